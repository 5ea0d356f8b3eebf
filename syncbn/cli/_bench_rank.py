"""What each rank of ``syncbn bench`` runs: the layers, the phase-by-phase replica, the collectives.

One process per rank, started by :mod:`syncbn.cli.bench` ("spawn" context),
joined in a gloo group over 127.0.0.1, one thread each. Everything a rank
measures goes back to the parent through one queue, as plain lists, with
every rank's per-iteration times (the parent takes the slowest rank).

Timing, per input shape: every repetition runs each contender once, in an
order that rotates from one repetition to the next, so that a drift of the
machine hits them all alike; each timed iteration is preceded by an untimed
``dist.barrier()`` (the ranks start together) and the reset of the
gradients. An iteration is ``layer(x).backward(grad)``.
"""

from __future__ import annotations

import datetime
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.cli._extras import import_fairscale_syncbn
from syncbn.comm import get_communicator
from syncbn.comm.base import Communicator
from syncbn.harness import RankChannel, gloo_group
from syncbn.ops import for_device

Shape = tuple[int, ...]

#: The timed contenders, in their starting order.
CONTENDERS = ("syncbn", "syncbn_phases", "local", "fairscale")
#: The steps of syncbn's forward + backward, in the order ``_functions.py`` runs them.
STEPS = (
    "local_moments",  # one pass over x: per-channel sums, the forward payload (ops.forward_moments)
    "all_reduce_forward",  # 2C + 4 float64
    "per_channel",  # summary read, global and running statistics, normalisation constants (ops.forward_finish)
    "normalize",  # one pass: read x, write y
    "backward_reduce",  # one pass: read dy and x, write dy * w * invstd; sum(dy), sum(dy * x_hat)
    "all_reduce_backward",  # 2C + 1 float32, and the read of its last slot (ranks creating a graph)
    "backward_elemt",  # one pass over dx in place
)
#: The phases the report adds the steps into.
PHASES: dict[str, tuple[str, ...]] = {
    "local_statistics": ("local_moments", "per_channel"),
    "collective": ("all_reduce_forward", "all_reduce_backward"),
    "elementwise": ("normalize", "backward_reduce", "backward_elemt"),
}

OUTPUT_TOLERANCE = 1e-4  # syncbn against fairscale (whose variance is E[x^2] - E[x]^2, in float32)
GRAD_TOLERANCE = 1e-3
MIN_SYNC_EFFECT = 1e-2  # at W > 1, syncbn's output must differ at least this much from the unsynchronised one's
REPLICA_TOLERANCE = 1e-6  # the phase replica runs the same operations: it must agree to rounding


@dataclass(frozen=True)
class Plan:
    """What every rank runs (picklable: it travels to the spawned processes)."""

    shapes: tuple[Shape, ...]
    warmup: int
    reps: int
    collective_numels: tuple[int, ...]  # float32 elements per rank of the all-reduce / all-gather sweep
    collective_warmup: int
    collective_reps: int
    seed: int
    collective_timeout_s: float


@dataclass
class Contender:
    """Something to time: ``run`` is timed, ``reset`` (untimed) runs before it."""

    name: str
    run: Callable[[], None]
    reset: Callable[[], None]


