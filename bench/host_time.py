"""Where SyncBatchNorm's host time per call goes, in one process on CPU (nothing is communicated).

Usage::

    python bench/host_time.py                       # prints a Markdown table
    python bench/host_time.py --shapes 64x512 --reps 4000 --threads 1

Contenders, interleaved in one process (each repetition runs every contender
once, in an order that rotates from one repetition to the next; medians after
the warm-up), one iteration being ``layer(x).backward(grad)``:

* ``batchnorm``: ``nn.BatchNorm1d/2d`` in training mode;
* ``passes``: an autograd function that makes the same four aten calls as
  syncbn's CPU implementation (the sums, the normalisation, the backward
  reduction, the input gradient's correction) with constant per-channel
  statistics, and nothing else: the floor of syncbn's design in Python;
* ``function``: ``syncbn._functions.SyncBatchNormFunction`` called directly,
  with the running statistics (everything syncbn does, but the module);
* ``function_no_running``: the same without running statistics;
* ``syncbn``: the ``syncbn.SyncBatchNorm`` module (world size 1).

``syncbn / batchnorm`` is what ``syncbn bench`` reports as the host-time
ratio; ``passes / batchnorm`` is how close to ``nn.BatchNorm`` syncbn could
come with its passes as they are; the rest is per-call Python and NumPy.
Absolute times on a shared machine are noise; compare within a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import syncbn
from syncbn import _functions, comm

_aten = torch.ops.aten


def _passes_function(num_channels: int, ndim: int) -> Any:
    """An autograd function with syncbn's four CPU aten calls and constant statistics."""
    zeros, ones = torch.zeros(num_channels), torch.ones(num_channels)
    coefficient = torch.full((1, num_channels) + (1,) * (ndim - 2), 1e-3)

    class Passes(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            _aten.native_batch_norm_backward(x, x, None, zeros, ones, None, None, False, 0.0, [False, True, True])
            ctx.save_for_backward(x, weight)
            return torch.batch_norm(x, weight, bias, zeros, ones, False, 0.0, 1e-5, False)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, weight = ctx.saved_tensors
            scaled, grad_weight, grad_bias = _aten.native_batch_norm_backward(
                grad, x, weight, zeros, ones, None, None, False, 1e-5, [True, True, True]
            )
            return scaled.addcmul_(x, coefficient, value=-1.0).sub_(coefficient), grad_weight, grad_bias

    return Passes


def contenders(shape: tuple[int, ...]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    num_channels, ndim = shape[1], len(shape)
    batchnorm = (nn.BatchNorm1d if ndim == 2 else nn.BatchNorm2d)(num_channels)
    layer = syncbn.SyncBatchNorm(num_channels)
    weight, bias = layer.weight, layer.bias
    sync = _functions.SyncCall(comm.LOCAL, layer, 1, True, False)
    passes = _passes_function(num_channels, ndim)
    apply = _functions.SyncBatchNormFunction.apply
    running = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    return {
        "batchnorm": batchnorm,
        "passes": lambda x: passes.apply(x, weight, bias),
        "function": lambda x: apply(x, weight, bias, *running, 0.1, 1e-5, sync),
        "function_no_running": lambda x: apply(x, weight, bias, None, None, None, 0.1, 1e-5, sync),
        "syncbn": layer,
    }


def measure(shape: tuple[int, ...], reps: int, warmup: int, seed: int) -> dict[str, float]:
    """Median µs per contender, interleaved."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    layers = contenders(shape)
    names = list(layers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            x.grad = None
            began = time.perf_counter()
            layers[name](x).backward(grad)
            elapsed = time.perf_counter() - began
            if rep >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x512,2x256x14x14,2x64x56x56", help="comma-separated NxC[xHxW]")
    parser.add_argument("--reps", type=int, default=2000, help="timed repetitions (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed repetitions (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in text.split("x")) for text in args.shapes.split(",")]
    header = "| shape | batchnorm | passes | function | function_no_running | syncbn | passes / bn | syncbn / bn |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in shapes:
        us = measure(shape, args.reps, args.warmup, args.seed)
        print(
            f"| {'x'.join(map(str, shape))} | {us['batchnorm']:.0f} | {us['passes']:.0f} | {us['function']:.0f} | "
            f"{us['function_no_running']:.0f} | {us['syncbn']:.0f} | {us['passes'] / us['batchnorm']:.2f} | "
            f"{us['syncbn'] / us['batchnorm']:.2f} |"
        )
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.reps} repetitions after {args.warmup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
