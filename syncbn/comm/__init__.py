"""Communication backends and the rule that picks one for a ``process_group``."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from syncbn.comm.base import Communicator
from syncbn.comm.local import LocalCommunicator
from syncbn.comm.mpi import MPICommunicator, is_mpi_communicator

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "get_communicator"]

_LOCAL = LocalCommunicator()


def get_communicator(process_group: Any = None) -> Communicator:
    """Return the :class:`Communicator` for a ``process_group`` argument.

    Args:
        process_group: ``None`` (the torch.distributed default group when it is
            initialised, otherwise this process alone), a ``torch.distributed``
            ProcessGroup, an mpi4py communicator, or a :class:`Communicator`.

    Raises:
        TypeError: for any other kind of object.
    """
    if isinstance(process_group, Communicator):
        return process_group
    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            from syncbn.comm.torch_dist import TorchDistributedCommunicator

            return TorchDistributedCommunicator(None)
        return _LOCAL
    if is_mpi_communicator(process_group):
        return MPICommunicator(process_group)
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        from syncbn.comm.torch_dist import TorchDistributedCommunicator

        return TorchDistributedCommunicator(process_group)
    raise TypeError(
        "process_group must be None, a torch.distributed ProcessGroup or an mpi4py communicator, "
        f"got {type(process_group).__name__}"
    )
