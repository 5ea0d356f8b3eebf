"""Test bodies shared by every world size and backend.

Each function takes ``group`` (what the layer gets as ``process_group``:
``None``, a torch.distributed group or an mpi4py communicator) and a
``seed`` that is the same on every rank, and raises ``AssertionError`` on a
mismatch. They run at size 1 under plain pytest, under ``mpiexec -n N`` with
pytest-mpi, and in real torch.distributed gloo processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import _extension
from syncbn.comm import get_communicator
from syncbn.comm.base import Communicator
from tests import needs
from tests.oracle import (
    MEMORY_FORMATS,
    TOLERANCES,
    assert_on_every_rank,
    draw_batch,
    group_rank_and_size,
    randomize_state,
    reference_batchnorm,
    sum_over_ranks,
)

#: Whether layers on CPU tensors run the CUDA kernels in tests/cuda_emulator.py (it sets this).
emulating_cuda = False


def _batch_sizes(spec: Any, world_size: int) -> list[int]:
    """``int``: the same batch everywhere; ``list``: cycled over the ranks."""
    if isinstance(spec, int):
        return [spec] * world_size
    return [spec[i % len(spec)] for i in range(world_size)]


def check_against_oracle(
    group: Any,
    seed: int,
    batch: Any = 4,
    channels: int = 5,
    tail: tuple[int, ...] = (3, 4),
    dtype: torch.dtype = torch.float32,
    memory_format: str = "contiguous",
    affine: bool = True,
    track_running_stats: bool = True,
    momentum: float | None = 0.1,
    steps: int = 2,
    loc_range: tuple[float, float] = (-3.0, 3.0),
    scale_range: tuple[float, float] = (0.5, 2.0),
    tolerance: dict[str, float] | None = None,
    ops: str = "auto",
    device: str = "cpu",
) -> None:
    """Several training steps (then one eval step) against nn.BatchNorm on the concatenated batch.

    ``ops`` is the implementation of the per-device work (:func:`syncbn.ops.set_ops`): the matrix
    runs on the tuned CPU one (``auto``) and again on the generic one (``torch``); on a GPU
    (``device="cuda"``) on the CuPy kernels (``cupy``) and the generic one. The oracle always runs
    on the CPU in float64.
    """
    with implementation(ops):
        if device == "cpu":  # "cupy" on CPU tensors: the CUDA kernels in tests/cuda_emulator.py
            expected = "cupy" if emulating_cuda else {"auto": "cpu", "python": "cpu"}.get(ops, ops)
            assert syncbn.ops.for_device("cpu").name == expected
        _check_against_oracle(
            group, seed, batch, channels, tail, dtype, memory_format, affine, track_running_stats, momentum, steps,
            loc_range, scale_range, tolerance, torch.device(device),
        )  # fmt: skip


def _check_against_oracle(
    group: Any,
    seed: int,
    batch: Any,
    channels: int,
    tail: tuple[int, ...],
    dtype: torch.dtype,
    memory_format: str,
    affine: bool,
    track_running_stats: bool,
    momentum: float | None,
    steps: int,
    loc_range: tuple[float, float],
    scale_range: tuple[float, float],
    tolerance: dict[str, float] | None,
    device: torch.device,
) -> None:
    rank, world_size = group_rank_and_size(group)
    batch_sizes = _batch_sizes(batch, world_size)
    generator = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = syncbn.SyncBatchNorm(
        channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats, process_group=group
    ).to(param_dtype)
    randomize_state(layer, generator)
    ndim = 2 + len(tail)
    reference = reference_batchnorm(ndim, layer)
    layer.to(device)
    fmt = MEMORY_FORMATS[memory_format]
    tol = TOLERANCES[dtype]
    elementwise = tolerance or tol.elementwise
    reduced = tolerance or tol.reduced
    context = f"seed={seed} rank={rank}/{world_size} batches={batch_sizes} dtype={dtype} format={memory_format}"

    for step in range(steps + 1):
        training = step < steps
        layer.train(training)
        reference.train(training)
        data = draw_batch(
            generator, batch_sizes, rank, channels, tail, dtype, loc_range=loc_range, scale_range=scale_range
        )
        x, grad = data.local(dtype, fmt)
        if device.type != "cpu":
            x, grad = x.detach().to(device).requires_grad_(), grad.to(device)  # strides kept
        local = slice(data.start, data.stop)
        # Evaluation without running statistics normalises each rank's batch on its own
        # (no collective in eval, as torch.nn.SyncBatchNorm): the oracle is then the local slice.
        if not training and not track_running_stats:
            data.x, data.grad = data.x[local], data.grad[local]
            local = slice(0, data.stop - data.start)
        x_ref = data.x.clone().requires_grad_()

        layer.zero_grad()
        reference.zero_grad()
        y = layer(x)
        y.backward(grad)
        y_ref = reference(x_ref)
        y_ref.backward(data.grad)

        msg = f"{context} step={step}"
        summed = training or track_running_stats
        grad_totals = {}
        if affine:
            # Parameter grads are this rank's share; their sum over ranks is the full-batch gradient.
            for name in ("weight", "bias"):
                mine = getattr(layer, name).grad
                assert mine is not None and mine.dtype == param_dtype, msg
                mine = mine.cpu()
                grad_totals[name] = sum_over_ranks(group, mine) if summed else mine.double()

        def check(step_msg: str = msg, part: slice = local) -> None:
            assert y.dtype == dtype, step_msg
            assert x.grad is not None and x.grad.dtype == dtype, step_msg
            if x.numel() and fmt is not torch.contiguous_format:
                assert y.is_contiguous(memory_format=fmt), f"output lost the memory format: {step_msg}"
            assert not torch.isnan(y).any() and not torch.isnan(x.grad).any(), step_msg
            assert x_ref.grad is not None
            y_host, grad_host = y.detach().double().cpu(), x.grad.double().cpu()
            assert_close(y_host, y_ref[part].detach(), **elementwise, msg=lambda m: f"output: {m}\n{step_msg}")
            assert_close(grad_host, x_ref.grad[part], **elementwise, msg=lambda m: f"input grad: {m}\n{step_msg}")
            for name, total in grad_totals.items():
                ref = getattr(reference, name).grad
                assert_close(total, ref, **reduced, msg=lambda m, n=name: f"{n} grad: {m}\n{step_msg}")
            if track_running_stats:
                assert_close(layer.running_mean.double().cpu(), reference.running_mean, **reduced, msg=step_msg)
                assert_close(layer.running_var.double().cpu(), reference.running_var, **reduced, msg=step_msg)
                assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked), step_msg

        assert_on_every_rank(group, check)


class TwoEqualRanks(Communicator):
    """A group of two ranks holding the same batch, made of one process: the sum of a payload is twice it.

    ``inner`` (a real one-rank group, e.g. NCCL at world size 1) reduces first, so that its path is taken.
    """

    name = "two-equal-ranks"
    world_size = 2
    rank = 0

    def __init__(self, inner: Communicator | None = None) -> None:
        self.inner = inner

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.all_reduce(tensor)
        tensor.mul_(2)


class CountingCommunicator(Communicator):
    """A real communicator that also records the size of every collective it makes."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.name = inner.name
        self.payload_sizes: list[int] = []

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def rank(self) -> int:
        return self.inner.rank

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.payload_sizes.append(tensor.numel())
        self.inner.all_reduce(tensor)


