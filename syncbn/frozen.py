"""Frozen BatchNorm: a fixed per-channel affine map from a layer's running statistics, as detection fine-tuning uses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from syncbn.batchnorm import is_batchnorm


class FrozenBatchNorm(nn.Module):
    r"""BatchNorm with fixed statistics and affine parameters, trained or not.

    .. math::

        y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}} * \mathrm{weight} + \mathrm{bias}

    Nothing in it is trained or updated, in training mode or not, and nothing
    is communicated: its ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` are buffers. Detection and segmentation models fine-tune
    with it (detectron2's ``FrozenBatchNorm2d``), where batches of a few
    images would give poor statistics. It takes inputs of 2 to 5 dimensions,
    contiguous or channels-last.

    Its ``state_dict`` has the keys of a BatchNorm layer (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so checkpoints
    of affine layers with a bias load both ways (a layer frozen from one
    without holds weight 1 and bias 0). Made by :func:`freeze_batchnorm`, undone by
    :func:`unfreeze_batchnorm`.

    Args:
        num_features: ``C`` of an input of shape ``(N, C, *)``.
        eps: added to the variance. Default: 1e-5.
        device, dtype: of the buffers.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        #: The BatchNorm class this layer was frozen from and its momentum (what :func:`unfreeze_batchnorm` gives).
        self.unfrozen_class: type[_BatchNorm] | None = None
        self.momentum: float | None = 0.1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected an input (N, {self.num_features}, ...) of at least 2 dimensions, "
                f"got shape {tuple(input.shape)}"
            )
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints of other frozen layers (detectron2's FrozenBatchNorm2d) have no num_batches_tracked.
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a :class:`FrozenBatchNorm` holding its current values.

    Layers of every kind are frozen: :class:`syncbn.SyncBatchNorm`,
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, and lazy ones that have
    seen an input (not InstanceNorm, whose statistics are per instance). A
    layer without ``weight`` (``affine=False``) freezes with weight 1 and bias
    0, one without bias with bias 0. The frozen
    layer's buffers are copies (in the layer's device and dtype): the
    optimizer's parameters of the old layers no longer act on the model.

    Layers without running statistics (``track_running_stats=False``)
    normalise every batch with its own statistics and have nothing to
    freeze: they are left as they are.

    Args:
        module: a model, or a single layer.

    Returns:
        ``module`` with its layers replaced in place, or the frozen layer
        when ``module`` itself is a BatchNorm layer.

    Raises:
        ValueError: for a lazy layer that has not seen an input.

    Example::

        model = syncbn.freeze_batchnorm(backbone)    # before building the optimizer
    """
    converted = module
    if is_batchnorm(module) and module.track_running_stats and module.running_mean is not None:
        if isinstance(module.running_mean, UninitializedBuffer) or isinstance(module.weight, UninitializedParameter):
            raise ValueError(
                f"freeze_batchnorm: {module} has not seen an input yet, so it has no statistics to freeze; HINT: "
                "run one forward pass first"
            )
        converted = _frozen(module)
    for name, child in module.named_children():
        converted.add_module(name, freeze_batchnorm(child))
    return converted


@torch.no_grad()
def _frozen(layer: _NormBase) -> FrozenBatchNorm:
    running_mean, running_var = layer.running_mean, layer.running_var
    assert running_mean is not None
    assert running_var is not None
    frozen = FrozenBatchNorm(layer.num_features, layer.eps, device=running_mean.device, dtype=running_mean.dtype)
    frozen.running_mean.copy_(running_mean)
    frozen.running_var.copy_(running_var)
    if layer.num_batches_tracked is not None:
        frozen.num_batches_tracked.copy_(layer.num_batches_tracked)
    if layer.weight is not None:
        frozen.weight.copy_(layer.weight)
    if layer.bias is not None:
        frozen.bias.copy_(layer.bias)
    frozen.unfrozen_class = _unfrozen_class(layer)
    frozen.momentum = layer.momentum
    return frozen


def _unfrozen_class(layer: _NormBase) -> type[_BatchNorm] | None:
    from syncbn.batchnorm import SyncBatchNorm

    if isinstance(layer, SyncBatchNorm):
        return SyncBatchNorm
    return type(layer) if isinstance(layer, _BatchNorm) else None


def unfreeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`FrozenBatchNorm` in ``module`` by a trainable BatchNorm layer with its values.

    The class and momentum are the ones the layer was frozen from
    (``nn.BatchNorm2d`` and 0.1 for a layer made otherwise), with
    ``affine=True``, a bias (0 where the layer had none) and running
    statistics; its parameters and buffers are copies of the frozen layer's.
    For fine-tuning the statistics again, or to give the layers to
    :func:`syncbn.convert_sync_batchnorm`.

    Example::

        model = syncbn.convert_sync_batchnorm(syncbn.unfreeze_batchnorm(model))
    """
    converted = module
    if isinstance(module, FrozenBatchNorm):
        cls = module.unfrozen_class or nn.BatchNorm2d
        layer = cls(
            module.num_features, module.eps, module.momentum, device=module.weight.device, dtype=module.weight.dtype
        )
        layer.load_state_dict(module.state_dict())
        converted = layer
    for name, child in module.named_children():
        converted.add_module(name, unfreeze_batchnorm(child))
    return converted
