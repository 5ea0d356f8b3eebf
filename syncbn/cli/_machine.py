"""What a measurement ran on: recorded beside every benchmark and demo result."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import syncbn


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other jobs on the machine slow the ranks down."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(value, 2) for value in os.getloadavg()]
    return None


def git_describe() -> str | None:
    """The commit of the checkout syncbn is imported from, and whether the package differs from it; None outside git.

    ``git describe --dirty`` misses new files, so the package's own status is asked too.
    """
    package = Path(syncbn.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        commit = git("describe", "--always")
        changed = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} with uncommitted changes in syncbn/" if changed else commit


def describe(*packages: str) -> dict[str, Any]:
    """CPU, cores, versions (of torch, syncbn and ``packages``), commit, date and how busy the machine is."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{package: package_version(package) for package in packages},
        "syncbn": syncbn.__version__,
        "syncbn_git": git_describe(),
        "cuda_available": torch.cuda.is_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
    }
