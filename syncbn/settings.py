"""syncbn's own environment variables, read here and nowhere else.

=========================  =====================================================================
``SYNCBN_DEBUG``           ``1`` (or ``true``, ``yes``, ``on``): debug checks before every
                           collective (see :mod:`syncbn.debug`); read at import.
``SYNCBN_OPS``             which implementation of the per-device work the layers use:
                           ``auto`` (the default: the tuned one for the tensors' device),
                           ``torch`` (the device-generic one, everywhere) or ``cupy`` (the CuPy
                           kernels on CUDA tensors, an error when CuPy is missing); read at the
                           first training call, or set with :func:`syncbn.ops.set_ops`.
``SYNCBN_MPI_CUDA_AWARE``  ``1`` or ``0``: whether the MPI library takes CUDA buffers, instead of
                           asking it (``MPIX_Query_cuda_support``); without it, or when the
                           library cannot tell, CUDA tensors are staged through host memory.
``SYNCBN_EXTENSION``       the compiled CPU path (:mod:`syncbn._extension`): ``auto`` (the default:
                           built on first use, and the Python implementation when it cannot be,
                           with one warning), ``off`` (never) or ``on`` (an error when it cannot
                           be built); read at the first training call on a CPU tensor.
``SYNCBN_CACHE_DIR``       where the compiled CPU path is built and kept (default
                           ``$XDG_CACHE_HOME/syncbn``, else ``~/.cache/syncbn``).
=========================  =====================================================================

Each function takes the mapping to read (``os.environ`` by default), as the
launcher environments do, so that tests give a plain dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEBUG = "SYNCBN_DEBUG"
OPS = "SYNCBN_OPS"
MPI_CUDA_AWARE = "SYNCBN_MPI_CUDA_AWARE"
EXTENSION = "SYNCBN_EXTENSION"
CACHE_DIR = "SYNCBN_CACHE_DIR"

#: The values ``SYNCBN_OPS`` takes.
OPS_CHOICES = ("auto", "torch", "cupy")
#: The values ``SYNCBN_EXTENSION`` takes.
EXTENSION_CHOICES = ("auto", "off", "on")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _read(environ: Mapping[str, str] | None, name: str) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip().lower()


def _flag(environ: Mapping[str, str] | None, name: str, default: bool | None) -> bool | None:
    value = _read(environ, name)
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a yes or no; HINT: set {name}=1 or {name}=0, or unset it")


def debug(environ: Mapping[str, str] | None = None) -> bool:
    """``SYNCBN_DEBUG``: whether debug mode is on by default (off when unset, ``0``, ``false``, ``no``, ``off``)."""
    return _read(environ, DEBUG) not in _FALSE


def ops(environ: Mapping[str, str] | None = None) -> str:
    """``SYNCBN_OPS``: one of :data:`OPS_CHOICES` (``auto`` when unset).

    Raises:
        ValueError: for any other value, naming the variable and its values.
    """
    value = _read(environ, OPS) or "auto"
    if value not in OPS_CHOICES:
        raise ValueError(
            f"{OPS}={value!r} is not an implementation of syncbn's per-device work; "
            f"HINT: set {OPS} to one of {', '.join(OPS_CHOICES)}, or unset it (auto)"
        )
    return value


def mpi_cuda_aware(environ: Mapping[str, str] | None = None) -> bool | None:
    """``SYNCBN_MPI_CUDA_AWARE``: True or False when set, None (ask the library) when unset."""
    return _flag(environ, MPI_CUDA_AWARE, None)


def extension(environ: Mapping[str, str] | None = None) -> str:
    """``SYNCBN_EXTENSION``: one of :data:`EXTENSION_CHOICES` (``auto`` when unset; ``0``/``1`` also read).

    Raises:
        ValueError: for any other value, naming the variable and its values.
    """
    value = _read(environ, EXTENSION) or "auto"
    value = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on"}.get(value, value)
    if value not in EXTENSION_CHOICES:
        raise ValueError(
            f"{EXTENSION}={value!r} is not a choice for syncbn's compiled CPU path; "
            f"HINT: set {EXTENSION} to one of {', '.join(EXTENSION_CHOICES)}, or unset it (auto)"
        )
    return value


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """``SYNCBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/syncbn``, else ``~/.cache/syncbn`` (not created here)."""
    env = os.environ if environ is None else environ
    explicit = env.get(CACHE_DIR, "").strip()
    if explicit:
        return os.path.expanduser(explicit)
    base = env.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "syncbn")
