"""Fixtures shared by the test files, and the rule that no test leaves a process running."""

from __future__ import annotations

import itertools
import os
import random
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING

import pytest

from tests import processes

if TYPE_CHECKING:
    from tests.gloo_world import GlooWorld

# Every process started during the session carries this prefix in its environment (tests/processes.py).
SESSION_TAG = f"syncbn-tests-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_numbers = itertools.count()
# Where a process left at the end may be ours for good reason: multiprocessing's resource tracker
# serves this process until it exits (started here, under the session's tag, not a test's).
_KEPT: set[int] = set()
# A test's processes must be gone this long after it ends.
WITHIN = 5.0


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[processes.TAG] = SESSION_TAG
    resource_tracker.ensure_running()
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    if tracker is not None:
        _KEPT.add(tracker)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = processes.wait_gone(SESSION_TAG, WITHIN, prefix=True, ignore=_KEPT)
    if left:
        print(f"\nprocesses started by the tests still running at the end:\n{processes.describe(left)}")
        processes.kill(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def no_process_left(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every process the test started (and those they started) must be gone within 5 s of its end.

    Yields the test's tag; long-lived helpers (the gloo worlds) run under tags of their own.
    """
    tag = f"{SESSION_TAG}:test-{next(_numbers)}"
    with processes.tag_environment(tag):
        yield tag
    left = processes.wait_gone(tag, WITHIN)
    if left:
        text = processes.describe(left)
        processes.kill(left)
        pytest.fail(f"{request.node.nodeid} left processes running {WITHIN:g} s after it ended:\n{text}")


#: The sizes of the gloo worlds that tests/test_gloo.py and tests/test_compile.py run on.
GLOO_WORLD_SIZES = [2, 4]


@pytest.fixture(scope="module", params=GLOO_WORLD_SIZES, ids=[f"world{n}" for n in GLOO_WORLD_SIZES])
def world(request: pytest.FixtureRequest) -> Iterator[GlooWorld]:
    """Real gloo ranks, started once per test module and world size (see tests/gloo_world.py)."""
    from tests.gloo_world import GlooWorld

    gloo_world = GlooWorld(request.param)
    yield gloo_world
    gloo_world.close()


@pytest.fixture
def seed() -> int:
    """A fresh seed for every test, printed so that a failure can be replayed (test_mpi.py shares it over MPI)."""
    value = random.randrange(2**31)
    print(f"seed={value}")
    return value