def check_collective_count(group: Any, seed: int, channels: int = 6) -> None:
    """One all-reduce of 2C+4 values in forward, one of 2C+1 in backward, none in eval; none at all in a group of 1."""
    counting = CountingCommunicator(get_communicator(group))
    expected = [2 * channels + 4, 2 * channels + 1] if counting.world_size > 1 else []
    layer = syncbn.SyncBatchNorm(channels, process_group=counting)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, 4, 4, generator=generator, requires_grad=True)
    y = layer(x)
    assert counting.payload_sizes == expected[:1]
    y.backward(torch.randn(y.shape, generator=generator))
    assert counting.payload_sizes == expected
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, channels, 4, 4, generator=generator))
    # track_running_stats=False normalises with batch statistics in eval, still locally.
    local_only = syncbn.SyncBatchNorm(channels, track_running_stats=False, process_group=counting).eval()
    local_only(torch.randn(2, channels, 4, 4, generator=generator))
    assert counting.payload_sizes == expected


def check_input_grad_on_some_ranks(group: Any, seed: int, channels: int = 4, steps: int = 2) -> None:
    """Only rank 0's input needs a gradient: no rank may be left alone in the backward collective.

    Each rank decides whether its input needs a gradient on its own; the
    backward all-reduce must not depend on that. Rank 0's input gradient and
    the parameter gradients summed over ranks must still be the full batch's.
    """
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    layer = syncbn.SyncBatchNorm(channels, process_group=group)
    randomize_state(layer, generator)
    reference = reference_batchnorm(4, layer)
    tol = TOLERANCES[torch.float32]
    for step in range(steps):
        data = draw_batch(generator, [3] * world_size, rank, channels, (2, 3), torch.float32)
        x, grad = data.local(torch.float32, torch.contiguous_format)
        x.requires_grad_(rank == 0)
        x_ref = data.x.clone().requires_grad_()
        layer.zero_grad()
        reference.zero_grad()
        layer(x).backward(grad)
        reference(x_ref).backward(data.grad)
        weight_total = sum_over_ranks(group, layer.weight.grad)
        bias_total = sum_over_ranks(group, layer.bias.grad)
        msg = f"seed={seed} rank={rank}/{world_size} step={step}"

        def check() -> None:
            assert (x.grad is not None) == (rank == 0), msg
            assert x_ref.grad is not None
            if x.grad is not None:
                assert_close(x.grad.double(), x_ref.grad[data.start : data.stop], **tol.elementwise, msg=msg)
            assert_close(weight_total, reference.weight.grad, **tol.reduced, msg=msg)
            assert_close(bias_total, reference.bias.grad, **tol.reduced, msg=msg)

        assert_on_every_rank(group, check)


def check_eval_is_local(group: Any, seed: int, channels: int = 4) -> None:
    """Eval on one rank alone must return (it makes no collective) and use running statistics."""
    rank, _ = group_rank_and_size(group)
    layer = syncbn.SyncBatchNorm(channels, process_group=group)
    generator = torch.Generator().manual_seed(seed)
    randomize_state(layer, generator)
    reference = reference_batchnorm(4, layer).eval()
    layer.eval()
    if rank == 0:
        x = torch.randn(2, channels, 3, 3, generator=generator)
        assert_close(layer(x).double(), reference(x.double()), **TOLERANCES[torch.float32].elementwise)


def check_all_empty(group: Any, seed: int, channels: int = 3) -> None:
    """Every rank empty: empty output, zero grads, no NaN, running statistics unchanged."""
    layer = syncbn.SyncBatchNorm(channels, process_group=group)
    randomize_state(layer, torch.Generator().manual_seed(seed))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.empty(0, channels, 2, 2, requires_grad=True)
    y = layer(x)
    y.backward(torch.empty_like(y))
    assert y.shape == x.shape
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert torch.equal(layer.weight.grad, torch.zeros(channels))
    assert torch.equal(layer.bias.grad, torch.zeros(channels))
    assert_close(layer.running_mean, before["running_mean"], rtol=0, atol=0)
    assert_close(layer.running_var, before["running_var"], rtol=0, atol=0)
    # As nn.BatchNorm does, the call still counts as a tracked batch.
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def check_single_value_error(group: Any, seed: int, channels: int = 3) -> None:
    """One value per channel in the whole group: ValueError on every rank, state kept, layer usable."""
    rank, world_size = group_rank_and_size(group)
    layer = syncbn.SyncBatchNorm(channels, process_group=group)
    generator = torch.Generator().manual_seed(seed)
    randomize_state(layer, generator)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    shape = (1, channels) if rank == world_size - 1 else (0, channels)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(shape, generator=generator))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The next, valid call works and is exact.
    check_against_oracle(group, seed, batch=[2, 3], tail=(), channels=channels, steps=1)


