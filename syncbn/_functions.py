"""The autograd function of SyncBatchNorm: how the statistics are computed and synchronised.

Forward, per call in training: local moments -> **one** all-reduce (none in a
group of one) of a
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


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


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
        # A group of one has nothing to add (every rank knows the group's size, so all skip or none).
        if communicator.world_size > 1:
            communicator.all_reduce(moments.payload)
        stats = ops.global_stats(moments.payload, num_channels)
        # Decided after the reduction, from the global count that every rank
        # holds, so that all ranks raise together and none is left waiting.
        if stats.num_values == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel in the "
                f"whole process group (this rank's input has shape {tuple(input.shape)}; "
                f"world size {communicator.world_size})"
            )
        if running_mean is not None and running_var is not None:
            ops.update_running_stats(stats, running_mean, running_var, num_batches_tracked, momentum)

        cdtype = moments.centered.dtype
        weight_c = weight if weight is None or weight.dtype == cdtype else weight.to(cdtype)
        bias_c = bias if bias is None or bias.dtype == cdtype else bias.to(cdtype)
        norm = ops.normalization(stats, moments.shift, cdtype)
        output = ops.normalize(moments.centered, norm, weight_c, bias_c, eps)

        ctx.save_for_backward(moments.centered, weight_c)
        ctx.norm = norm
        ctx.count = stats.num_values
        ctx.eps = eps
        ctx.communicator = communicator
        ctx.dtypes = (input.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return _cast(output, input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        centered, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        scaled, sum_dy, sum_dy_xhat = ops.backward_reduce(grad_output, centered, ctx.norm, weight, ctx.eps, need_input)
        # Weight and bias gradients are this rank's share, taken before the reduction.
        grad_weight = _cast(sum_dy_xhat, weight_dtype) if need_weight else None
        grad_bias = _cast(sum_dy, bias_dtype) if need_bias else None
        # Every rank that runs backward joins the all-reduce, whether or not its own input needs a
        # gradient: that is decided per rank (requires_grad may differ), and a rank that skipped
        # the collective would leave the others waiting in it.
        global_sums = torch.cat((sum_dy, sum_dy_xhat))
        if ctx.communicator.world_size > 1:
            ctx.communicator.all_reduce(global_sums)
        grad_input = None
        if need_input:
            assert scaled is not None
            grad_input = _cast(
                ops.backward_elemt(scaled, centered, ctx.norm, weight, ctx.eps, global_sums, ctx.count), input_dtype
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
