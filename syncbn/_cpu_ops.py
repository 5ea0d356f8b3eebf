"""SyncBatchNorm on CPU tensors: the passes over the data with PyTorch ops, per-channel arithmetic in NumPy.

The layout of the work:

* forward: local sums (one read of ``x``) -> one all-reduce -> normalise
  (read ``x``, write ``y``);
* backward: one reduction pass (read ``dy`` and ``x``; write ``dy * w * invstd``)
  -> one all-reduce -> one elementwise correction of that result.

When a rank's batch has a mean that is large against its spread (more than
about 2.6 standard deviations from zero, in any channel), sums of raw values
lose float32 precision to cancellation; that rank then works on
``c = x - shift`` instead, ``shift`` being its own per-channel mean: three
more passes (mean, subtraction, sums of ``c``) and the statistics and the
normalisation stay exact even with a mean 1e5 times the spread. ``c`` is then
saved for the backward instead of ``x``, so the layer holds no more memory
than ``nn.BatchNorm``. Each rank decides this alone, from its own sums, before
the all-reduce: the payload is the same either way.

The fused per-channel reductions come from ``aten::native_batch_norm_backward``
in inference mode, which computes ``sum(g)`` and ``sum(g * (x - m) / sqrt(v + eps))``
in one vectorised pass for every memory format, and the normalisation from
``aten::batch_norm`` in inference mode (one pass, memory format kept).

The ``O(C)`` arithmetic between the passes (combining moments, running
statistics, backward coefficients) is done in float64 NumPy on views of the
same memory: a dozen tiny torch operations would cost more than the passes
themselves on small layers. On CPU the global count is a host value, so
reading it costs nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

_aten = torch.ops.aten
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and intermediate values are computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor) -> list[int]:
    """All dimensions but the channel dimension (1)."""
    return [0, *range(2, x.dim())]


def channel_shape(ndim: int, num_channels: int) -> tuple[int, ...]:
    """The shape ``(1, C, 1, ...)`` of a per-channel vector that broadcasts against ``(N, C, ...)``."""
    return (1, num_channels) + (1,) * (ndim - 2)


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``(N, C, ...)``."""
    return t.view(channel_shape(ndim, t.shape[0]))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor that needs no gradient (float32 or float64; others are converted)."""
    if t.dtype not in _NUMPY_DTYPES:
        t = t.double()
    return t.detach().numpy()


@functools.lru_cache(maxsize=64)
def _zeros_and_ones(num_channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant per-channel statistics (mean 0, variance 1), made once per shape; never written to."""
    return torch.zeros(num_channels, dtype=dtype), torch.ones(num_channels, dtype=dtype)


class LocalMoments(NamedTuple):
    """What one rank knows about its own batch before the all-reduce."""

    centered: torch.Tensor  # x - shift (x itself when shift is 0), in the compute dtype and x's memory format
    shift: np.ndarray  # (C,) float64: 0, or this rank's rough per-channel mean
    payload: torch.Tensor  # (2C + 4,) float64: [C, C^2, sum x, sum x^2, count, runs backward (set by the caller)]


# sum(x^2) <= 8 * M2 means mean^2 <= 7 * variance: sums of the raw values then
# lose at most a factor 8 of float32's precision to cancellation.
_WELL_CONDITIONED = 8.0


def _sums(t: torch.Tensor) -> np.ndarray:
    """``[sum(t), sum(t^2)]`` per channel, float64, from one pass over ``t``."""
    zeros, ones = _zeros_and_ones(t.shape[1], t.dtype)
    # The inference-mode gradient of batch norm: sum(g) and sum(g * (t - 0) / sqrt(1 + 0)), with g = t.
    _, sum_sq, total = _aten.native_batch_norm_backward(
        t, t, None, zeros, ones, None, None, False, 0.0, [False, True, True]
    )
    return np.array((total.numpy(), sum_sq.numpy()), dtype=np.float64)


