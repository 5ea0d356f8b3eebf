"""Communication backends and the rule that picks one for a ``process_group``.

No object of syncbn keeps a torch.distributed process group alive: the cache
below is keyed weakly by the group, communicators hold a weak reference to
theirs, and so do layers and the default set here. A group that the user (or
:meth:`syncbn.DistributedContext.close`) destroys is freed at once, as PyTorch
needs: a gloo group still alive when the interpreter shuts down can abort the
process (``terminate called without an active exception``) after a run that
trained correctly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from syncbn.comm.base import Communicator
from syncbn.comm.local import LocalCommunicator
from syncbn.comm.mpi import MPICommunicator, is_mpi_communicator
from syncbn.faults import RankMismatchError

__all__ = [
    "LOCAL",
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "cache_size",
    "clear_cache",
    "get_communicator",
    "get_default_process_group",
    "reference",
    "set_default_process_group",
    "sum_if_agreed",
]

#: The group of this process alone: what ``process_group=None`` means without torch.distributed.
LOCAL = LocalCommunicator()

# What ``process_group=None`` means when set (by init_distributed), as a reference; None: the rule.
_default_reference: Callable[[], Any] | None = None


def is_torch_process_group(obj: object) -> bool:
    """Whether ``obj`` is a torch.distributed ProcessGroup (False on builds without distributed)."""
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


class _Held:
    """A strong reference that is called like a weak one (and pickles, unlike a lambda)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self) -> Any:
        return self.value


def reference(process_group: Any) -> Callable[[], Any]:
    """A callable that returns ``process_group``: weak for a torch.distributed group, strong otherwise.

    A torch.distributed group must be freed when it is destroyed, so syncbn
    refers to it weakly: the callable then returns None. mpi4py communicators
    (and ``None``) are held as they are; MPI frees them at finalisation.
    """
    if is_torch_process_group(process_group):
        return weakref.ref(process_group)
    return _Held(process_group)


def set_default_process_group(process_group: Any) -> None:
    """Make ``process_group`` what ``SyncBatchNorm(process_group=None)`` synchronises over.

    :func:`syncbn.init_distributed` calls it with ``MPI.COMM_WORLD`` for the
    MPI backend. ``None`` restores the rule: torch.distributed's default
    group when it is initialised, otherwise this process alone. A
    torch.distributed group is held weakly: once destroyed and freed, the rule
    applies again.
    """
    global _default_reference
    if process_group is not None:
        get_communicator(process_group)  # refuse what cannot be a group now, not at the first forward
        _default_reference = reference(process_group)
    else:
        _default_reference = None


def get_default_process_group() -> Any:
    """What :func:`set_default_process_group` set (None if nothing, or if that group was freed)."""
    return None if _default_reference is None else _default_reference()


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
    if process_group is None:
        process_group = get_default_process_group()
    if isinstance(process_group, Communicator):
        return process_group
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return LOCAL
        world = dist.group.WORLD  # a new object each time torch.distributed is initialised anew
        # Layers ask on every training call: building a communicator queries the
        # backend, so each group's is made once and kept, as long as the group lives.
        communicator = _TORCH_CACHE.get(world)
        if communicator is None:
            communicator = _TORCH_CACHE[world] = _make_communicator(world)
        return communicator
    if is_torch_process_group(process_group):
        communicator = _TORCH_CACHE.get(process_group)
        if communicator is None:
            communicator = _TORCH_CACHE[process_group] = _make_communicator(process_group)
        return communicator
    cached = _MPI_CACHE.get(id(process_group))
    if cached is not None and cached[0] is process_group:
        return cached[1]
    communicator = _make_communicator(process_group)
    if len(_MPI_CACHE) >= _MPI_CACHE_SIZE:
        _MPI_CACHE.clear()
    _MPI_CACHE[id(process_group)] = (process_group, communicator)
    return communicator


def sum_if_agreed(communicator: Communicator, counts: Sequence[int], body: torch.Tensor, mismatch: str) -> torch.Tensor:
    """``body`` summed over the group in float64, once every rank is known to have sent the same ``counts``.

    For a buffer whose layout follows the model (the tools of :mod:`syncbn.statistics`,
    :func:`syncbn.average_gradients`): each count crosses in the same all-reduce, in parts of 20 bits
    each followed by its square; summed, a part and its square are the group's size times this rank's
    only when every rank's are equal, and both stay exact in float64 at any count, as the layer's own
    payload head does. Otherwise every rank raises ``RankMismatchError(mismatch)`` (over MPI, which sums
    payloads of different lengths over their common part; gloo refuses them with its own error).
    """
    head = [value for count in counts for part in (count & 0xFFFFF, count >> 20) for value in (part, part * part)]
    device = communicator.buffer_device(body.device)  # an empty body may be on the CPU under NCCL
    payload = torch.cat((torch.tensor(head, dtype=torch.float64, device=device), body.to(device, torch.float64)))
    communicator.all_reduce(payload)
    if payload[: len(head)].tolist() != [communicator.world_size * value for value in head]:
        raise RankMismatchError(mismatch)
    return payload[len(head) :].to(body.device)


# torch.distributed groups -> their communicators, keyed weakly (the value holds a weak reference too).
_TORCH_CACHE: weakref.WeakKeyDictionary[Any, Communicator] = weakref.WeakKeyDictionary()
# mpi4py communicators, keyed by identity (the key is kept so that a reused id cannot alias), bounded.
_MPI_CACHE_SIZE = 64
_MPI_CACHE: dict[int, tuple[Any, Communicator]] = {}


def clear_cache() -> None:
    """Forget every communicator made so far (:meth:`syncbn.DistributedContext.close` calls it)."""
    _TORCH_CACHE.clear()
    _MPI_CACHE.clear()


def cache_size() -> int:
    """How many communicators are cached (for leak checks)."""
    return len(_TORCH_CACHE) + len(_MPI_CACHE)


def _make_communicator(process_group: Any) -> Communicator:
    from syncbn.comm.torch_dist import TorchDistributedCommunicator

    if is_mpi_communicator(process_group):
        return MPICommunicator(process_group)
    if is_torch_process_group(process_group):
        return TorchDistributedCommunicator(process_group)
    raise TypeError(
        "process_group must be None, a torch.distributed ProcessGroup or an mpi4py communicator, "
        f"got {type(process_group).__name__}"
    )
