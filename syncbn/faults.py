"""When a rank fails: errors that name the cause, a record of failures the other ranks can read, and an excepthook.

On a cluster a failed rank rarely crashes the others: they wait for it in the
next collective. syncbn bounds that wait and says why it ended:

* every collective of :class:`~syncbn.SyncBatchNorm` has a timeout (the one
  given to :func:`~syncbn.init_distributed`; torch.distributed's own for a
  group made elsewhere; for MPI, :func:`syncbn.comm.mpi.set_timeout`);
* a failed collective raises :class:`CollectiveError` (or
  :class:`CollectiveTimeoutError`) naming the layer, the direction, this rank,
  and what is known of the others: the ranks that recorded an exception, and
  the ranks on this host whose process is gone;
* ranks that call the layers inconsistently raise :class:`RankMismatchError`
  on every rank at once (see :mod:`syncbn.debug`);
* ``init_distributed(abort_on_exception=True)`` installs
  :func:`install_excepthook`: an uncaught exception on one rank records
  itself for the others (torch.distributed) or aborts ``MPI.COMM_WORLD``
  (MPI, as ChainerMN's global except hook does), so that the job ends at once
  instead of at the timeout.

The record lives in torch.distributed's rendezvous store, under
``syncbn/process/<rank>`` (host and pid, written by ``init_distributed``),
``syncbn/failed/<rank>`` (the exception), ``syncbn/left/<rank>`` (written when a
rank closes its group or its interpreter exits normally), and
``syncbn/collective-error/<rank>`` (what a rank's own failed collective saw,
written before it raises). Every rank also keeps the others' host and pid from
the start, so that it can tell which of them are gone even when the store's
host (rank 0, outside torchrun) has exited first.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "CollectiveError",
    "CollectiveTimeoutError",
    "RankMismatchError",
    "describe_failures",
    "install_excepthook",
    "record_departure",
    "record_failure",
    "register_process",
]

_PROCESS_KEY = "syncbn/process/{}"
_FAILED_KEY = "syncbn/failed/{}"
_LEFT_KEY = "syncbn/left/{}"
_ERROR_KEY = "syncbn/collective-error/{}"
_READ_KEY = "syncbn/read-failures/{}"
# How long init_distributed waits for every rank's host and pid (they are all past the rendezvous by then).
_PROCESS_TABLE_WAIT = timedelta(seconds=30)
# Seconds a failed rank waits before reading the store a second time, when the first read found nothing.
#: How long a lost connection waits for the rank that broke it to be seen gone (error path only).
_SETTLE = 0.5
_RECHECK_DELAY = 1.0
#: How long a rank that ends on an echo of another's failure waits for the others to have read the store.
_LINGER = 2.0
# Seconds between the excepthook's message and MPI_Abort, for the launcher to forward the message.
_ABORT_DELAY = 0.5


class CollectiveError(RuntimeError):
    """A collective of SyncBatchNorm failed: another rank died, stopped answering, or a backend error.

    The message names what is known: the layer and direction, this rank, the
    ranks that recorded a failure or whose process is gone, or the timeout.
    """


class CollectiveTimeoutError(CollectiveError):
    """No answer from the other ranks within the timeout: one is stuck, slow, or out of step."""


class RankMismatchError(CollectiveError):
    """The ranks disagree on a call (layer, channels, dtype, call order, ``requires_grad``...).

    Raised on every rank of the group together, before anything is mixed.
    """


# The timeout of the torch.distributed default group made by init_distributed, for messages.
_TORCH_TIMEOUT: timedelta | None = None


def set_torch_timeout(timeout: timedelta | None) -> None:
    """Remember the timeout of the default torch.distributed group (for messages only)."""
    global _TORCH_TIMEOUT
    _TORCH_TIMEOUT = timeout


def _default_store() -> Any:
    """torch.distributed's rendezvous store for the default group, or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _global_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


# Every rank's "host pid", read once at start-up: the store may be gone by the time a rank fails.
_PROCESSES: dict[int, str] = {}


def register_process(store: Any, rank: int, world_size: int | None = None) -> None:
    """Write this rank's host and pid into ``store``, then keep every rank's, to tell later which are gone.

    Called by :func:`syncbn.init_distributed` once the group exists (every
    rank is then past the rendezvous, so the others' records come at once).
    Reading them is best effort: without them, messages only know less.
    """
    store.set(_PROCESS_KEY.format(rank), f"{socket.gethostname()} {os.getpid()}")
    _PROCESSES.clear()
    if world_size is None:
        return
    keys = [_PROCESS_KEY.format(other) for other in range(world_size)]
    with contextlib.suppress(Exception):
        store.wait(keys, _PROCESS_TABLE_WAIT)
        values = store.multi_get(keys)
        _PROCESSES.update({other: value.decode(errors="replace") for other, value in enumerate(values)})


