"""``syncbn env``: what this machine offers, for a bug report.

torch and CUDA versions, the GPUs, NCCL, the torch.distributed backends, the
MPI library mpi4py loads and whether it takes CUDA buffers, CuPy and its
CUDA, the launcher variables set, and what ``init_distributed()`` would do.
Every probe that fails says why instead of stopping the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import syncbn
from syncbn._install import install_command
from syncbn.cli import _machine
from syncbn.environments import LaunchError, detect_environment, launcher_variables

Report = dict[str, dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect()
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render(report))
    return 0


def collect() -> Report:
    """The whole report: section -> field -> value."""
    return {
        "syncbn": _probe(_syncbn),
        "torch": _probe(_torch),
        "mpi": _probe(_mpi),
        "cupy": _probe(_cupy),
        "launch": _probe(_launch),
    }


def render(report: Report) -> str:
    lines = []
    for section, fields in report.items():
        lines.append(section)
        width = max(map(len, fields), default=0)
        for name, value in fields.items():
            lines.append(f"  {name:<{width}}  {_text(value)}")
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return "; ".join(map(_text, value)) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def _probe(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return function()
    except Exception as error:  # a report must not stop at the first broken component
        return {"error": f"{type(error).__name__}: {error}"}


def _syncbn() -> dict[str, Any]:
    return {
        "version": syncbn.__version__,
        "ops": _ops(),
        "cpu path": _cpu_path(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": f"{_machine.cpu_model()} ({os.cpu_count()} logical cores)",
    }


def _ops() -> str:
    """``SYNCBN_OPS`` and what it means for CPU and CUDA tensors."""
    try:
        choice = syncbn.ops.get_ops()
    except ValueError as error:
        return f"invalid: {error}"
    return f"{choice} (cpu tensors: {syncbn.ops.name_for('cpu')}, cuda tensors: {syncbn.ops.name_for('cuda')})"


def _cpu_path() -> str:
    """``SYNCBN_EXTENSION`` and whether the compiled CPU path is built (nothing is built here)."""
    from syncbn import _extension

    try:
        choice = _extension.get_choice()
    except ValueError as error:
        return f"invalid: {error}"
    if choice == "off":
        return "off (SYNCBN_EXTENSION=off): the Python implementation"
    status = _extension.status()
    if status["built"]:
        return f"compiled ({choice}; {status['path']})"
    compiler = status["compiler"] or "no C++ compiler found: the Python implementation"
    return f"{choice}, not built yet (built on the first training call on CPU; compiler: {compiler})"


def _torch() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    nccl = None
    if cuda and dist.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))  # type: ignore[no-untyped-call]
    return {
        "version": torch.__version__,
        "cuda build": torch.version.cuda or "none (CPU build)",
        "cuda available": cuda,
        "gpus": gpus,
        "cudnn": torch.backends.cudnn.version() if cuda else None,  # type: ignore[no-untyped-call]
        "nccl": nccl,
        "distributed backends": {
            "gloo": dist.is_gloo_available(),
            "nccl": dist.is_nccl_available(),
            "mpi": dist.is_mpi_available(),
        },
        "threads": torch.get_num_threads(),
    }


def _mpi() -> dict[str, Any]:
    try:
        import mpi4py
    except ModuleNotFoundError:
        return {"mpi4py": f"not installed ({install_command('mpi')}, and an MPI such as `pip install mpich`)"}
    from syncbn import settings
    from syncbn.comm.mpi import cuda_aware, import_mpi, mpi_cuda_support

    MPI = import_mpi()
    library_says = mpi_cuda_support()
    override = settings.mpi_cuda_aware()
    transfers = ("given to MPI as they are (CUDA-aware)" if cuda_aware() else "staged through pinned host memory") + (
        f" ({settings.MPI_CUDA_AWARE}={int(override)})" if override is not None else ""
    )
    return {
        "mpi4py": mpi4py.__version__,
        "library": " ".join(MPI.Get_library_version().split("\n")[0].split()),
        "standard": "MPI {}.{}".format(*MPI.Get_version()),
        "cuda-aware": "unknown (no MPIX_Query_cuda_support)" if library_says is None else library_says,
        "cuda tensors": transfers,
        "COMM_WORLD": f"rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()}",
    }


def _cupy() -> dict[str, Any]:
    try:
        import cupy
    except ModuleNotFoundError:
        return {"cupy": "not installed (the GPU path needs it: pip install cupy-cuda12x or cupy-cuda13x)"}
    except Exception as error:
        return {"cupy": f"installed but failed to import: {type(error).__name__}: {error}"}
    fields: dict[str, Any] = {"cupy": cupy.__version__}
    try:
        version = cupy.cuda.runtime.runtimeGetVersion()
        fields["cuda runtime"] = f"{version // 1000}.{version % 1000 // 10}"
        fields["devices"] = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        fields["cuda runtime"] = f"unavailable: {type(error).__name__}: {error}"
    return fields


def _launch() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    try:
        environment = detect_environment()
        fields["launcher"] = (
            f"{environment.name} (rank {environment.rank} of {environment.world_size}, "
            f"local rank {environment.local_rank})"
        )
    except LaunchError as error:
        fields["launcher"] = f"misconfigured: {error}"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    fields["init_distributed()"] = f'backend="auto" -> {backend}'
    fields["variables"] = launcher_variables()
    return fields
