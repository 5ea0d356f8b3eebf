"""Averaging gradients over the ranks without DistributedDataParallel: for mpi4py training, or any group.

``DistributedDataParallel`` needs torch.distributed; a job on mpi4py alone
(``syncbn.init_distributed(backend="mpi")``) has none. :func:`average_gradients`
is what DDP's gradient averaging does, called after ``backward()``: the
gradients are packed into a few flat buckets (one all-reduce each, instead
of one per parameter) and divided by the group's size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from syncbn.comm import get_communicator, sum_if_agreed

#: Default bucket size: as DDP's (25 MiB).
BUCKET_BYTES = 25 * 1024 * 1024


@torch.no_grad()
def average_gradients(
    parameters: nn.Module | Iterable[torch.Tensor], process_group: Any = None, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as DDP does; call it after ``backward()``.

    With a mean loss per rank and equal batches, the result is the gradient of
    the mean loss over the whole global batch, the same on every rank, so
    every rank's optimizer then takes the same step. A parameter without a
    gradient on some ranks (a branch it did not run) counts as zero there,
    as with DDP's ``find_unused_parameters``; one without a gradient on every
    rank keeps ``None``.

    Gradients are summed in buckets of up to ``bucket_bytes`` per device and
    dtype (float16 and bfloat16 ones in float32), with one small all-reduce
    before them that also checks that the ranks hold the same parameters.

    Args:
        parameters: a model (its ``parameters()``) or the parameters, in the
            same order on every rank.
        process_group: the ranks to average over, as for
            :class:`~syncbn.SyncBatchNorm` (``None``: the default group, which
            :func:`syncbn.init_distributed` sets to ``MPI.COMM_WORLD`` for the
            MPI backend).
        bucket_bytes: the most bytes summed in one all-reduce.

    Raises:
        RankMismatchError: on every rank, when the ranks' parameters differ
            in number or size (over MPI, which sums payloads of different
            lengths over their common part; gloo raises its own error then).

    Example::

        # mpiexec -n 4 python train.py
        ctx = syncbn.init_distributed(backend="mpi")
        model = syncbn.convert_sync_batchnorm(model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            syncbn.average_gradients(model)
            optimizer.step()
    """
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    communicator = get_communicator(process_group)
    world_size = communicator.world_size
    if world_size == 1:
        return
    # One small all-reduce first: how many ranks have a gradient for each parameter, with the parameters'
    # count and size, which every rank must share.
    numel = sum(p.numel() for p in params)
    device = params[0].device if params else torch.device("cpu")  # sum_if_agreed moves it where the group needs
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64, device=device)
    counts = sum_if_agreed(
        communicator, (len(params), numel), has_grad,
        f"average_gradients: the ranks do not hold the same parameters (this rank {communicator.rank} has "
        f"{len(params)} parameters of {numel} values in all); HINT: give it the same model on every rank",
    )  # fmt: skip
    reduced = [p for p, count in zip(params, counts.tolist(), strict=True) if count > 0]
    for bucket in _buckets(reduced, bucket_bytes):
        _average(bucket, communicator, world_size)


def _buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one device and dtype, up to ``bucket_bytes`` each (one more than that alone)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for param in params:
        key = (param.device, _bucket_dtype(param.dtype))
        nbytes = param.numel() * torch.finfo(key[1]).bits // 8
        last = buckets[-1][0] if buckets else None
        if last is None or (last.device, _bucket_dtype(last.dtype)) != key or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(param)
        size += nbytes
    return buckets


def _bucket_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _average(bucket: list[torch.Tensor], communicator: Any, world_size: int) -> None:
    first = bucket[0]
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(_bucket_dtype(first.dtype))
            for p in bucket
        ]
    )
    communicator.all_reduce(flat)
    flat /= world_size
    offset = 0
    for param in bucket:
        values = flat[offset : offset + param.numel()].view(param.shape)
        offset += param.numel()
        if param.grad is None:
            param.grad = values.to(param.dtype).clone()
        else:
            param.grad.copy_(values)