def check_big_count(group: Any, seed: int) -> None:
    """Counts stay exact beyond 2**24 values per channel.

    A constant channel of 1e6 has variance 0, so the output is
    ``(x - mean) / sqrt(eps)``: a count off by one (float32 rounding of
    2**24 + 1) moves the mean by 1e6 / 2**24 and the output by about 19.
    """
    rank, world_size = group_rank_and_size(group)
    total = 2**24 + 1
    sizes = [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]
    value = 1e6
    layer = syncbn.SyncBatchNorm(1, process_group=group)
    y = layer(torch.full((sizes[rank], 1), value))
    assert_close(y, torch.zeros_like(y), rtol=0, atol=1e-3, msg=lambda m: f"seed={seed}: {m}")
    assert_close(layer.running_mean, torch.tensor([0.1 * value]), rtol=1e-7, atol=0)
    assert_close(layer.running_var, torch.tensor([0.9]), rtol=1e-7, atol=0)


class SmallCNN(nn.Module):
    """Convolutions with BatchNorm2d, then BatchNorm1d on features: enough to exercise conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_training_matches_full_batch(
    group: Any, seed: int, use_ddp: bool = False, steps: int = 4, bucket_bytes: int | None = None
) -> None:
    """A converted model trained on each rank's share equals the full-batch model, step by step.

    Gradients are averaged over ranks: by DDP, by :func:`syncbn.average_gradients` (with buckets of
    ``bucket_bytes``), or by an all-reduce of each gradient that does not go through the library.
    The comparison runs in float64 so that any difference is a real one.
    """
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = SmallCNN().double()
    model: nn.Module = syncbn.convert_sync_batchnorm(copy.deepcopy(reference), process_group=group)
    if use_ddp:
        model = nn.parallel.DistributedDataParallel(model, process_group=group)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    per_rank = 3
    for step in range(steps):
        x = torch.randn(per_rank * world_size, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 + 1
        target = torch.randint(0, 4, (per_rank * world_size,), generator=generator)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)

        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[mine]), target[mine])
        loss.backward()
        if bucket_bytes is not None:
            syncbn.average_gradients(model, group, bucket_bytes=bucket_bytes)
        elif not use_ddp:
            for parameter in model.parameters():
                assert parameter.grad is not None
                parameter.grad.copy_(sum_over_ranks(group, parameter.grad) / world_size)
        optimizer.step()

        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), target).backward()
        reference_optimizer.step()

        inner = model.module if use_ddp else model

        def check(step: int = step, inner: nn.Module = inner) -> None:
            for (name, mine_value), ref_value in zip(
                inner.state_dict().items(), reference.state_dict().values(), strict=True
            ):
                assert_close(
                    mine_value,
                    ref_value,
                    rtol=1e-9,
                    atol=1e-10,
                    msg=lambda m, n=name: f"{n} step {step} seed {seed}: {m}",
                )

        assert_on_every_rank(group, check)


# The oracle matrix every backend and world size runs: (test id, keyword arguments).
ORACLE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("2d", {"tail": (), "batch": 5}),
    ("3d", {"tail": (7,)}),
    ("4d", {}),
    ("4d-centred", {"loc_range": (-0.2, 0.2), "scale_range": (0.8, 1.2)}),
    ("5d", {"tail": (2, 3, 2), "batch": 2}),
    ("unequal-batches", {"batch": [3, 1, 6, 2]}),
    ("one-sample-per-rank", {"batch": 1}),
    ("empty-first-rank", {"batch": [0, 3, 2, 1]}),
    ("no-affine", {"affine": False}),
    ("no-running-stats", {"track_running_stats": False}),
    ("cumulative-average", {"momentum": None, "steps": 3}),
    ("channels-last", {"memory_format": "channels_last"}),
    ("channels-last-3d", {"memory_format": "channels_last_3d", "tail": (2, 3, 2), "batch": 2}),
    ("float64", {"dtype": torch.float64}),
    ("float16", {"dtype": torch.float16}),
    ("bfloat16", {"dtype": torch.bfloat16}),
    ("bfloat16-channels-last", {"dtype": torch.bfloat16, "memory_format": "channels_last"}),
    # Mean 1e4 to 1e5 against a spread of 0.5 to 2: naive E[x^2] - E[x]^2 in float32 collapses here.
    ("cancellation", {"loc_range": (1e4, 1e5), "tail": (8, 8), "tolerance": {"rtol": 1e-3, "atol": 1e-3}}),
]
#: The oracle matrix runs once per implementation of the per-device work: the default one for the
#: device (on CPU the compiled path of syncbn/csrc for float32 and float64, CPUOps for half precision),
#: the Python CPU implementation without the compiled path (``python``: ``SYNCBN_EXTENSION=off``, float32
#: and float64 cases only, the others being ``auto``'s already) and the generic torch one (``SYNCBN_OPS=torch``).
OPS = ("auto", "python", "torch")
ORACLE_MATRIX: list[tuple[str, str, dict[str, Any]]] = [
    (ops, name, kwargs)
    for ops in OPS
    for name, kwargs in ORACLE_CASES
    if ops != "python" or kwargs.get("dtype", torch.float32) in (torch.float32, torch.float64)
]
ORACLE_IDS = [f"{ops}-{name}" for ops, name, _ in ORACLE_MATRIX]
#: What the CUDA implementation runs besides the matrix: odd channel counts (neither a multiple of 32
#: nor of a vector), the other layouts x dtypes, rows a whole number of vectors, long rows cut in pieces,
#: channels-last tensors of many rows (each thread of a block sums several).
CUDA_CASES: list[tuple[str, dict[str, Any]]] = [
    ("odd-channels-37", {"channels": 37, "tail": (5, 3)}),
    ("odd-channels-129-channels-last", {"channels": 129, "tail": (3, 3), "memory_format": "channels_last"}),
    (
        "odd-channels-37-bfloat16-channels-last",
        {"channels": 37, "dtype": torch.bfloat16, "memory_format": "channels_last"},
    ),
    ("float16-channels-last", {"dtype": torch.float16, "memory_format": "channels_last"}),
    ("float64-channels-last-3d", {"dtype": torch.float64, "memory_format": "channels_last_3d", "tail": (2, 3, 2)}),
    ("vectorised-rows", {"channels": 8, "tail": (8, 16), "batch": 3}),
    ("large-spatial", {"channels": 4, "tail": (64, 64), "batch": 2}),
    ("large-spatial-channels-last", {"channels": 40, "tail": (16, 16), "batch": 3, "memory_format": "channels_last"}),
    # Rows of 4095 (no vector loads), 2 samples, 4 channels: on a large GPU each row is cut in 3 pieces.
    ("rows-cut-in-pieces", {"channels": 4, "tail": (63, 65), "batch": 2, "dtype": torch.float64}),
]
#: The matrix the CUDA implementation runs (on a GPU, and on the CPU in tests/cuda_emulator.py), and its ids.
CUDA_MATRIX = ORACLE_CASES + CUDA_CASES
CUDA_IDS = [name for name, _ in CUDA_MATRIX]


@contextlib.contextmanager
def implementation(ops: str) -> Iterator[None]:
    """Within the block, the layers use ``ops`` (:func:`syncbn.ops.set_ops`), or for ``python`` the CPU
    implementation without its compiled path (``SYNCBN_EXTENSION=off``). ``auto`` on CPU needs the compiled
    path (:mod:`syncbn._extension`): where it cannot be built the test is skipped, and in CI it fails."""
    if ops == "python":
        with syncbn.ops.using("auto"), _extension.using("off"):
            yield
        return
    with syncbn.ops.using(ops):
        if ops == "auto" and not emulating_cuda:
            require_extension()
        yield


def require_extension() -> None:
    """The compiled CPU path is built and loads: else skipped here, a failure in CI."""
    try:
        with _extension.using("on"):
            _extension.function()
    except _extension.ExtensionBuildError as error:
        needs.unavailable(f"the compiled CPU path cannot be built here ({error}); CI builds it (make install)")


def poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor made with torch.empty / empty_like starts as NaN (integers: -1), so that an element
    a kernel forgot to write fails the comparison with the oracle."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan if t.is_floating_point() else -1) if t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def check_doubled(group: Communicator, seed: int, ops: str, memory_format: torch.memory_format, device: str) -> None:
    """Two identical ranks (``group`` doubles every sum): the layer against nn.BatchNorm on the batch twice over."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64) * 3 + 10
    dy = torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64)
    reference = nn.BatchNorm2d(6).double()
    both = torch.cat((x, x)).requires_grad_()
    y_ref = reference(both)
    y_ref.backward(torch.cat((dy, dy)))
    with implementation(ops):
        layer = syncbn.SyncBatchNorm(6, process_group=group).to(device)
        x_dev = x.float().to(device).contiguous(memory_format=memory_format).requires_grad_()
        y = layer(x_dev)
        y.backward(dy.float().to(device).contiguous(memory_format=memory_format))
    assert both.grad is not None and x_dev.grad is not None
    assert_close(y.double().cpu(), y_ref[:3].detach(), rtol=1e-5, atol=2e-5)
    assert_close(x_dev.grad.double().cpu(), both.grad[:3], rtol=1e-5, atol=2e-5)
    assert_close(layer.running_mean.double().cpu(), reference.running_mean, rtol=1e-4, atol=1e-4)
    assert_close(layer.running_var.double().cpu(), reference.running_var, rtol=1e-4, atol=1e-4)