def record_departure(store: Any, rank: int, how: str) -> None:
    """Tell the other ranks that this one is leaving on purpose (``how``: "closed its group", ...).

    A rank that ends while the others still train is otherwise only a lost
    connection to them; with this record they name it.
    """
    with contextlib.suppress(Exception):
        store.set(_LEFT_KEY.format(rank), how)
        store.set(_READ_KEY.format(rank), "1")  # it will read nothing: a rank lingering need not wait for it


def record_failure(store: Any, rank: int, summary: str) -> None:
    """Record this rank's uncaught exception (one line) for the others to name."""
    with contextlib.suppress(Exception):
        store.set(_FAILED_KEY.format(rank), summary[:2000])
        store.set(_READ_KEY.format(rank), "1")  # it will read nothing: a rank lingering need not wait for it


def forget_processes() -> None:
    """Drop the processes table (the group it describes was closed)."""
    _PROCESSES.clear()


def _process_gone(record: str) -> bool | None:
    """Whether the process of a ``"host pid"`` record has exited; None when it runs on another host."""
    host, _, pid = record.rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # Killed but not yet reaped by its parent (a launcher, a shell): a zombie is gone too.
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state in ("Z", "X")
    return False


def _await_a_gone_process(exclude: int | None, within: float) -> None:
    """Wait until a rank's process on this host has exited, at most ``within`` seconds (none on this host: no wait)."""
    records = [record for rank, record in _PROCESSES.items() if rank != exclude]
    deadline = time.monotonic() + within
    while records and time.monotonic() < deadline:
        states = [_process_gone(record) for record in records]
        if any(states) or all(state is None for state in states):
            return
        time.sleep(0.01)


def _read(store: Any, key: str) -> str | None:
    """The value of ``key``, without waiting for it: None when it is not there."""
    return store.get(key).decode(errors="replace") if store.check([key]) else None


def describe_failures(world_size: int, store: Any = None, exclude: int | None = None) -> str:
    """What is known of failed ranks, as sentences for an error message ('' when nothing).

    From the rendezvous store: the ranks that recorded an exception, those that
    left on purpose, and what other ranks' own collectives saw; from the
    processes table read at start-up, the ranks on this host whose process is
    gone (this works even when the store's host has exited).

    Args:
        world_size: ranks of the default group (global ranks are read).
        store: the store to read; default: torch.distributed's default store.
        exclude: a rank whose own collective error is left out (the caller's).
    """
    store = store if store is not None else _default_store()
    failed: list[str] = []  # exceptions recorded by the excepthook: the causes
    left: dict[int, str] = {}  # ranks that closed or exited normally while others were in a collective
    saw: dict[int, str] = {}  # what other ranks' collectives saw: echoes
    processes = dict(_PROCESSES)
    unreachable = ""
    if store is not None:
        try:
            for rank in range(world_size):
                exception = _read(store, _FAILED_KEY.format(rank))
                departure = _read(store, _LEFT_KEY.format(rank))
                echo = _read(store, _ERROR_KEY.format(rank)) if rank != exclude else None
                process = _read(store, _PROCESS_KEY.format(rank))
                if exception is not None:
                    failed.append(f"Rank {rank} failed with {exception}.")
                elif departure is not None:
                    left[rank] = departure
                elif echo is not None:
                    saw[rank] = f"Rank {rank} saw: {echo}."
                if process is not None:
                    processes[rank] = process
        except Exception as error:  # the store's host (rank 0, or torchrun's agent) has exited: that is news too
            unreachable = (
                f"The rendezvous store cannot be reached ({type(error).__name__}: {str(error)[:200]}): the process "
                "that hosts it has exited (rank 0, unless torchrun's agent hosts it)."
            )
    gone = [rank for rank, record in sorted(processes.items()) if rank != exclude and _process_gone(record)]
    sentences = failed
    if left:
        ranks = sorted(left)
        how = "; ".join(f"rank {rank} {left[rank]}" for rank in ranks)
        sentences.append(
            f"Rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} left the job while this rank was "
            f"still in a collective ({how}): the ranks did not run the same number of steps or layers."
        )
    # A rank that exited after its own collective failed, or that said it was leaving, is no news.
    silent = [
        rank
        for rank in gone
        if rank not in saw and rank not in left and not any(f.startswith(f"Rank {rank} ") for f in failed)
    ]
    if silent:
        ranks_text = ", ".join(map(str, silent))
        sentences.append(f"The process of rank{'s' if len(silent) > 1 else ''} {ranks_text} on this host has exited.")
    sentences.extend(saw.values())
    if unreachable:
        sentences.append(unreachable)
    return " ".join(sentences)


_GLOO_TIMEOUT = re.compile(r"[Tt]imed out waiting (\d+)\s*ms")


def _timeout_text(text: str, timeout: timedelta | None) -> str:
    """The limit that passed: as the backend reports it, else the group's, else the default group's."""
    match = _GLOO_TIMEOUT.search(text)
    if match:
        return f"{int(match[1]) / 1000:g} s"
    timeout = timeout if timeout is not None else _TORCH_TIMEOUT
    return f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"


