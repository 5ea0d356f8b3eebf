"""torch.distributed process groups (gloo, NCCL, MPI, subgroups)."""

from __future__ import annotations

import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from syncbn.comm.base import Communicator
from syncbn.faults import CollectiveError, torch_collective_error


class TorchDistributedCommunicator(Communicator):
    """A ``torch.distributed`` ProcessGroup (the default group, or one from ``new_group``).

    The group is held by a weak reference: syncbn never keeps a group alive
    after it is destroyed (PyTorch can abort at exit when one survives). A
    reduction on a group that was destroyed raises :class:`~syncbn.faults.CollectiveError`.

    A failed reduction (a rank died, the group's timeout passed) raises
    :class:`~syncbn.faults.CollectiveError` with what is known of the cause.

    Raises:
        RuntimeError: if torch.distributed is not initialised.
        ValueError: if this process is not a member of ``group``.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "a torch.distributed process group was given but torch.distributed is not initialised; "
                "HINT: call torch.distributed.init_process_group() first"
            )
        self._group = weakref.ref(group)
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        if self._rank < 0:
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                "given to SyncBatchNorm; HINT: only ranks that belong to a group may run layers that use it"
            )
        self.name = dist.get_backend(group)
        #: The group's own timeout (None when the backend does not say), for messages.
        self.timeout = group_timeout(group, self.name)

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group, or None once it has been destroyed and freed."""
        return self._group()

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def buffer_device(self, device: torch.device) -> torch.device:
        """NCCL reduces CUDA tensors only: a buffer elsewhere goes to the group's GPU (the ``device_id`` the
        group was bound to at ``init_process_group``, else the current CUDA device)."""
        if self.name == "nccl" and device.type != "cuda":
            group = self._group()
            bound = getattr(group, "bound_device_id", None) if group is not None else None
            return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())
        return device

    def all_reduce(self, tensor: torch.Tensor) -> None:
        group = self._group()
        if group is None:
            raise CollectiveError(
                f"rank {self._rank} of {self._world_size} ({self.name}): the process group was destroyed; "
                "HINT: run SyncBatchNorm in training only between init_distributed() (or init_process_group) "
                "and close() (or destroy_process_group)"
            )
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        except (RuntimeError, ValueError) as error:  # gloo and NCCL errors (DistBackendError...) are RuntimeErrors
            del group  # the traceback keeps this frame, which must not keep the group alive
            raise torch_collective_error(error, self._rank, self._world_size, self.name, self.timeout) from error


def group_timeout(group: dist.ProcessGroup, backend: str) -> timedelta | None:
    """The timeout ``group`` was created with (``new_group(timeout=...)``), from its backend's options."""
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    try:
        timeout = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError, TypeError):
        return None
    return timeout if isinstance(timeout, timedelta) else None
