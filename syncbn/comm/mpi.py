"""mpi4py communicators: ``MPI.COMM_WORLD`` or any communicator made from it."""

from __future__ import annotations

from typing import Any

import torch

from syncbn.comm.base import Communicator


def is_mpi_communicator(obj: object) -> bool:
    """Whether ``obj`` is an mpi4py intracommunicator, without importing mpi4py."""
    module = type(obj).__module__ or ""
    return module.startswith("mpi4py") and hasattr(obj, "Allreduce") and hasattr(obj, "Get_size")


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, or a ModuleNotFoundError that names the extra to install."""
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the MPI backend needs mpi4py; install it with `pip install syncbn[mpi]` "
            "(and an MPI library, for example `pip install mpich`)"
        ) from error
    return MPI


class MPICommunicator(Communicator):
    """An mpi4py communicator; no torch.distributed is involved.

    CPU tensors are handed to MPI without a copy (they share memory with a
    NumPy view). Reductions are ``MPI_Allreduce`` with ``MPI_IN_PLACE``.
    """

    name = "mpi"

    def __init__(self, comm: Any) -> None:
        self._mpi = import_mpi()
        if not is_mpi_communicator(comm):
            raise TypeError(f"expected an mpi4py communicator, got {type(comm).__name__}")
        if comm == self._mpi.COMM_NULL:
            raise ValueError(
                "SyncBatchNorm got MPI.COMM_NULL: this process is not in the communicator; "
                "HINT: with Split, give the layer the communicator this rank's Split returned"
            )
        self.comm = comm
        self._rank: int = comm.Get_rank()
        self._world_size: int = comm.Get_size()

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            raise NotImplementedError("the MPI backend reduces CPU tensors only in this version")
        self.comm.Allreduce(self._mpi.IN_PLACE, tensor.numpy(), op=self._mpi.SUM)


def mpi_cuda_support() -> bool | None:
    """Whether the MPI library mpi4py loaded can take CUDA device buffers; None when it cannot tell.

    Asks the library itself: ``MPIX_Query_cuda_support()``, which MPICH (4.0
    and later) and Open MPI export. The library is found among this process's
    mappings (Linux), once mpi4py has loaded it.
    """
    import ctypes
    import re

    import_mpi()
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(set(re.findall(r"(/\S*/libmpi[^/\s]*\.so[^/\s]*)", maps.read())))
    except OSError:
        return None
    for path in paths:
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return None