# --- outputs that autograd and in-place operations accept, and double backward ------------------

# Tolerances of a whole residual block (two convolutions in the test dtype, then the layers) against
# its float64 twin: convolutions in half precision round far more than one normalisation does.
BLOCK_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 6e-2, "atol": 6e-2},
}
BLOCK_CASES = [
    (dtype, memory_format)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for memory_format in ("contiguous", "channels_last", "channels_last_3d")
]


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock: conv, BN, in-place ReLU, conv, BN, in-place residual add, in-place ReLU.

    The convolutions are 1x1: half-precision CPU convolutions with more taps
    round more than the tolerances of the layer under test allow.
    """

    def __init__(self, channels: int, ndim: int) -> None:
        super().__init__()
        conv = nn.Conv2d if ndim == 4 else nn.Conv3d
        norm = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm3d
        self.conv1 = conv(channels, channels, 1, bias=False)
        self.bn1 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(channels, channels, 1, bias=False)
        self.bn2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def check_inplace_block_with_empty_rank(group: Any, seed: int, dtype: torch.dtype, memory_format: str) -> None:
    """A residual block with in-place ReLU and add trains on every rank while rank 0 holds no sample.

    An empty rank's output must be a new tensor: a view of the input would make
    the in-place ReLU raise on that rank alone, leaving the others waiting in
    the next layer. The non-empty ranks match the float64 block on the
    concatenated batch (output, input gradient, running statistics).
    """
    rank, world_size = group_rank_and_size(group)
    channels, ndim = 4, (5 if memory_format == "channels_last_3d" else 4)
    tail = (2, 3, 2) if ndim == 5 else (4, 3)
    batch_sizes = [0] + [2] * (world_size - 1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the same initial block on every rank
    plain = ResidualBlock(channels, ndim)
    for norm in (plain.bn1, plain.bn2):
        randomize_state(norm, generator)
    reference = copy.deepcopy(plain).double()
    block = syncbn.convert_sync_batchnorm(copy.deepcopy(plain), process_group=group).to(dtype)
    reference.load_state_dict({k: v.double() for k, v in block.state_dict().items()})  # rounded to dtype too
    fmt = MEMORY_FORMATS[memory_format]
    tolerance = BLOCK_TOLERANCES[dtype]
    for step in range(2):
        data = draw_batch(generator, batch_sizes, rank, channels, tail, dtype)
        x, grad = data.local(dtype, fmt)
        x_ref = data.x.clone().requires_grad_()
        y = block(x)
        y.backward(grad)
        # With every rank empty (a group of one) the running statistics stay as they were.
        y_ref = reference(x_ref) if data.x.shape[0] else x_ref
        y_ref.backward(data.grad)
        msg = f"seed={seed} rank={rank}/{world_size} dtype={dtype} format={memory_format} step={step}"

        def check() -> None:
            assert y.shape == x.shape and y.dtype == dtype, msg
            assert x.grad is not None and x.grad.shape == x.shape, msg
            assert torch.isfinite(x.grad).all(), msg
            if x.numel():  # (the convolutions decide the block's output format; the oracle cases check the layer's)
                part = slice(data.start, data.stop)
                assert x_ref.grad is not None
                assert_close(y.double(), y_ref[part].detach(), **tolerance, msg=lambda m: f"output: {m}\n{msg}")
                # In half precision a pre-activation that rounds across 0 flips a ReLU's gradient between 0
                # and 1: the input gradient is compared in float32 and float64 only (the oracle cases
                # check the layer's own half-precision gradients).
                if dtype in (torch.float32, torch.float64):
                    assert_close(
                        x.grad.double(), x_ref.grad[part], **tolerance, msg=lambda m: f"input grad: {m}\n{msg}"
                    )
            for name in ("bn1", "bn2"):
                mine, theirs = getattr(block, name), getattr(reference, name)
                assert_close(mine.running_mean.double(), theirs.running_mean, **tolerance, msg=msg)
                assert_close(mine.running_var.double(), theirs.running_var, **tolerance, msg=msg)

        assert_on_every_rank(group, check)


def check_double_backward_raises(group: Any, seed: int, mode: str) -> None:
    """A gradient taken with ``create_graph=True`` through the layer raises on every rank, never a wrong number.

    ``mode``: ``"all"`` ranks ask for the graph, or only rank ``"one"`` (0):
    the others must raise too, since the one that asks would otherwise stop
    alone. The loss is linear in the output, so the incoming gradient does
    not require grad. Afterwards the ranks are still in step, and the hint
    holds: in eval mode the layer is exactly twice differentiable.
    """
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    layer = syncbn.SyncBatchNorm(3, process_group=group)
    x = torch.randn(4, 3, 2, 2, generator=generator, requires_grad=True)
    weights = torch.randn(4, 3, 2, 2, generator=generator)
    creates = mode == "all" or rank == 0
    loss = (layer(x) * weights).sum()
    message = _raises_everywhere(
        group,
        lambda: torch.autograd.grad(loss, x, create_graph=creates),
        NotImplementedError,
        "double backward is not supported",
    )
    asking = world_size if mode == "all" else 1
    assert f"{asking} of {world_size} rank" in message, message
    _check_in_step(group, seed)

    layer.eval()
    reference = reference_batchnorm(4, layer).eval()
    x_ref = x.detach().double().requires_grad_()
    for module, inputs in ((layer, x), (reference, x_ref)):
        (first,) = torch.autograd.grad(
            (module(inputs) * weights.to(inputs.dtype)).square().sum(), inputs, create_graph=True
        )
        first.square().sum().backward()
    assert x.grad is not None and x_ref.grad is not None
    assert_close(x.grad.double(), x_ref.grad, **TOLERANCES[torch.float32].reduced)


def check_activation_checkpointing(group: Any, seed: int, reentrant: bool, steps: int = 2) -> None:
    """Layers inside ``torch.utils.checkpoint``: their forward runs again during backward, on every rank.

    The recomputation makes one more forward all-reduce per layer in backward, on every rank alike, so no
    rank waits; with ``use_reentrant=True`` the first forward runs under ``no_grad`` (no rank runs backward
    through it) and the recomputation with gradients. Against ``nn.BatchNorm2d`` under the same
    checkpointing on the whole batch, in float64, with unequal batches and an empty rank when there are 4
    ranks: outputs, input and parameter gradients, and the running statistics, which both update twice a
    step (the first forward and the recomputation), as torch's layer does.
    """
    from torch.utils.checkpoint import checkpoint

    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.SiLU(), nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4)
    ).double()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_state(module, generator)
    model = syncbn.convert_sync_batchnorm(copy.deepcopy(reference), process_group=group)
    batches = _batch_sizes([3, 1, 4, 0], world_size)
    start, stop = sum(batches[:rank]), sum(batches[: rank + 1])
    for step in range(steps):
        x = torch.randn(sum(batches), 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1
        weights = torch.randn(sum(batches), 4, 5, 5, generator=generator, dtype=torch.float64)
        outputs, grads = [], []
        for net, inputs, w in ((model, x[start:stop], weights[start:stop]), (reference, x, weights)):
            net.zero_grad()
            leaf = inputs.clone().requires_grad_()
            y = checkpoint(net, leaf, use_reentrant=reentrant)
            (y * w).sum().backward()
            outputs.append(y.detach())
            grads.append(leaf.grad)
        totals = [sum_over_ranks(group, p.grad) for p in model.parameters()]
        msg = f"seed={seed} rank={rank}/{world_size} step={step} reentrant={reentrant}"

        def check() -> None:
            tol = TOLERANCES[torch.float64]
            assert_close(outputs[0], outputs[1][start:stop], **tol.elementwise, msg=msg)
            assert grads[0] is not None and grads[1] is not None
            assert_close(grads[0], grads[1][start:stop], **tol.elementwise, msg=msg)
            for (name, theirs), total in zip(reference.named_parameters(), totals, strict=True):
                assert theirs.grad is not None
                assert_close(total, theirs.grad, **tol.reduced, msg=lambda m, n=name: f"{msg} {n}: {m}")
            for (name, theirs), mine in zip(reference.named_buffers(), model.buffers(), strict=True):
                assert_close(mine, theirs, **tol.reduced, msg=lambda m, n=name: f"{msg} {n}: {m}")

        assert_on_every_rank(group, check)
    assert [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)] == [
        2 * steps
    ] * 2


def check_under_autocast(seed: int, ops: str, dtype: torch.dtype, device: str) -> None:
    """Mixed precision: under torch.autocast a convolution hands the layer half-precision activations while its
    weight, bias and running statistics stay float32. The output keeps the activations' dtype (as
    nn.BatchNorm2d's does) and equals float64 nn.BatchNorm2d on the same activations; so do the gradients and
    the running statistics. (Autocast also recasts some operations inside the layer, on CUDA ``sum``,
    ``rsqrt`` and the norms among them: the layer's precision must not depend on it.)"""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(device)
    with implementation(ops):
        layer = syncbn.SyncBatchNorm(6)
        randomize_state(layer, generator)
        reference = reference_batchnorm(4, layer)
        layer.to(device)
        x = (torch.randn(4, 3, 5, 5, generator=generator) * 2 + 1).to(device)
        with torch.autocast(device, dtype=dtype):
            activations = conv(x)
            y = layer(activations)
        activations.retain_grad()
        assert activations.dtype == dtype and y.dtype == dtype and layer.weight.dtype == torch.float32
        exact = activations.detach().cpu().double().requires_grad_()
        y_ref = reference(exact)
        tol = TOLERANCES[dtype]
        assert_close(y.double().cpu(), y_ref, **tol.elementwise, msg=lambda m: f"seed={seed}: {m}")
        grad = torch.randn(y.shape, generator=generator).to(dtype)
        y.backward(grad.to(device))
        y_ref.backward(grad.double())
    assert activations.grad is not None and exact.grad is not None
    assert_close(activations.grad.double().cpu(), exact.grad, **tol.elementwise, msg=lambda m: f"seed={seed}: {m}")
    for name in ("weight", "bias"):
        assert_close(getattr(layer, name).grad.double().cpu(), getattr(reference, name).grad, **tol.reduced)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(layer, name).double().cpu(), getattr(reference, name), **tol.reduced)


