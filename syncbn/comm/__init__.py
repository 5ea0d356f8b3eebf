"""Communication backends and the rule that picks one for a ``process_group``."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from syncbn.comm.base import Communicator
from syncbn.comm.local import LocalCommunicator
from syncbn.comm.mpi import MPICommunicator, is_mpi_communicator

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "get_communicator",
    "get_default_process_group",
    "set_default_process_group",
]

_LOCAL = LocalCommunicator()
# What ``process_group=None`` means when set (by init_distributed); None: torch.distributed's default group.
_DEFAULT_PROCESS_GROUP: Any = None


def set_default_process_group(process_group: Any) -> None:
    """Make ``process_group`` what ``SyncBatchNorm(process_group=None)`` synchronises over.

    :func:`syncbn.init_distributed` calls it with ``MPI.COMM_WORLD`` for the
    MPI backend. ``None`` restores the rule: torch.distributed's default
    group when it is initialised, otherwise this process alone.
    """
    global _DEFAULT_PROCESS_GROUP
    if process_group is not None:
        get_communicator(process_group)  # refuse what cannot be a group now, not at the first forward
    _DEFAULT_PROCESS_GROUP = process_group


def get_default_process_group() -> Any:
    """What :func:`set_default_process_group` set, or None."""
    return _DEFAULT_PROCESS_GROUP


def get_communicator(process_group: Any = None) -> Communicator:
    """Return the :class:`Communicator` for a ``process_group`` argument.

    Args:
        process_group: ``None`` (the group :func:`set_default_process_group`
            set; else the torch.distributed default group when it is
            initialised; else this process alone), a ``torch.distributed``
            ProcessGroup, an mpi4py communicator, or a :class:`Communicator`.

    Raises:
        TypeError: for any other kind of object.
    """
    if process_group is None and _DEFAULT_PROCESS_GROUP is not None:
        process_group = _DEFAULT_PROCESS_GROUP
    if isinstance(process_group, Communicator):
        return process_group
    key = process_group
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return _LOCAL
        key = dist.group.WORLD  # a new object each time torch.distributed is initialised anew
    # Layers ask on every training call: building a communicator queries the
    # backend, so each group's is made once and kept.
    cached = _CACHE.get(id(key))
    if cached is not None and cached[0] is key:
        return cached[1]
    communicator = _make_communicator(process_group)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[id(key)] = (key, communicator)
    return communicator


_CACHE_SIZE = 64
_CACHE: dict[int, tuple[Any, Communicator]] = {}


def _make_communicator(process_group: Any) -> Communicator:
    from syncbn.comm.torch_dist import TorchDistributedCommunicator

    if process_group is None:
        return TorchDistributedCommunicator(None)
    if is_mpi_communicator(process_group):
        return MPICommunicator(process_group)
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return TorchDistributedCommunicator(process_group)
    raise TypeError(
        "process_group must be None, a torch.distributed ProcessGroup or an mpi4py communicator, "
        f"got {type(process_group).__name__}"
    )
