"""torch.distributed process groups (gloo, NCCL, MPI, subgroups)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from syncbn.comm.base import Communicator
from syncbn.faults import torch_collective_error


class TorchDistributedCommunicator(Communicator):
    """A ``torch.distributed`` ProcessGroup; ``group=None`` is the default (world) group.

    A failed reduction (a rank died, the group's timeout passed) raises
    :class:`~syncbn.faults.CollectiveError` with what is known of the cause.

    Raises:
        RuntimeError: if torch.distributed is not initialised.
        ValueError: if this process is not a member of ``group``.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "a torch.distributed process group was given but torch.distributed is not initialised; "
                "HINT: call torch.distributed.init_process_group() first"
            )
        self.group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        if self._rank < 0:
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                "given to SyncBatchNorm; HINT: only ranks that belong to a group may run layers that use it"
            )
        self.name = dist.get_backend(group)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor: torch.Tensor) -> None:
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as error:  # gloo and NCCL errors (DistBackendError...) are RuntimeErrors
            raise torch_collective_error(error, self._rank, self._world_size, self.name) from error
