"""SyncBatchNorm under ``torch.compile``: one training call as a pair of ``torch.library`` custom operators.

``torch.compile`` cannot trace the eager path (the CPU implementation works in
NumPy, the checks after the all-reduce branch on its values, the
communicators are Python objects). While compiling, :class:`SyncBatchNorm`
therefore calls two operators instead, which the graph holds as single,
opaque nodes:

* ``syncbn::train_forward(x, weight, bias, running_mean, running_var,
  num_batches_tracked, momentum, eps, layer, runs_backward) -> (y, shift,
  norm, running_mean, running_var, num_batches_tracked)``, functional
  (an operator with an autograd formula may not mutate its inputs): the
  updated statistics come out as new tensors, and the traced code copies
  them into the buffers, so that functionalisation sees the writes;
* ``syncbn::train_backward(grad, x, shift, weight, norm, ...) -> (grad_input,
  grad_weight, grad_bias)``, registered as the first one's derivative.

Inside, they run the eager path's own code (:func:`syncbn._functions.forward_body`
and ``backward_body``) on real tensors: the per-device implementation
(:mod:`syncbn.ops`), the one all-reduce each way over whatever group the layer
has (torch.distributed, mpi4py or the direct NCCL communicator), and the
checks after the all-reduce, which still raise on every rank, together. Only
plain values cross the operators' boundary: the layer is an integer, looked
up here, so that the graph holds no Python object.

What the compiled path gives up, for now: the collectives are inside the
operators, so inductor cannot move them, and two layers on independent
branches are not forced into one order across ranks; the forward saves
``x`` and ``shift`` and makes the centred input again in backward (an
operator's output may not be its input), a pass more on batches whose mean
was large against their spread; a double backward is refused by
AOTAutograd, not by every rank together; debug mode's messages name the
layer's latest call. ``shift`` and ``norm`` cross in float64 whatever the
implementation's dtype (exact), so that the fake outputs do not depend on
which implementation runs; and the choice of communicator (the group in
training, this rank alone in evaluation) is made when tracing and carried
to the backward.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from syncbn import ops as _ops
from syncbn._functions import SyncCall, backward_body, forward_body

_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# The operators act on the host (the layer's call count, MPI's collectives): a CUDA graph would not replay that.
# The compiler must hand the operators their inputs laid out exactly as traced: the fake outputs take the
# input's strides, and a real input laid out otherwise (inductor chooses layouts; an empty batch's strides
# are anyone's) would make the real outputs disagree with what the generated code expects.
_TAGS: tuple[torch.Tag, ...] = tuple(
    getattr(torch.Tag, name) for name in ("cudagraph_unsafe", "needs_exact_strides") if hasattr(torch.Tag, name)
)
#: The dtype of ``shift`` and ``norm`` between the operators, whatever the implementation's own.
_STATE = torch.float64
_IDS = itertools.count(1)


def register(layer: Any) -> int:
    """A new number for ``layer`` (held weakly): what the operators take instead of the layer."""
    number = next(_IDS)
    _LAYERS[number] = layer
    return number


def _layer(number: int) -> Any:
    layer = _LAYERS.get(number)
    if layer is None:
        raise RuntimeError(f"SyncBatchNorm: the layer of compiled call {number} no longer exists")
    return layer


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` is dense in one of the memory formats (``torch.empty_like`` keeps its strides then)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """What the fake implementations promise for an output shaped as ``x``: ``x``'s layout, contiguous if empty.

    An empty batch's strides are anyone's (the compiler may think them
    channels-last while the real tensor's are contiguous): contiguous then.
    """
    return x.new_empty(x.shape) if x.numel() == 0 else torch.empty_like(x)


def _laid_out_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``_empty_like(x)``, which the fake implementations promise (a copy if not).

    The compiler trusts an operator's fake outputs for the layout of what it
    generates around it: a real output laid out otherwise would be read wrong.
    """
    if x.numel() == 0:
        return t if t.is_contiguous() else t.contiguous()
    if t.stride() == x.stride() and _dense(x):
        return t
    like = torch.empty_like(x, dtype=t.dtype)
    if t.stride() == like.stride():
        return t
    return like.copy_(t)


def _sync(layer: Any, runs_backward: bool, call: int, synced: bool) -> SyncCall:
    from syncbn import debug as _debug
    from syncbn.comm import LOCAL, get_communicator

    debug = _debug.is_debug() if layer.debug is None else layer.debug
    # As in eager mode: a layer in evaluation without running statistics normalises with its own batch's.
    communicator = get_communicator(layer.process_group) if synced else LOCAL
    return SyncCall(communicator, layer, call, runs_backward, debug)


@torch.library.custom_op("syncbn::train_forward", mutates_args=(), device_types=None, tags=_TAGS)
def train_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    layer: int,
    synced: bool,
    runs_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One synchronised training forward, functional.

    Returns ``(y, shift, norm, running_mean, running_var,
    num_batches_tracked)``, the last three the updated statistics as new
    tensors (empty when not given), which :func:`forward` writes into the
    buffers.
    """
    module = _layer(layer)
    module._note_input(x)
    if synced:
        module._calls += 1
    sync = _sync(module, runs_backward, module._calls, synced)
    implementation = _ops.for_device(x.device.type)
    mean, var, count = (None if t is None else t.clone() for t in (running_mean, running_var, num_batches_tracked))
    output, _, shift, _, norm = forward_body(implementation, x, weight, bias, mean, var, count, momentum, eps, sync)
    return (
        _laid_out_like(output, x),
        shift.to(_STATE, copy=True),
        norm.to(_STATE, copy=True),
        # Outputs never alias one another: a new empty tensor for each statistic not given.
        x.new_empty((0,)) if mean is None else mean,
        x.new_empty((0,)) if var is None else var,
        x.new_empty((0,)) if count is None else count,
    )


@train_forward.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    layer: int,
    synced: bool,
    runs_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_channels = x.shape[1]
    return (
        _empty_like(x),
        x.new_empty((num_channels,), dtype=_STATE),
        x.new_empty((2 * num_channels + 1,), dtype=_STATE),
        # A new tensor for each statistic, never one shared (outputs may not alias one another).
        x.new_empty((0,)) if running_mean is None else torch.empty_like(running_mean),
        x.new_empty((0,)) if running_var is None else torch.empty_like(running_var),
        x.new_empty((0,)) if num_batches_tracked is None else torch.empty_like(num_batches_tracked),
    )


@torch.library.custom_op("syncbn::train_backward", mutates_args=(), device_types=None, tags=_TAGS)
def train_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    norm: torch.Tensor,
    eps: float,
    layer: int,
    synced: bool,
    weight_dtype: torch.dtype | None,
    bias_dtype: torch.dtype | None,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    creates_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`train_forward`'s input, weight and bias (empty tensors where not needed)."""
    module = _layer(layer)
    sync = _sync(module, True, module._calls, synced)  # messages name the layer's latest call
    implementation = _ops.for_device(x.device.type)
    state = implementation.state_dtype(x.dtype)  # exact: float32 to float64 and back
    shift, norm = shift.to(state), norm.to(state)
    centered = implementation.recenter(x, shift)
    cdtype = _ops.compute_dtype(x.dtype)
    weight_c = weight if weight is None or weight.dtype == cdtype else weight.to(cdtype)
    grads = backward_body(
        implementation, grad_output, centered, weight_c, norm, eps, sync, (x.dtype, weight_dtype, bias_dtype),
        (need_input, need_weight, need_bias), creates_graph,
    )  # fmt: skip
    # Outputs are new tensors, never views of one another (the CUDA kernels write both sums into one buffer).
    grad_input, grad_weight, grad_bias = (
        x.new_empty((0,)) if grad is None else grad.clone() if grad._base is not None else grad for grad in grads
    )
    return (_laid_out_like(grad_input, x) if need_input else grad_input), grad_weight, grad_bias


@train_backward.register_fake
def _(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    norm: torch.Tensor,
    eps: float,
    layer: int,
    synced: bool,
    weight_dtype: torch.dtype | None,
    bias_dtype: torch.dtype | None,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    creates_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_channels = x.shape[1]
    return (
        _empty_like(x) if need_input else x.new_empty((0,)),
        x.new_empty((num_channels,), dtype=weight_dtype)
        if need_weight and weight_dtype is not None
        else x.new_empty((0,)),
        x.new_empty((num_channels,), dtype=bias_dtype) if need_bias and bias_dtype is not None else x.new_empty((0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, *_, eps, layer, synced, _runs_backward = inputs
    _, shift, norm, *statistics = output
    ctx.mark_non_differentiable(shift, norm, *statistics)  # statistics, not functions of the parameters
    ctx.save_for_backward(x, shift, weight, norm)
    ctx.eps, ctx.layer, ctx.synced = eps, layer, synced
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _derivative(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, shift, weight, norm = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_input, grad_weight, grad_bias = train_backward(
        grad_output, x, shift, weight, norm, ctx.eps, ctx.layer, ctx.synced, *ctx.dtypes, need_input,
        need_weight, need_bias, torch.is_grad_enabled(),
    )  # fmt: skip
    return (
        grad_input if need_input else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        *(None,) * 8,
    )


train_forward.register_autograd(_derivative, setup_context=_setup_context)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    layer: int,
    synced: bool,
    runs_backward: bool,
) -> torch.Tensor:
    """The compiled path's training call: :func:`train_forward`, then the statistics written into the buffers."""
    output: torch.Tensor
    output, _, _, *statistics = train_forward(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, layer, synced, runs_backward
    )
    for buffer, value in zip((running_mean, running_var, num_batches_tracked), statistics, strict=True):
        if buffer is not None:
            buffer.copy_(value)
    return output
