"""Which processes a test left behind: every process it starts carries a tag in its environment.

The tag is an environment variable (:data:`TAG`) that ``conftest.py`` sets for
each test, so every process the test starts, and every process those start
(launchers, ranks, forkservers, resource trackers, a Slurm job's tasks),
inherits it, even when it is re-parented after its parent died. Reading
``/proc/<pid>/environ`` then finds them all, however they were started.
Zombies (exited, not yet reaped) count as gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from syncbn.harness import command_line, descendants, parent_of, rank_processes, tagged_processes
from syncbn.harness import process_alive as alive
from syncbn.harness import process_state as state

TAG = "SYNCBN_TEST_PROCESS_TAG"
__all__ = ["TAG", "alive", "describe", "kill", "state", "tag_environment", "tagged", "wait_for_ranks", "wait_gone"]


def tagged(tag: str, *, prefix: bool = False) -> list[int]:
    """Live processes (not this one) whose environment holds ``TAG=tag`` (or a tag starting with ``tag``)."""
    return tagged_processes(TAG, tag, prefix=prefix)


def wait_gone(tag: str, within: float, *, prefix: bool = False, ignore: set[int] | None = None) -> list[int]:
    """Wait up to ``within`` seconds for the tagged processes to end; return those still alive."""
    deadline = time.monotonic() + within
    while True:
        left = [pid for pid in tagged(tag, prefix=prefix) if pid not in (ignore or set())]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def describe(pids: list[int]) -> str:
    return "\n".join(
        f"  pid {pid} (state {state(pid)}, parent {parent_of(pid)}): {command_line(pid)[:200]}" for pid in pids
    )


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def wait_for_ranks(root: int, count: int, within: float) -> list[int]:
    """Wait until ``count`` ranks run below ``root``; return their pids (fails the test at ``within``)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ranks = rank_processes(root)
        if len(ranks) >= count:
            return ranks
        time.sleep(0.1)
    raise AssertionError(
        f"{count} ranks did not start within {within} s below pid {root}:\n{describe(descendants(root))}"
    )


@contextlib.contextmanager
def tag_environment(tag: str) -> Iterator[str]:
    """Within the block, processes started from here carry ``TAG=tag``."""
    previous = os.environ.get(TAG)
    os.environ[TAG] = tag
    try:
        yield tag
    finally:
        if previous is None:
            os.environ.pop(TAG, None)
        else:
            os.environ[TAG] = previous
