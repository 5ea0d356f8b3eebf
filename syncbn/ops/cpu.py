"""SyncBatchNorm's work on CPU tensors: the passes over the data with PyTorch ops, per-channel arithmetic in NumPy.

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
themselves on small layers. What leaves this module is tensors (views of
that memory), and the running statistics are written with in-place torch
operations. On CPU the global count is a host value, so reading it costs
nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from syncbn.ops.base import Ops, Summary, channel_shape, channel_view, compute_dtype, host_summary, reduce_dims

_aten = torch.ops.aten
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# sum(x^2) <= 8 * M2 means mean^2 <= 7 * variance: sums of the raw values then
# lose at most a factor 8 of float32's precision to cancellation.
_WELL_CONDITIONED = 8.0


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor that needs no gradient (float32 or float64; others are converted)."""
    if t.dtype not in _NUMPY_DTYPES:
        t = t.double()
    return t.detach().numpy()


@functools.lru_cache(maxsize=64)
def _zeros_and_ones(num_channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant per-channel statistics (mean 0, variance 1), made once per shape; never written to."""
    return torch.zeros(num_channels, dtype=dtype), torch.ones(num_channels, dtype=dtype)


#: ``native_batch_norm_backward``'s output mask for the sums alone (no input gradient).
_SUMS_ONLY = [False, True, True]
#: ... and for the input gradient alone (no sums).
_INPUT_GRAD_ONLY = [True, False, False]


def _sums(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``sum(t)`` and ``sum(t^2)`` per channel, in ``t``'s dtype, from one pass over ``t``."""
    zeros, ones = _zeros_and_ones(t.shape[1], t.dtype)
    # The inference-mode gradient of batch norm: sum(g) and sum(g * (t - 0) / sqrt(1 + 0)), with g = t.
    _, sum_sq, total = _aten.native_batch_norm_backward(t, t, None, zeros, ones, None, None, False, 0.0, _SUMS_ONLY)
    return total.numpy(), sum_sq.numpy()


def _offset_and_var(norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``norm``'s offset and variance (in the compute dtype already)."""
    values = norm.numpy()
    num_channels = values.shape[0] >> 1
    return torch.from_numpy(values[:num_channels]), torch.from_numpy(values[num_channels:-1])


class CPUOps(Ops):
    """The tuned CPU implementation (the default on CPU)."""

    name = "cpu"

    def forward_moments(self, x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill the forward all-reduce payload; centre ``x`` when its mean is large against its spread.

        The payload holds ``C`` and ``C^2`` (summed, they tell every rank whether
        all ranks have its channel count), then
        per channel ``S = sum(x)`` and ``Q = sum(x^2)``, then the count ``n`` and
        1 when this rank will run backward (summed, it says how many ranks will),
        in float64. Summed over ranks they give the global mean ``S/N`` and
        ``M2 = Q - S^2/N`` with about ``(mean/std)^2 * 1e-16`` relative error,
        and counts exact far beyond 2^24.

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
        payload = np.empty(2 * num_channels + 4)
        payload[0] = num_channels
        payload[1] = num_channels * num_channels
        payload[-2] = count
        payload[-1] = runs_backward
        sums = payload[2:-2]
        if count == 0:
            # An empty rank contributes zeros but still joins the all-reduce.
            sums.fill(0.0)
            cdtype = compute_dtype(x.dtype)
            return x.to(cdtype), _zero_shift(num_channels, cdtype), torch.from_numpy(payload)
        if x.dtype in _NUMPY_DTYPES:
            total, total_sq = sums[:num_channels], sums[num_channels:]
            total[:], total_sq[:] = _sums(x)
            # sum(x^2) <= 8 * (sum(x^2) - sum(x)^2 / n)  <=>  sum(x)^2 <= (7/8) * n * sum(x^2), in float64:
            # in float32 a square can overflow to inf, and inf <= inf would pass an ill-conditioned batch.
            if (total * total <= total_sq * (count * (1.0 - 1.0 / _WELL_CONDITIONED))).all():
                return x, _zero_shift(num_channels, x.dtype), torch.from_numpy(payload)
        # The shift must be close to the mean (its residual is summed n times in
        # float32): torch's cascade summation gives it, the sums above do not.
        shift = x.mean(reduce_dims(x), dtype=compute_dtype(x.dtype))
        centered = x - channel_view(shift, x.dim())  # type promotion lifts half inputs to float32
        sum_c, sum_sq = _sums(centered)
        shift64 = shift.numpy().astype(np.float64)
        total, total_sq = sums[:num_channels], sums[num_channels:]
        np.multiply(shift64, count, out=total)
        total += sum_c
        np.add(sum_c, total, out=total_sq)
        total_sq *= shift64
        total_sq += sum_sq
        return centered, shift, torch.from_numpy(payload)

    def state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(dtype)

    def recenter(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if x.dtype in _NUMPY_DTYPES and x.numel() and not shift.numpy().any():
            return x  # forward_moments used x as it is
        return x - channel_view(shift, x.dim())

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
        values = payload.numpy()
        shift_values = shift.numpy()
        num_channels = shift_values.shape[0]
        count = float(values[-2])
        # An all-empty group has count 0: divide by 1 instead, so that every
        # statistic is a finite 0 and nothing downstream turns into NaN.
        safe_count = count if count > 0.0 else 1.0
        total, total_sq = values[2 : 2 + num_channels], values[2 + num_channels : -2]
        mean = total / safe_count
        with np.errstate(invalid="ignore"):  # NaN or Inf in the input give NaN statistics, silently, as in nn.BatchNorm
            m2 = total_sq - total * mean
        np.maximum(m2, 0.0, out=m2)
        # norm in the compute dtype (the shift's): the aten passes take it as it is, without a conversion.
        norm = np.empty(2 * num_channels + 1, dtype=shift_values.dtype)
        np.subtract(mean, shift_values, out=norm[:num_channels], casting="same_kind")  # small: nothing is lost
        np.divide(m2, safe_count, out=norm[num_channels:-1], casting="same_kind")
        norm[-1] = count
        if running_mean is not None and running_var is not None:
            _update_running_stats(mean, m2, count, running_mean, running_var, num_batches_tracked, momentum)
        return torch.from_numpy(norm)

    def normalize(
        self,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """One pass (``aten::batch_norm`` in inference mode), memory format kept."""
        if centered.numel() == 0:
            return torch.empty_like(centered)
        offset, var = _offset_and_var(norm)
        return torch.batch_norm(centered, weight, bias, offset, var, False, 0.0, eps, False)

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
        """One pass over ``dy`` and ``c`` (``aten::native_batch_norm_backward`` in inference mode)."""
        num_channels = centered.shape[1]
        payload = np.empty(2 * num_channels + 1, dtype=_NUMPY_DTYPES[centered.dtype])
        payload[-1] = creates_graph
        if centered.numel() == 0:
            payload[:-1] = 0.0
            zeros = torch.zeros(num_channels, dtype=centered.dtype)
            scaled = centered.new_empty(centered.shape) if need_input_grad else None
            return scaled, zeros, zeros.clone(), torch.from_numpy(payload)
        if grad_output.dtype != centered.dtype:
            grad_output = grad_output.to(centered.dtype)
        offset, var = _offset_and_var(norm)
        scaled, sum_dy_xhat, sum_dy = _aten.native_batch_norm_backward(
            grad_output, centered, weight, offset, var, None, None, False, eps, [need_input_grad, True, True]
        )
        payload[:num_channels] = sum_dy.numpy()
        payload[num_channels:-1] = sum_dy_xhat.numpy()
        return scaled, sum_dy, sum_dy_xhat, torch.from_numpy(payload)

    def scale_grad(
        self,
        grad_output: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """``dy * w * invstd`` as :meth:`backward_reduce` makes it, bit for bit (the same aten pass, no sums)."""
        if centered.numel() == 0:
            return centered.new_empty(centered.shape)
        if grad_output.dtype != centered.dtype:
            grad_output = grad_output.to(centered.dtype)
        offset, var = _offset_and_var(norm)
        scaled: torch.Tensor = _aten.native_batch_norm_backward(
            grad_output, centered, weight, offset, var, None, None, False, eps, _INPUT_GRAD_ONLY
        )[0]
        return scaled

    def read_graph_ranks(self, global_sums: torch.Tensor, creates_graph: bool) -> int:
        """Read from the summed payload: on CPU that costs nothing, so every rank knows."""
        return int(global_sums.numpy()[-1])

    def backward_elemt(
        self,
        scaled_grad: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        global_sums: torch.Tensor,
    ) -> torch.Tensor:
        """In place on ``scaled_grad``, as ``scaled_grad - k1 * c - k0`` per channel: one pass."""
        if centered.numel() == 0:
            return scaled_grad
        num_channels = centered.shape[1]
        values = norm.numpy().astype(np.float64)
        offset, var, count = values[:num_channels], values[num_channels:-1], values[-1]
        sums = global_sums.numpy()
        invstd = 1.0 / np.sqrt(var + eps)
        scale = invstd if weight is None else invstd * _numpy(weight)
        # mean(dy) * scale and mean(dy * x_hat) * invstd * scale, with the global means
        scale_per_value = scale * (1.0 / count if count > 0.0 else 1.0)
        # k1 and k0, written straight in the compute dtype and the broadcast shape (1, C, 1, ...).
        coefficients = np.empty((2, *channel_shape(centered.dim(), num_channels)), dtype=_NUMPY_DTYPES[centered.dtype])
        k1, k0 = coefficients.reshape(2, -1)
        np.multiply(sums[num_channels:-1] * invstd, scale_per_value, out=k1, casting="same_kind")
        np.subtract(sums[:num_channels] * scale_per_value, k1 * offset, out=k0, casting="same_kind")
        return scaled_grad.addcmul_(centered, torch.from_numpy(coefficients[0]), value=-1.0).sub_(
            torch.from_numpy(coefficients[1])
        )


@functools.lru_cache(maxsize=64)
def _zero_shift(num_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """The shift of an uncentred batch, made once per channel count and dtype; never written to."""
    return torch.zeros(num_channels, dtype=dtype)


def _update_running_stats(
    mean: np.ndarray,
    m2: np.ndarray,
    count: float,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
) -> None:
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if count == 0:
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / float(num_batches_tracked)
    else:
        factor = momentum
    keep = 1.0 - factor
    # In float64 (whatever NumPy's promotion rules), rounded once into the buffer (a float32 buffer would
    # otherwise round twice a step), and written with torch operations, so that autograd's version counter sees it.
    new_mean = np.multiply(_numpy(running_mean), keep, dtype=np.float64)
    new_mean += factor * mean
    new_var = np.multiply(_numpy(running_var), keep, dtype=np.float64)
    new_var += factor * (m2 / max(count - 1.0, 1.0))  # unbiased, with the global count
    running_mean.copy_(torch.from_numpy(new_mean))
    running_var.copy_(torch.from_numpy(new_var))
