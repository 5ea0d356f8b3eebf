"""Ranks on this machine: run one function in N processes, with a hard deadline, and never leave one behind.

``syncbn bench``, ``syncbn demo``, ``bench/bench_cpu.py`` and the test suite
start their ranks through :class:`LocalRanks`, so one rule ends them all,
however the run ends (a result, an error, a rank that dies or hangs, the
deadline, SIGTERM, Ctrl-C):

* when the harness is left (``with`` block or :meth:`LocalRanks.stop`), every
  rank still alive after ``grace`` seconds is killed with SIGKILL (which ends a
  rank stuck in a collective, or stopped with SIGSTOP, as surely as a running
  one) and reaped;
* while the harness is in use, SIGTERM to the parent (what ``timeout``, Slurm
  and most schedulers send) raises :class:`Terminated` in it, so that the
  rule above runs instead of the parent vanishing and its ranks training on;
* a rank ignores SIGINT: Ctrl-C reaches the parent, which stops the ranks,
  instead of every rank printing its own ``KeyboardInterrupt``;
* a rank ends when the parent that started the run exits, whatever ends it,
  even SIGKILL: the kernel kills it (``PR_SET_PDEATHSIG`` on Linux, through
  the forkserver with that start method), and a watchdog thread waits on the
  parent's pidfd where that is not enough.

A rank runs ``target(rank, world_size, channel, *args)``. It talks to the
parent through ``channel`` (:class:`RankChannel`): ``channel.send(kind,
payload)`` for messages such as progress, and, with ``inboxes=True``,
``channel.receive()`` for the parent's :meth:`LocalRanks.send`. What
``target`` returns is the rank's result; an exception in it reaches the
parent as :class:`RankFailedError` with the rank's traceback.

Example::

    def square(rank, world_size, channel, base):
        return (base + rank) ** 2

    with LocalRanks(square, 4, args=(10,)) as ranks:
        print(ranks.wait(deadline=time.monotonic() + 60))   # [100, 121, 144, 169]
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from multiprocessing import connection as mp_connection
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "LocalRanks",
    "RankChannel",
    "RankError",
    "RankExitedError",
    "RankFailedError",
    "RanksTimeoutError",
    "Terminated",
    "command_line",
    "descendants",
    "free_port",
    "gloo_group",
    "launch_environ",
    "parent_of",
    "process_alive",
    "process_state",
    "rank_processes",
    "tagged_processes",
    "terminate_raises",
]

Message = tuple[str, int, Any]

# Longest single wait for a message, so that a deadline is seen promptly (a rank's exit is seen at once).
_POLL = 0.2
_PR_SET_PDEATHSIG = 1


class RankError(RuntimeError):
    """A rank of a :class:`LocalRanks` run failed, died, or the run passed its deadline."""

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


class RankFailedError(RankError):
    """A rank raised; the message holds its traceback."""


class RankExitedError(RankError):
    """A rank exited (or was killed) without sending its result."""


class RanksTimeoutError(RankError, TimeoutError):
    """The run passed its deadline; ``ranks`` had not finished."""


class Terminated(SystemExit):
    """SIGTERM reached the parent while ranks were running (exit status 143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Variables a launcher sets for its ranks (Slurm, PMI, Open MPI, torchrun): a command started inside an
# allocation (a developer's shell under salloc, say) must not hand them to ranks it launches itself.
_LAUNCHER_VARIABLES = re.compile(
    r"^(SLURM_|PMI_|PMIX_|OMPI_|MPI_LOCAL|TORCHELASTIC_|RANK$|WORLD_SIZE$|LOCAL_RANK$|LOCAL_WORLD_SIZE$|GROUP_RANK$|"
    r"MASTER_ADDR$|MASTER_PORT$)"
)


def launch_environ(python: str, **extra: str) -> dict[str, str]:
    """This process's environment for a command that starts its own ranks, under any launcher.

    Without the variables of an enclosing launch; with ``python``'s folder first
    on ``PATH`` (its ``mpiexec`` and ``torchrun``), ``PYTHON=python`` (what
    ``launch/*.sh`` run), ``OMP_NUM_THREADS=1`` (several ranks share the cores)
    and ``extra``.
    """
    environ = {key: value for key, value in os.environ.items() if not _LAUNCHER_VARIABLES.match(key)}
    environ["PATH"] = f"{Path(python).parent}{os.pathsep}{environ.get('PATH', '')}"
    environ["PYTHON"] = python
    environ["OMP_NUM_THREADS"] = "1"
    environ.update(extra)
    return environ


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a store the ranks meet at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def gloo_group(
    rank: int, world_size: int, timeout: timedelta, *, port: int | None = None, store: Any = None
) -> Iterator[None]:
    """Within the block, this rank is in a torch.distributed gloo group of the run's ranks, on 127.0.0.1.

    The ranks meet at ``port`` (``tcp://`` rendezvous, rank 0 hosts the
    store) or through ``store``. One thread per rank (they share the
    machine's cores). The group is destroyed on the way out, once its worker
    threads are idle (:func:`syncbn.distributed.destroy_process_group`).
    """
    import torch
    import torch.distributed as dist

    from syncbn.distributed import _import_before_the_group_exists, destroy_process_group

    torch.set_num_threads(1)
    _import_before_the_group_exists()
    where: dict[str, Any] = {"store": store} if store is not None else {"init_method": f"tcp://127.0.0.1:{port}"}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout, **where)
    try:
        yield
    finally:
        destroy_process_group()


