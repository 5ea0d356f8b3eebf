"""A direct NCCL communicator on ``cupy.cuda.nccl``, for jobs that do not use torch.distributed.

A job started by ``mpiexec`` or ``srun`` with one GPU per rank can synchronise
its SyncBatchNorm layers over NCCL without a torch.distributed process group::

    from mpi4py import MPI
    import syncbn
    from syncbn.comm.nccl import NCCLCommunicator

    torch.cuda.set_device(local_rank)
    group = NCCLCommunicator(MPI.COMM_WORLD)              # collective: every rank of the communicator
    model = syncbn.convert_sync_batchnorm(model, process_group=group)

NCCL's unique id is made on rank 0 and broadcast over mpi4py, as ChainerMN
does; one NCCL communicator is made per mpi4py communicator (``Split`` gives
subgroups). Reductions run on PyTorch's current stream, without a host
synchronisation, so a rank that stopped answering cannot make the call itself
fail: a watchdog thread follows every reduction with a CUDA event and, past
``timeout`` seconds, aborts the NCCL communicator (which ends the stuck
kernel) and makes the next reduction raise
:class:`~syncbn.faults.CollectiveTimeoutError`, as the other backends do.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import torch

from syncbn._install import install_command
from syncbn.comm.base import Communicator
from syncbn.comm.mpi import import_mpi, is_mpi_communicator
from syncbn.faults import CollectiveError, CollectiveTimeoutError

#: How long a reduction may stay unfinished before the communicator is aborted (seconds).
DEFAULT_TIMEOUT = 300.0
_POLL = 1e-3


def import_nccl() -> Any:
    """``cupy.cuda.nccl``, or a ModuleNotFoundError that names the extra to install."""
    try:
        from cupy.cuda import nccl
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the direct NCCL communicator needs CuPy with NCCL; install it with "
            f"`{install_command('cuda13')}` (CUDA 13) or `{install_command('cuda12')}` (CUDA 12)"
        ) from error
    if not getattr(nccl, "available", True):
        raise ModuleNotFoundError("CuPy was built without NCCL: install NCCL (e.g. `pip install nvidia-nccl-cu13`)")
    return nccl


def nccl_dtype(nccl: Any, dtype: torch.dtype) -> int:
    """NCCL's code for the payload dtypes SyncBatchNorm reduces."""
    codes = {torch.float32: nccl.NCCL_FLOAT32, torch.float64: nccl.NCCL_FLOAT64}
    if dtype not in codes:
        raise TypeError(f"the NCCL communicator reduces float32 and float64 tensors, got {dtype}")
    return int(codes[dtype])


class NCCLCommunicator(Communicator):
    """NCCL over the ranks of an mpi4py communicator, one GPU per rank (collective to build).

    Args:
        comm: the mpi4py communicator whose ranks form the group (``MPI.COMM_WORLD``, or one from ``Split``).
        device: this rank's GPU (default: the current CUDA device).
        timeout: seconds a reduction may take before the communicator is aborted; None: no watchdog.
    """

    name = "nccl"

    def __init__(self, comm: Any, device: torch.device | int | None = None, timeout: float | None = DEFAULT_TIMEOUT):
        self._mpi = import_mpi()
        if not is_mpi_communicator(comm):
            raise TypeError(f"expected an mpi4py communicator, got {type(comm).__name__}")
        nccl = import_nccl()
        import cupy

        self._nccl = nccl
        self._rank, self._world_size = comm.Get_rank(), comm.Get_size()
        if device is None:
            index = torch.cuda.current_device()
        else:
            index = device if isinstance(device, int) else (device.index or 0)
        self.device = torch.device("cuda", index)
        unique_id = nccl.get_unique_id() if self._rank == 0 else None
        unique_id = comm.bcast(unique_id, root=0)
        with cupy.cuda.Device(index):
            self._comm = nccl.NcclCommunicator(self._world_size, unique_id, self._rank)
        self.timeout = timeout
        self._error: str | None = None
        self._pending: collections.deque[tuple[torch.cuda.Event, float]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None
        if timeout is not None:
            self._watchdog = threading.Thread(target=self._watch, name="syncbn-nccl-watchdog", daemon=True)
            self._watchdog.start()

    @property
    def world_size(self) -> int:
        return int(self._world_size)

    @property
    def rank(self) -> int:
        return int(self._rank)

    def buffer_device(self, device: torch.device) -> torch.device:
        """This communicator's GPU, whatever ``device``."""
        return self.device

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.check()
        if tensor.device != self.device:
            raise ValueError(f"the NCCL communicator of {self.device} got a tensor on {tensor.device}")
        stream = torch.cuda.current_stream(self.device)
        self._comm.allReduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_dtype(self._nccl, tensor.dtype),
            self._nccl.NCCL_SUM, stream.cuda_stream,
        )  # fmt: skip
        if self._watchdog is not None and not torch.cuda.is_current_stream_capturing():
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
            with self._lock:
                self._pending.append((done, time.monotonic() + float(self.timeout or 0.0)))

    def check(self) -> None:
        """Raise what the watchdog found: a reduction past the timeout (the communicator is then aborted)."""
        if self._error is not None:
            raise CollectiveTimeoutError(self._error)
        if self._comm is None:
            raise CollectiveError(f"rank {self._rank} of {self._world_size} (nccl): the communicator was closed")

    def _watch(self) -> None:
        while not self._closed.wait(_POLL):
            with self._lock:
                if not self._pending:
                    continue
                done, deadline = self._pending[0]
            if done.query():  # type: ignore[no-untyped-call]
                with self._lock:
                    self._pending.popleft()
            elif time.monotonic() > deadline:
                self._error = (
                    f"rank {self._rank} of {self._world_size} (nccl): a reduction did not finish within "
                    f"{self.timeout:g} s: a rank is stuck, slower, or out of step (it skipped a layer, or called "
                    "them in another order: SYNCBN_DEBUG=1 checks that); the NCCL communicator was aborted"
                )
                self._comm.abort()
                return

    def close(self) -> None:
        """Stop the watchdog and destroy the NCCL communicator (after the work queued on it)."""
        self._closed.set()
        if self._watchdog is not None:
            self._watchdog.join()
        if self._comm is not None and self._error is None:
            torch.cuda.synchronize(self.device)
            self._comm.destroy()
        self._comm = None
