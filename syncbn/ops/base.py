"""The interface between the autograd function and the per-device work.

One training call of SyncBatchNorm is, on every device::

    centered, shift, payload = ops.forward_moments(x, runs_backward)   # one read of x (more when centring)
    <all-reduce payload>                                               # (2C + 4,) float64
    summary = ops.read_summary(payload)                                # host values for the checks, or None
    norm = ops.forward_finish(payload, shift, running_mean, ...)       # (2C + 1,) float64, O(C)
    y = ops.normalize(centered, norm, weight, bias, eps)               # read c, write y
    scaled, sum_dy, sum_dy_xhat, sums = ops.backward_reduce(dy, centered, norm, weight, eps, need_input,
                                                            creates_graph)
    <all-reduce sums>                                                  # (2C + 1,) [sum dy, sum dy x_hat, 0|1]
    graph_ranks = ops.read_graph_ranks(sums, creates_graph)            # ranks creating a graph (double backward)
    # (compiled: backward_reduce without the input gradient, then scale_grad beside backward_elemt)
    dx = ops.backward_elemt(scaled, centered, norm, weight, eps, sums)

What crosses the interface is tensors, ints, floats, bools and strings only
(never the layer, a communicator or a NumPy array), so that the operations
can become ``torch.library`` custom ops; every buffer is written with an
in-place torch operation, so that autograd's version counter and
functionalisation see it.

Layouts:

* ``payload`` ``(2C + 4,)`` float64, the same for every implementation (ranks may differ in
  device): ``[C, C^2, sum x (C), sum x^2 (C), count, runs backward]``, the sums around
  ``shift`` already moved back to raw values;
* ``shift`` ``(C,)``: what this rank subtracted from ``x`` to form ``centered`` (0 when nothing);
* ``norm`` ``(2C + 1,)``: ``[global mean - shift (C), global biased variance (C), global count]``;
* ``sums`` ``(2C + 1,)`` in the compute dtype: ``[sum dy (C), sum dy * x_hat (C), creates graph]``,
  its own memory (the all-reduce sums it in place; ``sum_dy`` and ``sum_dy_xhat`` stay this rank's).

The function only passes ``shift`` and ``norm`` back to the implementation that made them,
so their dtype is the implementation's: float64 for the generic and CUDA ones, the compute
dtype for the CPU one (whose aten passes take them as they are).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch


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


class Summary(NamedTuple):
    """The host values of the summed payload that the checks after the forward all-reduce need."""

    channels: float  # sum of C over the ranks
    channels_squared: float  # sum of C^2
    num_values: float  # values per channel in the whole group
    backward_ranks: float  # ranks that will run backward through the call


def host_summary(payload: torch.Tensor) -> Summary | None:
    """The summed payload's head and tail on the host: one small device-to-host copy (none on CPU).

    None while a CUDA graph is being captured, where a copy to the host would break the capture.
    """
    if payload.device.type == "cpu":
        values = payload.numpy()
    elif payload.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    else:
        values = payload.to("cpu").numpy()
    return Summary(float(values[0]), float(values[1]), float(values[-2]), float(values[-1]))


class Ops(abc.ABC):
    """The per-device work of SyncBatchNorm; one implementation per device type (see :mod:`syncbn.ops`)."""

    #: What ``SYNCBN_OPS`` calls this implementation.
    name: str

    @abc.abstractmethod
    def forward_moments(self, x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(centered, shift, payload)``: this rank's sums, ready for the forward all-reduce.

        ``centered`` is ``x - shift`` in the compute dtype (``x`` itself when
        nothing was subtracted), the tensor the later passes read and the
        backward saves.
        """

    def state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``shift`` and ``norm`` for an input of ``dtype`` (float64 unless an implementation says)."""
        return torch.float64

    def recenter(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``centered`` again, as :meth:`forward_moments` made it from ``x`` and returned with ``shift``.

        The compiled path saves ``x`` and ``shift`` (an operator's output may
        not be its input, which ``centered`` often is) and makes ``centered``
        again in backward; bit for bit what the forward made.
        """
        return x - channel_view(shift.to(compute_dtype(x.dtype)), x.dim())

    @abc.abstractmethod
    def read_summary(self, payload: torch.Tensor) -> Summary | None:
        """The payload's head and tail on the host: one small read, the only one per training forward.

        None when reading would break what the caller is doing (a CUDA graph
        being captured): the checks are then left to the eager calls before
        the capture. Every implementation here reads it with :func:`host_summary`.
        """

    @abc.abstractmethod
    def forward_finish(
        self,
        payload: torch.Tensor,
        shift: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
    ) -> torch.Tensor:
        """The global statistics from the summed payload: update the running ones, return ``norm``.

        ``running = (1 - factor) * running + factor * batch`` with ``factor``
        ``momentum``, or ``1 / num_batches_tracked`` when ``momentum`` is None;
        the running variance is unbiased with the global count; nothing
        changes but ``num_batches_tracked`` when the group saw no value.
        """

    @abc.abstractmethod
    def normalize(
        self,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """``y = (c - offset) / sqrt(var + eps) * weight + bias``: a new tensor, in ``c``'s memory format.

        Always a new tensor, even for an empty batch: an output aliasing the
        input would be a view that in-place operations after the layer
        (``ReLU(inplace=True)``, ``out += identity``) refuse, on that rank only.
        """

    @abc.abstractmethod
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
        """``(scaled, sum(dy), sum(dy * x_hat), sums)``, the sums per channel in the compute dtype.

        ``scaled`` is what :meth:`backward_elemt` starts the input gradient
        from (``dy * weight * invstd`` on CPU and in the generic
        implementation, ``dy`` itself for the CUDA kernels), None when the
        input needs no gradient. ``sums`` is the backward all-reduce's
        payload (see the layouts above), whose last slot is 1 when this rank
        creates a graph of the gradient.
        """

    def scale_grad(
        self,
        grad_output: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """What :meth:`backward_reduce` returns first when the input needs a gradient, made on its own.

        The compiled path asks :meth:`backward_reduce` for the sums alone and
        makes this in the operator that runs :meth:`backward_elemt`, so that
        no tensor but the sums crosses between them. Here (and in the generic
        implementation): ``dy * weight * invstd`` in the compute dtype, a new
        tensor that :meth:`backward_elemt` may overwrite.
        """
        num_channels, cdtype = centered.shape[1], centered.dtype
        invstd = (norm[num_channels:-1].to(torch.float64) + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(torch.float64)
        return grad_output.to(cdtype) * channel_view(scale.to(cdtype), centered.dim())

    def read_graph_ranks(self, global_sums: torch.Tensor, creates_graph: bool) -> int:
        """How many ranks create a graph of the gradient, from the summed ``sums``; 0 when it is not read.

        Read on CPU, where it is free, and on a rank that creates a graph (it
        raises anyway); elsewhere reading it would synchronise every backward.
        """
        return int(global_sums[-1]) if creates_graph or global_sums.device.type == "cpu" else 0

    @abc.abstractmethod
    def backward_elemt(
        self,
        scaled_grad: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        global_sums: torch.Tensor,
    ) -> torch.Tensor:
        """The input gradient, from ``scaled_grad`` (which it may overwrite) and the summed ``sums``.

        ``dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``
        with the global means, ``x_hat = (c - offset) * invstd``.
        """


def backward_payload(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, creates_graph: bool) -> torch.Tensor:
    """``[sum dy, sum dy * x_hat, creates graph]`` in new memory, with torch operations on their device."""
    flag = torch.full((1,), float(creates_graph), dtype=sum_dy.dtype, device=sum_dy.device)
    return torch.cat((sum_dy, sum_dy_xhat, flag))