class RankChannel:
    """What a rank holds of the harness: ``send`` to the parent, ``receive`` what it sent (with ``inboxes=True``).

    Messages go through a pipe of the rank's own and are written before
    ``send`` returns, so a rank that dies right after sending has still been
    heard.
    """

    def __init__(self, rank: int, connection: Any, inbox: bool) -> None:
        self.rank = rank
        self._connection = connection
        self._inbox = inbox

    def send(self, kind: str, payload: Any = None) -> None:
        """Send ``(kind, rank, payload)`` to the parent; ``"done"`` and ``"error"`` are the harness's own."""
        if kind in ("done", "error"):
            raise ValueError(f"message kind {kind!r} is reserved by the harness")
        self._connection.send((kind, self.rank, payload))

    def receive(self) -> Any:
        """The next object the parent sent to this rank (blocks)."""
        if not self._inbox:
            raise RuntimeError("this run has no inboxes; HINT: LocalRanks(..., inboxes=True)")
        return self._connection.recv()


def _leave_with_parent(parent_pid: int) -> None:
    """End this process when the parent that started the run exits, however it exits.

    * ``PR_SET_PDEATHSIG`` (Linux): the kernel sends SIGKILL when the process
      that forked this one exits: the parent itself with "spawn", the
      forkserver with "forkserver";
    * a forkserver exits when its parent does, but only once no process holds
      the parent's end of its "alive" pipe, and every child it forks inherits
      that end: closed here, so that the server, then this rank, can go;
    * a watchdog thread that waits on the parent's pidfd (or polls), for
      systems without the first, or a parent that died before it was set.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    with contextlib.suppress(ImportError, AttributeError, OSError, TypeError):
        from multiprocessing import forkserver

        alive = forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined]
        if alive is not None:
            os.close(alive)
            forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    if not _alive(parent_pid):  # the parent died before the lines above: nothing else would end this process
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="syncbn-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(parent_pid: int) -> None:
    try:
        descriptor = os.pidfd_open(parent_pid)  # readable once the process has exited
        select.select([descriptor], [], [])
    except (AttributeError, OSError):
        while _alive(parent_pid) and os.getppid() != 1:
            time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _bootstrap(
    target: Callable[..., Any],
    rank: int,
    world_size: int,
    connection: Any,
    inbox: bool,
    parent_pid: int,
    args: tuple[Any, ...],
) -> None:
    """The first code a rank runs: the exit rules, then ``target``, then its result or traceback to the parent."""
    _leave_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops every rank
    try:
        result = target(rank, world_size, RankChannel(rank, connection, inbox), *args)
        message: Message = ("done", rank, result)
    except BaseException:
        message = ("error", rank, traceback.format_exc())
    try:
        connection.send(message)
    except Exception as error:  # an unpicklable result, say
        connection.send(("error", rank, f"the rank's result could not be sent to the parent: {error!r}"))
    connection.close()


class LocalRanks:
    """``world_size`` processes on this machine running ``target``; see the module's documentation.

    Args:
        target: ``target(rank, world_size, channel, *args)``, a module-level
            function (it is pickled by name for "spawn" and "forkserver").
        world_size: how many ranks.
        args: more arguments for ``target`` (picklable).
        start_method: ``"spawn"`` (a fresh interpreter per rank) or
            ``"forkserver"`` (forked from a server that imported ``preload``
            once: much faster when ranks import torch; Linux and macOS only).
        preload: modules the forkserver imports before forking.
        inboxes: let the parent :meth:`send` to each rank.
        name: prefix of the processes' names.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        world_size: int,
        args: Sequence[Any] = (),
        *,
        start_method: str = "spawn",
        preload: Sequence[str] = (),
        inboxes: bool = False,
        name: str = "syncbn-rank",
    ) -> None:
        if world_size < 1:
            raise ValueError(f"LocalRanks: world_size must be at least 1, got {world_size}")
        if start_method == "forkserver" and "forkserver" not in mp.get_all_start_methods():
            start_method = "spawn"
        self.world_size = world_size
        self.results: dict[int, Any] = {}
        self._target = target
        self._args = tuple(args)
        self._context: Any = mp.get_context(start_method)
        if start_method == "forkserver" and preload:
            self._context.set_forkserver_preload(list(preload))
        self._inboxes = inboxes
        self._name = name
        self._processes: list[Any] = []
        self._connections: list[Any] = []
        self._heard_last: set[int] = set()  # ranks whose pipe is at its end
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalRanks:
        """Start the ranks (SIGTERM raises :class:`Terminated` in the parent until :meth:`stop`)."""
        if self._processes:
            raise RuntimeError("LocalRanks: already started")
        self._stack.enter_context(terminate_raises())
        for rank in range(self.world_size):
            mine, theirs = self._context.Pipe(duplex=True)
            process = self._context.Process(
                target=_bootstrap,
                args=(self._target, rank, self.world_size, theirs, self._inboxes, os.getpid(), self._args),
                name=f"{self._name}-{rank}",
                daemon=True,
            )
            self._processes.append(process)
            self._connections.append(mine)
            process.start()
            theirs.close()  # the rank's end lives in the rank only: its exit then ends the pipe
        return self

    def __enter__(self) -> LocalRanks:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, grace: float = 0.0) -> None:
        """The one cleanup rule: after ``grace`` seconds, kill every rank still alive; reap them all.

        Safe to call more than once, and from ``finally`` blocks. ``grace`` is
        for ranks that were told to finish (they may be tearing down their
        process group); a failed or timed-out run is stopped with none.
        """
        try:
            until = time.monotonic() + grace
            for process in self._processes:
                if process.exitcode is None:
                    process.join(max(0.0, until - time.monotonic()))
            for process in self._processes:
                if process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) or stuck rank
            for process in self._processes:
                process.join(5.0)
            for connection in self._connections:
                connection.close()
        finally:
            self._stack.close()

    # ------------------------------------------------------------------ talking to the ranks

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, in rank order."""
        return [process.pid for process in self._processes]

    @property
    def exitcodes(self) -> list[int | None]:
        """The ranks' exit codes (None while running; negative: killed by that signal)."""
        return [process.exitcode for process in self._processes]

    def unclean_exits(self) -> str:
        """``"rank 1 exit status 3, ..."`` for the ranks that ended with anything but status 0 ('' if none)."""
        return ", ".join(
            f"rank {rank} {_exit_status(code)}" for rank, code in enumerate(self.exitcodes) if code not in (0, None)
        )

    def send(self, rank: int, message: Any) -> None:
        """Send ``message`` to ``rank`` (``inboxes=True``); its :meth:`RankChannel.receive` returns it."""
        if not self._inboxes:
            raise RuntimeError("LocalRanks: this run has no inboxes; HINT: LocalRanks(..., inboxes=True)")
        self._connections[rank].send(message)

    def pending(self) -> list[int]:
        """Ranks that have not sent their result yet."""
        return [rank for rank in range(self.world_size) if rank not in self.results]

    def receive(self, deadline: float) -> Message:
        """The next message from any rank, ``(kind, rank, payload)``; a ``"done"`` one also fills :attr:`results`.

        Args:
            deadline: a ``time.monotonic()`` value.

        Raises:
            RankFailedError: a rank raised (its traceback is in the message).
            RankExitedError: a rank ended without its result.
            RanksTimeoutError: ``deadline`` passed first.
        """
        while True:
            listening = {
                self._connections[rank]: rank for rank in range(self.world_size) if rank not in self._heard_last
            }
            exits = {self._processes[rank].sentinel: rank for rank in self.pending()}
            now = time.monotonic()
            if now >= deadline:
                pending = self.pending()
                raise RanksTimeoutError(
                    f"rank{'s' if len(pending) != 1 else ''} {_ranks(pending)} of {self.world_size} had not "
                    "finished by the deadline and were stopped",
                    pending,
                )
            ready = mp_connection.wait([*listening, *exits], timeout=min(_POLL, deadline - now))
            for item in ready:
                if item in listening:
                    rank = listening[item]
                    connection: Any = item
                    try:
                        kind, sender, payload = connection.recv()
                    except (EOFError, OSError):
                        self._heard_last.add(rank)
                        continue
                    if kind == "error":
                        raise RankFailedError(
                            f"rank {sender} of {self.world_size} failed:\n{payload}{self._exited_others(sender)}",
                            [sender],
                        )
                    if kind == "done":
                        self.results[sender] = payload
                        self._heard_last.add(sender)
                    return str(kind), int(sender), payload
            for item in ready:
                rank = exits.get(item, -1)
                if rank < 0 or rank in self.results:
                    continue
                # A rank's messages are all in its pipe once it has exited: read them (up to the pipe's end)
                # before judging it.
                if rank in self._heard_last or not self._connections[rank].poll(0):
                    process = self._processes[rank]
                    process.join(1.0)  # its sentinel closes just before the kernel has the exit status
                    code = process.exitcode
                    raise RankExitedError(
                        f"rank {rank} of {self.world_size} exited without a result ({_exit_status(code)})", [rank]
                    )

    def _exited_others(self, failed: int) -> str:
        """Ranks other than ``failed`` that ended without a result: often the cause of its failure."""
        others = [self._processes[rank] for rank in self.pending() if rank != failed]
        mp_connection.wait([process.sentinel for process in others], timeout=_POLL)  # the news may be on its way
        lines = []
        for rank, process in zip([rank for rank in self.pending() if rank != failed], others, strict=True):
            if process.exitcode is not None or not process.is_alive():
                process.join(1.0)
                lines.append(
                    f"rank {rank} of {self.world_size} exited without a result ({_exit_status(process.exitcode)})"
                )
        return "".join(f"\nmeanwhile {line}" for line in lines)

    def wait(self, deadline: float, on_message: Callable[[Message], None] | None = None) -> list[Any]:
        """Receive until every rank has sent its result; return the results in rank order.

        Other messages go to ``on_message``. Raises as :meth:`receive` does.
        """
        while self.pending():
            message = self.receive(deadline)
            if message[0] != "done" and on_message is not None:
                on_message(message)
        return [self.results[rank] for rank in range(self.world_size)]


