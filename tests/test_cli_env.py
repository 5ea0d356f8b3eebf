"""``syncbn env``, run as users run it: a real process, and under a real launcher."""

from __future__ import annotations

import json
import re

import torch

from tests.launching import PYTHON, run


def test_env_report_sections() -> None:
    result = run([PYTHON, "-m", "syncbn", "env"], timeout=120)
    assert result.returncode == 0, result.stderr
    for section in ("syncbn", "torch", "mpi", "cupy", "launch"):
        assert f"\n{section}\n" in f"\n{result.stdout}"
    assert f"version               {torch.__version__}" in result.stdout
    assert "launcher            single process (rank 0 of 1, local rank 0)" in result.stdout
    assert 'backend="auto" -> ' + ("nccl" if torch.cuda.is_available() else "gloo") in result.stdout


def test_env_json() -> None:
    result = run([PYTHON, "-m", "syncbn", "env", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["distributed backends"]["gloo"] is True
    assert report["mpi"]["library"].startswith("MPICH")  # the test extra installs MPICH and mpi4py
    assert report["mpi"]["cuda-aware"] is False  # MPICH from PyPI is built without CUDA
    assert report["launch"]["variables"] == {"OMP_NUM_THREADS": "1"}  # what the test harness sets, no launcher


def test_env_reports_the_launcher_variables_and_a_misconfiguration() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    report = json.loads(run([PYTHON, "-m", "syncbn", "env", "--json"], timeout=120, **torchrun).stdout)
    assert report["launch"]["launcher"] == "torchrun (rank 1 of 2, local rank 1)"
    assert report["launch"]["variables"] == {**torchrun, "OMP_NUM_THREADS": "1"}
    wrong = run([PYTHON, "-m", "syncbn", "env"], timeout=120, PMI_RANK="0", PMI_SIZE="1", WORLD_SIZE="4")
    assert wrong.returncode == 0
    assert "misconfigured: WORLD_SIZE=4 is set in the environment" in wrong.stdout


def test_env_under_mpiexec() -> None:
    result = run(["launch/mpiexec.sh", "-m", "syncbn", "env"], NPROCS="2", timeout=120)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert f"mpiexec (MPICH/Hydra) (rank {rank} of 2, local rank {rank})" in result.stdout
        assert re.search(rf"COMM_WORLD +rank {rank} of 2\n", result.stdout), result.stdout