def local_moments(x: torch.Tensor) -> LocalMoments:
    """Fill the forward all-reduce payload; centre ``x`` when its mean is large against its spread.

    The payload holds ``C`` and ``C^2`` (summed, they tell every rank whether
    all ranks have its channel count: see :func:`channel_counts_agree`), then
    per channel ``S = sum(x)`` and ``Q = sum(x^2)``, then the count ``n`` and
    a last slot the caller sets to 1 when this rank will run backward
    (summed, it says how many ranks will), in float64. Summed over ranks they give the global mean
    ``S/N`` and ``M2 = Q - S^2/N`` with about ``(mean/std)^2 * 1e-16`` relative
    error, and counts exact far beyond 2^24.

    A float32/float64 batch whose mean is within a few standard deviations of
    zero (the usual case) is read once and used as it is (``shift = 0``, no
    copy). Otherwise, or for half-precision input, ``c = x - shift`` is formed
    with this rank's mean (rounded to the compute dtype) as ``shift`` and the
    sums come from ``c`` (``S = n * shift + sum(c)``,
    ``Q = sum(c^2) + shift * (sum(c) + S)``): three more passes, and the sums
    keep their precision whatever the mean.
    """
    num_channels = x.shape[1]
    count = x.numel() // num_channels
    cdtype = compute_dtype(x.dtype)
    payload = np.empty(2 * num_channels + 4)
    payload[:2] = num_channels, num_channels * num_channels
    payload[-2:] = count, 0.0
    if count == 0:
        # An empty rank contributes zeros but still joins the all-reduce.
        payload[2:-2] = 0.0
        return LocalMoments(x.to(cdtype), np.zeros(num_channels), torch.from_numpy(payload))
    total, total_sq = payload[2 : 2 + num_channels], payload[2 + num_channels : -2]
    if x.dtype == cdtype:
        total[:], total_sq[:] = _sums(x)
        # sum(x^2) <= 8 * (sum(x^2) - sum(x)^2 / n)  <=>  sum(x)^2 <= (7/8) * n * sum(x^2)
        if np.all(total * total <= total_sq * (count * (1.0 - 1.0 / _WELL_CONDITIONED))):
            return LocalMoments(x, np.zeros(num_channels), torch.from_numpy(payload))
    # The shift must be close to the mean (its residual is summed n times in
    # float32): torch's cascade summation gives it, the sums above do not.
    shift = x.mean(reduce_dims(x), dtype=cdtype)
    centered = x - channel_view(shift, x.dim())  # type promotion lifts half inputs to float32
    sum_c, sum_sq = _sums(centered)
    shift64 = shift.numpy().astype(np.float64)
    np.multiply(shift64, count, out=total)
    total += sum_c
    np.add(sum_c, total, out=total_sq)
    total_sq *= shift64
    total_sq += sum_sq
    return LocalMoments(centered, shift64, torch.from_numpy(payload))


class GlobalStats(NamedTuple):
    """Global per-channel statistics, decoded from the summed forward payload (float64)."""

    num_values: float  # values per channel in the whole group
    mean: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the global mean
    var: np.ndarray  # biased: m2 / count


def channel_counts_agree(payload: torch.Tensor, num_channels: int, world_size: int) -> bool:
    """Whether every rank sent this channel count, from the summed ``[C, C^2]`` at the payload's head.

    ``sum C = W c`` and ``sum C^2 = W c^2`` hold together only when every
    ``C`` is ``c`` (their variance is then 0), so each rank reaches the same
    verdict. The head is read first because it is what stays aligned when
    ranks send payloads of different lengths: gloo then fails, but MPICH
    sums the common prefix without a word.
    """
    total, total_sq = payload.numpy()[:2]
    return bool(total == world_size * num_channels and total_sq == world_size * num_channels * num_channels)


def global_stats(payload: torch.Tensor, num_channels: int) -> GlobalStats:
    values = payload.numpy()
    total, total_sq, count = values[2 : 2 + num_channels], values[2 + num_channels : -2], float(values[-2])
    # An all-empty group has count 0: divide by 1 instead, so that every
    # statistic is a finite 0 and nothing downstream turns into NaN.
    safe_count = max(count, 1.0)
    mean = total / safe_count
    with np.errstate(invalid="ignore"):  # NaN or Inf in the input give NaN statistics, silently, as in nn.BatchNorm
        m2 = total_sq - total * mean
    np.maximum(m2, 0.0, out=m2)
    return GlobalStats(count, mean, m2, m2 / safe_count)


