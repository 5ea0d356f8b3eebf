"""Running statistics across ranks: pooled in one all-reduce, or recomputed exactly over many batches (PreciseBN)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parameter import UninitializedBuffer

from syncbn.batchnorm import is_batchnorm
from syncbn.comm import get_communicator, sum_if_agreed


def _tracked(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """``(layer, running_mean, running_var)`` of every BatchNorm layer (ours, torch's) in ``model`` that keeps them."""
    layers: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    for name, module in model.named_modules():
        mean, var = (getattr(module, "running_mean", None), getattr(module, "running_var", None))
        if not is_batchnorm(module) or mean is None or var is None:
            continue
        if isinstance(mean, UninitializedBuffer):
            raise ValueError(
                f"{name or type(module).__name__}: a lazy BatchNorm layer that has not seen an input has no "
                "running statistics yet; HINT: run one forward pass first"
            )
        layers.append((module, mean, var))
    return layers


@torch.no_grad()
def sync_running_stats(model: nn.Module, process_group: Any = None) -> int:
    """Make the running statistics of every BatchNorm layer in ``model`` the same on all ranks: their pooled values.

    For models trained with unsynchronised BatchNorm (each rank's statistics
    describe its own share of the data), or to be sure before a checkpoint or
    an evaluation on one rank; timm's ``distribute_bn`` does the first half
    of it. Every layer of any kind counts (``syncbn.SyncBatchNorm``,
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``), and all of them cross in
    one all-reduce.

    * ``running_mean`` becomes the mean of the ranks' running means: exact,
      the running mean of the pooled data when every rank saw as many values.
    * ``running_var`` becomes the mean of the ranks' running variances *plus
      the variance of their running means* (the law of total variance): the
      variance of the pooled data with equal shares, where averaging the
      variances alone (``distribute_bn``) would leave out how far apart the
      ranks' means are. Each rank's variance is the unbiased estimate
      BatchNorm keeps, so the result is to that precision.
    * ``num_batches_tracked`` is left as it is.

    With :class:`~syncbn.SyncBatchNorm` layers the ranks' statistics are the
    same already (up to rounding), and this changes nothing.

    Args:
        model: the model (or a single layer), the same on every rank.
        process_group: the ranks to pool over, as for
            :class:`~syncbn.SyncBatchNorm` (``None``: the default group).

    Returns:
        The number of layers synchronised.

    Raises:
        RankMismatchError: on every rank, when the ranks' models do not hold
            the same layers (their channel counts differ; over MPI, which
            sums payloads of different lengths over their common part, gloo
            raising its own error then).
        ValueError: for a lazy layer that has not seen an input.

    Example::

        syncbn.sync_running_stats(model)             # every rank, before rank 0 saves or evaluates
        if ctx.rank == 0:
            torch.save(model.state_dict(), "model.pt")
    """
    layers = _tracked(model)
    communicator = get_communicator(process_group)
    if communicator.world_size == 1:
        return len(layers)
    sizes = [mean.numel() for _, mean, _ in layers]
    total = sum(sizes)
    no_values = torch.zeros(0, dtype=torch.float64)
    means = torch.cat([mean.to(torch.float64) for _, mean, _ in layers]) if layers else no_values
    variances = torch.cat([var.to(torch.float64) for _, _, var in layers]) if layers else no_values
    summed = sum_if_agreed(
        communicator, (total,), torch.cat((means, means * means, variances)),
        f"sync_running_stats: the ranks' models do not hold the same BatchNorm layers (this rank "
        f"{communicator.rank} has {len(layers)} layers of {total} channels in all); HINT: call it with the same "
        "model on every rank",
    )  # fmt: skip
    pooled_mean, mean_of_squares, mean_var = (summed / communicator.world_size).view(3, total)
    pooled_var = mean_var + (mean_of_squares - pooled_mean * pooled_mean).clamp_(min=0.0)
    offset = 0
    for (_, mean, var), size in zip(layers, sizes, strict=True):
        mean.copy_(pooled_mean[offset : offset + size])
        var.copy_(pooled_var[offset : offset + size])
        offset += size
    return len(layers)


class _Accumulator:
    """Per-channel sums of one layer's inputs over many batches, in float64, on the layer's device."""

    def __init__(self, num_channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(2 * num_channels + 1, dtype=torch.float64, device=device)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """A forward pre-hook: add the layer's input."""
        x = args[0]
        num_channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        values = x.detach().to(torch.float64)
        self.sums[:num_channels] += values.sum(dims)
        self.sums[num_channels:-1] += (values * values).sum(dims)
        self.sums[-1] += x.numel() // num_channels


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[Any], num_batches: int = 200, process_group: Any = None) -> int:
    """Recompute every BatchNorm layer's running statistics exactly, over many batches and all ranks (PreciseBN).

    The running statistics a layer keeps in training are an exponential
    average of batch statistics taken while the weights moved: they lag
    behind the final weights and are noisy when the batches are small (Wu and
    Johnson, "Rethinking 'Batch' in BatchNorm", 2021; detectron2's PreciseBN
    hook). This function runs up to ``num_batches`` batches per rank through
    the model in training mode, as training runs them, and sets each layer's
    ``running_mean`` and ``running_var`` to the mean and the (unbiased)
    variance of *all* the values its input took, over all the ranks: the
    population statistics of the model as it is now.

    Every layer normalises each batch as in training (a
    :class:`~syncbn.SyncBatchNorm` with the statistics of the group's batch, a
    torch layer with its rank's); the sums of the inputs are kept on each
    rank and combined at the end, in one all-reduce for all the layers.
    Nothing else changes: parameters, the running statistics' previous values
    (until they are replaced), ``num_batches_tracked``, and every module's
    training flag are as they were, and nothing is differentiated. When the
    model's SyncBatchNorm layers (ours or ``nn.SyncBatchNorm``) synchronise,
    every rank runs as many batches as the rank with the fewest (a one-value all-reduce before each batch
    decides, so that no rank waits in a layer for another that has run out).

    Args:
        model: the model, the same on every rank (a DistributedDataParallel
            wrapper is looked through).
        batches: the inputs (a data loader); each item is given to the model,
            or, for a tuple or list (``(images, labels)``), its first element.
        num_batches: the most batches per rank.
        process_group: the ranks to pool over, as for
            :class:`~syncbn.SyncBatchNorm` (``None``: the default group); the
            group of the model's layers.

    Returns:
        The number of batches this rank ran.

    Raises:
        RankMismatchError: on every rank, when the ranks' models do not hold
            the same BatchNorm layers (as for :func:`sync_running_stats`).
        ValueError: for a lazy layer that has not seen an input.

    Example::

        syncbn.precise_bn(model, train_loader, num_batches=200)   # every rank, before evaluating
    """
    # DistributedDataParallel would broadcast its buffers at every forward: a collective per batch that the
    # ranks need not agree on. Its module is the model.
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    tracked = _tracked(model)
    communicator = get_communicator(process_group)
    # The same model on every rank: every rank reaches the same answer, and all of them agree per batch or none.
    synchronised = communicator.world_size > 1 and any(_synchronises(module) for module in model.modules())
    # Where the group reduces (a NCCL group: CUDA tensors only), even on a rank with no layer tracking statistics.
    device = communicator.buffer_device(tracked[0][1].device if tracked else torch.device("cpu"))
    state = {name: buffer.clone() for name, buffer in model.named_buffers()}
    training = {module: module.training for module in model.modules()}
    accumulators = [_Accumulator(mean.numel(), mean.device) for _, mean, _ in tracked]
    hooks = [layer.register_forward_pre_hook(hook) for (layer, _, _), hook in zip(tracked, accumulators, strict=True)]
    count = 0
    try:
        model.train()
        iterator = iter(batches)
        while count < num_batches:
            batch = next(iterator, None)
            if synchronised:
                have = torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64, device=device)
                communicator.all_reduce(have)
                if have.item() < communicator.world_size:
                    break
            elif batch is None:
                break
            model(batch[0] if isinstance(batch, tuple | list) else batch)
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in training.items():
            module.training = flag
        buffers = dict(model.named_buffers())
        for name, value in state.items():
            buffers[name].copy_(value)
    _set_population_statistics(tracked, accumulators, communicator)
    return count


