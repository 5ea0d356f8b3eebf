"""The autograd function of SyncBatchNorm: how the statistics are computed and synchronised.

Forward, per call in training: local moments -> **one** all-reduce of a
``2C + 1`` float64 payload ``[sum x, sum x^2, count]`` -> global mean and
variance -> normalise. Backward: local ``[sum dy, sum dy * x_hat]`` -> **one**
all-reduce of ``2C`` values -> input gradient.

Why one all-reduce and not an all-gather: the sums are all the global
statistics need, and a sum has a fixed size, so the payload stays ``O(C)``
whatever the number of ranks. Unequal batch sizes stay exact because each
rank adds its own count into the payload.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from syncbn import _cpu_ops as ops
from syncbn.comm.base import Communicator


class GlobalStats:
    """Global per-channel statistics, decoded from the summed forward payload (all float64)."""

    def __init__(self, payload: torch.Tensor, num_channels: int, eps: float) -> None:
        total = payload[:num_channels]
        total_sq = payload[num_channels:-1]
        self.count = payload[-1:]
        # An all-empty group has count 0: divide by 1 instead, so that every
        # statistic is a finite 0 and nothing downstream turns into NaN.
        safe_count = self.count.clamp(min=1.0)
        self.mean = total / safe_count
        self.m2 = (total_sq - total * self.mean).clamp_(min=0.0)
        self.var = self.m2 / safe_count
        self.invstd = torch.rsqrt(self.var + eps)


def _update_running_stats(
    stats: GlobalStats,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
) -> None:
    """``running = (1 - factor) * running + factor * batch``, skipped when the group saw no value.

    Runs on the device without reading anything back to the host.
    ``factor`` is ``momentum``, or ``1 / num_batches_tracked`` (a cumulative
    average) when ``momentum`` is None. The running variance is unbiased,
    with the global count.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor: torch.Tensor | float = 1.0 / num_batches_tracked.double()
    else:
        factor = momentum
    unbiased = stats.m2 / (stats.count - 1.0).clamp(min=1.0)
    has_values = stats.count > 0
    for running, batch in ((running_mean, stats.mean), (running_var, unbiased)):
        old = running.double()
        new = old * (1.0 - factor) + batch * factor
        running.copy_(torch.where(has_values, new, old))


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the union of the batches of a group of processes.

    ``apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
    momentum, eps, communicator)``. Running statistics are updated in place
    when ``running_mean`` is given. Weight and bias gradients are this rank's
    share (DDP's averaging of them yields the full-batch gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
        eps: float,
        communicator: Communicator,
    ) -> torch.Tensor:
        num_channels = input.shape[1]
        moments = ops.local_moments(input)
        # Every rank joins, even one with an empty batch: the others are waiting for its zeros.
        communicator.all_reduce(moments.payload)
        stats = GlobalStats(moments.payload, num_channels, eps)

        local_count = input.numel() // num_channels
        # Decided after the reduction, from the global count that every rank
        # holds, so that all ranks raise together and none is left waiting.
        # A rank with two values or more knows the total is at least two and
        # reads nothing back from the device.
        if local_count < 2 and int(stats.count.item()) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel in the "
                f"whole process group (this rank's input has shape {tuple(input.shape)}; "
                f"world size {communicator.world_size})"
            )
        if running_mean is not None and running_var is not None:
            _update_running_stats(stats, running_mean, running_var, num_batches_tracked, momentum)

        cdtype = moments.centered.dtype
        offset = (stats.mean - moments.shift.double()).to(cdtype)
        var = stats.var.to(cdtype)
        weight_c = None if weight is None else weight.to(cdtype)
        bias_c = None if bias is None else bias.to(cdtype)
        output = ops.normalize(moments.centered, offset, var, weight_c, bias_c, eps, input.dtype)

        ctx.save_for_backward(moments.centered, offset, var, stats.invstd.to(cdtype), stats.count, weight_c)
        ctx.eps = eps
        ctx.communicator = communicator
        ctx.input_dtype = input.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        centered, offset, var, invstd, count, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        scaled, sum_dy, sum_dy_xhat = ops.backward_reduce(
            grad_output, centered, offset, var, weight, ctx.eps, need_input
        )
        # Weight and bias gradients are this rank's share, taken before the reduction.
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_input = None
        if need_input:
            assert scaled is not None
            payload = torch.cat([sum_dy, sum_dy_xhat])
            ctx.communicator.all_reduce(payload)
            # count is 0 only when every rank is empty; then the sums are 0 too.
            safe_count = count.clamp(min=1.0).to(payload.dtype)
            mean_dy, mean_dy_xhat = (payload / safe_count).chunk(2)
            grad_input = ops.backward_elemt(
                scaled, centered, offset, invstd, weight, mean_dy, mean_dy_xhat, ctx.input_dtype
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
