"""Running the example under real launchers, and reading what its ranks printed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from syncbn.harness import launch_environ

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_cnn.py"
PYTHON = sys.executable

_STEP = re.compile(
    r"^rank (?P<rank>\d+)/(?P<world>\d+) step (?P<step>\d+)/(?P<steps>\d+) loss (?P<loss>\S+) "
    r"global batch (?P<batch>\d+) = (?P<ranks>\d+) ranks x (?P<local>\d+) local "
    r"\(launcher: (?P<launcher>[^,]+), backend: (?P<backend>\w+), device: (?P<device>[^)]+)\)$",
    re.MULTILINE,
)
_VERDICT = re.compile(
    r"^rank (?P<rank>\d+)/(?P<world>\d+): running statistics and parameters (?P<verdict>EQUAL|DIFFER)", re.MULTILINE
)


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, with ``PYTHON`` and ``extra``."""
    return launch_environ(PYTHON, **extra)


def start(command: list[str], **extra: str) -> subprocess.Popen[str]:
    """Start ``command`` from the repository root in a session of its own, its output captured.

    The session lets :func:`kill_session` end everything the command started
    (a launcher's ranks too), not only the command itself.
    """
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=clean_environ(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_session(process: subprocess.Popen[str]) -> None:
    """SIGKILL to every process still in ``process``'s session (it leads it: see :func:`start`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def run(command: list[str], timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` from the repository root; a hang is killed at ``timeout`` (all it started) and fails the test."""
    process = start(command, **extra)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@dataclass
class Report:
    """What the example's ranks printed."""

    world_size: int
    launchers: set[str]
    backends: set[str]
    verdicts: dict[int, str]


def read_report(output: str, world_size: int, batch_size: int = 4, steps: int | None = None) -> Report:
    """Check the example's lines: every rank printed every step over the whole group, then a verdict."""
    steps_seen: dict[int, list[int]] = {}
    launchers, backends = set(), set()
    for match in _STEP.finditer(output):
        assert int(match["world"]) == world_size, match.group(0)
        assert int(match["ranks"]) == world_size, match.group(0)  # the group SyncBatchNorm synchronised over
        assert int(match["batch"]) == world_size * batch_size == int(match["ranks"]) * int(match["local"])
        steps_seen.setdefault(int(match["rank"]), []).append(int(match["step"]))
        if steps is not None:
            assert int(match["steps"]) == steps
        launchers.add(match["launcher"])
        backends.add(match["backend"])
    assert sorted(steps_seen) == list(range(world_size)), f"ranks that printed steps: {sorted(steps_seen)}\n{output}"
    counts = {len(seen) for seen in steps_seen.values()}
    assert len(counts) == 1 and 0 not in counts, f"steps per rank differ: {steps_seen}"
    verdicts = {int(m["rank"]): m["verdict"] for m in _VERDICT.finditer(output)}
    assert sorted(verdicts) == list(range(world_size)), f"ranks that gave a verdict: {sorted(verdicts)}\n{output}"
    return Report(world_size, launchers, backends, verdicts)


def assert_synchronised(output: str, world_size: int, launcher: str, backend: str, steps: int | None = None) -> None:
    """Every rank trained over the global batch and ended with the same statistics as the others."""
    report = read_report(output, world_size, steps=steps)
    assert report.launchers == {launcher}, report.launchers
    assert report.backends == {backend}, report.backends
    assert set(report.verdicts.values()) == {"EQUAL"}, report.verdicts


@dataclass
class Ending:
    """How a command ended after the test did something to it while its ranks ran."""

    returncode: int
    output: str  # stdout and stderr together
    seconds: float  # from the action to the command's exit
    ranks: list[int]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end_while_running(
    command: list[str],
    world_size: int,
    action: Callable[[subprocess.Popen[bytes], list[int]], None],
    log: Path,
    exit_within: float,
    start_within: float = 120.0,
) -> Ending:
    """Start ``command``; once its ``world_size`` ranks run, ``action(process, rank_pids)``; wait for its exit.

    The command's output goes to ``log`` (a pipe nobody reads could fill and
    block it). Past ``exit_within`` seconds after the action, everything the
    command started is killed and the test fails.
    """
    from tests import processes

    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=clean_environ(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT as in a terminal: a suite started in the background (`nohup make test &`) has it ignored,
            # and the command would inherit that.
            preexec_fn=_default_sigint,
        )
    try:
        ranks = processes.wait_for_ranks(process.pid, world_size, start_within)
        time.sleep(1.0)  # let them train
        acted = time.monotonic()
        action(process, ranks)
        try:
            process.wait(timeout=exit_within)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{' '.join(command)} still ran {exit_within:g} s after the test acted:\n{log.read_text()}"
            ) from None
        return Ending(process.returncode, log.read_text(errors="replace"), time.monotonic() - acted, ranks)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def signal_the_command(sig: int) -> Callable[[subprocess.Popen[bytes], list[int]], None]:
    """An action for :func:`end_while_running`: send ``sig`` to the command (not to its ranks)."""
    return lambda process, ranks: os.kill(process.pid, sig)


def kill_a_rank(process: subprocess.Popen[bytes], ranks: list[int]) -> None:
    """An action for :func:`end_while_running`: SIGKILL the last rank."""
    os.kill(ranks[-1], signal.SIGKILL)


def assert_a_signal_ends_every_process(command: list[str], sig: int, log: Path, tag: str) -> None:
    """``sig`` to ``command`` while its 2 ranks run: it exits ``128 + sig`` within 5 s, and 5 s later every
    process it started (``tag``: the test's process tag) is gone."""
    from tests import processes

    ending = end_while_running(command, 2, signal_the_command(sig), log, exit_within=5.0)
    assert ending.returncode == 128 + sig, ending.output
    left = processes.wait_gone(tag, 5.0)
    assert not left, processes.describe(left)
    print(f"exited {ending.seconds:.2f} s after {signal.Signals(sig).name}")


def assert_a_dead_rank_fails_the_command(command: list[str], log: Path, tag: str) -> None:
    """SIGKILL of rank 1 of 2: ``command`` exits 1 within 5 s naming it, and leaves no process behind."""
    from tests import processes

    ending = end_while_running(command, 2, kill_a_rank, log, exit_within=5.0)
    assert ending.returncode == 1, ending.output
    # Rank 1 was killed; rank 0, left alone in a collective, may report first: either way rank 1 is named.
    assert re.search(r"rank 1 of 2 exited without a result \(killed by SIGKILL\)", ending.output), ending.output
    left = processes.wait_gone(tag, 5.0)
    assert not left, processes.describe(left)
