"""The per-device implementations: the table that picks one, SYNCBN_OPS, the host reads, MPI transfers.

The oracle matrix runs both CPU implementations already (``tests/cases.py``,
``ORACLE_MATRIX``); these are the decisions around them, checked without a GPU.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import ops, settings
from syncbn._install import install_command
from syncbn.comm import mpi as comm_mpi
from syncbn.ops.base import Ops, Summary
from syncbn.ops.cpu import CPUOps
from syncbn.ops.generic import GenericOps
from tests import cases
from tests.needs import require_mpi

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each test starts from SYNCBN_OPS as this process has it, with no implementation made yet, and leaves it so."""
    monkeypatch.setattr(ops, "_made", {})
    monkeypatch.setattr(ops, "_said", set())
    ops.set_ops(None)
    yield
    ops.set_ops(None)


# --- SYNCBN_OPS, read in one place --------------------------------------------------------------


@pytest.mark.parametrize(("value", "choice"), [(None, "auto"), ("", "auto"), ("torch", "torch"), (" CuPy ", "cupy")])
def test_ops_variable(value: str | None, choice: str) -> None:
    environ = {} if value is None else {settings.OPS: value}
    assert settings.ops(environ) == choice


def test_unknown_ops_value_names_the_variable_and_its_values() -> None:
    with pytest.raises(ValueError, match=r"SYNCBN_OPS='triton'.*one of auto, torch, cupy"):
        settings.ops({settings.OPS: "triton"})
    with pytest.raises(ValueError, match="expected one of auto, torch, cupy"):
        ops.set_ops("numpy")


def test_unknown_ops_value_raises_at_the_first_training_call_not_at_import() -> None:
    code = (
        "import torch, syncbn\n"
        "layer = syncbn.SyncBatchNorm(3)\n"
        "layer.eval()(torch.randn(4, 3))\n"  # evaluation with running statistics needs no implementation
        "try:\n"
        "    layer.train()(torch.randn(4, 3))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, settings.OPS: "fast"}, capture_output=True, text=True,
        timeout=120, check=True, cwd=ROOT,
    )  # fmt: skip
    assert "SYNCBN_OPS='fast'" in done.stdout and "auto, torch, cupy" in done.stdout, done.stdout + done.stderr


def test_the_environment_variable_selects_the_generic_implementation_everywhere() -> None:
    code = "import syncbn; print(syncbn.ops.for_device('cpu').name, syncbn.ops.for_device('cuda').name)"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, settings.OPS: "torch"}, capture_output=True, text=True,
        timeout=120, check=True, cwd=ROOT,
    )  # fmt: skip
    assert done.stdout.split() == ["torch", "torch"], done.stdout + done.stderr


# --- the table keyed by device type --------------------------------------------------------------


def test_table_by_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "cupy_installed", lambda: False)
    with ops.using("auto"):
        assert isinstance(ops.for_device("cpu"), CPUOps)
        assert isinstance(ops.for_device("meta"), GenericOps)  # a device without its own: the generic one
        with pytest.warns(UserWarning, match=r"CuPy is not installed.*" + re.escape(install_command("cuda13"))):
            assert isinstance(ops.for_device("cuda"), GenericOps)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            ops.for_device("cuda")
    with ops.using("torch"):
        assert all(isinstance(ops.for_device(device), GenericOps) for device in ("cpu", "cuda", "meta"))
    with ops.using("cupy"):
        assert isinstance(ops.for_device("cpu"), CPUOps)  # the kernels are for CUDA tensors only
    assert ops.name_for("cuda", "cupy") == "cupy" and ops.name_for("xpu", "auto") == "torch"
    monkeypatch.setattr(ops, "cupy_installed", lambda: True)
    assert ops.name_for("cuda", "auto") == "cupy" and ops.name_for("cuda", "torch") == "torch"


def test_cupy_without_cupy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ModuleNotFoundError
    hint = re.escape(install_command("cuda13")) + ".*" + re.escape(install_command("cuda12"))
    with ops.using("cupy"), pytest.raises(ModuleNotFoundError, match=hint):
        ops.for_device("cuda")


def test_every_implementation_follows_the_interface() -> None:
    abstract = {name for name, value in vars(Ops).items() if getattr(value, "__isabstractmethod__", False)}
    assert abstract == {
        "forward_moments", "read_summary", "forward_finish", "normalize", "backward_reduce", "backward_elemt",
    }  # fmt: skip
    for implementation in (CPUOps, GenericOps):
        assert not implementation.__abstractmethods__, implementation
        assert implementation.name in ops.IMPLEMENTATIONS


# --- host reads: one per training forward at world size 2, none at 1 and none in backward --------


