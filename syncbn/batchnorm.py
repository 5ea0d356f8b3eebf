"""The SyncBatchNorm module and the model conversion helpers."""

from __future__ import annotations

from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from syncbn import _compile, comm
from syncbn import debug as _debug
from syncbn._functions import SyncCall, sync_batch_norm
from syncbn.comm import get_communicator
from syncbn.faults import RankMismatchError

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: torch's lazy BatchNorm classes (``_LazyNormBase`` also covers the lazy InstanceNorm ones, which are no BatchNorm).
LAZY_BATCHNORMS: tuple[type[_LazyNormBase], ...] = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
_CLASS_BY_NDIM: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization over the union of the batches of a group of processes.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, the mean and the (biased) variance are taken per channel over
    the batch, spatial dimensions *and all the processes of the group*: on
    every rank the layer computes what ``nn.BatchNorm`` computes on the
    concatenation of all the ranks' batches (output, input gradient,
    ``running_mean``, ``running_var`` with the unbiased global variance, and
    ``num_batches_tracked``). Ranks may hold batches of different sizes,
    including empty ones.

    Each training call makes one all-reduce in forward (``2C + 4`` values:
    the channel count and its square, per-channel sums, the count and how
    many ranks will run backward, in float64) and one in backward (``2C + 1``
    values: per-channel sums, and how many ranks create a graph of the
    gradient). Evaluation with running statistics makes none. In evaluation
    mode without running statistics (``track_running_stats=False``) each
    rank normalises with its own batch statistics and makes none either, as
    ``torch.nn.SyncBatchNorm`` does: evaluation is often run on one rank only.

    ``weight`` and ``bias`` gradients are this rank's share of the full-batch
    gradient, as in ``torch.nn.SyncBatchNorm``: DistributedDataParallel's
    averaging of gradients (or a sum over ranks divided by the world size)
    yields the gradient of the full batch with a mean loss.

    Args:
        num_features: ``C`` of an input of shape ``(N, C, *)``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: factor of the running statistics' update; ``None`` for a
            cumulative moving average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: True.
        track_running_stats: keep running statistics for evaluation. Default: True.
        process_group: the ranks to synchronise over: ``None`` (the default
            torch.distributed group when it is initialised, otherwise this
            process alone), a ``torch.distributed`` ProcessGroup (subgroups
            included) or an mpi4py communicator (``MPI.COMM_WORLD`` or one made
            with ``Split``).
        device, dtype: of the parameters and buffers.
        debug: check before every collective that all ranks make the same
            call (see :mod:`syncbn.debug`); ``None`` follows ``SYNCBN_DEBUG``
            and :func:`syncbn.debug.set_debug`. Default: None.
        bias: (keyword only) with ``affine``, a learnable ``bias`` as well as
            the ``weight``; ``False``: the weight alone, as torch's
            ``BatchNorm(..., bias=False)``. Default: True.

    Attributes:
        layer_name: the layer's path in its model (``"layer1.0.bn1"``), set by
            :func:`convert_sync_batchnorm` or :func:`name_layers`;
            errors and debug checks name the layer with it.

    Double backward (``create_graph=True`` through the layer in training, as
    a gradient penalty needs) is not supported: it raises
    ``NotImplementedError`` on every rank, never a wrong gradient. In
    evaluation mode the layer is ``nn.BatchNorm`` and twice differentiable.

    Faults: every rank raises together, instead of waiting, when the ranks
    disagree on running backward (one rank under ``torch.no_grad()`` or with
    nothing requiring a gradient while the others train), or when the group
    holds a single value per channel. A rank that died or stopped answering
    makes the others raise :class:`syncbn.faults.CollectiveError` naming the
    layer, at the latest after the group's timeout.

    Shape:
        - Input: ``(N, C, *)`` with 2 to 5 dimensions in all (``(N, C)``,
          ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``); contiguous or
          channels-last; float32, float64, bfloat16 or float16. ``N`` may be 0.
        - Output: same shape, dtype and memory format as the input.

    Statistics are accumulated in float32 (float64 for float64 input) around a
    per-rank shift, and combined across ranks in float64, so that they stay
    accurate when the mean is large against the spread.

    Example::

        # mpiexec -n 4 python train.py      (or: torchrun --nproc-per-node 4 train.py)
        from mpi4py import MPI
        import syncbn

        model = syncbn.convert_sync_batchnorm(model, process_group=MPI.COMM_WORLD)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        debug: bool | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if affine and not bias:  # what torch's own bias=False does (its keyword is newer than torch 2.5)
            self.register_parameter("bias", None)
        self.process_group = process_group  # held weakly when it is a torch.distributed group
        self.debug = debug
        self._layer_name: str | None = None
        self._calls = 0  # training calls so far (the debug check compares them between ranks)
        self._compiled_number = _compile.register(self)  # what the compiled path's operators name this layer by
        # The BatchNormXd class this layer was converted from, or the last one its input matched.
        self._batchnorm_class: type[_BatchNorm] | None = None

    @property
    def process_group(self) -> Any:
        """The ``process_group`` given to the layer (None: the default group).

        A torch.distributed group is held by a weak reference, so that a model
        alive until the end of the program does not keep the group alive past
        its destruction (PyTorch can abort at exit when a group survives it).
        Once the group has been destroyed and freed, training raises.
        """
        group = self._process_group()
        if group is None and self._process_group_given:
            raise RuntimeError(
                f"{type(self).__name__}: the torch.distributed process group given to this layer has been destroyed; "
                "HINT: give the layer a live group (layer.process_group = group) before training it again"
            )
        return group

    @process_group.setter
    def process_group(self, process_group: Any) -> None:
        self._process_group = comm.reference(process_group)
        self._process_group_given = process_group is not None

    @property
    def layer_name(self) -> str | None:
        return self._layer_name

    @layer_name.setter
    def layer_name(self, name: str | None) -> None:
        self._layer_name = name
        if name:
            _debug.layer_key(name)  # remembered, so that debug checks can name it when another rank is in it

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """:func:`syncbn.convert_sync_batchnorm`, under the name ``torch.nn.SyncBatchNorm`` users call.

        Example::

            model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model)
        """
        # The lazy class converts to the layer it becomes (its constructor has no num_features).
        converted = _convert(module, process_group, getattr(cls, "cls_to_become", None) or cls)
        name_layers(converted)
        return converted

    def reset_parameters(self) -> None:
        """Running statistics to 0 and 1, ``weight`` to 1 and ``bias`` (if any) to 0; ``bias=False`` kept."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:  # torch before its bias= keyword would zero a None bias
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected an input of at least 2 dimensions (N, C, ...), "
                f"got a {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] == 0:
            raise ValueError(
                f"{type(self).__name__}: expected at least one channel in dimension 1, "
                f"got input of shape {tuple(input.shape)}"
            )

    def _check_input(self, input: torch.Tensor, state: torch.Tensor | None = None) -> None:
        """Type, dimensions, channels, dtype and device of ``input``; ``state`` is the weight, else the running mean."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor input, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels in dimension 1, "
                f"got {input.shape[1]} (input shape {tuple(input.shape)})"
            )
        if input.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: expected a float16, bfloat16, float32 or float64 input, got {input.dtype}"
            )
        if state is None:
            state = self.weight if self.weight is not None else self.running_mean
        if state is not None and state.device != input.device:
            raise ValueError(
                f"{type(self).__name__}: expected input on {state.device}, where the layer's parameters and "
                f"buffers are, got input on {input.device}; HINT: move the model and its inputs to one device"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._compiled_number = _compile.register(self)  # a copy is another layer

    def _note_input(self, input: torch.Tensor) -> None:
        """Remember the BatchNormXd class the input's dimensions match (for revert_sync_batchnorm)."""
        if self._batchnorm_class is None or self._batchnorm_class is nn.SyncBatchNorm:
            self._batchnorm_class = _CLASS_BY_NDIM.get(input.dim(), self._batchnorm_class)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(input)
        # Read from the module's dicts once: nn.Module's attribute lookup of each costs more than the rest
        # of a small layer's Python here.
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters.get("weight"), parameters.get("bias")
        running_mean = buffers.get("running_mean")
        training = self.training
        debug = _debug.is_debug() if self.debug is None else self.debug
        if debug and training:
            self._check_input_with_others(input)
        else:
            self._check_input(input, weight if weight is not None else running_mean)
        self._note_input(input)

        if not training and running_mean is not None:
            return F.batch_norm(input, running_mean, buffers.get("running_var"), weight, bias, False, 0.0, self.eps)

        communicator = get_communicator(self.process_group) if training else comm.LOCAL
        if training:
            # Past nn.Module.__setattr__ (a plain int: it would end up in __dict__ all the same, slower).
            object.__setattr__(self, "_calls", self._calls + 1)
        runs_backward = torch.is_grad_enabled() and (
            input.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        sync = SyncCall(communicator, self, self._calls, runs_backward, debug)
        if training and self.track_running_stats:
            return sync_batch_norm(
                input, weight, bias, running_mean, buffers.get("running_var"), buffers.get("num_batches_tracked"),
                self.momentum, self.eps, sync,
            )  # fmt: skip
        return sync_batch_norm(input, weight, bias, None, None, None, self.momentum, self.eps, sync)

    def _statistics_to_update(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(running_mean, running_var, num_batches_tracked)`` that a call updates: all None when none."""
        if self.training and self.track_running_stats:
            return self.running_mean, self.running_var, self.num_batches_tracked
        return None, None, None

    def _compiled_forward(self, input: torch.Tensor) -> torch.Tensor:
        """What ``torch.compile`` traces: the checks, then the operators and collectives of :mod:`syncbn._compile`."""
        self._check_input(input)
        running_mean, weight, bias = self.running_mean, self.weight, self.bias
        if not self.training and running_mean is not None:
            return F.batch_norm(input, running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        return _compile.forward(
            input,
            weight,
            bias,
            *self._statistics_to_update(),
            self.momentum,
            self.eps,
            self._compiled_number,
            self.training,  # synchronised in training; alone in evaluation without running statistics
            _runs_backward(input, weight, bias),
        )

    def _check_input_with_others(self, input: Any) -> None:
        """Debug mode: a rank with invalid input still joins the check, so that every rank raises, not only it."""
        try:
            self._check_input(input)
        except (TypeError, ValueError) as error:
            if not isinstance(input, torch.Tensor):
                raise
            self._calls += 1  # the others count this call too
            channels = input.shape[1] if input.dim() > 1 else 0
            sync = SyncCall(get_communicator(self.process_group), self, self._calls, False, True)
            try:
                sync.check(channels, input.dtype, _debug.FORWARD, _debug.INVALID_INPUT)
            except RankMismatchError as mismatch:  # always: this rank reported a problem
                raise error from mismatch
            raise


def _runs_backward(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether autograd will run backward through a call: grad mode, and the input, weight or bias needs it."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


class LazySyncBatchNorm(LazyModuleMixin, SyncBatchNorm):
    """A :class:`SyncBatchNorm` whose ``num_features`` is inferred from its first input, as ``nn.LazyBatchNorm2d``.

    Its ``weight``, ``bias``, ``running_mean`` and ``running_var`` are
    uninitialised until the first forward, which makes them ``(C,)`` and the
    layer a :class:`SyncBatchNorm`. :func:`convert_sync_batchnorm` gives one
    for a lazy torch layer that has not seen an input yet. Arguments as
    :class:`SyncBatchNorm`'s, without ``num_features``.

    Example::

        model = nn.Sequential(nn.LazyConv2d(16, 3), syncbn.LazySyncBatchNorm(), nn.ReLU())
        model(torch.randn(2, 3, 8, 8))  # the layer is a SyncBatchNorm(16) now
    """

    cls_to_become = SyncBatchNorm
    weight: UninitializedParameter  # type: ignore[assignment]
    bias: UninitializedParameter  # type: ignore[assignment]

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        debug: bool | None = None,
        *,
        bias: bool = True,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        # No parameters or buffers of 0 channels: made uninitialised below, as torch's lazy layers do.
        super().__init__(0, eps, momentum, False, False, process_group, device, dtype, debug)
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            self.bias = UninitializedParameter(**factory) if bias else None  # type: ignore[assignment]
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:
        """Make the parameters and buffers ``(C,)`` from the first input's ``C``, then initialise them."""
        if not self.has_uninitialized_params() and self.num_features:
            return
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor input, got {type(input).__name__}")
        self._check_input_dim(input)
        # Set even without parameters or buffers to make (affine=False, track_running_stats=False): the channel
        # count is checked at every call.
        self.num_features = input.shape[1]
        for tensor in (self.weight, self.bias, self.running_mean, self.running_var):
            if isinstance(tensor, UninitializedParameter | UninitializedBuffer):
                tensor.materialize((self.num_features,))
        self.reset_parameters()


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by :class:`SyncBatchNorm`.

    The new layers share the old ones' parameters and buffers (no copies) and
    keep their ``training`` flag and options (``bias=False`` included), so
    optimizers and checkpoints keep working. A lazy layer
    (``nn.LazyBatchNorm1d/2d/3d``) that has not seen an input yet becomes a
    :class:`LazySyncBatchNorm`, which takes its channel count from its first
    input; one that has is an ``nn.BatchNorm1d/2d/3d`` already.

    Args:
        module: a model, or a single batch-norm layer.
        process_group: given to every new layer (see :class:`SyncBatchNorm`).

    Returns:
        ``module`` with its layers replaced in place, or the new layer when
        ``module`` itself is a batch-norm layer.

    Example::

        model = syncbn.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model)
    """
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)


def name_layers(module: nn.Module, prefix: str = "") -> int:
    """Name every :class:`SyncBatchNorm` in ``module`` after its path (``"layer1.0.bn1"``).

    :func:`convert_sync_batchnorm` does this already; call it for models
    built with ``SyncBatchNorm`` directly, so that errors and debug mode
    (:mod:`syncbn.debug`) can tell the layers apart and name them. Returns
    how many layers were named.
    """
    count = 0
    for path, child in module.named_modules(prefix=prefix):
        if isinstance(child, SyncBatchNorm) and path:  # a lone layer has no path: it stays unnamed
            child.layer_name = path
            count += 1
    return count


def _convert(module: nn.Module, process_group: Any, cls: type[SyncBatchNorm]) -> nn.Module:
    converted = module
    if is_batchnorm(module) and not isinstance(module, SyncBatchNorm):
        options = _options(module)
        bias = not module.affine or module.bias is not None
        # A lazy layer not run yet, or one without parameters or buffers that ran (torch leaves its count at 0).
        if (isinstance(module, LAZY_BATCHNORMS) and module.has_uninitialized_params()) or module.num_features == 0:
            converted = LazySyncBatchNorm(**options, process_group=process_group, bias=bias)
            converted._batchnorm_class = cast(type[_BatchNorm], getattr(module, "cls_to_become", None) or type(module))
        else:
            converted = cls(module.num_features, **options, process_group=process_group, bias=bias)
            converted._batchnorm_class = cast(type[_BatchNorm], type(module))
        _share_state(module, converted)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, process_group, cls))
    return converted


def is_batchnorm(module: nn.Module) -> TypeGuard[_NormBase]:
    """Whether ``module`` is a BatchNorm layer of any kind: ours, torch's (``nn.SyncBatchNorm`` included), lazy ones.

    Not InstanceNorm, which shares torch's base class but keeps per-instance statistics.
    """
    return isinstance(module, (_BatchNorm, *LAZY_BATCHNORMS))


def _options(module: nn.Module) -> dict[str, Any]:
    """The constructor's keywords that say what ``module`` (a BatchNorm layer of any kind) is.

    Not ``bias``, which only recent versions of torch's classes take: a layer without
    one gets it from :func:`_share_state`, as its parameters.
    """
    return {
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
    }


#: The BatchNorm classes of torch that :func:`revert_sync_batchnorm` gives, and their lazy forms.
_LAZY_CLASS: dict[type[_BatchNorm], type[_LazyNormBase]] = {
    nn.BatchNorm1d: nn.LazyBatchNorm1d,
    nn.BatchNorm2d: nn.LazyBatchNorm2d,
    nn.BatchNorm3d: nn.LazyBatchNorm3d,
}


def revert_sync_batchnorm(module: nn.Module, cls: type[_BatchNorm] | None = None) -> nn.Module:
    """Replace every :class:`SyncBatchNorm` in ``module`` by the plain ``nn.BatchNorm1d/2d/3d`` it stands for.

    The class is the one the layer was converted from, or else the one that
    matches the last input it saw (2D/3D -> BatchNorm1d, 4D -> BatchNorm2d,
    5D -> BatchNorm3d), or else ``cls``. A :class:`LazySyncBatchNorm` that
    has not seen an input becomes the lazy form of that class
    (``nn.LazyBatchNorm2d``...). Parameters and buffers are shared, not
    copied.

    Args:
        module: a model, or a single layer.
        cls: the class of the layers that neither were converted from a
            BatchNorm class nor have seen an input (built as SyncBatchNorm
            directly, or converted from ``nn.SyncBatchNorm``). Default:
            ``nn.BatchNorm2d``, the class of convolutional networks.

    Example::

        model = syncbn.revert_sync_batchnorm(model)                          # for single-process inference
        head = syncbn.revert_sync_batchnorm(head, cls=torch.nn.BatchNorm1d)  # layers not run yet
    """
    converted = module
    if isinstance(module, SyncBatchNorm):
        known = module._batchnorm_class
        target = known if known is not None and known is not nn.SyncBatchNorm else (cls or nn.BatchNorm2d)
        options = _options(module)
        if isinstance(module, LazySyncBatchNorm) and module.has_uninitialized_params():
            converted = _LAZY_CLASS.get(target, nn.LazyBatchNorm2d)(**options)
        else:
            converted = target(module.num_features, **options)
        _share_state(module, converted)
    for name, child in module.named_children():
        converted.add_module(name, revert_sync_batchnorm(child, cls))
    return converted


def _share_state(source: _NormBase, target: _NormBase) -> None:
    """Make ``target`` use ``source``'s parameters and buffers (the same tensors) and training flag."""
    if source.affine:
        with torch.no_grad():
            target.weight = source.weight
            target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
