"""A group of real processes joined by torch.distributed gloo, kept alive across tests.

Starting a process with torch takes seconds, so each world is started once
and given one test body at a time. The ranks run under syncbn's own harness
(:class:`syncbn.harness.LocalRanks`), so the rule that ends them is the one
the commands use. Every call has a hard timeout: a rank that does not answer
in time, or dies, fails the test and the world is torn down and started
afresh, so a hang can never stall the suite.
"""

from __future__ import annotations

import importlib
import itertools
import time
import traceback
from datetime import timedelta
from typing import Any

from syncbn.harness import LocalRanks, RankChannel, RankError, RanksTimeoutError, free_port, gloo_group
from tests import processes

START_TIMEOUT = 120.0
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
_worlds = itertools.count()


def _worker(rank: int, world_size: int, channel: RankChannel, port: int) -> None:
    """A rank: join the group, then run the test bodies the parent sends until it sends None."""
    with gloo_group(rank, world_size, COLLECTIVE_TIMEOUT, port=port):
        channel.send("answer", (True, "ready"))
        while (task := channel.receive()) is not None:
            module_name, function_name, kwargs = task
            try:
                function = getattr(importlib.import_module(module_name), function_name)
                channel.send("answer", (True, function(**kwargs)))
            except BaseException:
                channel.send("answer", (False, traceback.format_exc()))


class GlooWorld:
    """``world_size`` spawned processes in one gloo group; ``run`` executes a function on all of them."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._ranks: LocalRanks | None = None
        self._start()

    def _start(self) -> None:
        # The world outlives single tests: its processes carry a tag of their own (see tests/conftest.py).
        from tests.conftest import SESSION_TAG

        self.tag = f"{SESSION_TAG}:gloo-world-{next(_worlds)}"
        ranks = LocalRanks(_worker, self.world_size, args=(free_port(),), inboxes=True, name="gloo-world")
        with processes.tag_environment(self.tag):
            self._ranks = ranks.start()
        self._collect(START_TIMEOUT, "start", restart=False)

    @property
    def pids(self) -> list[int]:
        return [] if self._ranks is None else self._ranks.pids

    def _collect(self, timeout: float, what: str, restart: bool = True) -> list[Any]:
        assert self._ranks is not None
        answers: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            try:
                _, rank, answer = self._ranks.receive(deadline)
            except RanksTimeoutError:
                missing = sorted(set(range(self.world_size)) - set(answers))
                self._recover(restart)
                raise TimeoutError(
                    f"{what}: ranks {missing} of {self.world_size} did not answer within {timeout:.0f} s (hang)"
                ) from None
            except RankError as error:
                self._recover(restart)
                raise AssertionError(f"{what}: {error}") from None
            answers[rank] = answer
        failures = {rank: value for rank, (ok, value) in answers.items() if not ok}
        if failures:
            self._recover(restart)
            report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items()))
            raise AssertionError(f"{what} failed on ranks {sorted(failures)}:\n{report}")
        return [answers[rank][1] for rank in range(self.world_size)]

    def run(self, function: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Call ``function(**kwargs)`` on every rank; return the per-rank results."""
        assert self._ranks is not None
        for rank in range(self.world_size):
            self._ranks.send(rank, (function.__module__, function.__name__, kwargs))
        return self._collect(timeout, function.__name__)

    def close(self) -> None:
        """Ask the ranks to leave, then the harness's rule; every process of the world must then be gone."""
        if self._ranks is None:
            return
        for rank in range(self.world_size):
            self._ranks.send(rank, None)
        self._ranks.stop(grace=10.0)
        codes = self._ranks.exitcodes
        self._ranks = None
        assert codes == [0] * self.world_size, f"the gloo world's ranks did not exit cleanly (exit codes {codes})"
        left = processes.wait_gone(self.tag, 5.0)
        assert not left, f"the gloo world left processes behind:\n{processes.describe(left)}"

    def _recover(self, restart: bool) -> None:
        if self._ranks is not None:
            self._ranks.stop()
            self._ranks = None
        if restart:
            self._start()

    def restart(self) -> None:
        """Tear down after a failure (a rank may be stuck in a collective) and start a fresh world."""
        self._recover(restart=True)