# --------------------------------------------------------------------------- observing processes (Linux)
#
# For tests and benchmarks that check what a run left behind: every process, however it was started
# and whoever its parent is now, can be found by a variable that it inherited in its environment.


def process_state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T``, ``Z``...), or None when it does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie, exited but not reaped, counts as gone)."""
    return process_state(pid) not in (None, "Z", "X")


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def tagged_processes(variable: str, value: str, *, prefix: bool = False) -> list[int]:
    """Live processes (not this one) whose environment holds ``variable=value`` (or a value starting so)."""
    wanted = f"{variable}={value}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(wanted) if prefix else entry == wanted for entry in entries) and process_alive(pid):
            found.append(pid)
    return found


def descendants(root: int) -> list[int]:
    """Live processes below ``root`` in the process tree (children, their children...)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        ppid = parent_of(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if process_alive(child):
                found.append(child)
                stack.append(child)
    return found


def rank_processes(root: int) -> list[int]:
    """The ranks that :class:`LocalRanks` started below ``root``, spawned or forked by a forkserver.

    Left out: multiprocessing's resource tracker and the forkserver itself.
    """
    ranks = []
    for pid in descendants(root):
        line = command_line(pid)
        if "resource_tracker" in line:
            continue
        ppid = parent_of(pid)
        if "spawn_main" in line or (ppid is not None and ppid != root and "forkserver" in command_line(ppid)):
            ranks.append(pid)
    return sorted(ranks)


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks))


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"
