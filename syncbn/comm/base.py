"""The one thing SyncBatchNorm needs from a communication backend."""

from __future__ import annotations

import abc

import torch


class Communicator(abc.ABC):
    """A group of processes that can sum one tensor across its members.

    SyncBatchNorm needs exactly one collective per direction: an in-place
    sum of a small, contiguous, per-channel buffer. Every backend (a local
    process, ``torch.distributed``, mpi4py) implements this interface in a
    file of its own.
    """

    #: Short backend name, for messages and reports (``"local"``, ``"gloo"``, ``"mpi"``...).
    name: str = "abstract"

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """Number of processes in the group."""

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's rank within the group."""

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group, in place, on every member.

        ``tensor`` is contiguous and of dtype float32 or float64. Every
        member must call this the same number of times with tensors of the
        same shape and dtype.
        """

    def buffer_device(self, device: torch.device) -> torch.device:
        """Where a buffer on ``device`` must be for :meth:`all_reduce` (``device`` itself here).

        For the tools that build a buffer from whatever the model holds (nothing at
        all on a rank without BatchNorm layers or parameters): a backend that reduces
        CUDA tensors only says which GPU, so that such a rank still joins the
        collective instead of failing alone and leaving the others waiting.
        """
        return device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, rank={self.rank}, world_size={self.world_size})"