# --- agreement between ranks: requires_grad, and debug mode's checks ---------------------------


def _raises_everywhere(group: Any, call: Any, expected: type[BaseException], match: str) -> str:
    """``call()`` must raise ``expected`` matching ``match`` on this rank; returns the message."""
    with pytest.raises(expected, match=match) as caught:
        call()
    return str(caught.value)


def check_backward_disagreement(group: Any, seed: int, mode: str) -> None:
    """Some ranks will run backward and some will not: every rank raises in forward, none waits in backward.

    ``mode``: ``"requires_grad"`` (only rank 0's input needs a gradient, the
    layer has no affine parameters) or ``"no_grad"`` (the last rank runs
    forward under ``torch.no_grad()``). In a group of one there is nothing
    to disagree with: the call must work.
    """
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    layer = syncbn.SyncBatchNorm(3, affine=mode != "requires_grad", process_group=group)
    x = torch.randn(4, 3, 2, 2, generator=generator)
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def call() -> None:
        if mode == "requires_grad":
            layer(x.requires_grad_(rank == 0)).sum().backward() if rank == 0 else layer(x)
        elif rank == world_size - 1:
            with torch.no_grad():
                layer(x)
        else:
            layer(x).sum().backward()

    if world_size == 1:
        call()
        return
    message = _raises_everywhere(group, call, syncbn.faults.RankMismatchError, "will run backward")
    expected = (1 if mode == "requires_grad" else world_size - 1, world_size)
    assert f"{expected[0]} of {expected[1]} ranks will run backward" in message, message
    # Raised before the running statistics were touched, and the group is still in step.
    for key, value in layer.state_dict().items():
        if key != "num_batches_tracked":
            assert torch.equal(value, before[key]), key
    check_against_oracle(group, seed, batch=[2, 3], steps=1)