class _CountingReads(GenericOps):
    """The generic implementation, counting its host reads; on ``meta`` it invents their values."""

    def __init__(self) -> None:
        self.reads = 0

    def read_summary(self, payload: torch.Tensor) -> Summary | None:
        self.reads += 1
        if payload.device.type == "meta":
            channels = (payload.shape[0] - 4) // 2
            return Summary(2.0 * channels, 2.0 * channels * channels, 16.0, 2.0)
        return super().read_summary(payload)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> _CountingReads:
    implementation = _CountingReads()
    monkeypatch.setattr(ops, "for_device", lambda device_type: implementation)
    return implementation


@pytest.mark.parametrize("world_size", [1, 2])
def test_one_host_read_per_forward_and_none_in_backward(counting: _CountingReads, world_size: int) -> None:
    """On ``meta`` tensors every read of a value raises: the only one the layer makes is ``read_summary``."""
    group = cases.TwoEqualRanks() if world_size == 2 else syncbn.comm.LOCAL
    layer = syncbn.SyncBatchNorm(4, process_group=group, device="meta")
    x = torch.empty(2, 4, 3, 3, device="meta").requires_grad_()
    for step in range(3):
        layer(x).sum().backward()
        assert counting.reads == (step + 1 if world_size == 2 else 0)


def test_two_equal_ranks_match_the_doubled_batch(counting: _CountingReads, seed: int) -> None:
    """The generic implementation at world size 2 (a mirrored rank) against nn.BatchNorm on both batches."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64) * 2 + 3).requires_grad_()
    dy = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64)
    layer = syncbn.SyncBatchNorm(4, process_group=cases.TwoEqualRanks()).double()
    reference = nn.BatchNorm2d(4).double()
    y = layer(x)
    y.backward(dy)
    both = torch.cat((x.detach(), x.detach())).requires_grad_()
    y_ref = reference(both)
    y_ref.backward(torch.cat((dy, dy)))
    assert both.grad is not None and x.grad is not None
    assert_close(y, y_ref[:3], rtol=1e-9, atol=1e-9)
    assert_close(layer.running_mean, reference.running_mean)
    assert_close(layer.running_var, reference.running_var)
    assert_close(x.grad, both.grad[:3], rtol=1e-9, atol=1e-9)
    assert counting.reads == 1


# --- MPI and CUDA tensors: the transfer decision -------------------------------------------------


@pytest.mark.parametrize(
    ("device", "aware", "expected"),
    [("cpu", False, "host"), ("cpu", True, "host"), ("cuda", True, "device"), ("cuda", False, "staged")],
)
def test_mpi_transfer(device: str, aware: bool, expected: str) -> None:
    assert comm_mpi.transfer(device, aware) == expected


def test_mpi_transfer_refuses_other_devices() -> None:
    with pytest.raises(NotImplementedError, match="CPU and CUDA tensors, got a xpu tensor"):
        comm_mpi.transfer("xpu", True)


def test_mpi_cuda_awareness_override() -> None:
    assert comm_mpi.cuda_aware({settings.MPI_CUDA_AWARE: "1"}) is True
    assert comm_mpi.cuda_aware({settings.MPI_CUDA_AWARE: "no"}) is False
    with pytest.raises(ValueError, match="SYNCBN_MPI_CUDA_AWARE='maybe' is not a yes or no"):
        comm_mpi.cuda_aware({settings.MPI_CUDA_AWARE: "maybe"})
    require_mpi()
    # The PyPI MPICH build is not CUDA-aware: its CUDA tensors are staged.
    assert comm_mpi.cuda_aware({}) is bool(comm_mpi.mpi_cuda_support())


# --- structure -----------------------------------------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """syncbn's modules and the syncbn modules each imports (anywhere in it, TYPE_CHECKING blocks aside)."""
    files = {}
    for path in (ROOT / "syncbn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []  # never run: not an import
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in files else node.module)
        graph[module] = {name for name in found if name in files and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles = set()
    for start in graph:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in graph.get(module, ()):
                if target == start:
                    cycles.add(" -> ".join([*path, start]))
                elif target not in path:
                    stack.append((target, [*path, target]))
    return sorted(cycles)


def test_no_import_cycles() -> None:
    """No syncbn module imports one that imports it back, even lazily inside a function."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        "a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c",
    ]  # fmt: skip
    graph = _import_graph()
    assert {"syncbn._functions", "syncbn.debug", "syncbn.ops"} <= graph["syncbn.batchnorm"] | graph["syncbn._functions"]
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles[:10])


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_buffers_are_written_by_torch_operations(name: str) -> None:
    """Autograd's version counter (and functionalisation) see every write to the running statistics."""
    layer = syncbn.SyncBatchNorm(3, momentum=None)
    buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    before = [buffer._version for buffer in buffers]
    with ops.using(name):
        layer(torch.randn(4, 3, 2)).sum().backward()
    assert all(buffer._version > version for buffer, version in zip(buffers, before, strict=True))
    assert int(layer.num_batches_tracked) == 1
