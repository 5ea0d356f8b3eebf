"""Subgroups of consecutive ranks: synchronise BatchNorm over a few ranks (a node) rather than all of them.

Synchronising over the whole job is not always best: on machines of 8 GPUs
joined by NVLink, statistics over the 8 GPUs of a node cost one intra-node
all-reduce per layer and already hold 8 times a rank's batch, while an
all-reduce over every node crosses the network twice per layer. apex's
``create_syncbn_process_group`` and torch's ``new_subgroups`` give such
groups; :func:`new_groups` does it for torch.distributed and mpi4py alike.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from syncbn.comm import get_default_process_group, is_torch_process_group
from syncbn.comm.mpi import is_mpi_communicator


def new_groups(group_size: int, process_group: Any = None) -> Any:
    """This rank's subgroup of ``group_size`` consecutive ranks of ``process_group``.

    The ranks ``0 .. group_size - 1`` form the first subgroup, the next
    ``group_size`` the second, and so on. Every rank of ``process_group`` must
    call it, in the same order as its other group creations: for the default
    torch.distributed group every process creates every subgroup
    (``new_subgroups``), for a smaller one each creates its own
    (``new_group`` with local synchronisation), and mpi4py's ``Split`` is a
    collective of the communicator.

    Args:
        group_size: ranks per subgroup (8 for the GPUs of one NVLink node);
            it must divide the group's size.
        process_group: the group to divide: ``None`` (the default group: what
            :func:`syncbn.set_default_process_group` or
            :func:`syncbn.init_distributed` set, else torch.distributed's
            default group), a torch.distributed ProcessGroup or an mpi4py
            communicator.

    Returns:
        A torch.distributed ProcessGroup (from ``new_subgroups``) or an mpi4py
        communicator (from ``Split``), to give to
        :func:`syncbn.convert_sync_batchnorm` or the layers as
        ``process_group``. ``None`` for a process on its own with
        ``group_size`` 1 (a layer then synchronises with nothing).

    Raises:
        ValueError: if ``group_size`` is not positive or does not divide the
            group's size (raised on every rank, before any collective).

    Example::

        # torchrun --nnodes 4 --nproc-per-node 8 train.py
        ctx = syncbn.init_distributed()
        node = syncbn.new_groups(8)                  # the 8 ranks of this node
        model = syncbn.convert_sync_batchnorm(model, process_group=node)
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"new_groups: expected a positive group_size, got {group_size!r}")
    parent = get_default_process_group() if process_group is None else process_group
    if parent is None and dist.is_available() and dist.is_initialized():
        parent = dist.group.WORLD
    if parent is None:
        _check_divides(group_size, 1, "this process alone (nothing is initialised)")
        return None
    if is_mpi_communicator(parent):
        size, rank = parent.Get_size(), parent.Get_rank()
        _check_divides(group_size, size, "the mpi4py communicator")
        return parent.Split(color=rank // group_size, key=rank)
    if is_torch_process_group(parent):
        size = dist.get_world_size(parent)
        _check_divides(group_size, size, f"the torch.distributed group ({dist.get_backend(parent)})")
        if parent is dist.group.WORLD:
            subgroup, _ = dist.new_subgroups(group_size)  # type: ignore[no-untyped-call]
            return subgroup
        # A group of some ranks only: only they call this, so each makes its own subgroup with the ranks of it
        # alone (new_group's local synchronisation), from the parent's ranks that every member knows.
        ranks = dist.get_process_group_ranks(parent)
        first = dist.get_rank(parent) // group_size * group_size
        return dist.new_group(ranks[first : first + group_size], use_local_synchronization=True)
    raise TypeError(
        "new_groups: process_group must be None, a torch.distributed ProcessGroup or an mpi4py communicator, "
        f"got {type(parent).__name__}"
    )


def _check_divides(group_size: int, size: int, what: str) -> None:
    if size % group_size:
        raise ValueError(
            f"new_groups: group_size {group_size} does not divide the size of {what}, {size}; HINT: choose a "
            f"divisor of {size} (the GPUs of one node, usually), or launch a multiple of {group_size} ranks"
        )
