"""syncbn.harness: ranks in processes of their own, and the one rule that ends them however the run ends.

Each test also runs under conftest's check that every process it started is
gone within 5 s of its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from syncbn.harness import LocalRanks, RankExitedError, RankFailedError, RanksTimeoutError
from tests import processes
from tests.harness_targets import echo, one_rank_fails, square
from tests.launching import PYTHON, ROOT, clean_environ

WITHIN = 5.0


def _gone(pids: list[int], within: float = WITHIN) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(processes.alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_results_in_rank_order_and_messages_on_the_way() -> None:
    seen = []
    with LocalRanks(square, 3, args=(10,)) as ranks:
        assert ranks.wait(time.monotonic() + 120, on_message=seen.append) == [100, 121, 144]
        pids = ranks.pids
    assert sorted(seen) == [("progress", rank, rank) for rank in range(3)]
    assert _gone(pids)


def test_inboxes() -> None:
    with LocalRanks(echo, 2, inboxes=True) as ranks:
        for rank in (0, 1):
            ranks.send(rank, f"hello {rank}")
        answers = {ranks.receive(time.monotonic() + 120)[2] for _ in range(2)}
        for rank in (0, 1):
            ranks.send(rank, None)
        assert ranks.wait(time.monotonic() + 60) == [None, None]
    assert answers == {(0, "hello 0"), (1, "hello 1")}


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("raise", RankFailedError, r"(?s)rank 1 of 3 failed:\n.*ValueError: rank 1 gives up"),
        ("exit", RankExitedError, r"rank 1 of 3 exited without a result \(exit status 3\)"),
        ("kill", RankExitedError, r"rank 1 of 3 exited without a result \(killed by SIGKILL\)"),
        ("quiet", RankExitedError, r"rank 1 of 3 exited without a result \(exit status 0\)"),
    ],
)
def test_a_failed_rank_ends_the_run_and_every_rank(how: str, error: type[Exception], match: str) -> None:
    started = time.monotonic()
    ranks = LocalRanks(one_rank_fails, 3, args=(how,))
    with pytest.raises(error, match=match) as caught, ranks:
        ranks.wait(time.monotonic() + 120)
    assert caught.value.ranks == [1]
    assert time.monotonic() - started < 60
    assert _gone(ranks.pids)


@pytest.mark.parametrize("how", ["none", "stop"])
def test_a_hung_or_stopped_rank_ends_at_the_deadline(how: str) -> None:
    """A rank that never answers (asleep, or stopped with SIGSTOP, which SIGTERM cannot end) is killed."""
    ranks = LocalRanks(one_rank_fails, 3, args=(how,))
    with ranks:
        pids = [ranks.receive(time.monotonic() + 120)[2] for _ in range(3)]
        if how == "stop":
            deadline = time.monotonic() + 10
            while not any(processes.state(pid) == "T" for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(RanksTimeoutError, match="ranks 0, 1, 2 of 3 had not finished by the deadline"):
            ranks.wait(time.monotonic() + 1.0)
        assert time.monotonic() - started < 3
    assert _gone(pids)


def _parent(start_method: str) -> tuple[subprocess.Popen[str], list[int]]:
    """A parent process running 3 ranks under the harness, once they have started."""
    parent = subprocess.Popen(
        [PYTHON, "-m", "tests.harness_targets", start_method],
        cwd=ROOT,
        env=clean_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.startswith("ranks "), line + parent.stderr.read() if parent.stderr else line
    return parent, [int(pid) for pid in line.split()[1:]]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signalled_parent_takes_its_ranks_with_it(
    start_method: str, sig: signal.Signals, no_process_left: str
) -> None:
    """SIGTERM (schedulers, `timeout`), Ctrl-C and even SIGKILL of the parent: every process it started is gone."""
    parent, ranks = _parent(start_method)
    os.kill(parent.pid, sig)
    try:
        parent.wait(timeout=WITHIN)
    finally:
        parent.kill()
        parent.communicate()
    if sig == signal.SIGTERM:
        assert parent.returncode == 128 + signal.SIGTERM
    assert _gone(ranks), processes.describe([pid for pid in ranks if processes.alive(pid)])
    left = processes.wait_gone(no_process_left, WITHIN)  # the forkserver and the resource tracker too
    assert not left, processes.describe(left)
