"""A group of one process: the reduction is the identity."""

from __future__ import annotations

import torch

from syncbn.comm.base import Communicator


class LocalCommunicator(Communicator):
    """The group made of this process alone (no torch.distributed, no MPI).

    With it, :class:`syncbn.SyncBatchNorm` behaves exactly like ``nn.BatchNorm``.
    """

    name = "local"

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        return None
