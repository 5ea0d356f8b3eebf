"""The compiled CPU path (syncbn/csrc/cpu_function.cpp, syncbn/_extension.py): what it runs, that it equals
the Python implementation, its errors, SYNCBN_EXTENSION, and its build (a failing compiler, concurrent builds).

The oracle matrix runs on it too (``auto`` in tests/cases.py), in one process, over gloo and under MPI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import syncbn
from syncbn import _extension, settings
from tests import cases
from tests.oracle import MEMORY_FORMATS


@pytest.fixture(autouse=True)
def _compiled() -> Iterator[None]:
    """Every test here needs the library (skipped where it cannot be built, a failure in CI)."""
    cases.require_extension()
    with syncbn.ops.using("auto"), _extension.using(None):
        yield


def _train(choice: str, x: torch.Tensor, dy: torch.Tensor, steps: int = 2, **layer_kwargs: Any) -> dict[str, Any]:
    """``steps`` training calls of a fresh layer on ``x`` under ``choice``; what they produced."""
    generator = torch.Generator().manual_seed(7)
    leaf = x.detach().clone().requires_grad_()
    with _extension.using(choice):
        layer = syncbn.SyncBatchNorm(x.shape[1], **layer_kwargs)
        if layer.affine and layer.bias is None:  # randomize_state wants both
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5, generator=generator)
        else:
            cases.randomize_state(layer, generator)
        layer.to(x.dtype)  # the same state in every dtype
        outputs = []
        for _ in range(steps):
            y = layer(leaf)
            y.backward(dy)
            outputs.append(y.detach())
    result: dict[str, Any] = {"grad_fn": type(y.grad_fn).__name__, "x.grad": leaf.grad, "y": outputs}
    result.update({name: value.detach().clone() for name, value in layer.state_dict().items()})
    for name, parameter in layer.named_parameters():
        result[f"{name}.grad"] = parameter.grad
    return result


def _assert_same(compiled: dict[str, Any], python: dict[str, Any], dtype: torch.dtype) -> None:
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert compiled["grad_fn"] != python["grad_fn"]  # two implementations, really
    for key, value in python.items():
        if key != "grad_fn":
            assert_close(compiled[key], value, **tolerance, msg=lambda message, key=key: f"{key}: {message}")


SHAPES = [
    ("2d", (6, 5), "contiguous"),
    ("3d", (3, 4, 7), "contiguous"),
    ("4d", (3, 5, 4, 3), "contiguous"),
    ("4d-channels-last", (3, 5, 4, 3), "channels_last"),
    ("5d-channels-last-3d", (2, 3, 2, 3, 2), "channels_last_3d"),
    ("odd-channels", (4, 37, 3, 1), "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "memory_format"), SHAPES, ids=[name for name, _, _ in SHAPES])
@pytest.mark.parametrize("loc", [0.5, 1e4], ids=["mean-0.5", "mean-1e4"])
def test_equals_the_python_implementation(
    seed: int, dtype: torch.dtype, name: str, shape: tuple[int, ...], memory_format: str, loc: float
) -> None:
    """Forward, gradients and running statistics as the Python implementation's, also around a large mean
    (the centred path), in every layout."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=dtype) * 2 + loc).contiguous(
        memory_format=MEMORY_FORMATS[memory_format]
    )
    dy = torch.randn(shape, generator=generator, dtype=dtype)
    compiled, python = _train("on", x, dy), _train("off", x, dy)
    assert compiled["grad_fn"] == "CppFunction" and python["grad_fn"] == "SyncBatchNormFunctionBackward"
    _assert_same(compiled, python, dtype)


# Large enough that the loops split over two threads: rows into two ranges whose partial sums are added
# (more than 2 x aten's grain of 32768 values), planes into channel ranges; runs of 361 values, 45 blocks of
# 8 and one more.
LARGE_SHAPES = [
    ("rows", (2048, 40), "contiguous"),
    ("channels-last", (8, 24, 19, 19), "channels_last"),
    ("planes", (8, 24, 19, 19), "contiguous"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "memory_format"), LARGE_SHAPES, ids=[name for name, _, _ in LARGE_SHAPES])
