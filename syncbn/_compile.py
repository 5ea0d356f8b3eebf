"""SyncBatchNorm under ``torch.compile``: the per-device work as custom operators, the collectives in the graph.

``torch.compile`` cannot trace the eager path (the CPU implementation works in
NumPy, the checks after the all-reduce branch on its values, the
communicators are Python objects). While compiling, :class:`SyncBatchNorm`
calls these operators instead, the same steps as the eager function with a
collective between them::

    shift, payload = syncbn::forward_moments(x, runs_backward)
    payload = <all-reduce payload>                              # (2C + 4,) float64
    norm, running_mean, running_var, num_batches_tracked = syncbn::forward_finish(x, shift, payload, ...)
    y = syncbn::normalize(x, shift, norm, weight, bias, eps, ...)        # its derivative:
        sum_dy, sum_dy_xhat, sums = syncbn::backward_reduce(dy, x, shift, norm, weight, eps)
        sums = <all-reduce sums>                                # (2C + 1,)
        dx = syncbn::backward_elemt(dy, x, shift, norm, weight, eps, sums)

The all-reduce is, for a torch.distributed group, a functional collective
(``torch.distributed._functional_collectives.all_reduce`` by the group's
name): the compiler sees one all-reduce each way per layer, orders them the
same on every rank (inductor keeps the graph's order of collectives) and may
overlap them with other work. For an mpi4py communicator or the direct NCCL
communicator, which torch.distributed does not know, it is the opaque
operator ``syncbn::all_reduce``, registered as an ordered effect, so that the
compiler keeps these in the program's order too. A group of one makes none.

The operators are functional (an operator with an autograd formula may not
mutate its inputs): the updated running statistics come out of
``forward_finish`` as new tensors, and the traced code copies them into the
buffers, so that functionalisation sees the writes. Inside, each operator
runs the per-device implementation (:mod:`syncbn.ops`) chosen as in eager
mode (``SYNCBN_OPS``, :func:`syncbn.ops.using`; the table, not the
dispatcher, so that the generic implementation can be chosen on any
device). ``forward_finish`` makes the checks after the all-reduce
(:func:`syncbn._functions.check_summed`), which raise on every rank
together, as in eager mode. Only plain values cross the operators'
boundary: the layer is an integer, looked up here, so that the graph holds
no Python object.

What the compiled path does otherwise than eager mode, and gives up:

* the group is resolved when tracing (its name and size are in the graph):
  a layer given another group afterwards needs ``torch._dynamo.reset()``;
* a failed functional collective raises torch.distributed's own error, not
  :class:`~syncbn.faults.CollectiveError` naming the layer;
* debug mode (:mod:`syncbn.debug`) makes no check in compiled calls (a
  warning says so when tracing): run the model eagerly to debug it;
* the operators save ``x`` and ``shift`` and form the centred input again
  where they need it (an operator's output may not be its input), a pass
  more each on batches whose mean was large against their spread;
* a double backward is refused by AOTAutograd, not by every rank together;
* ``shift`` and ``norm`` cross in float64 whatever the implementation's
  dtype (exact), so that the fake outputs do not depend on which
  implementation runs.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed._functional_collectives as funcol
from torch._library.effects import EffectType

from syncbn import ops as _ops
from syncbn._functions import SyncCall, check_summed

_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# The operators act on the host (the layer's call count, the checks' reads): a CUDA graph would not replay that.
# The compiler must hand the operators their inputs laid out exactly as traced: the fake outputs take the
# input's strides, and a real input laid out otherwise (inductor chooses layouts; an empty batch's strides
# are anyone's) would make the real outputs disagree with what the generated code expects.
_TAGS: tuple[torch.Tag, ...] = tuple(
    getattr(torch.Tag, name) for name in ("cudagraph_unsafe", "needs_exact_strides") if hasattr(torch.Tag, name)
)
#: The dtype of ``shift`` and ``norm`` between the operators, whatever the implementation's own.
_STATE = torch.float64
_IDS = itertools.count(1)

#: How a compiled layer's sums cross the group: not at all, a functional collective, ``syncbn::all_reduce``.
ALONE, FUNCTIONAL, OPAQUE = "alone", "functional", "opaque"


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


def _plan(number: int, synced: bool) -> tuple[str, str]:
    """``(how, group name)``: how layer ``number``'s sums cross its group in a compiled graph; when tracing.

    ``how`` is :data:`ALONE` (a group of one, or evaluation without running
    statistics, which normalises with this rank's batch), :data:`FUNCTIONAL`
    (a torch.distributed group, by its name) or :data:`OPAQUE` (mpi4py, the
    direct NCCL communicator).
    """
    from syncbn import debug as _debug
    from syncbn.comm import get_communicator
    from syncbn.comm.torch_dist import TorchDistributedCommunicator

    layer = _layer(number)
    if synced and (_debug.is_debug() if layer.debug is None else layer.debug):
        warnings.warn(
            f"SyncBatchNorm {layer.layer_name or layer.num_features}: debug mode makes no check in a compiled "
            "call; HINT: run the model without torch.compile to debug it",
            stacklevel=2,
        )
    if not synced:
        return ALONE, ""
    communicator = get_communicator(layer.process_group)
    if communicator.world_size == 1:
        return ALONE, ""
    if isinstance(communicator, TorchDistributedCommunicator):
        group = communicator.group
        if group is not None:  # a destroyed group: the opaque operator raises the communicator's own error
            return FUNCTIONAL, str(group.group_name)
    return OPAQUE, ""


# Run when tracing, its result a constant in the graph (dynamo would not trace the communicator's Python).
plan: Callable[[int, bool], tuple[str, str]] = torch.compiler.assume_constant_result(_plan)  # type: ignore[no-untyped-call]


def _summed(tensor: torch.Tensor, number: int, how: str, group_name: str, direction: str) -> torch.Tensor:
    """``tensor`` summed over the layer's group, as :func:`plan` says; ``direction`` names it in errors."""
    if how == FUNCTIONAL:
        reduced: torch.Tensor = funcol.wait_tensor(  # type: ignore[no-untyped-call]
            funcol.all_reduce(tensor, "sum", cast(Any, group_name))
        )
        return reduced
    if how == OPAQUE:
        summed: torch.Tensor = all_reduce(tensor, number, direction)
        return summed
    return tensor


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
    """``t`` in ``x``'s dtype with the strides of ``_empty_like(x)``, which the fake implementations promise.

    The compiler trusts an operator's fake outputs for the layout of what it
    generates around it: a real output laid out otherwise would be read wrong.
    """
    if t.dtype != x.dtype:
        t = t.to(x.dtype)
    if x.numel() == 0:
        return t if t.is_contiguous() else t.contiguous()
    if t.stride() == x.stride() and _dense(x):
        return t
    like = torch.empty_like(x, dtype=t.dtype)
    if t.stride() == like.stride():
        return t
    return like.copy_(t)


def _new(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy when it is a view: an operator's outputs never alias one another or a cached tensor."""
    return t.clone() if t._base is not None else t


def _sync(layer: Any, runs_backward: bool, synced: bool) -> SyncCall:
    from syncbn.comm import LOCAL, get_communicator

    # As in eager mode: a layer in evaluation without running statistics normalises with its own batch's.
    communicator = get_communicator(layer.process_group) if synced else LOCAL
    return SyncCall(communicator, layer, layer._calls, runs_backward, False)


class _Inputs:
    """What every operator but the first makes of its ``x``, ``shift``, ``norm`` and ``weight``."""

    def __init__(self, x: torch.Tensor, shift: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor | None) -> None:
        self.implementation = _ops.for_device(x.device.type)
        state = self.implementation.state_dtype(x.dtype)  # exact: float64 to float32 and back
        self.centered = self.implementation.recenter(x, shift.to(state))
        self.norm = norm.to(state)
        cdtype = _ops.compute_dtype(x.dtype)
        self.weight = weight if weight is None or weight.dtype == cdtype else weight.to(cdtype)


# --------------------------------------------------------------------------- forward


@torch.library.custom_op("syncbn::forward_moments", mutates_args=(), device_types=None, tags=_TAGS)
def forward_moments(x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, payload)``: this rank's sums, ready for the forward all-reduce (see :mod:`syncbn.ops`)."""
    _, shift, payload = _ops.for_device(x.device.type).forward_moments(x, runs_backward)
    return shift.to(_STATE, copy=True), _new(payload)


@forward_moments.register_fake
def _(x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    num_channels = x.shape[1]
    return x.new_empty((num_channels,), dtype=_STATE), x.new_empty((2 * num_channels + 4,), dtype=_STATE)


@torch.library.custom_op("syncbn::all_reduce", mutates_args=(), device_types=None, tags=_TAGS)
def all_reduce(tensor: torch.Tensor, layer: int, direction: str) -> torch.Tensor:
    """``tensor`` summed over layer ``layer``'s group (mpi4py, the direct NCCL communicator), a new tensor."""
    module = _layer(layer)
    summed = tensor.clone()
    _sync(module, True, True).all_reduce(summed, direction)
    return summed


@all_reduce.register_fake
def _(tensor: torch.Tensor, layer: int, direction: str) -> torch.Tensor:
    return torch.empty_like(tensor)


# A collective: never removed, never moved past another one (the order must be the same on every rank).
all_reduce.register_effect(EffectType.ORDERED)


@torch.library.custom_op("syncbn::forward_finish", mutates_args=(), device_types=None, tags=_TAGS)
def forward_finish(
    x: torch.Tensor,
    shift: torch.Tensor,
    payload: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    layer: int,
    synced: bool,
    runs_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks after the all-reduce, then ``(norm, running_mean, running_var, num_batches_tracked)``.

    The statistics come out updated as new tensors (empty when not given),
    which :func:`forward` writes into the buffers; ``x`` is read for its
    shape only.
    """
    module = _layer(layer)
    module._note_input(x)
    if synced:
        module._calls += 1
    implementation = _ops.for_device(x.device.type)
    check_summed(implementation, payload, _sync(module, runs_backward, synced), x)
    mean, var, count = (None if t is None else t.clone() for t in (running_mean, running_var, num_batches_tracked))
    state = implementation.state_dtype(x.dtype)
    norm = implementation.forward_finish(payload, shift.to(state), mean, var, count, momentum)
    return (
        norm.to(_STATE, copy=True),
        # Outputs never alias one another: a new empty tensor for each statistic not given.
        x.new_empty((0,)) if mean is None else mean,
        x.new_empty((0,)) if var is None else var,
        x.new_empty((0,)) if count is None else count,
    )


@forward_finish.register_fake
def _(
    x: torch.Tensor,
    shift: torch.Tensor,
    payload: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    layer: int,
    synced: bool,
    runs_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var, count = (
        x.new_empty((0,)) if t is None else torch.empty_like(t)
        for t in (running_mean, running_var, num_batches_tracked)
    )
    return x.new_empty((2 * x.shape[1] + 1,), dtype=_STATE), mean, var, count


@torch.library.custom_op("syncbn::normalize", mutates_args=(), device_types=None, tags=_TAGS)
def normalize(
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    layer: int,
    synced: bool,
) -> torch.Tensor:
    """``y`` from the global statistics in ``norm``; differentiable in ``x``, ``weight`` and ``bias``.

    Its derivative is the whole-group one (through the batch statistics),
    with the backward all-reduce inside.
    """
    inputs = _Inputs(x, shift, norm, weight)
    cdtype = _ops.compute_dtype(x.dtype)
    bias_c = bias if bias is None or bias.dtype == cdtype else bias.to(cdtype)
    output = inputs.implementation.normalize(inputs.centered, inputs.norm, inputs.weight, bias_c, eps)
    return _laid_out_like(output, x)


@normalize.register_fake
def _(
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    layer: int,
    synced: bool,
) -> torch.Tensor:
    return _empty_like(x)


# --------------------------------------------------------------------------- backward


@torch.library.custom_op("syncbn::backward_reduce", mutates_args=(), device_types=None, tags=_TAGS)
def backward_reduce(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum dy, sum dy * x_hat, sums)``: this rank's sums in the compute dtype, ``sums`` for the all-reduce."""
    inputs = _Inputs(x, shift, norm, weight)
    _, sum_dy, sum_dy_xhat, sums = inputs.implementation.backward_reduce(
        grad_output, inputs.centered, inputs.norm, inputs.weight, eps, False, False
    )
    # New tensors, never views of one another (the CUDA kernels write both sums into one buffer).
    return _new(sum_dy), _new(sum_dy_xhat), _new(sums)


@backward_reduce.register_fake
def _(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_channels, cdtype = x.shape[1], _ops.compute_dtype(x.dtype)
    return (
        x.new_empty((num_channels,), dtype=cdtype),
        x.new_empty((num_channels,), dtype=cdtype),
        x.new_empty((2 * num_channels + 1,), dtype=cdtype),
    )


@torch.library.custom_op("syncbn::backward_elemt", mutates_args=(), device_types=None, tags=_TAGS)
def backward_elemt(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    global_sums: torch.Tensor,
) -> torch.Tensor:
    """The input gradient, from the summed ``sums`` of :func:`backward_reduce`."""
    inputs = _Inputs(x, shift, norm, weight)
    implementation = inputs.implementation
    scaled = implementation.scale_grad(grad_output, inputs.centered, inputs.norm, inputs.weight, eps)
    grad_input = implementation.backward_elemt(scaled, inputs.centered, inputs.norm, inputs.weight, eps, global_sums)
    return _laid_out_like(grad_input, x)


@backward_elemt.register_fake
def _(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    global_sums: torch.Tensor,
) -> torch.Tensor:
    return _empty_like(x)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, shift, norm, weight, bias, eps, layer, synced = inputs
    ctx.save_for_backward(x, shift, norm, weight)
    ctx.eps, ctx.layer, ctx.synced = eps, layer, synced
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _derivative(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, shift, norm, weight = ctx.saved_tensors
    need_input, _, _, need_weight, need_bias = ctx.needs_input_grad[:5]
    weight_dtype, bias_dtype = ctx.dtypes
    sum_dy, sum_dy_xhat, sums = backward_reduce(grad_output, x, shift, norm, weight, ctx.eps)
    # Every rank that runs backward joins the all-reduce, whether or not its own input needs a gradient
    # (that is decided per rank): a rank that skipped it would leave the others waiting in it.
    how, group_name = plan(ctx.layer, ctx.synced)
    sums = _summed(sums, ctx.layer, how, group_name, "backward")
    grad_input = backward_elemt(grad_output, x, shift, norm, weight, ctx.eps, sums) if need_input else None
    # Weight and bias gradients are this rank's share, taken before the reduction.
    return (
        grad_input,
        None,
        None,
        sum_dy_xhat.to(weight_dtype) if need_weight and weight_dtype is not None else None,
        sum_dy.to(bias_dtype) if need_bias and bias_dtype is not None else None,
        None,
        None,
        None,
    )


normalize.register_autograd(_derivative, setup_context=_setup_context)


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
    """The compiled path's training call: the operators and collectives above, the statistics written back."""
    how, group_name = plan(layer, synced)
    # The statistics are not differentiated through: normalize's derivative is the whole-group one.
    detached = x.detach()
    shift, payload = forward_moments(detached, runs_backward)
    # Every rank joins, even one with an empty batch: the others are waiting for its zeros.
    payload = _summed(payload, layer, how, group_name, "forward")
    norm, *statistics = forward_finish(
        detached, shift, payload, running_mean, running_var, num_batches_tracked, momentum, layer, synced,
        runs_backward,
    )  # fmt: skip
    for buffer, value in zip((running_mean, running_var, num_batches_tracked), statistics, strict=True):
        if buffer is not None:
            buffer.copy_(value)
    output: torch.Tensor = normalize(x, shift, norm, weight, bias, eps, layer, synced)
    return output
