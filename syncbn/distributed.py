"""``init_distributed``: start communication the way the launcher intended, in one call.

>>> ctx = syncbn.init_distributed()            # doctest: +SKIP
>>> model = syncbn.convert_sync_batchnorm(model).to(ctx.device)   # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import socket
import sys
import time
import weakref
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from syncbn import comm, faults
from syncbn._install import install_command
from syncbn.comm import mpi as comm_mpi
from syncbn.comm.mpi import import_mpi
from syncbn.environments import (
    ClusterEnvironment,
    LaunchError,
    SingleProcessEnvironment,
    TorchElasticEnvironment,
    detect_environment,
)

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

#: How long a rank waits for the others, at start-up and in each collective, before failing.
DEFAULT_TIMEOUT = timedelta(minutes=5)
BACKENDS = ("auto", "nccl", "gloo", "mpi")


class DistributedContext:
    """What :func:`init_distributed` set up; ``close()`` it (or use it in a ``with``) when training ends.

    Attributes:
        rank: this process's rank in the job.
        world_size: number of processes in the job.
        local_rank: this process's rank on its node.
        device: ``cuda:<index>`` chosen from the local rank when CUDA is available, else ``cpu``.
        backend: ``"nccl"``, ``"gloo"`` or ``"mpi"``.
        launcher: the launcher detected (``"torchrun"``, ``"slurm"``, ``"mpiexec (MPICH/Hydra)"``...).

    A process group that :func:`init_distributed` created is destroyed by
    :meth:`close`, or, if the program ends without calling it, when the
    interpreter exits (before it shuts down: a gloo group still alive at
    shutdown can make PyTorch abort a process that trained correctly). The
    context holds the group only by a weak reference.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        backend: str,
        launcher: str,
        process_group: Any,
        *,
        owns_process_group: bool = False,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.backend = backend
        self.launcher = launcher
        self._group = comm.reference(process_group)
        self._owns_process_group = owns_process_group
        self._previous_excepthook: Any = None
        self._closed = False
        if owns_process_group:
            _watch_at_exit(self, process_group)

    @property
    def process_group(self) -> Any:
        """What to give ``SyncBatchNorm(process_group=...)``: the torch.distributed default group, or
        ``MPI.COMM_WORLD`` for ``"mpi"`` (also what ``process_group=None`` means meanwhile); None after
        :meth:`close`."""
        return None if self._closed else self._group()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that should print, log and save."""
        return self.rank == 0

    def close(self) -> None:
        """Undo :func:`init_distributed`: destroy the process group it created, forget the default group
        and syncbn's communicators, restore ``sys.excepthook``. Calling it again does nothing.

        The other ranks are told that this one is leaving, so that a rank still
        waiting for it in a collective names it instead of reporting a lost
        connection.
        """
        self._shut_down("closed its process group")

    def _close_at_exit(self) -> None:
        """At interpreter exit without :meth:`close`: the same; the others learn why this rank ended.

        After an uncaught exception (printed, so in ``sys.last_value``) it is
        recorded as this rank's failure, unless it is the echo of another
        rank's (a :class:`~syncbn.faults.CollectiveError`); otherwise the
        program simply ended, and the others are told this rank left.
        """
        uncaught = getattr(sys, "last_value", None)
        if isinstance(uncaught, BaseException):
            if not isinstance(uncaught, faults.CollectiveError):
                summary = f"{type(uncaught).__name__}: {uncaught}".splitlines()[0]
                store = faults._default_store() if self.world_size > 1 else None
                if store is not None:
                    faults.record_failure(store, self.rank, summary)
            self._shut_down(None)
        else:
            self._shut_down("ended its program")

    def _shut_down(self, how: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN_CONTEXTS.discard(self)
        if self._previous_excepthook is not None:
            sys.excepthook = self._previous_excepthook
            self._previous_excepthook = None
        group = self._group()
        if group is not None and comm.get_default_process_group() is group:
            comm.set_default_process_group(None)
        if self._owns_process_group and group is not None and dist.is_initialized() and dist.group.WORLD is group:
            store = faults._default_store() if self.world_size > 1 and how is not None else None
            if store is not None and how is not None:
                faults.record_departure(store, self.rank, how)
            del group, store
            destroy_process_group()
        comm.clear_cache()
        faults.forget_processes()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DistributedContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"device={self.device!r}, backend={self.backend!r}, launcher={self.launcher!r}"
            f"{', closed' if self._closed else ''})"
        )


def destroy_process_group(group: Any = None) -> None:
    """``torch.distributed.destroy_process_group(group)``, once the group's worker threads are idle.

    A gloo group's destructor joins its worker threads while holding the GIL.
    A worker may still be releasing the last collective's work, and when the
    program has already dropped that work's tensors, releasing them needs the
    GIL: the destructor then waits for the worker, and the worker for the GIL,
    forever (or, during interpreter shutdown, the worker is ended and the
    process aborts). Waiting until the workers are idle first (Linux: they
    sleep, and have not woken during a pause in which the GIL was free) closes
    that window. :meth:`DistributedContext.close` calls this.
    """
    _wait_for_idle_workers()
    dist.destroy_process_group(group)


_WORKER_THREAD_NAMES = ("pt_gloo_runloop",)
_IDLE_PAUSE = 0.005
_IDLE_WAIT = 2.0


def _worker_states() -> dict[str, tuple[str, int]]:
    """Per worker thread of a torch.distributed backend in this process: its state and context switches."""
    states: dict[str, tuple[str, int]] = {}
    tasks = Path("/proc/self/task")
    with contextlib.suppress(OSError):
        for task in tasks.iterdir():
            try:
                if (task / "comm").read_text().strip() not in _WORKER_THREAD_NAMES:
                    continue
                state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                switches = sum(
                    int(line.split()[1])
                    for line in (task / "status").read_text().splitlines()
                    if "ctxt_switches" in line
                )
            except (OSError, IndexError, ValueError):
                continue
            states[task.name] = (state, switches)
    return states


def _wait_for_idle_workers(timeout: float = _IDLE_WAIT) -> bool:
    """Wait (at most ``timeout`` s) until the backend's worker threads sleep and did not wake during a pause.

    Each pause releases the GIL, so a worker waiting for it runs then (and is
    seen to have woken). Returns whether they were seen idle (True too when
    there are none, or on systems without ``/proc``).
    """
    deadline = time.monotonic() + timeout
    before = _worker_states()
    while before:
        time.sleep(_IDLE_PAUSE)
        after = _worker_states()
        if after == before and all(state == "S" for state, _ in after.values()):
            return True
        if time.monotonic() >= deadline:
            return False
        before = after
    return True


# Contexts whose group init_distributed created and that are not closed yet (held strongly: a context
# dropped without close() must still be closed at exit), and weak references to every group created.
_OPEN_CONTEXTS: set[DistributedContext] = set()
_CREATED_GROUPS: list[weakref.ref[Any]] = []


def _watch_at_exit(context: DistributedContext, group: Any) -> None:
    if not _CREATED_GROUPS:
        atexit.register(_at_exit)
    _OPEN_CONTEXTS.add(context)
    _CREATED_GROUPS.append(weakref.ref(group))


def _at_exit() -> None:
    """Before the interpreter shuts down: close what is open, then make sure the groups are freed.

    A gloo group freed during interpreter shutdown can abort the process: its
    worker threads, releasing the tensors of the last collective, need the
    GIL, which a shutting-down interpreter no longer gives. So the groups must
    go now: close the contexts left open, collect garbage (a model in a
    reference cycle may hold one), and say so when one is still referenced.
    """
    for context in list(_OPEN_CONTEXTS):
        try:
            context._close_at_exit()
        except Exception as error:  # never let exit fail because of this
            sys.stderr.write(f"syncbn: rank {context.rank}: closing the process group at exit failed: {error!r}\n")
    # The traceback of an uncaught exception, kept for post-mortem debugging, holds its frames and their locals.
    for name in ("last_traceback", "last_value", "last_exc"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    gc.collect()
    if any(group() is not None for group in _CREATED_GROUPS):
        sys.stderr.write(
            "syncbn: a torch.distributed process group is still referenced at exit (by an object alive until the "
            "end, such as a DistributedDataParallel model in a global variable); PyTorch may abort while the "
            "interpreter shuts down ('terminate called without an active exception'). HINT: delete such objects "
            "before the program ends, or keep them in a function that returns first\n"
        )


def init_distributed(
    backend: str = "auto",
    timeout: timedelta | float = DEFAULT_TIMEOUT,
    *,
    abort_on_exception: bool = False,
    environ: Mapping[str, str] | None = None,
) -> DistributedContext:
    """Detect how this process was started, choose its device and initialise communication.

    Launchers understood: ``torchrun`` (single- or multi-node, c10d
    rendezvous), Slurm's ``srun`` (one task per GPU: the rendezvous host is
    the first of ``SLURM_NODELIST``, the port derived from the job id unless
    ``MASTER_PORT`` is set), MPICH/Hydra's ``mpiexec`` and Open MPI's
    ``mpirun`` (also ``srun --mpi=pmi2``), and a plain ``python train.py``
    (a world of one). See :mod:`syncbn.environments`.

    The CUDA device is ``cuda:<local rank>`` (``cuda:0`` when the launcher
    gives each process one visible GPU) and is made current. The group set up
    becomes the default of ``SyncBatchNorm(process_group=None)``.

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"nccl"``,
            ``"gloo"``, or ``"mpi"`` (the mpi4py ``COMM_WORLD``, without
            torch.distributed; start the job with ``mpiexec`` or ``srun --mpi=pmi2``).
        timeout: how long to wait for the other ranks at the rendezvous and in
            each collective (a ``timedelta`` or seconds): torch.distributed's
            group timeout, or :func:`syncbn.comm.mpi.set_timeout` for ``"mpi"``.
            A rank that dies or stops answering makes the others raise
            :class:`syncbn.faults.CollectiveError` within it.
        abort_on_exception: install :func:`syncbn.faults.install_excepthook`:
            an uncaught exception on one rank aborts ``MPI.COMM_WORLD``
            (``"mpi"``; the launcher then ends every rank at once), or is
            recorded in the rendezvous store so that the others, which fail
            as soon as this process exits, name this rank and its exception.
            ``close()`` restores the previous hook. Default: False.
        environ: the environment to read (default ``os.environ``).

    Returns:
        A :class:`DistributedContext`; ``close()`` it (or use it in a ``with``)
        to destroy the process group it created.

    Raises:
        LaunchError: the launch is inconsistent (the message gives the fix).
        ValueError: an unknown backend, or NCCL without CUDA.
        ModuleNotFoundError: ``backend="mpi"`` without mpi4py.

    Example::

        # torchrun --nproc-per-node 4 train.py | srun python train.py | mpiexec -n 4 python train.py
        import syncbn

        ctx = syncbn.init_distributed()
        model = syncbn.convert_sync_batchnorm(model).to(ctx.device)
        model = torch.nn.parallel.DistributedDataParallel(model)  # not with backend="mpi"
    """
    backend = _resolve_backend(backend)
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    environment = detect_environment(environ)
    if backend == "mpi":
        comm_mpi.set_timeout(timeout)
        context = _init_mpi(environment)
    else:
        context = _init_torch_distributed(environment, backend, timeout)
    if abort_on_exception:
        context._previous_excepthook = faults.install_excepthook(context.backend, context.rank, context.world_size)
    return context


def _resolve_backend(backend: str) -> str:
    name = backend.lower() if isinstance(backend, str) else backend
    if name not in BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "init_distributed: backend='nccl' needs CUDA, which this process does not have; "
            "HINT: use backend='auto' (gloo on CPU) or 'gloo'"
        )
    return str(name)


def _select_device(local_rank: int) -> torch.device:
    """``cuda:<local rank>``, or ``cuda:0`` when only one GPU is visible; ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        index = 0
    elif local_rank < count:
        index = local_rank
    else:
        raise LaunchError(
            f"local rank {local_rank} but only {count} CUDA devices are visible on this node; HINT: start at most "
            f"{count} processes per node (`--nproc-per-node {count}`, `--ntasks-per-node={count}`), or give each "
            "process one GPU (`srun --gpus-per-task=1`)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _init_mpi(environment: ClusterEnvironment) -> DistributedContext:
    MPI = import_mpi()
    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    if isinstance(environment, TorchElasticEnvironment):
        raise LaunchError(
            f"backend='mpi' under torchrun (WORLD_SIZE={environment.world_size}): torchrun does not start MPI "
            "processes, so each one is an MPI world of its own; HINT: launch with `mpiexec -n N` or "
            "`srun --mpi=pmi2`, or use backend='gloo'/'nccl' with torchrun"
        )
    _check_mpi_world(environment, MPI)
    local_rank = environment.local_rank if environment.knows_local_rank else _local_rank_from_mpi(MPI, world)
    device = _select_device(local_rank)
    comm.set_default_process_group(world)
    return DistributedContext(rank, world_size, local_rank, device, "mpi", _launcher_name(environment, MPI), world)


def _check_mpi_world(environment: ClusterEnvironment, MPI: Any) -> None:
    """MPI must see the job the launcher started; otherwise every rank would wait for the others forever."""
    rank, world_size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if isinstance(environment, SingleProcessEnvironment) or (rank, world_size) == (
        environment.rank,
        environment.world_size,
    ):
        return
    raise LaunchError(
        f"{environment.name} started this process as rank {environment.rank} of {environment.world_size}, "
        f"but MPI.COMM_WORLD makes it rank {rank} of {world_size}: mpi4py is linked to another MPI library "
        f"than the launcher's ({MPI.Get_library_version().splitlines()[0].strip()}); HINT: launch with "
        "the mpiexec of the MPI that mpi4py uses (with `pip install mpich`: .venv/bin/mpiexec), or "
        "`srun --mpi=pmi2` for MPICH under Slurm"
    )


def _launcher_name(environment: ClusterEnvironment, MPI: Any) -> str:
    if isinstance(environment, SingleProcessEnvironment) and MPI.COMM_WORLD.Get_size() > 1:
        return "MPI (mpi4py)"
    return environment.name


def _local_rank_from_mpi(MPI: Any, world: Any) -> int:
    """This rank's index among the ranks that share its node, from MPI itself."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


def _init_torch_distributed(environment: ClusterEnvironment, backend: str, timeout: timedelta) -> DistributedContext:
    local_rank = environment.local_rank
    if not environment.knows_local_rank and environment.world_size > 1 and torch.cuda.is_available():
        MPI = import_mpi()  # only an MPI launcher leaves it out; the GPU depends on it
        local_rank = _local_rank_from_mpi(MPI, MPI.COMM_WORLD)
    device = _select_device(local_rank)
    rank, world_size = environment.rank, environment.world_size
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise LaunchError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but {environment.name} started this process as rank {rank} of {world_size}; HINT: call "
                "init_distributed() instead of init_process_group(), not both"
            )
        return DistributedContext(
            rank, world_size, local_rank, device, dist.get_backend(), environment.name, dist.group.WORLD
        )
    # Imported here: torch builds without distributed support have no c10d module, and `import syncbn` must work.
    from torch._C._distributed_c10d import HashStore

    _import_before_the_group_exists()

    init: dict[str, Any]
    if world_size == 1:
        init = {"store": HashStore()}
    elif isinstance(environment, TorchElasticEnvironment):
        init = {"init_method": "env://"}
    elif environment.main_address is not None and environment.main_port is not None:
        init = {"init_method": f"tcp://{environment.main_address}:{environment.main_port}"}
    else:
        init = {"store": _store_over_mpi(environment, timeout)}
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **init)
    faults.set_torch_timeout(timeout)
    if world_size > 1:  # so that the others can tell when this process is gone
        faults.register_process(dist.distributed_c10d._get_default_store(), rank, world_size)
    return DistributedContext(
        rank, world_size, local_rank, device, backend, environment.name, dist.group.WORLD, owns_process_group=True
    )


def _import_before_the_group_exists() -> None:
    """Import the torch modules that would otherwise keep the default group alive for good.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default
    argument of ten functions when it is first imported. Imported after the
    default group exists (``torch._dynamo`` imports it, and
    ``DistributedDataParallel`` imports ``torch._dynamo``), those defaults hold
    the group until the interpreter shuts down, past ``destroy_process_group``;
    the group is then freed during shutdown, and a gloo worker thread that is
    still releasing its last collective's tensors aborts the process
    (``terminate called without an active exception``) after a run that
    trained correctly. Imported now, the defaults are ``None``.
    """
    import torch.distributed.nn.functional  # noqa: F401


def _store_over_mpi(environment: ClusterEnvironment, timeout: timedelta) -> Store:
    """A TCPStore on rank 0 at a port the OS picks, its address sent to the others with MPI.

    An MPI launcher names no rendezvous; mpi4py can carry one, and a port
    chosen by binding port 0 cannot collide with another job's.
    """
    try:
        MPI = import_mpi()
    except ModuleNotFoundError as error:
        raise LaunchError(
            f"{environment.name} gives no rendezvous address for torch.distributed and mpi4py is not installed "
            f"to exchange one; HINT: `{install_command('mpi')}`, or set MASTER_ADDR and MASTER_PORT for every rank"
        ) from error
    from torch._C._distributed_c10d import TCPStore

    _check_mpi_world(environment, MPI)
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = node.Get_size() == world.Get_size()
    node.Free()
    store: Store | None = None
    address: tuple[str, int] | None = None
    if world.Get_rank() == 0:
        host = environment.main_address or ("127.0.0.1" if one_node else socket.gethostname())
        store = TCPStore(host, 0, world.Get_size(), is_master=True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
    host, port = world.bcast(address, root=0)
    if store is None:
        store = TCPStore(host, port, world.Get_size(), is_master=False, timeout=timeout)
    return store
