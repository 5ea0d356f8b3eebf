"""Per-channel statistics, normalisation and backward of SyncBatchNorm with PyTorch ops.

This is the path for CPU tensors (and any device without a dedicated kernel).
The layout of the work, shared with the GPU kernels:

* forward: local moments (two reads of ``x``; one write of the centred input
  ``c``) -> one all-reduce -> normalise (read ``c``, write ``y``);
* backward: one reduction pass (read ``dy`` and ``c``; write ``dy * w * invstd``)
  -> one all-reduce -> one elementwise correction of that result.

``c = x - shift`` is the input minus a rough per-channel mean of this rank.
Every later step works on ``c`` instead of ``x``, which keeps the statistics
and the normalisation exact when the mean is large against the spread (with
``x`` itself, float32 loses all significant digits of the variance once the
mean reaches about 1e4 times the standard deviation). ``c`` is saved for the
backward instead of ``x``, so the layer keeps no more memory than
``nn.BatchNorm``.

The fused per-channel reductions come from ``aten::native_batch_norm_backward``
in inference mode, which computes ``sum(g)`` and ``sum(g * (x - m) / sqrt(v + eps))``
in one vectorised pass on CPU for every memory format, and the normalisation
from ``aten::batch_norm`` in inference mode (one pass, memory format kept).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_aten = torch.ops.aten


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and intermediate values are computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor) -> list[int]:
    """All dimensions but the channel dimension (1)."""
    return [0, *range(2, x.dim())]


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``(N, C, ...)``."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class LocalMoments(NamedTuple):
    """What one rank knows about its own batch before the all-reduce."""

    centered: torch.Tensor  # x - shift, in the compute dtype, x's memory format
    shift: torch.Tensor  # (C,) compute dtype: the per-channel shift of this rank
    payload: torch.Tensor  # (2C + 1,) float64: [sum x, sum x^2 (centred, see below), count]


def local_moments(x: torch.Tensor) -> LocalMoments:
    """Centre ``x`` and fill the forward all-reduce payload.

    The payload holds, per channel, ``S = sum(x)`` and ``Q = M2 + S^2 / n``
    (``M2 = sum((x - mean_local)^2)``, so ``Q`` equals ``sum(x^2)``), then the
    count ``n``, all in float64: summed over ranks they give the global mean
    ``S/N`` and ``M2 = Q - S^2/N`` with about ``(mean/std)^2 * 1e-16`` relative
    error, and counts exact far beyond 2^24. Reads ``x`` twice, writes ``c`` once.
    """
    num_channels = x.shape[1]
    count = x.numel() // num_channels if num_channels else 0
    cdtype = compute_dtype(x.dtype)
    payload = torch.empty(2 * num_channels + 1, dtype=torch.float64, device=x.device)
    payload[-1] = count
    if count == 0:
        # An empty rank contributes zeros but still joins the all-reduce.
        payload[:-1].zero_()
        shift = torch.zeros(num_channels, dtype=cdtype, device=x.device)
        return LocalMoments(x.to(cdtype), shift, payload)
    dims = reduce_dims(x)
    shift = x.sum(dims, dtype=cdtype).div_(count)
    centered = x - channel_view(shift, x.dim())  # type promotion lifts half inputs to float32
    zeros = torch.zeros(num_channels, dtype=cdtype, device=x.device)
    ones = torch.ones(num_channels, dtype=cdtype, device=x.device)
    # sum(c * (c - 0) / sqrt(1 + 0)) and sum(c), in one pass over c.
    _, sum_sq, sum_c = _aten.native_batch_norm_backward(
        centered, centered, None, zeros, ones, None, None, False, 0.0, [False, True, True]
    )
    sum_c = sum_c.double()
    m2 = (sum_sq.double() - sum_c * sum_c / count).clamp_(min=0.0)
    total = shift.double() * count + sum_c
    payload[:num_channels] = total
    payload[num_channels:-1] = m2 + total * total / count
    return LocalMoments(centered, shift, payload)


def normalize(
    centered: torch.Tensor,
    offset: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = (c - offset) / sqrt(var + eps) * weight + bias``, cast to ``out_dtype``.

    ``offset`` is the global mean minus this rank's shift: small, so the
    subtraction loses nothing. One pass (read ``c``, write ``y``).
    """
    if centered.numel() == 0:
        return centered.to(out_dtype)
    out = F.batch_norm(centered, offset, var, weight, bias, False, 0.0, eps)
    return out.to(out_dtype)


def backward_reduce(
    grad_output: torch.Tensor,
    centered: torch.Tensor,
    offset: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Local ``sum(dy)`` and ``sum(dy * x_hat)`` per channel, and ``dy * weight * invstd``.

    One pass: reads ``dy`` and ``c``; writes the scaled gradient when the input
    needs one (it is the first term of the input gradient).
    """
    if centered.numel() == 0:
        zeros = torch.zeros(centered.shape[1], dtype=centered.dtype, device=centered.device)
        scaled = centered.new_empty(centered.shape) if need_input_grad else None
        return scaled, zeros, zeros.clone()
    grad = grad_output.to(centered.dtype)
    scaled, sum_dy_xhat, sum_dy = _aten.native_batch_norm_backward(
        grad, centered, weight, offset, var, None, None, False, eps, [need_input_grad, True, True]
    )
    return scaled, sum_dy, sum_dy_xhat


def backward_elemt(
    scaled_grad: torch.Tensor,
    centered: torch.Tensor,
    offset: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    mean_dy: torch.Tensor,
    mean_dy_xhat: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Finish the input gradient in place on ``scaled_grad``.

    ``dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with global
    means, written as ``scaled_grad + k1 * c + k0`` per channel.
    """
    if centered.numel() == 0:
        return scaled_grad.to(out_dtype)
    alpha = invstd if weight is None else weight * invstd
    k1 = -alpha * invstd * mean_dy_xhat
    k0 = -alpha * mean_dy - k1 * offset
    ndim = centered.dim()
    scaled_grad.addcmul_(centered, channel_view(k1, ndim)).add_(channel_view(k0, ndim))
    return scaled_grad.to(out_dtype)