def _two_layers(group: Any, channels: tuple[int, int] = (3, 3), **kwargs: Any) -> nn.Module:
    """Layers 'a' and 'b' in a named model, in debug mode."""
    model = nn.ModuleDict(
        {name: syncbn.SyncBatchNorm(c, process_group=group, **kwargs) for name, c in zip("ab", channels, strict=True)}
    )
    assert syncbn.name_layers(model) == 2
    return model


DEBUG_MISMATCHES = ("order", "skip", "channels", "input-channels", "dtype", "requires_grad", "nan")


def check_debug_mismatch(group: Any, seed: int, kind: str) -> None:
    """Debug mode turns each kind of disagreement between ranks into an error on every rank, naming it.

    Rank 0 is the odd one out: it calls the layers in another ``order``,
    ``skip``s layer 'a', holds layers of other ``channels``, feeds an input
    with the wrong channel count, another ``dtype``, runs backward where the
    others do not, or has a NaN in its input. After the error the ranks are
    still in step: a matching call works.
    """
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    odd = rank == 0
    channels = (5, 3) if kind == "channels" and odd else (3, 3)
    model = _two_layers(group, channels, debug=True, affine=kind != "requires_grad")
    x = torch.randn(4, 3, 2, 2, generator=generator)

    def call() -> None:
        if kind == "order":
            for name in "ba" if odd else "ab":
                model[name](x)
        elif kind == "skip":
            model["b"](x) if odd else (model["a"](x), model["b"](x))
        elif kind == "channels":
            model["a"](torch.randn(4, channels[0], 2, 2, generator=generator))
        elif kind == "input-channels":
            model["a"](torch.randn(4, 4, 2, 2, generator=generator) if odd else x)
        elif kind == "dtype":
            model["a"](x.double() if odd else x)
        elif kind == "requires_grad":
            model["a"](x.clone().requires_grad_(odd))
        elif kind == "nan":
            bad = x.clone()
            if odd:
                bad[1, 2, 0, 1] = float("nan")
            model["a"](bad)

    mismatch = world_size > 1 or kind in ("input-channels", "nan")
    if not mismatch:
        call()
        return
    if kind == "input-channels" and odd:
        # The rank with the bad input raises its own error, chained to the check's.
        message = _raises_everywhere(group, call, ValueError, "expected input with 3 channels")
        return _check_in_step(group, seed)
    headline = "input is not usable" if kind == "nan" else "the ranks are not making the same call"
    message = _raises_everywhere(group, call, syncbn.faults.RankMismatchError, headline)
    others = "ranks " + ", ".join(map(str, range(1, world_size))) if world_size > 2 else "rank 1"
    expected = {
        "order": ("rank 0: 'b' (3 channels, float32, forward of call 1", f"{others}: 'a' (3 channels"),
        "skip": ("rank 0: 'b' (3 channels", f"{others}: 'a' (3 channels"),
        "channels": ("rank 0: 'a' (5 channels", f"{others}: 'a' (3 channels"),
        "input-channels": ("rank 0: 'a': invalid input", f"{others}: 'a' (3 channels"),
        "dtype": ("rank 0: 'a' (3 channels, float64", f"{others}: 'a' (3 channels, float32"),
        "requires_grad": ("rank 0: 'a' (3 channels, float32, forward of call 1, will run backward)", "will not"),
        "nan": ("rank 0: 'a' (3 channels, float32, forward of call 1, will run backward) with NaN or Inf", ""),
    }[kind]
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    _check_in_step(group, seed)


def _check_in_step(group: Any, seed: int) -> None:
    """After an error raised on every rank, the next matching calls (checked in debug mode) work."""
    layer = syncbn.SyncBatchNorm(3, process_group=group, debug=True)
    layer(torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))).sum().backward()


