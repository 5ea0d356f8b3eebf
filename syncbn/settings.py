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

#: The values ``SYNCBN_OPS`` takes.
OPS_CHOICES = ("auto", "torch", "cupy")
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
