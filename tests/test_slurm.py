"""Every template in slurm/, submitted with sbatch to a real one-node Slurm cluster.

`make slurm-test` (part of `make test`) starts the cluster with
slurm/ci/local-cluster.sh, runs this file, and stops it. Without a cluster
these tests skip, saying how to start one; in CI (``CI`` set) they fail.
Each job runs examples/train_cnn.py on 2 to 4 CPU tasks; the test reads the
job's state from Slurm and checks in its output that every rank trained over
the global batch and ended with the same statistics.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launching import EXAMPLE, ROOT, assert_synchronised, clean_environ
from tests.needs import unavailable

pytestmark = pytest.mark.slurm
STEPS = 3
JOB_TIMEOUT = 300  # seconds; the job's own --time limit is shorter, so Slurm ends a hung job first


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """An idle Slurm node to submit to; otherwise a skip (a failure in CI) that says how to get one."""
    problem = None
    if shutil.which("sbatch") is None:
        problem = "Slurm is not installed"
    else:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
        if state.returncode != 0 or "idle" not in state.stdout:
            problem = f"no idle Slurm node (sinfo: {(state.stdout + state.stderr).strip()!r})"
    if problem is not None:
        unavailable(f"{problem}; HINT: `sudo slurm/ci/local-cluster.sh start` (or `make slurm-test`, as root)")


class Job:
    """One sbatch submission, waited for; its id, exit status, Slurm state and output."""

    def __init__(self, script: Path | str, tmp_path: Path, *options: str, args: tuple[str, ...] = (), **env: str):
        self.output_file = tmp_path / "job.out"
        command = ["sbatch", "--wait", "--parsable", f"--output={self.output_file}", f"--chdir={ROOT}",
                   "--time=4", *options, str(script), *args]  # fmt: skip
        environ = clean_environ(SCRIPT=str(EXAMPLE), **env)
        try:
            result = subprocess.run(
                command, env=environ, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as error:
            out = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
            job_id = out.strip().split(";")[0]
            if job_id:
                subprocess.run(["scancel", job_id], check=False, timeout=30)
            raise
        self.returncode = result.returncode
        self.id = result.stdout.strip().split(";")[0]
        assert self.id.isdigit(), f"sbatch did not submit: {result.stdout}{result.stderr}"
        self.output = self.output_file.read_text() if self.output_file.exists() else ""
        self.state, self.exit_code = self._state()

    def _state(self) -> tuple[str, str]:
        info = subprocess.run(["scontrol", "show", "job", self.id], capture_output=True, text=True, timeout=30)
        state = re.search(r"JobState=(\S+)", info.stdout)
        exit_code = re.search(r"\bExitCode=(\S+)", info.stdout)
        assert state and exit_code, f"scontrol knows no job {self.id}: {info.stdout}{info.stderr}"
        return state[1], exit_code[1]

    def __repr__(self) -> str:
        return f"job {self.id}: {self.state}, exit {self.exit_code}\n--- output ---\n{self.output}"


ARGS = ("--steps", str(STEPS))


def assert_completed(job: Job) -> None:
    assert job.returncode == 0 and job.state == "COMPLETED" and job.exit_code == "0:0", job


def test_srun_one_task_per_gpu(tmp_path: Path) -> None:
    job = Job("slurm/srun_per_gpu.sbatch", tmp_path, args=ARGS)
    assert_completed(job)
    assert "4 tasks on" in job.output
    assert_synchronised(job.output, 4, "slurm", "gloo", steps=STEPS)


def test_torchrun_per_node(tmp_path: Path) -> None:
    job = Job("slurm/torchrun_per_node.sbatch", tmp_path, args=ARGS, NPROC_PER_NODE="2")
    assert_completed(job)
    assert_synchronised(job.output, 2, "torchrun", "gloo", steps=STEPS)


def test_mpi_with_srun_pmi2(tmp_path: Path) -> None:
    job = Job("slurm/mpi.sbatch", tmp_path, args=ARGS, MPI_LAUNCH="srun")
    assert_completed(job)
    assert_synchronised(job.output, 4, "slurm", "mpi", steps=STEPS)


def test_mpi_with_mpiexec_inside_the_allocation(tmp_path: Path) -> None:
    job = Job("slurm/mpi.sbatch", tmp_path, "--ntasks-per-node=3", args=ARGS, MPI_LAUNCH="mpiexec")
    assert_completed(job)
    assert_synchronised(job.output, 3, "mpiexec (MPICH/Hydra)", "mpi", steps=STEPS)


# --- misconfigured jobs end at once, on every rank, with the fix ---


def test_torchrun_started_on_every_task_is_refused(tmp_path: Path) -> None:
    """srun with 2 tasks on one node, each starting torchrun: the classic mistake."""
    script = tmp_path / "wrong.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=1 --ntasks-per-node=2\n"
        'srun "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 "$SCRIPT" --steps 1\n'
    )
    job = Job(script, tmp_path)
    assert job.returncode != 0 and job.state == "FAILED", job
    assert job.output.count("LaunchError: torchrun runs inside a Slurm step of 2 tasks on 1 node(s)") == 2, job
    assert "HINT: start one torchrun per node" in job.output


def test_a_plain_process_in_a_multi_task_batch_script_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "no_srun.sbatch"
    script.write_text('#!/bin/bash\n#SBATCH --ntasks=2\n"$PYTHON" "$SCRIPT" --steps 1\n')
    job = Job(script, tmp_path)
    assert job.returncode != 0 and job.state == "FAILED", job
    assert re.search(r"LaunchError: this process runs in the batch script of Slurm job \d+, which asked for 2 tasks",
                     job.output), job  # fmt: skip
    assert "HINT: start the tasks with `srun python train.py`" in job.output
