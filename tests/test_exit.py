"""How a job ends: no reference to a destroyed group survives in syncbn, and runs exit 0 under every launcher.

A gloo group still alive when the interpreter shuts down can abort a process
that trained correctly (``terminate called without an active exception``):
its worker threads, still releasing the tensors of the last collective, need
the GIL that a finalising interpreter refuses. So ``close()``, and the exit of
a program that never called it, must leave the group free to go at once.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import syncbn
from syncbn.comm import LocalCommunicator, get_communicator
from tests.launching import PYTHON, run


@pytest.fixture
def world_of_one() -> Iterator[syncbn.DistributedContext]:
    """``init_distributed()`` in this process: a gloo group of one, closed at the end in any case."""
    context = syncbn.init_distributed(timeout=30)
    yield context
    context.close()


def test_close_leaves_no_reference_to_the_group(world_of_one: syncbn.DistributedContext) -> None:
    """Layers, their autograd graphs, subgroups and the communicator cache hold the groups weakly."""
    context = world_of_one
    world = weakref.ref(dist.group.WORLD)
    subgroup = dist.new_group([0])
    sub = weakref.ref(subgroup)
    layers = [syncbn.SyncBatchNorm(3, process_group=group) for group in (None, context.process_group, subgroup)]
    del subgroup
    outputs = []
    for layer in layers:
        get_communicator(layer.process_group)
        outputs.append(layer(torch.randn(4, 3, requires_grad=True)))  # graphs kept: they hold the layers' calls
    assert syncbn.comm.cache_size() >= 2
    context.close()
    gc.collect()
    assert world() is None, "a destroyed default group is still referenced"
    assert sub() is None, "a destroyed subgroup is still referenced"
    assert context.process_group is None and syncbn.comm.cache_size() == 0
    assert isinstance(get_communicator(None), LocalCommunicator)
    with pytest.raises(RuntimeError, match="process group given to this layer has been destroyed"):
        layers[2](torch.randn(4, 3))
    context.close()  # a second close does nothing


def test_ddp_does_not_keep_the_group_alive(world_of_one: syncbn.DistributedContext) -> None:
    """DistributedDataParallel imports torch._dynamo, whose import would bind the group as a default argument."""
    world = weakref.ref(dist.group.WORLD)
    model = torch.nn.parallel.DistributedDataParallel(syncbn.convert_sync_batchnorm(torch.nn.BatchNorm1d(3)))
    model(torch.randn(4, 3)).sum().backward()
    del model
    world_of_one.close()
    gc.collect()
    assert world() is None


def test_mpi_context_close() -> None:
    context = syncbn.init_distributed(backend="mpi", timeout=30)
    assert syncbn.get_default_process_group() is context.process_group is not None
    context.close()
    assert context.process_group is None and syncbn.get_default_process_group() is None
    assert isinstance(get_communicator(None), LocalCommunicator)


EXIT_CHECK = """
import atexit, gc, sys, weakref
import torch, torch.distributed as dist
state = {}
def check():  # registered before syncbn's own exit handler, so it runs after it
    gc.collect()
    print("group freed before shutdown:", state["world"]() is None, flush=True)
atexit.register(check)
import syncbn
ctx = syncbn.init_distributed(timeout=30)
state["world"] = weakref.ref(dist.group.WORLD)
model = torch.nn.parallel.DistributedDataParallel(syncbn.convert_sync_batchnorm(torch.nn.BatchNorm1d(3)))
model(torch.randn(4, 3)).sum().backward()
del model
"""


@pytest.mark.parametrize("ending", ["return", "exception"])
def test_exit_without_close_frees_the_group(ending: str, tmp_path: Path) -> None:
    """A program that never calls close(): syncbn destroys and frees the group before the interpreter shuts down."""
    script = tmp_path / "job.py"
    script.write_text(EXIT_CHECK + ("raise SystemExit(0)\n" if ending == "return" else "raise RuntimeError('x')\n"))
    result = run([PYTHON, str(script)], timeout=120)
    assert "group freed before shutdown: True" in result.stdout, result.stdout + result.stderr
    assert result.returncode == (0 if ending == "return" else 1), result.stderr
    assert "terminate called" not in result.stderr and "still referenced at exit" not in result.stderr


def test_a_group_kept_alive_by_the_program_is_reported(tmp_path: Path) -> None:
    """The program keeps the group in a global: syncbn cannot free it, and says why a crash may follow."""
    script = tmp_path / "job.py"
    script.write_text(EXIT_CHECK.replace("del model\n", "") + "ctx.close()\n")
    result = run([PYTHON, str(script)], timeout=120)
    assert "group freed before shutdown: False" in result.stdout, result.stdout + result.stderr
    assert "syncbn: a torch.distributed process group is still referenced at exit" in result.stderr


@pytest.mark.launch
def test_reliability_benchmark_short(tmp_path: Path) -> None:
    """One round of bench/reliability.py: both jobs under every launcher exit 0, with nothing left running."""
    command = [PYTHON, "bench/reliability.py", "--runs", "1", "--endings", "0", "--output-dir", str(tmp_path)]
    result = run(command, timeout=900)
    report = json.loads((tmp_path / "reliability.json").read_text())
    outcomes = {(r["launcher"], r["job"]): r["outcome"] for r in report["runs"]}
    assert len(outcomes) == 5 * 3, outcomes
    failures = "\n\n".join(f"{f['launcher']} {f['job']}:\n{f['output']}" for f in report["failures"])
    assert set(outcomes.values()) == {"clean"}, f"{outcomes}\n{failures}"
    assert result.returncode == 0, result.stdout
    assert "In all: 15 of 15 runs clean." in (tmp_path / "reliability.md").read_text()
