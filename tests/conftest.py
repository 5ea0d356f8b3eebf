"""Fixtures shared by the test files."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed for every test, printed so that a failure can be replayed (test_mpi.py shares it over MPI)."""
    value = random.randrange(2**31)
    print(f"seed={value}")
    return value