def check_debug_collectives(group: Any, seed: int, channels: int = 4) -> None:
    """Debug mode adds one check of W x 8 values before each collective; off, it adds nothing."""
    counting = CountingCommunicator(get_communicator(group))
    world_size = counting.world_size
    x = torch.randn(3, channels, 2, 2, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    for debug, expected in (
        (False, [2 * channels + 4, 2 * channels + 1]),
        (True, [8 * world_size, 2 * channels + 4, 8 * world_size, 2 * channels + 1]),
    ):
        counting.payload_sizes.clear()
        syncbn.SyncBatchNorm(channels, process_group=counting, debug=debug)(x).sum().backward()
        # A group of one makes no collective, and its check none either.
        assert counting.payload_sizes == (expected if world_size > 1 else []), (debug, counting.payload_sizes)


# --- state: checkpoint and resume, running statistics equal on every rank ----------------------

GLOBAL_BATCH = 8
RESUME_STEPS = (3, 6)  # checkpoint after 3 steps, end after 6


def _global_batch(seed: int, step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step, the same for any number of ranks (each takes its contiguous share)."""
    generator = torch.Generator().manual_seed(seed * 1009 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator, dtype=dtype) * 2 + 1
    return x, torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator)


def _fresh_model(group: Any, seed: int, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = syncbn.convert_sync_batchnorm(SmallCNN().to(dtype), process_group=group)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train_steps(model: nn.Module, optimizer: Any, group: Any, seed: int, steps: range, dtype: torch.dtype) -> None:
    """Each rank trains on its share of the global batch; gradients are averaged over the ranks (as DDP)."""
    rank, world_size = group_rank_and_size(group)
    share = GLOBAL_BATCH // world_size
    for step in steps:
        x, y = _global_batch(seed, step, dtype)
        mine = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        if world_size > 1:
            for parameter in model.parameters():
                parameter.grad.copy_(sum_over_ranks(group, parameter.grad).to(dtype) / world_size)
        optimizer.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def check_checkpoint_resume(group: Any, seed: int, directory: str) -> None:
    """Saving after 3 steps and resuming in fresh objects gives, after 6, exactly the uninterrupted run.

    Rank 0 writes the checkpoint (model and optimizer state) and the
    uninterrupted run's final state to ``directory``, for
    :func:`check_resume_with_other_world_size`.
    """
    rank, world_size = group_rank_and_size(group)
    checkpoint_at, end = RESUME_STEPS
    model, optimizer = _fresh_model(group, seed)
    _train_steps(model, optimizer, group, seed, range(end), torch.float64)
    uninterrupted = _state(model)

    model, optimizer = _fresh_model(group, seed)
    _train_steps(model, optimizer, group, seed, range(checkpoint_at), torch.float64)
    path = Path(directory) / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": checkpoint_at}, path)
        torch.save(uninterrupted, Path(directory) / "uninterrupted.pt")
    sum_over_ranks(group, torch.zeros(1))  # a barrier: the file is written before anyone reads it

    resumed, resumed_optimizer = _fresh_model(group, seed + 1)  # other initial values: the load must set them all
    checkpoint = torch.load(path)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    _train_steps(resumed, resumed_optimizer, group, seed, range(checkpoint["step"], end), torch.float64)

    def check() -> None:
        for key, value in _state(resumed).items():
            assert torch.equal(value, uninterrupted[key]), f"{key} differs after resuming (seed {seed}, rank {rank})"

    assert_on_every_rank(group, check)
    if world_size > 1:
        sum_over_ranks(group, torch.zeros(1))  # nobody leaves before rank 0 has written


def check_resume_with_other_world_size(group: Any, seed: int, directory: str) -> None:
    """Resume ``directory``'s checkpoint with this group's number of ranks, the global batch kept.

    The statistics and gradients are then summed in another order than in
    the run that wrote it, so the comparison is to float64 rounding.
    """
    checkpoint_at, end = RESUME_STEPS
    resumed, optimizer = _fresh_model(group, seed + 1)
    checkpoint = torch.load(Path(directory) / "checkpoint.pt")
    assert checkpoint["step"] == checkpoint_at
    resumed.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train_steps(resumed, optimizer, group, seed, range(checkpoint_at, end), torch.float64)
    uninterrupted = torch.load(Path(directory) / "uninterrupted.pt")

    def check() -> None:
        for key, value in _state(resumed).items():
            assert_close(value, uninterrupted[key], rtol=1e-10, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")

    assert_on_every_rank(group, check)


def _rank0_value(group: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank: the others add zeros, which is exact."""
    rank, _ = group_rank_and_size(group)
    mine = tensor.detach().double().clone() if rank == 0 else torch.zeros(tensor.shape, dtype=torch.float64)
    return sum_over_ranks(group, mine)


def check_state_bitwise_equal(group: Any, seed: int, steps: int = 100) -> None:
    """After ``steps`` float32 training steps, every parameter and running statistic is bitwise rank 0's.

    They come from the same summed moments on every rank, so any difference
    is a bug (a rank-dependent reduction order, a local statistic leaking in).
    Then the eval outputs on one input are bitwise equal too.
    """
    rank, _ = group_rank_and_size(group)
    model, optimizer = _fresh_model(group, seed, torch.float32)
    _train_steps(model, optimizer, group, seed, range(steps), torch.float32)
    model.eval()
    x, _ = _global_batch(seed, steps, torch.float32)
    with torch.no_grad():
        output = model(x)
    tensors = {**_state(model), "eval output": output}

    def check() -> None:
        for key, value in tensors.items():
            reference = _rank0_value(group, value)
            assert torch.equal(value.double(), reference), f"{key} differs from rank 0's on rank {rank} (seed {seed})"
        assert int(tensors["features.1.num_batches_tracked"]) == steps

    assert_on_every_rank(group, check)


def check_new_groups(group: Any, seed: int, group_size: int) -> None:
    """``new_groups(group_size, group)``: each subgroup's statistics are the oracle of its own ranks' batches."""
    rank, world_size = group_rank_and_size(group)
    if world_size % group_size:
        with pytest.raises(ValueError, match=f"group_size {group_size} does not divide"):
            syncbn.new_groups(group_size, group)
        return
    subgroup = syncbn.new_groups(group_size, group)
    sub_rank, sub_size = group_rank_and_size(subgroup) if subgroup is not None else (0, 1)
    assert (sub_rank, sub_size) == (rank % group_size, group_size), (sub_rank, sub_size)
    # Each subgroup draws its own data (another seed): a statistic mixed across subgroups would differ.
    check_against_oracle(subgroup, seed + rank // group_size, batch=[2 + i for i in range(group_size)])


def check_sync_running_stats(group: Any, seed: int) -> None:
    """Per-rank running statistics (unsynchronised layers, fresh values) pooled: against float64 computed here.

    Every rank draws every rank's values from the shared seed, so each knows what the pooled statistics must
    be: the mean of the means, and the mean of the variances plus the variance of the means.
    """
    rank, world_size = group_rank_and_size(group)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(syncbn.SyncBatchNorm(5)), nn.BatchNorm1d(2, affine=False),
                          nn.BatchNorm1d(4, track_running_stats=False))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    layers = [model[0], model[1][0], model[2]]
    drawn = [
        [(torch.randn(layer.num_features, generator=generator, dtype=torch.float64) * 3,
          torch.rand(layer.num_features, generator=generator, dtype=torch.float64) + 0.1) for layer in layers]
        for _ in range(world_size)
    ]  # fmt: skip
    with torch.no_grad():
        for layer, (mean, var) in zip(layers, drawn[rank], strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    counts = [int(layer.num_batches_tracked) for layer in layers]
    assert syncbn.sync_running_stats(model, group) == 3
    for index, layer in enumerate(layers):
        means = torch.stack([drawn[r][index][0] for r in range(world_size)])
        variances = torch.stack([drawn[r][index][1] for r in range(world_size)])
        expected_mean = means.mean(0)
        expected_var = variances.mean(0) + means.var(0, unbiased=False)
        assert_close(layer.running_mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
        assert_close(layer.running_var.double(), expected_var, rtol=1e-6, atol=1e-6)
    assert [int(layer.num_batches_tracked) for layer in layers] == counts
    assert model[3].running_mean is None


def check_average_gradients_of_unused_parameters(group: Any, seed: int) -> None:
    """A gradient missing on rank 0 counts as zero there; one missing on every rank stays None; halves stay halves."""
    rank, world_size = group_rank_and_size(group)
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(3, 2, generator=generator, dtype=torch.float64) for _ in range(world_size)]
    halves = [torch.randn(5, generator=generator).to(torch.bfloat16) for _ in range(world_size)]
    used = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    unused_here = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    unused = nn.Parameter(torch.zeros(4))
    half = nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    used.grad = grads[rank].clone()
    unused_here.grad = None if rank == 0 else grads[rank].clone()
    half.grad = halves[rank].clone()
    syncbn.average_gradients([used, unused_here, unused, half], group, bucket_bytes=16)
    expected = torch.stack(grads).mean(0)
    assert_close(used.grad, expected)
    if world_size == 1:  # missing on every rank
        assert unused_here.grad is None
    else:
        assert unused_here.grad is not None
        assert_close(unused_here.grad, torch.stack(grads[1:]).sum(0) / world_size)
    assert unused.grad is None
    assert half.grad.dtype == torch.bfloat16
    assert_close(half.grad, torch.stack([h.float() for h in halves]).mean(0).to(torch.bfloat16))


def check_precise_bn(group: Any, seed: int) -> None:
    """PreciseBN over every rank's batches: the mean and unbiased variance of every value each BatchNorm layer's
    input took, against plain torch layers run on the global batches here.

    Every rank draws every rank's batches from the shared seed (3 + rank of them: the ranks run as many as the
    rank with the fewest, 3, since the layers synchronise); the oracle runs an unconverted copy of the model in
    training mode on each step's global batch (the concatenation of the ranks' batches, which SyncBatchNorm
    normalises with), captures the inputs of its BatchNorm layers with forward hooks, and takes their
    statistics in float64. In one process a torch layer stands among ours.
    """
    rank, world_size = group_rank_and_size(group)
    torch.manual_seed(seed)
    reference = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1),
        nn.BatchNorm2d(6, momentum=None), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
        nn.BatchNorm1d(5),
    )  # fmt: skip
    model = syncbn.convert_sync_batchnorm(copy.deepcopy(reference), process_group=group)
    if world_size == 1:
        model[9] = copy.deepcopy(reference[9])  # a torch layer among ours
    model.eval()
    model[8].train()  # flags of every module are kept, whatever they are
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [[torch.randn(2, 3, 5, 5, generator=generator) * 2 + 3 for _ in range(3 + r)] for r in range(world_size)]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    captured: dict[int, list[torch.Tensor]] = {index: [] for index in (1, 4, 9)}

    def capture(index: int) -> Any:
        return lambda _, args: captured[index].append(args[0].double())

    hooks = [reference[index].register_forward_pre_hook(capture(index)) for index in captured]
    reference.train()
    with torch.no_grad():
        for step in range(3):
            reference(torch.cat([rank_batches[step] for rank_batches in batches]))
    for hook in hooks:
        hook.remove()

    ran = syncbn.precise_bn(model, [(x, None) for x in batches[rank]], num_batches=100, process_group=group)
    assert ran == (3 if world_size > 1 else 3 + rank)

    def check() -> None:
        for index, inputs in captured.items():
            values = torch.cat(inputs)
            dims = [0, *range(2, values.dim())]
            mean = values.mean(dims)
            var = values.var(dims, unbiased=True)
            assert_close(model[index].running_mean.double(), mean, rtol=1e-5, atol=1e-5, msg=f"layer {index} mean")
            assert_close(model[index].running_var.double(), var, rtol=1e-5, atol=1e-5, msg=f"layer {index} var")
        for key, value in model.state_dict().items():
            if "running_mean" not in key and "running_var" not in key:
                assert torch.equal(value, before[key]), key
        assert [m.training for m in model.modules()] == [False] * 9 + [True] + [False]

    assert_on_every_rank(group, check)


def check_mixed_paths(group: Any, seed: int) -> None:
    """Rank 0 on the Python CPU implementation, the others on the compiled path: the same collectives with the
    same payloads, so the group trains exactly as one (unequal batches, an empty rank at 4 ranks)."""
    rank, world_size = group_rank_and_size(group)
    batch = [3, 1, 0, 2][:world_size] if world_size == 4 else 3
    with _extension.using("off" if rank == 0 else None):
        check_against_oracle(group, seed, batch=batch, steps=2)
        check_against_oracle(group, seed, batch=batch, dtype=torch.float64, memory_format="channels_last", steps=2)