class PhasedSyncBatchNorm:
    """syncbn's forward + backward as ``_functions.py`` runs it, with a clock read between the steps.

    The same ``syncbn.ops`` calls and ``Communicator.all_reduce`` calls, in the
    same order, on the same arguments; the library itself carries no timer.
    ``step_seconds`` gets one row of :data:`STEPS` durations per call. On
    float32 CPU tensors the layer itself runs the compiled CPU path
    (:mod:`syncbn._extension`: the same passes and collectives, in C++), so
    these phases describe the Python implementation and may add up to more
    than the layer's time.
    """

    def __init__(self, layer: _BatchNorm, communicator: Communicator) -> None:
        buffers = (layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if any(t is None for t in buffers):
            raise ValueError("the phase replica times an affine layer that tracks running statistics")
        weight, bias, running_mean, running_var, num_batches_tracked = (t.detach() for t in buffers if t is not None)
        self.weight, self.bias = weight, bias  # the layer's own parameters: the same values
        # Copies: the replica updates its own running statistics, not the layer's.
        self.running_mean, self.running_var = running_mean.clone(), running_var.clone()
        self.num_batches_tracked = num_batches_tracked.clone()
        self.momentum = layer.momentum
        self.eps = layer.eps
        self.communicator = communicator
        self.step_seconds: list[list[float]] = []

    def __call__(self, x: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and input gradient; the step durations are appended to ``step_seconds``."""
        clock = time.perf_counter
        ops = for_device(x.device.type)
        t0 = clock()
        centered, shift, payload = ops.forward_moments(x, True)
        t1 = clock()
        if self.communicator.world_size > 1:  # as _functions.py: a group of one makes no collective
            self.communicator.all_reduce(payload)
        t2 = clock()
        if self.communicator.world_size > 1:
            ops.read_summary(payload)
        norm = ops.forward_finish(
            payload, shift, self.running_mean, self.running_var, self.num_batches_tracked, self.momentum
        )
        t3 = clock()
        output = ops.normalize(centered, norm, self.weight, self.bias, self.eps)
        t4 = clock()
        scaled, _, _, global_sums = ops.backward_reduce(grad_output, centered, norm, self.weight, self.eps, True, False)
        t5 = clock()
        if self.communicator.world_size > 1:
            self.communicator.all_reduce(global_sums)
        t6 = clock()
        assert scaled is not None
        ops.read_graph_ranks(global_sums, False)
        grad_input = ops.backward_elemt(scaled, centered, norm, self.weight, self.eps, global_sums)
        t7 = clock()
        self.step_seconds.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6])
        return output, grad_input


# --------------------------------------------------------------------------- layers, inputs, checks


def make_layers(num_channels: int, ndim: int, seed: int) -> dict[str, _BatchNorm]:
    """syncbn, the local layer and fairscale's, in training mode, with the same weight and bias on every rank."""
    import syncbn

    local_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    layers: dict[str, _BatchNorm] = {
        "syncbn": syncbn.SyncBatchNorm(num_channels),
        "local": local_class(num_channels),
        "fairscale": import_fairscale_syncbn()(num_channels, process_group=dist.group.WORLD),
    }
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(num_channels, generator=generator) + 0.5
    bias = torch.randn(num_channels, generator=generator)
    for layer in layers.values():
        layer.train()
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layers


def make_inputs(shape: Shape, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input (a leaf that requires grad) and output gradient.

    The ranks' inputs differ in mean and spread, so that a layer that does not
    synchronise gives visibly different results from one that does.
    """
    generator = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    x = torch.randn(shape, generator=generator) * (1.0 + 0.5 * rank) + rank
    grad = torch.randn(shape, generator=generator)
    return x.requires_grad_(), grad


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    output = layer(leaf)
    output.backward(grad)
    assert leaf.grad is not None
    return output.detach(), leaf.grad


def check_agreement(
    layers: dict[str, _BatchNorm], replica: PhasedSyncBatchNorm, x: torch.Tensor, grad: torch.Tensor, world_size: int
) -> dict[str, float]:
    """syncbn against fairscale, the unsynchronised layer and the phase replica; raises on every rank together."""
    y_ours, dx_ours = _forward_backward(layers["syncbn"], x, grad)
    y_fs, dx_fs = _forward_backward(layers["fairscale"], x, grad)
    y_local, _ = _forward_backward(layers["local"], x, grad)
    y_replica, dx_replica = replica(x.detach(), grad)
    replica.step_seconds.clear()
    diffs = torch.tensor(
        [
            (y_ours - y_fs).abs().max().item(),
            (dx_ours - dx_fs).abs().max().item(),
            -(y_ours - y_local).abs().max().item(),  # negated: the MAX below keeps the smallest effect
            max((y_ours - y_replica).abs().max().item(), (dx_ours - dx_replica).abs().max().item()),
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)  # every rank decides on the same numbers
    report = {
        "max_abs_diff_output_vs_fairscale": diffs[0].item(),
        "max_abs_diff_grad_input_vs_fairscale": diffs[1].item(),
        "min_over_ranks_max_abs_diff_output_vs_local": -diffs[2].item(),
        "max_abs_diff_vs_phase_replica": diffs[3].item(),
    }
    ok = (
        report["max_abs_diff_output_vs_fairscale"] <= OUTPUT_TOLERANCE
        and report["max_abs_diff_grad_input_vs_fairscale"] <= GRAD_TOLERANCE
        and report["max_abs_diff_vs_phase_replica"] <= REPLICA_TOLERANCE
        and (world_size == 1 or report["min_over_ranks_max_abs_diff_output_vs_local"] >= MIN_SYNC_EFFECT)
    )
    if not ok:
        raise RuntimeError(f"sanity check failed for input shape {tuple(x.shape)} at {world_size} ranks: {report}")
    return report


def probe_torch_syncbn(x: torch.Tensor) -> str:
    """Try ``torch.nn.SyncBatchNorm`` once on this (CPU) input; say why it cannot be timed.

    torch checks the device before any collective, on every rank alike, so
    the probe cannot leave a rank waiting.
    """
    layer = nn.SyncBatchNorm(x.shape[1]).train()
    try:
        layer(x.detach())
    except (ValueError, RuntimeError) as error:
        return f"not applicable on CPU: {type(error).__name__}: {error}"
    return "ran on CPU (not timed by this version of the benchmark)"


# --------------------------------------------------------------------------- timing


def _zero_grads(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def reset() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return reset


def _noop() -> None:
    return None


def layer_contenders(
    layers: dict[str, _BatchNorm], replica: PhasedSyncBatchNorm, x: torch.Tensor, grad: torch.Tensor
) -> list[Contender]:
    """The contenders of :data:`CONTENDERS`: one training step of each layer, and of the phase replica."""

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer(x).backward(grad)

        return run

    def replica_step() -> None:
        replica(detached, grad)

    detached = x.detach()
    return [
        Contender(name, replica_step, _noop)
        if name == "syncbn_phases"
        else Contender(name, step(layers[name]), _zero_grads(layers[name], x))
        for name in CONTENDERS
    ]


def time_interleaved(
    contenders: Sequence[Contender], warmup: int, reps: int, tick: Callable[[], None]
) -> list[list[float]]:
    """Seconds per timed iteration, ``[contender][rep]``; the order rotates every repetition."""
    count = len(contenders)
    times = [[0.0] * reps for _ in contenders]
    for rep in range(warmup + reps):
        for offset in range(count):
            index = (rep + offset) % count
            contenders[index].reset()
            dist.barrier()
            start = time.perf_counter()
            contenders[index].run()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[index][rep - warmup] = elapsed
        tick()
    return times


def gather(values: list[list[float]]) -> list[list[list[float]]]:
    """Every rank's ``values`` (a rectangular table of floats), indexed by rank."""
    tensor = torch.tensor(values, dtype=torch.float64)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def bench_layer(shape: Shape, plan: Plan, rank: int, world_size: int, tick: Callable[[], None]) -> dict[str, Any]:
    """Check, then time every contender on one input shape; every rank's times in seconds."""
    layers = make_layers(shape[1], len(shape), plan.seed)
    replica = PhasedSyncBatchNorm(layers["syncbn"], get_communicator(None))
    x, grad = make_inputs(shape, rank, plan.seed)
    check = check_agreement(layers, replica, x, grad, world_size)
    times = time_interleaved(layer_contenders(layers, replica, x, grad), plan.warmup, plan.reps, tick)
    steps = replica.step_seconds[plan.warmup :]  # one row per call: the warm-up calls come first
    return {
        "shape": list(shape),
        "check": check,
        "seconds": dict(zip(CONTENDERS, zip(*gather(times), strict=True), strict=True)),  # name -> [rank][rep]
        "step_seconds": gather(steps),  # [rank][rep][step]
    }


def bench_collectives(plan: Plan, world_size: int, tick: Callable[[], None]) -> list[dict[str, Any]]:
    """All-reduce and all-gather of each size, interleaved like the layers; every rank's times in seconds."""

    def all_reduce(tensor: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            dist.all_reduce(tensor)

        return run

    def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            dist.all_gather(outputs, tensor)

        return run

    contenders = []
    for numel in plan.collective_numels:
        # Zeros stay zeros through any number of reductions: nothing overflows.
        contenders.append(Contender(f"all_reduce:{numel}", all_reduce(torch.zeros(numel)), _noop))
        outputs = [torch.empty(numel) for _ in range(world_size)]
        contenders.append(Contender(f"all_gather:{numel}", all_gather(outputs, torch.zeros(numel)), _noop))
    times = gather(time_interleaved(contenders, plan.collective_warmup, plan.collective_reps, tick))
    results = []
    for index, contender in enumerate(contenders):
        op, count = contender.name.split(":")
        results.append(
            {
                "op": op,
                "numel": int(count),
                "bytes_per_rank": int(count) * 4,
                "seconds": [times[rank][index] for rank in range(world_size)],
            }
        )
    return results


# --------------------------------------------------------------------------- the process


def rank_main(rank: int, world_size: int, channel: RankChannel, port: int, plan: Plan) -> dict[str, Any] | None:
    """One rank (run by :class:`syncbn.harness.LocalRanks`): join the gloo group, run the plan.

    Sends ``("progress", 0, 1)`` after each repetition (rank 0 only); returns
    rank 0's results (None on the other ranks).
    """
    # fairscale calls a deprecated torch API in every backward
    warnings.filterwarnings("ignore", message="non-inplace resize_as is deprecated", category=UserWarning)
    with gloo_group(rank, world_size, datetime.timedelta(seconds=plan.collective_timeout_s), port=port):

        def tick() -> None:
            if rank == 0:
                channel.send("progress", 1)

        torch_syncbn = probe_torch_syncbn(make_inputs(plan.shapes[0], rank, plan.seed)[0])
        layers = [bench_layer(shape, plan, rank, world_size, tick) for shape in plan.shapes]
        collectives = bench_collectives(plan, world_size, tick)
        dist.barrier()
        return {"torch_syncbn": torch_syncbn, "layers": layers, "collectives": collectives} if rank == 0 else None
