"""The oracle: ``nn.BatchNorm`` in float64 on the concatenation of every rank's batch.

Also the per-dtype tolerance table, the data every rank draws from one shared
seed, and a way to sum a test value over the ranks that does not go through
the library under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from syncbn.comm.mpi import is_mpi_communicator


@dataclass(frozen=True)
class Tolerance:
    """``assert_close`` tolerances for elementwise results and for per-channel reductions."""

    elementwise: dict[str, float]
    reduced: dict[str, float]


# One table for the whole suite. Elementwise results (output, input gradient)
# are rounded to the input's dtype; reductions (weight and bias gradients,
# running statistics) are accumulated in float32 or float64 whatever the input.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance({"rtol": 1e-9, "atol": 1e-9}, {"rtol": 1e-9, "atol": 1e-9}),
    torch.float32: Tolerance({"rtol": 1e-5, "atol": 2e-5}, {"rtol": 1e-4, "atol": 1e-4}),
    torch.float16: Tolerance({"rtol": 2e-3, "atol": 2e-3}, {"rtol": 1e-3, "atol": 1e-3}),
    torch.bfloat16: Tolerance({"rtol": 1.6e-2, "atol": 1.6e-2}, {"rtol": 1e-3, "atol": 1e-3}),
}

MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}

BATCHNORM_BY_NDIM: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def group_rank_and_size(group: Any) -> tuple[int, int]:
    """Rank and size of this process in ``group`` (mpi4py, torch.distributed or None)."""
    if is_mpi_communicator(group):
        return group.Get_rank(), group.Get_size()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def sum_over_ranks(group: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a float64 copy of ``tensor`` over ``group``, straight through the backend."""
    total = tensor.detach().to(torch.float64).contiguous().clone()
    if is_mpi_communicator(group):
        from mpi4py import MPI

        group.Allreduce(MPI.IN_PLACE, total.numpy(), op=MPI.SUM)
    elif dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total


def max_over_ranks(group: Any, value: float) -> float:
    """The largest of a float across ``group``."""
    tensor = torch.tensor([value], dtype=torch.float64)
    if is_mpi_communicator(group):
        from mpi4py import MPI

        group.Allreduce(MPI.IN_PLACE, tensor.numpy(), op=MPI.MAX)
    elif dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor.item())


@dataclass
class GlobalBatch:
    """One step's data: every rank draws the same global tensors and keeps its slice."""

    x: torch.Tensor  # float64 values, exactly representable in the test dtype
    grad: torch.Tensor  # float64 upstream gradient, exactly representable in the test dtype
    start: int
    stop: int

    def local(self, dtype: torch.dtype, memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[self.start : self.stop].to(dtype).contiguous(memory_format=memory_format)
        grad = self.grad[self.start : self.stop].to(dtype).contiguous(memory_format=memory_format)
        return x.requires_grad_(), grad


def draw_batch(
    generator: torch.Generator,
    batch_sizes: list[int],
    rank: int,
    channels: int,
    tail: tuple[int, ...],
    dtype: torch.dtype,
    loc_range: tuple[float, float] = (-3.0, 3.0),
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> GlobalBatch:
    """Fresh random values with a random mean and spread per channel, rounded to ``dtype``."""
    total = sum(batch_sizes)
    shape = (total, channels, *tail)
    view = (1, channels) + (1,) * len(tail)
    loc = torch.empty(channels, dtype=torch.float64).uniform_(*loc_range, generator=generator)
    scale = torch.empty(channels, dtype=torch.float64).uniform_(*scale_range, generator=generator)
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale.view(view) + loc.view(view)
    grad = torch.randn(shape, dtype=torch.float64, generator=generator)
    start = sum(batch_sizes[:rank])
    return GlobalBatch(x.to(dtype).double(), grad.to(dtype).double(), start, start + batch_sizes[rank])


def reference_batchnorm(ndim: int, module: nn.Module) -> nn.Module:
    """A float64 ``nn.BatchNormXd`` with the same configuration and state as ``module``."""
    cls = BATCHNORM_BY_NDIM[ndim]
    reference = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        dtype=torch.float64,
    )
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in module.state_dict().items()})
    reference.train(module.training)
    return reference


def randomize_state(module: nn.Module, generator: torch.Generator) -> None:
    """Random affine parameters and running statistics (the same on every rank)."""
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=generator))
            module.bias.copy_(torch.empty_like(module.bias).uniform_(-1.0, 1.0, generator=generator))
        if module.track_running_stats:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.empty_like(module.running_var).uniform_(0.5, 2.0, generator=generator))


def assert_on_every_rank(group: Any, check: Callable[[], None]) -> None:
    """Run ``check``; if it fails on any rank, fail on every rank.

    Keeps the ranks in step: a rank whose assertion failed must not leave the
    others waiting in the next collective of the test.
    """
    error: AssertionError | None = None
    try:
        check()
    except AssertionError as caught:
        error = caught
    failed_somewhere = max_over_ranks(group, 0.0 if error is None else 1.0)
    if error is not None:
        raise error
    if failed_somewhere:
        raise AssertionError("this check failed on another rank (see that rank's report)")
