"""What a test needs of the machine: without it the test is skipped, but in CI, which installs all of it, it fails."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Skip the test (or the module) for ``message``; in CI (``CI`` set), fail instead: nothing real is skipped."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require_mpi() -> Any:
    """mpi4py's ``MPI`` module; unavailable without mpi4py, or with mpi4py but no MPI library to load (a GPU
    machine's Python may have that)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # RuntimeError: "cannot load MPI library"
        unavailable(f"MPI cannot start here ({error}); CI installs mpi4py and MPICH")
    return MPI