def torch_collective_error(
    error: BaseException, rank: int, world_size: int, backend: str, timeout: timedelta | None = None
) -> CollectiveError:
    """Turn a torch.distributed backend error into a :class:`CollectiveError` that says what happened.

    ``timeout`` is the group's own (``new_group(timeout=...)``); without it, the default group's.
    """
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        limit = _timeout_text(text, timeout)
        what = f"no answer from the other ranks within {limit}: a rank is stuck, slower, or out of step"
        cls: type[CollectiveError] = CollectiveTimeoutError
    elif any(word in text for word in ("closed by peer", "reset by peer", "Broken pipe", "Read error")):
        what = "the connection to another rank was lost: a rank has exited or was killed"
        cls = CollectiveError
        # A dying process closes its sockets before it becomes a zombie: give it a moment to be seen gone.
        _await_a_gone_process(exclude=_global_rank(), within=_SETTLE)
    else:
        what = "the backend failed"
        cls = CollectiveError
    known = ""
    if world_size > 1:
        global_rank = _global_rank()
        store = _default_store()
        if store is not None and global_rank is not None:
            # Written before this rank raises and exits, so that the ranks it leaves behind can read it;
            # when the store's host is gone, describe_failures says so.
            with contextlib.suppress(Exception):
                store.set(_ERROR_KEY.format(global_rank), what)
        known = describe_failures(_global_world_size(), store, exclude=global_rank)
        if not known:  # the rank whose exit broke the connection may still be writing what it saw
            time.sleep(_RECHECK_DELAY)
            known = describe_failures(_global_world_size(), store, exclude=global_rank)
        if store is not None and global_rank is not None:
            with contextlib.suppress(Exception):  # done reading: a rank that hosts the store may now go
                store.set(_READ_KEY.format(global_rank), "1")
    return cls(f"rank {rank} of {world_size} ({backend}): {what}. {known + ' ' if known else ''}[{first_line}]")


def _linger_for_readers(store: Any, rank: int, world_size: int, within: float = _LINGER) -> None:
    """Before an echo of another rank's failure ends this process: let the others read the store first.

    The store lives in rank 0 or in torchrun's agent, which stops when its
    workers end: ending at once could take it away from a rank that has not
    yet read which rank failed and why. So wait, at most ``within`` seconds
    (in a thread: a store that no longer answers cannot hold the exit
    longer), until every other rank has marked that it has read, or recorded
    a failure or a departure of its own (which mark it too). A rank killed
    outright marks nothing and costs the whole wait.
    """
    deadline = time.monotonic() + within

    def wait() -> None:
        with contextlib.suppress(Exception):  # the store is gone: nobody can read it any more
            store.set(_READ_KEY.format(rank), "1")  # the others, lingering too, need not wait for this one
            pending = [other for other in range(world_size) if other != rank]
            while pending and time.monotonic() < deadline:
                pending = [other for other in pending if not store.check([_READ_KEY.format(other)])]
                if pending:
                    time.sleep(0.05)

    waiter = threading.Thread(target=wait, name="syncbn-linger", daemon=True)
    waiter.start()
    waiter.join(max(0.0, deadline - time.monotonic()))


def install_excepthook(backend: str, rank: int, world_size: int, store: Any = None) -> Callable[..., None]:
    """Make an uncaught exception on this rank end the whole job quickly, with its cause named.

    After the usual traceback: with ``backend="mpi"``, ``MPI.COMM_WORLD.Abort(1)``
    (the launcher then ends every rank at once, as ChainerMN does); with
    torch.distributed, the exception is written to the rendezvous ``store``
    so that the others name this rank in their :class:`CollectiveError`, and
    the process exits at once with status 1 (``os._exit``: ``atexit``
    handlers do not run), so that the others fail as soon as its connections
    close. A :class:`CollectiveError` is an echo of another rank's failure:
    it is not recorded as a cause, but still ends the process.

    Returns:
        The previous ``sys.excepthook`` (restore it to uninstall).
    """
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None) -> None:
        previous(exc_type, exc, traceback)
        summary = f"{exc_type.__name__}: {exc}".splitlines()[0] if str(exc) else exc_type.__name__
        try:
            if backend == "mpi":
                from mpi4py import MPI

                sys.stderr.write(
                    f"syncbn: rank {rank} of {world_size} stopped on an uncaught {summary}; "
                    "aborting MPI_COMM_WORLD so that every rank ends now\n"
                )
                sys.stderr.flush()
                # MPI_Abort makes the launcher kill every rank at once, its output forwarders included:
                # what this rank just wrote may not have left the pipe yet. A moment lets it reach the user.
                time.sleep(_ABORT_DELAY)
                MPI.COMM_WORLD.Abort(1)
            target = store if store is not None else _default_store()
            if not issubclass(exc_type, CollectiveError):
                if target is not None:
                    record_failure(target, rank, summary)
            elif target is not None:
                _linger_for_readers(target, rank, world_size)
        except Exception as error:  # the hook must never hide the original failure
            sys.stderr.write(f"syncbn: the excepthook could not tell the other ranks: {error!r}\n")
        # Now, not after interpreter teardown (which can take seconds with a process group
        # alive): the others learn of it when this process's connections close.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook
    return previous
