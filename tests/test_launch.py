"""The launch/ wrappers, run for real: torchrun on one node and on two "nodes", and mpiexec.

Each run trains examples/train_cnn.py for a few steps; every rank must print
every step over the whole global batch and end with running statistics equal
to those of the other ranks (the example checks that and exits 1 if not).
"""

from __future__ import annotations

import subprocess

import pytest

from syncbn.harness import free_port
from tests.launching import EXAMPLE, PYTHON, assert_synchronised, kill_session, read_report, run, start

pytestmark = pytest.mark.launch
STEPS = "3"


def check(result: subprocess.CompletedProcess[str], world_size: int, launcher: str, backend: str) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert_synchronised(result.stdout, world_size, launcher, backend, steps=int(STEPS))


def test_plain_process() -> None:
    check(run([PYTHON, str(EXAMPLE), "--steps", STEPS]), 1, "single process", "gloo")


def test_torchrun_single_node() -> None:
    result = run(["launch/torchrun_single_node.sh", str(EXAMPLE), "--steps", STEPS], NPROC_PER_NODE="3")
    check(result, 3, "torchrun", "gloo")


def test_torchrun_multi_node() -> None:
    """Two torchrun agents, as two nodes would start them, meet in a c10d rendezvous: 2 x 2 workers."""
    variables = {"NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": "t"}
    command = ["launch/torchrun_multi_node.sh", str(EXAMPLE), "--steps", STEPS]
    nodes = [start(command, **variables) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=240)
            assert node.returncode == 0, f"exit {node.returncode}\n{stdout}\n{stderr}"
            outputs.append(stdout)
    finally:
        for node in nodes:
            kill_session(node)  # an agent, and its workers, that did not finish
    assert_synchronised("".join(outputs), 4, "torchrun", "gloo", steps=int(STEPS))
    # Each agent ran two of the four workers.
    assert all(len(ranks_in(out)) == 2 for out in outputs)


def ranks_in(output: str) -> set[int]:
    return {int(line.split()[1].split("/")[0]) for line in output.splitlines() if " step " in line}


@pytest.mark.parametrize(("nprocs", "backend"), [(4, "mpi"), (2, "gloo")])
def test_mpiexec(nprocs: int, backend: str) -> None:
    result = run(["launch/mpiexec.sh", str(EXAMPLE), "--steps", STEPS, "--backend", backend], NPROCS=str(nprocs))
    check(result, nprocs, "mpiexec (MPICH/Hydra)", backend)


def test_the_example_fails_when_ranks_are_not_synchronised() -> None:
    """The check the launch tests rely on can fail: plain per-rank BatchNorm ends with different statistics."""
    result = run(["launch/mpiexec.sh", str(EXAMPLE), "--steps", "2", "--unsynced", "--backend", "mpi"], NPROCS="2")
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    assert set(read_report(result.stdout, 2).verdicts.values()) == {"DIFFER"}


def test_a_misconfigured_launch_fails_on_every_rank_with_the_fix() -> None:
    """A WORLD_SIZE left in the job's environment that disagrees with mpiexec's: an error, not a hang."""
    result = run(["launch/mpiexec.sh", str(EXAMPLE), "--steps", "1"], NPROCS="2", WORLD_SIZE="3", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("LaunchError: WORLD_SIZE=3 is set in the environment") == 2, result.stderr
    assert "HINT: remove WORLD_SIZE" in result.stderr


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh", "mpiexec.sh"])
def test_wrappers_print_their_usage(script: str) -> None:
    result = run([f"launch/{script}", "--help"], timeout=30)
    assert result.returncode == 2
    assert "Environment:" in result.stdout and "syncbn.init_distributed()" in result.stdout
