"""The autograd function of SyncBatchNorm: how the statistics are computed and synchronised.

Forward, per call in training: local moments -> **one** all-reduce (none in a
group of one) of a ``2C + 4`` float64 payload ``[C, C^2, sum x, sum x^2,
count, runs backward]`` -> global mean and variance -> normalise. Backward: local
``[sum dy, sum dy * x_hat, creates graph]`` -> **one** all-reduce of ``2C + 1``
values -> input gradient.

Double backward (a gradient taken with ``create_graph=True`` through the
layer, as a gradient penalty does) is not supported: its exact form needs
collectives whose number depends on each rank's graph. Each rank knows only
whether it creates a graph itself; the last slot of the backward payload
counts the ranks that do, so that all of them raise together, before any
wrong number is returned, instead of one rank raising and leaving the others
waiting.

Whether a rank takes part in the backward all-reduce is decided by autograd
on that rank alone (a rank under ``torch.no_grad()``, or where nothing
requires a gradient, never runs backward). The last slot of the forward
payload counts the ranks that will, so every rank knows it: when some will
and some will not, all of them raise in forward instead of leaving the others
waiting in backward.

The per-device work goes through :mod:`syncbn.ops` (one implementation per
device type); this function holds the order of the passes and collectives
and the decisions between them. Those decisions need a few values of the
summed payload on the host: one small read per training forward (none at
world size 1, where they are known already), none in backward on a device
other than the CPU, and none while a CUDA graph is being captured. A graph
replays the shapes, dtypes and grad mode of the call it captured, and
capture needs eager calls before it, in which every check ran: a captured
call cannot disagree with the others in a way those checks would have caught.

Why one all-reduce and not an all-gather: the sums are all the global
statistics need, and a sum has a fixed size, so the payload stays ``O(C)``
whatever the number of ranks. Unequal batch sizes stay exact because each
rank adds its own count into the payload.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from syncbn import _extension
from syncbn import debug as _debug
from syncbn import ops as _ops
from syncbn.comm.base import Communicator
from syncbn.faults import CollectiveError, RankMismatchError


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


class _Layer(Protocol):
    @property
    def layer_name(self) -> str | None: ...

    @property
    def num_features(self) -> int: ...


@dataclasses.dataclass
class SyncCall:
    """One training call of a layer: its group, and what messages and debug checks say about it."""

    communicator: Communicator
    module: _Layer  # the SyncBatchNorm layer, named in messages
    call: int  # the layer's training calls so far, this one included
    runs_backward: bool  # grad mode is on and the input, weight or bias requires a gradient
    debug: bool

    @property
    def layer(self) -> str:
        """The layer, for messages: ``'layer1.0.bn1'``, or ``SyncBatchNorm(64)`` when unnamed."""
        name = self.module.layer_name
        return repr(name) if name else f"SyncBatchNorm({self.module.num_features})"

    @contextlib.contextmanager
    def naming(self, what: str) -> Iterator[None]:
        """A failed collective inside names this layer, ``what`` it was doing and the call."""
        try:
            yield
        except CollectiveError as error:
            if not isinstance(error, RankMismatchError):  # those name the layer already
                error.args = (f"SyncBatchNorm {self.layer}, {what} of call {self.call}: {error}", *error.args[1:])
            raise

    def all_reduce(self, tensor: torch.Tensor, direction: str) -> None:
        """Sum ``tensor`` over the group; a failure names this layer and call."""
        with self.naming(direction):
            self.communicator.all_reduce(tensor)

    # What the compiled CPU path (syncbn/csrc/cpu_function.cpp) calls back into Python for.

    def forward_reduced(self, payload: torch.Tensor, input: torch.Tensor) -> None:
        """Sum the forward ``payload`` over the group (none in a group of one), then the checks after it."""
        if self.communicator.world_size > 1:
            self.all_reduce(payload, "forward")
        check_summed(_ops.for_device("cpu"), payload, self, input)

    def backward_reduced(self, global_sums: torch.Tensor) -> None:
        """Sum the backward payload over the group."""
        self.all_reduce(global_sums, "backward")

    def double_backward_error(self, graph_ranks: int, creates_graph: bool) -> None:
        """Raise the error of a call whose gradient some rank asked the graph of (every rank raises)."""
        raise double_backward_error(self, graph_ranks, creates_graph)

    def check(self, channels: int, dtype: torch.dtype, direction: int, problem: int = _debug.OK) -> None:
        """Debug mode: make sure every rank is at the same point before the collective."""
        name = self.module.layer_name
        key = _debug.layer_key(name) if name else 0
        mine = _debug.fingerprint(key, channels, dtype, direction, self.call, self.runs_backward, problem)
        with self.naming(f"debug check before {'backward' if direction == _debug.BACKWARD else 'forward'}"):
            _debug.check(self.communicator, mine, self.layer)


def _check_forward(summary: _ops.Summary, sync: SyncCall, num_channels: int) -> None:
    """The checks every rank makes from the summed payload: all reach the same verdict, so all raise together."""
    communicator = sync.communicator
    world_size = communicator.world_size
    # sum C = W c and sum C^2 = W c^2 hold together only when every C is c (their variance is
    # then 0). The head is read because it stays aligned when ranks send payloads of different
    # lengths: gloo then fails, but MPICH sums the common prefix without a word.
    if summary.channels != world_size * num_channels or summary.channels_squared != world_size * num_channels**2:
        raise RankMismatchError(
            f"SyncBatchNorm {sync.layer}, forward of call {sync.call}: the ranks do not all have "
            f"{num_channels} channels in this call (rank {communicator.rank}'s count), so their statistics "
            "cannot be combined: the ranks are in different layers, or built different models. HINT: "
            "SYNCBN_DEBUG=1 names the layer and channel count of every rank"
        )
    backward_ranks = int(summary.backward_ranks)
    if 0 < backward_ranks < world_size:
        raise RankMismatchError(
            f"SyncBatchNorm {sync.layer}, forward of call {sync.call}: {backward_ranks} of "
            f"{world_size} ranks will run backward through this call and the others will "
            f"not (this rank {communicator.rank} {'will' if sync.runs_backward else 'will not'}); the "
            "ones that do would wait forever for the others in the backward all-reduce. HINT: use the "
            "same torch.no_grad() and requires_grad on every rank (a rank runs backward when grad mode "
            "is on and the input, weight or bias requires a gradient); SYNCBN_DEBUG=1 names the ranks"
        )


def check_summed(ops: _ops.Ops, payload: torch.Tensor, sync: SyncCall, input: torch.Tensor) -> None:
    """The decisions after the forward all-reduce, from the summed ``payload``: every rank raises, or none.

    Decided from the global values that every rank holds, so that all ranks
    raise together and none is left waiting. In a group of one nothing is
    read (the count is this rank's own).
    """
    num_channels = input.shape[1]
    world_size = sync.communicator.world_size
    num_values: float | None = float(input.numel() // num_channels)
    if world_size > 1:
        summary = ops.read_summary(payload)
        if summary is None:  # a CUDA graph is being captured: the eager calls before it checked
            num_values = None
        else:
            _check_forward(summary, sync, num_channels)
            num_values = summary.num_values
    if num_values == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel in the "
            f"whole process group (this rank's input has shape {tuple(input.shape)}; world size {world_size})"
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the union of the batches of a group of processes.

    ``apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
    momentum, eps, sync)`` with ``sync`` a :class:`SyncCall`. Running statistics are updated in place
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
        sync: SyncCall,
    ) -> torch.Tensor:
        ops = _ops.for_device(input.device.type)
        num_channels = input.shape[1]
        communicator = sync.communicator
        centered, shift, payload = ops.forward_moments(input, sync.runs_backward)
        if sync.debug:
            finite = bool(torch.isfinite(payload[2:-2]).all())
            sync.check(num_channels, input.dtype, _debug.FORWARD, _debug.OK if finite else _debug.NOT_FINITE)
        # Every rank joins, even one with an empty batch: the others are waiting for its zeros.
        # A group of one has nothing to add (every rank knows the group's size, so all skip or none).
        if communicator.world_size > 1:
            sync.all_reduce(payload, "forward")
        check_summed(ops, payload, sync, input)
        norm = ops.forward_finish(payload, shift, running_mean, running_var, num_batches_tracked, momentum)

        cdtype = _ops.compute_dtype(input.dtype)
        weight_c = weight if weight is None or weight.dtype == cdtype else weight.to(cdtype)
        bias_c = bias if bias is None or bias.dtype == cdtype else bias.to(cdtype)
        output = ops.normalize(centered, norm, weight_c, bias_c, eps)
        ctx.save_for_backward(centered, weight_c, norm)
        ctx.ops = ops
        ctx.eps = eps
        ctx.sync = sync
        ctx.dtypes = (input.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return _cast(output, input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Autograd runs this in grad mode exactly when the caller asked for create_graph=True.
        if not torch.is_grad_enabled():
            return _backward(ctx, grad_output, False)
        with torch.no_grad():
            return _backward(ctx, grad_output, True)


def _backward(ctx: Any, grad_output: torch.Tensor, creates_graph: bool) -> tuple[torch.Tensor | None, ...]:
    """The gradients of the input, weight and bias (None where not needed), then None for the other inputs."""
    centered, weight, norm = ctx.saved_tensors
    ops, eps, sync = ctx.ops, ctx.eps, ctx.sync
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    input_dtype, weight_dtype, bias_dtype = ctx.dtypes
    scaled, sum_dy, sum_dy_xhat, global_sums = ops.backward_reduce(
        grad_output, centered, norm, weight, eps, need_input, creates_graph
    )
    # Weight and bias gradients are this rank's share, taken before the reduction.
    grad_weight = _cast(sum_dy_xhat, weight_dtype) if need_weight else None
    grad_bias = _cast(sum_dy, bias_dtype) if need_bias else None
    # Every rank that runs backward joins the all-reduce, whether or not its own input needs a
    # gradient: that is decided per rank (requires_grad may differ), and a rank that skipped
    # the collective would leave the others waiting in it. The last slot counts the ranks that
    # create a graph of this gradient (double backward), so that all of them raise below.
    if sync.debug:
        sync.check(centered.shape[1], input_dtype, _debug.BACKWARD)
    if sync.communicator.world_size > 1:
        sync.all_reduce(global_sums, "backward")
    # On CPU the count is read from the sum (free): every rank raises. Elsewhere reading it
    # would synchronise every backward, so only the ranks that create a graph raise (they
    # know it without reading); the others' first-order gradient is right.
    graph_ranks = ops.read_graph_ranks(global_sums, creates_graph)
    if graph_ranks:
        raise double_backward_error(sync, graph_ranks, creates_graph)
    grad_input = None
    if need_input:
        assert scaled is not None
        grad_input = _cast(ops.backward_elemt(scaled, centered, norm, weight, eps, global_sums), input_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def double_backward_error(sync: SyncCall, graph_ranks: int, creates_graph: bool) -> NotImplementedError:
    """The error every rank raises when ``graph_ranks`` ranks asked for the graph of a call's gradient."""
    world_size = sync.communicator.world_size
    return NotImplementedError(
        f"SyncBatchNorm {sync.layer}, backward of call {sync.call}: double backward is not supported: "
        f"{graph_ranks} of {world_size} rank{'s' if world_size > 1 else ''} asked for the graph of this "
        f"gradient (create_graph=True; this rank {sync.communicator.rank} "
        f"{'did' if creates_graph else 'did not'}), and its derivative would be wrong. HINT: compute the term "
        "that needs second derivatives (a gradient penalty) with the layer in eval mode, which uses the running "
        "statistics and makes no collective, or use nn.GroupNorm in that network; torch.nn.SyncBatchNorm does "
        "not support double backward either"
    )


_COMPILED_DTYPES = (torch.float32, torch.float64)


def sync_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    sync: SyncCall,
) -> torch.Tensor:
    """One training call: the compiled CPU path where it applies (:mod:`syncbn._extension`), else the function.

    Both make the same collectives with the same payloads, so ranks may differ in which one they run.
    """
    if (
        input.device.type == "cpu"
        and input.dtype in _COMPILED_DTYPES
        and not sync.debug
        and (weight is None or weight.dtype == input.dtype)
        and (bias is None or bias.dtype == input.dtype)
        and (momentum is not None or num_batches_tracked is not None or running_mean is None)
        and _ops.for_device("cpu").name == "cpu"
    ):
        compiled = _extension.function()
        if compiled is not None:
            return compiled(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                sync.runs_backward, sync.communicator.world_size, sync,
            )  # fmt: skip
    output: torch.Tensor = SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, sync
    )
    return output
