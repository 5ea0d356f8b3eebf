"""The per-device work of SyncBatchNorm: one implementation per device type, chosen by a table.

=========  ==========================================================  ======================
name       what                                                        default on
=========  ==========================================================  ======================
``cpu``    :class:`~syncbn.ops.cpu.CPUOps`: tuned PyTorch passes,      CPU tensors
           per-channel arithmetic in NumPy
``torch``  :class:`~syncbn.ops.generic.GenericOps`: plain torch        every other device;
           operations, any device, no host synchronisation             CUDA without CuPy
``cupy``   :class:`~syncbn.ops.cuda.CupyOps`: syncbn's CUDA kernels    CUDA tensors, CuPy
           (``syncbn/kernels/*.cu``) launched through CuPy             installed
=========  ==========================================================  ======================

``SYNCBN_OPS`` (read by :mod:`syncbn.settings`) or :func:`set_ops` overrides
the table: ``torch`` runs the generic implementation on every device, CPU
included (the test suite runs its oracle matrix both ways); ``cupy`` runs
the kernels on CUDA tensors, and raises ``ModuleNotFoundError`` naming the
extra when CuPy is missing.

On CUDA tensors without CuPy the layers run the generic implementation and
say so once, naming the extra that installs CuPy. The CUDA kernels are
compile-checked for sm_80, sm_90 and sm_100, and syncbn's tests run them on
the CPU in an emulator of CUDA's execution model, but they have not yet run
on a GPU in this version: their first use says so once too (``SYNCBN_OPS=torch`` keeps
the generic implementation). The interface every implementation follows is
:class:`~syncbn.ops.base.Ops`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator

from syncbn import settings
from syncbn._install import install_command
from syncbn.ops.base import Ops, Summary, compute_dtype
from syncbn.ops.cpu import CPUOps
from syncbn.ops.generic import GenericOps

__all__ = ["Ops", "Summary", "compute_dtype", "cupy_installed", "for_device", "get_ops", "name_for", "set_ops", "using"]


def _cupy_ops() -> Ops:
    from syncbn.ops.cuda import CupyOps

    return CupyOps()


#: Implementations by name (what ``SYNCBN_OPS`` and :func:`set_ops` take); each is made once.
IMPLEMENTATIONS: dict[str, Callable[[], Ops]] = {"cpu": CPUOps, "torch": GenericOps, "cupy": _cupy_ops}
#: The default implementation per device type; a device type not listed gets ``torch``.
DEFAULTS: dict[str, str] = {"cpu": "cpu"}

_choice: str | None = None  # None: not read yet
_resolved: dict[str, Ops] = {}  # device type -> implementation, for the current choice
_made: dict[str, Ops] = {}


def _make(name: str) -> Ops:
    ops = _made.get(name)
    if ops is None:
        ops = _made[name] = IMPLEMENTATIONS[name]()
    return ops


def cupy_installed() -> bool:
    """Whether CuPy can be imported (looked up, not imported)."""
    return importlib.util.find_spec("cupy") is not None


def name_for(device_type: str, choice: str | None = None) -> str:
    """The name of the implementation tensors on ``device_type`` get under ``choice`` (default: the current one)."""
    choice = get_ops() if choice is None else choice
    if choice == "torch":
        return "torch"
    if device_type == "cuda" and (choice == "cupy" or cupy_installed()):
        return "cupy"
    return DEFAULTS.get(device_type, "torch")


_said: set[str] = set()


def _once(what: str) -> bool:
    """True the first time ``what`` is asked about in this process: each warning is given once."""
    first = what not in _said
    _said.add(what)
    return first


def _resolve(device_type: str, choice: str) -> Ops:
    name = name_for(device_type, choice)
    if device_type == "cuda" and name == "torch" and choice == "auto" and _once("no cupy"):
        warnings.warn(
            "syncbn: CuPy is not installed, so CUDA tensors use the generic torch implementation of "
            "SyncBatchNorm (exact, with more passes over the data than syncbn's kernels); install CuPy with "
            f"`{install_command('cuda13')}` (CUDA 13) or `{install_command('cuda12')}` (CUDA 12)",
            stacklevel=4,
        )
    implementation = _make(name)  # first: a missing CuPy raises before any warning
    if name == "cupy" and _once("kernels"):
        warnings.warn(
            "syncbn: SyncBatchNorm's CUDA kernels have not yet been run on a GPU in this version (they are "
            "compile-checked, and tested on the CPU in an emulator of CUDA's execution model); "
            f"{settings.OPS}=torch selects the generic torch implementation instead",
            stacklevel=4,
        )
    return implementation


def for_device(device_type: str) -> Ops:
    """The implementation for tensors on ``device_type`` (``"cpu"``, ``"cuda"``, ...) under the current choice.

    Raises:
        ValueError: when ``SYNCBN_OPS`` holds an unknown value.
        ModuleNotFoundError: ``cupy`` chosen and CuPy missing (naming the extra that installs it).
    """
    ops = _resolved.get(device_type)
    if ops is None:
        ops = _resolved[device_type] = _resolve(device_type, get_ops())
    return ops


def get_ops() -> str:
    """The current choice: what :func:`set_ops` set, else ``SYNCBN_OPS`` (``auto`` when unset)."""
    global _choice
    if _choice is None:
        _choice = settings.ops()
    return _choice


def set_ops(name: str | None) -> None:
    """Choose the implementation for the layers of this process: ``auto``, ``torch`` or ``cupy``.

    ``None`` goes back to ``SYNCBN_OPS``.

    Raises:
        ValueError: for another name.
    """
    global _choice
    if name is not None and name not in settings.OPS_CHOICES:
        raise ValueError(f"expected one of {', '.join(settings.OPS_CHOICES)} (or None), got {name!r}")
    _choice = name
    _resolved.clear()


@contextlib.contextmanager
def using(name: str | None) -> Iterator[None]:
    """Within the block, the layers use implementation ``name`` (see :func:`set_ops`)."""
    previous = _choice
    set_ops(name)
    try:
        yield
    finally:
        set_ops(previous)
