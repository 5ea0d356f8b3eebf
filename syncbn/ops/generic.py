"""SyncBatchNorm's work in plain torch operations: any device, no host synchronisation.

The fallback on CUDA when CuPy is not installed, the reference the CuPy
kernels are tested against, a path for other accelerators, and, with
``SYNCBN_OPS=torch``, what the whole test suite runs against on CPU.

Every rank always works on ``c = x - shift``, ``shift`` being its own
per-channel mean in the compute dtype (a choice made from the data would need
the values on the host): the sums of ``c`` keep their precision whatever the
mean, and ``c - (global mean - shift)`` is exact where ``x - global mean``
in float32 would lose the low digits of a large mean. Per-channel arithmetic
is in float64 on the device; no value is read back to the host except in
:meth:`GenericOps.read_summary`, the one read a training forward makes.
"""

from __future__ import annotations

import torch

from syncbn.ops.base import Ops, Summary, backward_payload, channel_view, compute_dtype, host_summary, reduce_dims

_f64 = torch.float64


def _split(norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_channels = (norm.shape[0] - 1) // 2
    return norm[:num_channels], norm[num_channels : 2 * num_channels], norm[-1]


class GenericOps(Ops):
    """The device-generic implementation (``SYNCBN_OPS=torch``)."""

    name = "torch"

    def forward_moments(self, x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_channels = x.shape[1]
        count = x.numel() // num_channels
        cdtype = compute_dtype(x.dtype)
        # The head and tail are host values, written with fills: no host-to-device copy, which would
        # synchronise (and is refused while a CUDA graph is captured); item assignment would make one.
        head = torch.full((2,), float(num_channels), dtype=_f64, device=x.device)
        head[1:].fill_(float(num_channels * num_channels))
        tail = torch.full((2,), float(count), dtype=_f64, device=x.device)
        tail[1:].fill_(float(runs_backward))
        if count == 0:
            # An empty rank contributes zeros but still joins the all-reduce.
            zeros = torch.zeros(2 * num_channels, dtype=_f64, device=x.device)
            shift = torch.zeros(num_channels, dtype=_f64, device=x.device)
            return x.to(cdtype), shift, torch.cat((head, zeros, tail))
        dims = reduce_dims(x)
        shift_c = x.mean(dims, dtype=cdtype)
        centered = x - channel_view(shift_c, x.dim())  # type promotion lifts half inputs to float32
        sum_c = centered.sum(dims, dtype=_f64) if cdtype == _f64 else centered.sum(dims).double()
        sum_sq = torch.linalg.vector_norm(centered, 2, dims).double().square()
        shift = shift_c.double()
        total = shift * count + sum_c
        total_sq = sum_sq + shift * (sum_c + total)
        return centered, shift, torch.cat((head, total, total_sq, tail))

    def read_summary(self, payload: torch.Tensor) -> Summary | None:
        return host_summary(payload)

    def forward_finish(
        self,
        payload: torch.Tensor,
        shift: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
    ) -> torch.Tensor:
        num_channels = shift.shape[0]
        total, total_sq, count = payload[2 : 2 + num_channels], payload[2 + num_channels : -2], payload[-2:-1]
        # An all-empty group has count 0: divide by 1 instead, so that every statistic is a finite 0.
        safe_count = count.clamp(min=1.0)
        mean = total / safe_count
        m2 = (total_sq - total * mean).clamp_(min=0.0)
        var = m2 / safe_count
        if running_mean is not None and running_var is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            if momentum is None:
                if num_batches_tracked is None:
                    raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
                factor = num_batches_tracked.to(_f64).reciprocal()
            else:
                factor = torch.full((1,), momentum, dtype=_f64, device=payload.device)
            # Nothing moves when the group saw no value: the factor is 0 then.
            factor = factor * (count > 0)
            unbiased = m2 / (count - 1.0).clamp(min=1.0)
            for running, batch in ((running_mean, mean), (running_var, unbiased)):
                # In float64, rounded once into the buffer; an in-place torch operation, seen by autograd.
                running.copy_(torch.lerp(running.to(_f64), batch, factor))
        return torch.cat((mean - shift, var, count))

    def normalize(
        self,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        offset, var, _ = _split(norm)
        ndim = centered.dim()
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(_f64)
        output = (centered - channel_view(offset.to(centered.dtype), ndim)) * channel_view(
            scale.to(centered.dtype), ndim
        )
        if bias is not None:
            output = output + channel_view(bias.to(centered.dtype), ndim)
        return output

    def backward_reduce(
        self,
        grad_output: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        need_input_grad: bool,
        creates_graph: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        offset, var, _ = _split(norm)
        cdtype = centered.dtype
        dims = reduce_dims(centered)
        if grad_output.dtype != cdtype:
            grad_output = grad_output.to(cdtype)
        invstd = (var + eps).rsqrt()
        sum_dy = grad_output.sum(dims)
        # sum(dy * x_hat) = invstd * (sum(dy * c) - offset * sum(dy)), without forming x_hat.
        sum_dy_c = (grad_output * centered).sum(dims)
        sum_dy_xhat = ((sum_dy_c.to(_f64) - offset * sum_dy.to(_f64)) * invstd).to(cdtype)
        scaled = self.scale_grad(grad_output, centered, norm, weight, eps) if need_input_grad else None
        return scaled, sum_dy, sum_dy_xhat, backward_payload(sum_dy, sum_dy_xhat, creates_graph)

    def backward_elemt(
        self,
        scaled_grad: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        global_sums: torch.Tensor,
    ) -> torch.Tensor:
        offset, var, count = _split(norm)
        num_channels, ndim, cdtype = centered.shape[1], centered.dim(), centered.dtype
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(_f64)
        means = global_sums.to(_f64) / count.clamp(min=1.0)
        mean_dy, mean_dy_xhat = means[:num_channels], means[num_channels : 2 * num_channels]
        k1 = mean_dy_xhat * invstd * scale
        k0 = mean_dy * scale - k1 * offset
        return scaled_grad.addcmul_(centered, channel_view(k1.to(cdtype), ndim), value=-1.0).sub_(
            channel_view(k0.to(cdtype), ndim)
        )
