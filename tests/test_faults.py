"""Rank failures in real 4-rank jobs: the survivors must end, within the timeout, saying why.

One of 4 ranks (rank 2) fails at step 3 of a training loop (tests/fault_worker.py):
it raises, is killed with SIGKILL, or hangs out of the collectives. The
others run unmodified: nothing catches their errors. Over gloo the 4 ranks are
plain processes given torch.distributed's variables (no launcher that would
end them for us); over MPI they run under MPICH's ``mpiexec``.

Each test measures, from the moment the failing rank announced its failure,
how long every survivor took to exit, and asserts it is at most the 5 s
timeout given to ``init_distributed()`` plus the time a loaded machine takes
to tear a Python process down.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncbn.harness import free_port
from tests.launching import ROOT, clean_environ

pytestmark = pytest.mark.faults

WORKER = ROOT / "tests" / "fault_worker.py"
WORLD_SIZE = 4
FAILED_RANK = 2
TIMEOUT = 5.0
# Exiting after the error: tearing down torch and the backend, on 2 busy cores.
TEARDOWN = 10.0
# Start-up of 4 torch processes on 2 cores, plus the bound: beyond this a run is a hang.
DEADLINE = 120.0
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# Not anchored to a line: the other ranks' tracebacks go to the same output, a write at a time.
_FAILING = re.compile(r"FAILING rank (\d+) pid (\d+) mode \w+ at (\d+\.\d{3})\n")


@dataclass
class Job:
    """What the ranks printed, their exit codes, and when each exited after the failure (seconds)."""

    outputs: list[str]
    returncodes: list[int]
    delays: list[float]
    failed_pid: int
    failed_rank: int = FAILED_RANK

    def survivors(self) -> list[int]:
        return [rank for rank in range(len(self.outputs)) if rank != self.failed_rank]


def _watch(processes: list[subprocess.Popen[bytes]], stop_when: list[int]) -> list[float]:
    """Wait for the processes in ``stop_when``; kill everything left after that or at the deadline."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and not all(i in ended for i in stop_when):
        for i, process in enumerate(processes):
            if i not in ended and process.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.02)
    for i, process in enumerate(processes):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the process and all it started (mpiexec's ranks)
            process.wait(timeout=30)
            ended.setdefault(i, float("inf"))
    return [ended[i] for i in range(len(processes))]


def _failure(output: str, failed_rank: int = FAILED_RANK) -> tuple[int, float]:
    match = _FAILING.search(output)
    assert match is not None and int(match[1]) == failed_rank, f"the failing rank did not announce itself:\n{output}"
    return int(match[2]), float(match[3])


def start_gloo(tmp_path: Path, *args: str) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """4 processes with torch.distributed's env:// variables, as a launcher would set them, and nothing else."""
    port = str(free_port())
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    processes = []
    for rank, log in enumerate(logs):
        environ = clean_environ(
            RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        command = [sys.executable, str(WORKER), "--backend", "gloo", "--timeout", str(TIMEOUT), *args]
        with open(log, "wb") as out:
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return processes, logs


def run_gloo(mode: str, tmp_path: Path, *extra: str, failed_rank: int = FAILED_RANK) -> Job:
    processes, logs = start_gloo(tmp_path, "--mode", mode, "--fail-rank", str(failed_rank), *extra)
    survivors = [rank for rank in range(WORLD_SIZE) if rank != failed_rank]
    ended = _watch(processes, survivors)
    outputs = [log.read_text(errors="replace") for log in logs]
    pid, failed_at = _failure(outputs[failed_rank], failed_rank)
    return Job(outputs, [p.returncode for p in processes], [t - failed_at for t in ended], pid, failed_rank)


def run_mpi(mode: str, tmp_path: Path, *extra: str) -> Job:
    """``mpiexec -n 4`` on the MPI backend; the job's single output and exit time stand for every rank."""
    if not MPIEXEC.exists() and not os.environ.get("CI"):
        pytest.skip("mpiexec is not installed (pip install mpich)")
    log = tmp_path / "mpiexec.log"
    command = [str(MPIEXEC), "-n", str(WORLD_SIZE), sys.executable, str(WORKER), "--backend", "mpi"]
    command += ["--mode", mode, "--timeout", str(TIMEOUT), *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=clean_environ(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    (ended,) = _watch([process], [0])
    output = log.read_text(errors="replace")
    pid, failed_at = _failure(output)
    return Job([output] * WORLD_SIZE, [process.returncode] * WORLD_SIZE, [ended - failed_at] * WORLD_SIZE, pid)


def assert_survivors_end(job: Job, message: str | re.Pattern[str], within: float = TIMEOUT + TEARDOWN) -> None:
    """Every survivor exited with an error, within ``within`` seconds of the failure, saying ``message``."""
    print("seconds from the failure to each survivor's exit:", [round(job.delays[r], 2) for r in job.survivors()])
    for rank in job.survivors():
        output = job.outputs[rank]
        assert job.returncodes[rank] != 0, f"rank {rank} exited 0:\n{output}"
        assert job.delays[rank] <= within, f"rank {rank} took {job.delays[rank]:.1f} s to exit:\n{output}"
        found = re.search(message, output) if isinstance(message, re.Pattern) else message in output
        assert found, f"rank {rank} does not say {message!r}:\n{output}"
        assert "still referenced at exit" not in output, f"rank {rank} kept its process group alive:\n{output}"


def _names_rank(rank: int) -> re.Pattern[str]:
    """'The process of rank 2 ...' or 'The process of ranks 1, 2 ...'."""
    return re.compile(rf"The process of ranks? (?:\d+, )*{rank}\b")


# --- gloo -------------------------------------------------------------------------------------


def test_gloo_rank_raises(tmp_path: Path) -> None:
    """With the excepthook the failed rank records its exception; the others name it as soon as it exits."""
    job = run_gloo("raise", tmp_path, "--abort-on-exception")
    assert "RuntimeError: injected failure on rank 2" in job.outputs[FAILED_RANK]
    assert_survivors_end(job, re.compile(r"Collective(Timeout)?Error: SyncBatchNorm '1', forward of call 4: rank"))
    assert_survivors_end(job, "Rank 2 failed with RuntimeError: injected failure on rank 2 at step 3")


def test_gloo_rank_killed(tmp_path: Path) -> None:
    """SIGKILL: no code runs on the failed rank; the others find its process gone."""
    job = run_gloo("kill", tmp_path)
    assert job.returncodes[FAILED_RANK] == -9
    assert_survivors_end(job, "CollectiveError")
    assert_survivors_end(job, _names_rank(FAILED_RANK))


def test_gloo_store_host_killed(tmp_path: Path) -> None:
    """SIGKILL of rank 0, which hosts the rendezvous store: the others still name it, from what they read at start."""
    job = run_gloo("kill", tmp_path, failed_rank=0)
    assert job.returncodes[0] == -9
    assert_survivors_end(job, "CollectiveError")
    assert_survivors_end(job, _names_rank(0))


def test_gloo_rank_hangs(tmp_path: Path) -> None:
    """A rank alive but out of the collectives: the others time out after 5 s and say so."""
    job = run_gloo("hang", tmp_path)
    assert_survivors_end(job, "no answer from the other ranks within 5 s")
    for rank in job.survivors():
        assert job.delays[rank] >= TIMEOUT - 0.5, f"rank {rank} ended before the timeout: {job.delays[rank]:.1f} s"


def test_gloo_rank_killed_in_debug_mode(tmp_path: Path) -> None:
    """A failure inside debug mode's own check names the layer and the check, as any collective does."""
    job = run_gloo("kill", tmp_path, "--debug")
    assert_survivors_end(job, "CollectiveError: SyncBatchNorm '1', debug check before forward of call 4: rank")
    assert_survivors_end(job, _names_rank(FAILED_RANK))


@pytest.mark.parametrize("mode", ["exit", "close"])
def test_gloo_rank_ends_early(mode: str, tmp_path: Path) -> None:
    """A rank that ends its program with status 0 while the others train is named, not just a lost connection."""
    job = run_gloo(mode, tmp_path)
    assert job.returncodes[FAILED_RANK] == 0, job.outputs[FAILED_RANK]
    how = "ended its program" if mode == "exit" else "closed its process group"
    assert_survivors_end(
        job, re.compile(rf"Rank 2 left the job while this rank was still in a collective \(rank 2 {how}\)")
    )


def test_gloo_channel_counts_differ(tmp_path: Path) -> None:
    """Payloads of different lengths: gloo itself stops the rank that notices, and the others follow at once."""
    job = run_gloo("channels", tmp_path)
    outputs = "\n".join(job.outputs)
    assert "Received data size doesn't match expected size" in outputs, outputs
    assert_survivors_end(job, "CollectiveError", within=TEARDOWN)


# --- MPI --------------------------------------------------------------------------------------


def test_mpi_rank_raises_with_excepthook(tmp_path: Path) -> None:
    """The excepthook aborts MPI_COMM_WORLD: the whole job ends at once, naming the rank and its exception."""
    job = run_mpi("raise", tmp_path, "--abort-on-exception")
    # MPICH's own "application called MPI_Abort" line may be cut off when mpiexec kills the ranks; ours is
    # written before the abort, with time for mpiexec to forward it.
    assert_survivors_end(
        job,
        "syncbn: rank 2 of 4 stopped on an uncaught RuntimeError: injected failure on rank 2 at step 3",
        within=TEARDOWN,
    )


def test_mpi_rank_raises_without_excepthook(tmp_path: Path) -> None:
    """Without the hook the failed rank just exits; the others' timeout ends them."""
    job = run_mpi("raise", tmp_path)
    assert "RuntimeError: injected failure on rank 2" in job.outputs[0]
    assert_survivors_end(job, "no answer from the other ranks within 5 s")


def test_mpi_channel_counts_differ(tmp_path: Path) -> None:
    """MPICH would sum the common prefix of payloads of different lengths: the head [C, C^2] catches it."""
    job = run_mpi("channels", tmp_path)
    text = "RankMismatchError: SyncBatchNorm {}, forward of call {}: the ranks do not all have {} channels"
    for layer, call, channels in (("SyncBatchNorm(5)", 1, 5), ("'1'", 4, 8)):
        assert job.outputs[0].count(text.format(layer, call, channels)) == (1 if channels == 5 else 3), job.outputs[0]
    assert_survivors_end(job, "RankMismatchError", within=TEARDOWN)


def test_mpi_rank_killed(tmp_path: Path) -> None:
    """mpiexec (Hydra) sees the killed process and ends the others at once.

    It reports a process killed by signal 9 by its PID (not always the
    killed rank's: the first it saw end), not by its rank.
    """
    job = run_mpi("kill", tmp_path)
    assert_survivors_end(job, "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES", within=TEARDOWN)
    assert_survivors_end(job, "Killed (signal 9)")


def test_mpi_rank_hangs(tmp_path: Path) -> None:
    """A stuck rank: the others time out (MPI itself never would), and their excepthook ends the job."""
    job = run_mpi("hang", tmp_path, "--abort-on-exception")
    assert_survivors_end(job, "CollectiveTimeoutError: SyncBatchNorm '1', forward of call 4")
    assert_survivors_end(job, "no answer from the other ranks within 5 s")
    assert job.delays[0] >= TIMEOUT - 0.5


def test_gloo_control_without_failure(tmp_path: Path) -> None:
    """The control: with no failure injected the same 4-rank job trains and every rank exits 0."""
    processes, logs = start_gloo(tmp_path, "--fail-rank", "-1", "--steps", "5")
    _watch(processes, list(range(WORLD_SIZE)))
    for rank, (process, log) in enumerate(zip(processes, logs, strict=True)):
        output = log.read_text(errors="replace")
        assert process.returncode == 0 and f"rank {rank} finished" in output, output


def test_an_echo_lingers_until_the_others_have_read() -> None:
    """A rank ending on another's failure waits for every other rank to have read the store, and no longer."""
    import torch.distributed as dist

    from syncbn import faults

    store = dist.HashStore()
    faults.record_failure(store, 2, "RuntimeError: injected")  # the failed rank: it will not read
    store.set(faults._READ_KEY.format(1), "1")
    started = time.monotonic()
    faults._linger_for_readers(store, rank=0, world_size=4, within=0.6)  # rank 3 has not read: the whole wait
    assert time.monotonic() - started >= 0.6
    faults.record_departure(store, 3, "ended its program")
    started = time.monotonic()
    faults._linger_for_readers(store, rank=0, world_size=4, within=5.0)  # everyone accounted for: at once
    assert time.monotonic() - started < 1.0
    assert store.check([faults._READ_KEY.format(0)])  # a lingering rank marks itself: the others need not wait


def test_a_store_that_no_longer_answers_cannot_hold_the_exit() -> None:
    from syncbn import faults

    class Stuck:
        def set(self, key: str, value: str) -> None:
            time.sleep(30)

    started = time.monotonic()
    faults._linger_for_readers(Stuck(), rank=0, world_size=2, within=0.3)
    assert time.monotonic() - started < 1.0
