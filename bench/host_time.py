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
* ``minimal``: the passes with the least Python a synchronised layer of this
  design needs around them (the payload of sums, mean and variance from it,
  the running statistics and the backward coefficients, in NumPy), with no
  check, no centring and no dispatch: what a leaner Python layer could reach;
* ``function``: ``syncbn._functions.SyncBatchNormFunction`` called directly,
  with the running statistics (everything syncbn does, but the module);
* ``function_no_running``: the same without running statistics;
* ``syncbn``: the ``syncbn.SyncBatchNorm`` module (world size 1).

``syncbn / batchnorm`` is what ``syncbn bench`` reports as the host-time
ratio; ``passes / batchnorm`` is how close to ``nn.BatchNorm`` syncbn could
come with its passes as they are, ``minimal / batchnorm`` how close with
Python around them; the rest is per-call Python and NumPy.
Absolute times on a shared machine are noise; compare within a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
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


def _minimal_function(num_channels: int, ndim: int) -> Any:
    """The least Python a synchronised layer of this design runs around its passes: an autograd function
    with the forward payload of sums, mean and variance from it (where the all-reduce would be), the running
    statistics, and the backward coefficients, in NumPy; no check, no centring, no dispatch, float32 only."""
    zeros, ones = torch.zeros(num_channels), torch.ones(num_channels)
    channels = num_channels
    shape = (1, channels) + (1,) * (ndim - 2)

    class Minimal(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
        ) -> torch.Tensor:
            _, total_sq, total = _aten.native_batch_norm_backward(
                x, x, None, zeros, ones, None, None, False, 0.0, [False, True, True]
            )
            count = x.numel() // channels
            payload = np.empty(2 * channels + 4)
            payload[2 : 2 + channels] = total.numpy()
            payload[2 + channels : -2] = total_sq.numpy()
            sums, squares = payload[2 : 2 + channels], payload[2 + channels : -2]
            batch_mean = sums / count
            batch_var = (squares - sums * batch_mean) / count
            norm = np.empty(2 * channels, dtype=np.float32)
            norm[:channels], norm[channels:] = batch_mean, batch_var
            stats = torch.from_numpy(norm)
            running_mean, running_var = mean.numpy(), var.numpy()
            running_mean *= 0.9
            running_mean += 0.1 * batch_mean
            running_var *= 0.9
            running_var += (0.1 * count / (count - 1)) * batch_var
            ctx.save_for_backward(x, weight, stats)
            return torch.batch_norm(x, weight, bias, stats[:channels], stats[channels:], False, 0.0, 1e-5, False)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            x, weight, stats = ctx.saved_tensors
            scaled, grad_weight, grad_bias = _aten.native_batch_norm_backward(
                grad, x, weight, stats[:channels], stats[channels:], None, None, False, 1e-5, [True, True, True]
            )
            values = stats.numpy().astype(np.float64)
            invstd = 1.0 / np.sqrt(values[channels:] + 1e-5)
            scale = invstd * weight.detach().numpy() / (x.numel() // channels)
            k1 = (grad_weight.numpy() * invstd * scale).astype(np.float32)
            k0 = (grad_bias.numpy() * scale - k1 * values[:channels]).astype(np.float32)
            grad_input = scaled.addcmul_(x, torch.from_numpy(k1).view(shape), value=-1.0).sub_(
                torch.from_numpy(k0).view(shape)
            )
            return grad_input, grad_weight, grad_bias, None, None

    return Minimal


def contenders(shape: tuple[int, ...]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    num_channels, ndim = shape[1], len(shape)
    batchnorm = (nn.BatchNorm1d if ndim == 2 else nn.BatchNorm2d)(num_channels)
    layer = syncbn.SyncBatchNorm(num_channels)
    weight, bias = layer.weight, layer.bias
    sync = _functions.SyncCall(comm.LOCAL, layer, 1, True, False)
    passes = _passes_function(num_channels, ndim)
    minimal = _minimal_function(num_channels, ndim)
    minimal_stats = torch.zeros(num_channels), torch.ones(num_channels)
    apply = _functions.SyncBatchNormFunction.apply
    running = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    return {
        "batchnorm": batchnorm,
        "passes": lambda x: passes.apply(x, weight, bias),
        "minimal": lambda x: minimal.apply(x, weight, bias, *minimal_stats),
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
    header = (
        "| shape | batchnorm | passes | minimal | function | function_no_running | syncbn "
        "| passes / bn | minimal / bn | syncbn / bn |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in shapes:
        us = measure(shape, args.reps, args.warmup, args.seed)
        print(
            f"| {'x'.join(map(str, shape))} | {us['batchnorm']:.0f} | {us['passes']:.0f} | {us['minimal']:.0f} | "
            f"{us['function']:.0f} | {us['function_no_running']:.0f} | {us['syncbn']:.0f} | "
            f"{us['passes'] / us['batchnorm']:.2f} | {us['minimal'] / us['batchnorm']:.2f} | "
            f"{us['syncbn'] / us['batchnorm']:.2f} |"
        )
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.reps} repetitions after {args.warmup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