def test_large_inputs_on_one_and_two_threads(
    seed: int, dtype: torch.dtype, name: str, shape: tuple[int, ...], memory_format: str, threads: int
) -> None:
    """The compiled loops' results split over threads, as the Python implementation's in float64 (in float32
    the compiled sums, accumulated in float64, are closer to it than the Python path's: 3e-6 against 5e-5 on
    a weight gradient of 100 here)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=dtype) * 3 + 2).contiguous(
        memory_format=MEMORY_FORMATS[memory_format]
    )
    dy = torch.randn(shape, generator=generator, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled = _train("on", x, dy)
    finally:
        torch.set_num_threads(previous)
    exact = _train("off", x.double(), dy.double())
    exact = {key: value if key == "grad_fn" else _cast_all(value, dtype) for key, value in exact.items()}
    _assert_same(compiled, exact, dtype)


def _cast_all(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, list):
        return [_cast_all(item, dtype) for item in value]
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


@pytest.mark.parametrize(
    "layer_kwargs",
    [{"affine": False}, {"bias": False}, {"track_running_stats": False}, {"momentum": None}],
    ids=["no-affine", "no-bias", "no-running-stats", "cumulative-average"],
)
def test_layer_options(seed: int, layer_kwargs: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, generator=generator)
    dy = torch.randn(4, 3, 5, generator=generator)
    _assert_same(_train("on", x, dy, steps=3, **layer_kwargs), _train("off", x, dy, steps=3, **layer_kwargs), x.dtype)


@pytest.mark.parametrize("gradient", ["expanded", "other-layout", "transposed"])
def test_gradients_of_any_layout(seed: int, gradient: str) -> None:
    """An output gradient whose strides differ from the input's takes the general (two-operation) correction."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 2, generator=generator)
    if gradient == "expanded":
        dy = torch.randn(1, 4, 1, 1, generator=generator).expand(3, 4, 5, 2)
    elif gradient == "other-layout":
        dy = torch.randn(3, 4, 5, 2, generator=generator).contiguous(memory_format=torch.channels_last)
    else:
        dy = torch.randn(3, 4, 2, 5, generator=generator).transpose(2, 3)
    _assert_same(_train("on", x, dy), _train("off", x, dy), x.dtype)