def _synchronises(module: nn.Module) -> bool:
    """Whether ``module`` makes a collective at each training forward (ours or torch's SyncBatchNorm in a group)."""
    from syncbn.batchnorm import SyncBatchNorm

    if isinstance(module, SyncBatchNorm):
        return get_communicator(module.process_group).world_size > 1
    if isinstance(module, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
        return dist.get_world_size(module.process_group) > 1
    return False


def _set_population_statistics(
    tracked: list[tuple[nn.Module, torch.Tensor, torch.Tensor]], accumulators: list[_Accumulator], communicator: Any
) -> None:
    total = sum(accumulator.sums.numel() for accumulator in accumulators)
    device = accumulators[0].sums.device if accumulators else torch.device("cpu")
    body = (
        torch.cat([accumulator.sums for accumulator in accumulators]) if accumulators else torch.zeros(0, device=device)
    )
    summed = sum_if_agreed(
        communicator, (total,), body,
        f"precise_bn: the ranks' models do not hold the same BatchNorm layers (this rank {communicator.rank} has "
        f"{len(accumulators)}); HINT: call it with the same model on every rank",
    )  # fmt: skip
    offset = 0
    for (_, running_mean, running_var), accumulator in zip(tracked, accumulators, strict=True):
        size = accumulator.sums.numel()
        sums = summed[offset : offset + size]
        offset += size
        num_channels = (size - 1) // 2
        count = float(sums[-1])
        if count == 0:  # the layer saw nothing anywhere: its statistics stay as they were
            continue
        mean = sums[:num_channels] / count
        var = (sums[num_channels:-1] / count - mean * mean).clamp_(min=0.0)
        running_mean.copy_(mean)
        running_var.copy_(var * (count / (count - 1)) if count > 1 else var)