def update_running_stats(
    stats: GlobalStats,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
) -> None:
    """``running = (1 - factor) * running + factor * batch``; nothing when the group saw no value.

    ``factor`` is ``momentum``, or ``1 / num_batches_tracked`` (a cumulative
    average) when ``momentum`` is None. The running variance is unbiased,
    with the global count.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.numpy()[...] += 1  # in place, without a torch dispatch
    if stats.num_values == 0:
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / float(num_batches_tracked)
    else:
        factor = momentum
    unbiased = stats.m2 / max(stats.num_values - 1.0, 1.0)
    for running, batch in ((running_mean, stats.mean), (running_var, unbiased)):
        if running.dtype in _NUMPY_DTYPES:
            values = running.numpy()  # the buffer itself: updated in place
            # In float64, rounded once into the buffer: a float32 buffer would otherwise round twice a step.
            values[...] = values * np.float64(1.0 - factor) + factor * batch
        else:
            running.mul_(1.0 - factor).add_(torch.from_numpy(batch), alpha=factor)


class Normalization(NamedTuple):
    """Per-channel constants of ``y = (c - offset) / sqrt(var + eps) * weight + bias``."""

    offset: np.ndarray  # float64: global mean - this rank's shift (small: the subtraction loses nothing)
    var: np.ndarray  # float64: global biased variance
    offset_c: torch.Tensor  # the same two in the compute dtype
    var_c: torch.Tensor


def normalization(stats: GlobalStats, shift: np.ndarray, cdtype: torch.dtype) -> Normalization:
    offset = stats.mean - shift
    both = np.array((offset, stats.var), dtype=_NUMPY_DTYPES[cdtype])
    return Normalization(offset, stats.var, torch.from_numpy(both[0]), torch.from_numpy(both[1]))


def normalize(
    centered: torch.Tensor,
    norm: Normalization,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``y = (c - offset) / sqrt(var + eps) * weight + bias``. One pass, memory format kept.

    Always a new tensor: for an empty batch ``c`` is the input itself, and an
    output that aliases it would be a view that in-place operations after the
    layer (``ReLU(inplace=True)``, ``out += identity``) refuse, on that rank only.
    """
    if centered.numel() == 0:
        return torch.empty_like(centered)
    return torch.batch_norm(centered, weight, bias, norm.offset_c, norm.var_c, False, 0.0, eps, False)


def backward_reduce(
    grad_output: torch.Tensor,
    centered: torch.Tensor,
    norm: Normalization,
    weight: torch.Tensor | None,
    eps: float,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dy * weight * invstd, sum(dy), sum(dy * x_hat))`` per channel, in one pass over ``dy`` and ``c``.

    The first is written only when the input needs a gradient (it is the
    first term of that gradient).
    """
    if centered.numel() == 0:
        zeros = torch.zeros(centered.shape[1], dtype=centered.dtype)
        scaled = centered.new_empty(centered.shape) if need_input_grad else None
        return scaled, zeros, zeros.clone()
    if grad_output.dtype != centered.dtype:
        grad_output = grad_output.to(centered.dtype)
    scaled, sum_dy_xhat, sum_dy = _aten.native_batch_norm_backward(
        grad_output, centered, weight, norm.offset_c, norm.var_c, None, None, False, eps, [need_input_grad, True, True]
    )
    return scaled, sum_dy, sum_dy_xhat


def backward_elemt(
    scaled_grad: torch.Tensor,
    centered: torch.Tensor,
    norm: Normalization,
    weight: torch.Tensor | None,
    eps: float,
    global_sums: torch.Tensor,
    count: float,
) -> torch.Tensor:
    """Finish the input gradient in place on ``scaled_grad`` (``= weight * invstd * dy``). One pass.

    ``dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with
    the global means (``global_sums = [sum dy, sum dy * x_hat]`` over the
    group) and ``x_hat = (c - offset) * invstd``, written as
    ``scaled_grad - k1 * c - k0`` per channel.
    """
    if centered.numel() == 0:
        return scaled_grad
    invstd = 1.0 / np.sqrt(norm.var + eps)
    scale = invstd if weight is None else _numpy(weight) * invstd
    mean_dy, mean_dy_xhat = np.divide(_numpy(global_sums), max(count, 1.0), dtype=np.float64).reshape(2, -1)
    # k1 and k0, written straight in the compute dtype and the broadcast shape (1, C, 1, ...).
    coefficients = np.empty((2, *channel_shape(centered.dim(), centered.shape[1])), dtype=_NUMPY_DTYPES[centered.dtype])
    k1, k0 = coefficients.reshape(2, -1)
    np.multiply(mean_dy_xhat * invstd, scale, out=k1)
    np.subtract(mean_dy * scale, k1 * norm.offset, out=k0)
    k1_t, k0_t = torch.from_numpy(coefficients[0]), torch.from_numpy(coefficients[1])
    return scaled_grad.addcmul_(centered, k1_t, value=-1.0).sub_(k0_t)