@pytest.mark.parametrize("needs", ["input", "parameters", "weight"])
def test_gradients_asked_for(seed: int, needs: str) -> None:
    """Only the gradients autograd asks for are made, and those are right."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 4, generator=generator, requires_grad=needs == "input")
    dy = torch.randn(5, 3, 4, generator=generator)
    results = []
    for choice in ("on", "off"):
        with _extension.using(choice):
            layer = syncbn.SyncBatchNorm(3)
            cases.randomize_state(layer, torch.Generator().manual_seed(seed))
            layer.weight.requires_grad_(needs != "input")
            layer.bias.requires_grad_(needs == "parameters")
            leaf = x.detach().clone().requires_grad_(needs == "input")
            layer(leaf).backward(dy)
            results.append((leaf.grad, layer.weight.grad, layer.bias.grad, layer.running_var.clone()))
    for compiled, python in zip(*results, strict=True):
        assert (compiled is None) == (python is None)
        if compiled is not None:
            assert_close(compiled, python, rtol=1e-5, atol=1e-5)


def test_empty_batch() -> None:
    """An empty batch: an empty output and input gradient, zero parameter gradients, the count of batches moved."""
    layer = syncbn.SyncBatchNorm(3)
    x = torch.empty(0, 3, 2, requires_grad=True)
    y = layer(x)
    y.backward(torch.empty_like(y))
    assert type(y.grad_fn).__name__ == "CppFunction"
    assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.zeros(3))
    assert int(layer.num_batches_tracked) == 1
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_running_statistics_are_seen_by_autograd() -> None:
    """The running statistics are written in place as torch operations write: their version moves, so a graph
    that saved them refuses to run backward on stale values."""
    layer = syncbn.SyncBatchNorm(3)
    versions = (layer.running_mean._version, layer.running_var._version, layer.num_batches_tracked._version)
    y = layer(torch.randn(4, 3))
    assert type(y.grad_fn).__name__ == "CppFunction"
    after = (layer.running_mean._version, layer.running_var._version, layer.num_batches_tracked._version)
    assert all(new > old for new, old in zip(after, versions, strict=True))
    saved = torch.ones(3, requires_grad=True) * layer.running_mean  # saves running_mean for its backward
    layer(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_errors_raised_through_the_compiled_path() -> None:
    """The Python errors the checks raise come out of the C++ node as they are, in forward and in backward."""
    layer = syncbn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    assert int(layer.num_batches_tracked) == 0  # raised before any state changed
    x = torch.randn(4, 3, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    with pytest.raises(NotImplementedError, match="double backward is not supported: 1 of 1 rank asked"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # The layer is still usable after both.
    layer(torch.randn(4, 3, requires_grad=True)).sum().backward()


@pytest.mark.parametrize(
    ("make_input", "match"),
    [
        (lambda: torch.randn(4, 0, 3), "at least one channel"),
        (lambda: torch.randn(4), r"CPU tensors \(N, C, \.\.\.\)"),
        (lambda: torch.ones(4, 3, dtype=torch.int32), "float32 or float64 input, got Int"),
        (lambda: torch.randn(4, 3, device="meta"), "CPU tensors"),
    ],
    ids=["no-channels", "1d", "int32", "meta"],
)
def test_the_compiled_call_checks_its_own_input(make_input: Any, match: str) -> None:
    """What the layer never passes is refused by the C++ entry point itself, as an error and not a crash."""
    compiled = _extension.function()
    assert compiled is not None
    with pytest.raises(RuntimeError, match=match):
        compiled(make_input(), None, None, None, None, None, 0.1, 1e-5, True, 1, None)


def test_half_precision_and_debug_stay_in_python() -> None:
    layer = syncbn.SyncBatchNorm(3).to(torch.bfloat16)
    assert type(layer(torch.randn(4, 3, dtype=torch.bfloat16)).grad_fn).__name__ == "SyncBatchNormFunctionBackward"
    debug_layer = syncbn.SyncBatchNorm(3, debug=True)
    assert type(debug_layer(torch.randn(4, 3)).grad_fn).__name__ == "SyncBatchNormFunctionBackward"
    with syncbn.ops.using("torch"):
        assert type(syncbn.SyncBatchNorm(3)(torch.randn(4, 3)).grad_fn).__name__ == "SyncBatchNormFunctionBackward"


# --- SYNCBN_EXTENSION and the cache -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "choice"), [("", "auto"), ("auto", "auto"), ("OFF", "off"), ("0", "off"), ("on", "on"), ("1", "on")]
)
def test_setting(value: str, choice: str) -> None:
    assert settings.extension({settings.EXTENSION: value}) == choice


def test_unknown_setting_names_the_variable_and_its_values() -> None:
    with pytest.raises(ValueError, match=r"SYNCBN_EXTENSION='fast'.*auto, off, on"):
        settings.extension({settings.EXTENSION: "fast"})
    with pytest.raises(ValueError, match="expected one of auto, off, on"):
        _extension.set_choice("fast")


def test_cache_directory(tmp_path: Path) -> None:
    assert settings.cache_dir({settings.CACHE_DIR: str(tmp_path)}) == str(tmp_path)
    assert settings.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "syncbn")
    assert settings.cache_dir({}).endswith(os.path.join(".cache", "syncbn"))


def test_library_path_follows_the_source_and_torch() -> None:
    path = _extension.library_path()
    assert path.parent.parent == Path(settings.cache_dir())
    assert path.name.startswith("_syncbn_cpu_") and path.exists()
    status = _extension.status()
    assert status["built"] and status["path"] == str(path) and status["compiler"]


_CHILD = textwrap.dedent(
    """
    import sys, warnings, torch, syncbn
    warnings.simplefilter("always")
    layer = syncbn.SyncBatchNorm(3)
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(3):
            y = layer(torch.randn(4, 3, requires_grad=True))
            y.sum().backward()
    said = [str(w.message) for w in caught if "compiled CPU path" in str(w.message)]
    print(type(y.grad_fn).__name__, len(said))
    print(said[0].replace("\\n", " ") if said else "")
    """
)


def _child(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, settings.CACHE_DIR: str(tmp_path / "cache"), **environment}
    return subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240)


def test_a_failing_compiler_falls_back_with_one_warning(tmp_path: Path) -> None:
    done = _child(tmp_path, CXX="false")
    assert done.returncode == 0, done.stderr
    first, said = done.stdout.splitlines()[:2]
    assert first == "SyncBatchNormFunctionBackward 1", done.stdout
    assert "cannot be built" in said and "false failed" in said and "SYNCBN_EXTENSION=off" in said
    assert not list((tmp_path / "cache").rglob("*.so")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_missing_compiler_with_extension_on_raises(tmp_path: Path) -> None:
    done = _child(tmp_path, CXX=str(tmp_path / "no-such-compiler"), SYNCBN_EXTENSION="on")
    assert done.returncode == 1
    assert "ExtensionBuildError" in done.stderr and "SYNCBN_EXTENSION=on" in done.stderr, done.stderr


def test_off_builds_nothing(tmp_path: Path) -> None:
    done = _child(tmp_path, SYNCBN_EXTENSION="off")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "SyncBatchNormFunctionBackward 0"
    assert not (tmp_path / "cache").exists()


@pytest.mark.timeout(600)
def test_concurrent_first_builds(tmp_path: Path) -> None:
    """Two processes whose first training call finds nothing built: one builds, the other waits, both train on
    the compiled path, and the cache holds one library and no temporary file."""
    env = {**os.environ, settings.CACHE_DIR: str(tmp_path / "cache")}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=540) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.splitlines()[0] == "CppFunction 0", out + err
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))
