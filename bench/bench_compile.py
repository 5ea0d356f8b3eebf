"""A training step of a small CNN with SyncBatchNorm on 2 gloo ranks: eager against torch.compile.

Usage::

    python bench/bench_compile.py --out-dir bench/results   # the recorded run (a few minutes)
    python bench/bench_compile.py --steps 5 --reps 10        # a quick look; prints the table only

Method: 2 processes (:class:`syncbn.harness.LocalRanks`) in a gloo group on
127.0.0.1, one thread each. The model is the residual CNN of
``tests/test_compile.py`` made wider (a stem, two residual blocks with
in-place ReLUs and ``+=``, a BatchNorm1d head: 6 SyncBatchNorm layers), one
step being forward, backward and SGD on a batch of 8 images of 3x32x32 per
rank. Contenders: ``eager``, ``aot_eager`` (the graph as traced, no code
generation) and ``inductor`` (generated C++), each compiled with
``fullgraph=True``. Compile time is the first step's wall time (tracing and
code generation included, inductor's on-disk caches off). Then the contenders run interleaved, each
repetition once each in a rotating order, with a barrier (untimed) before
each step; the figure per step is the slower rank's, the table shows medians
and the ratio to eager. Then, in the same processes, the all-reduce eager mode
makes (``dist.all_reduce`` in place) against the functional collective the
compiled graphs hold, on payloads of ``2C + 4`` float64 values, interleaved.
Absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from syncbn.harness import LocalRanks, RankChannel, free_port, gloo_group

CONTENDERS = ("eager", "aot_eager", "inductor")
COLLECTIVES = ("direct", "functional")
WORLD_SIZE = 2


def _model() -> Any:
    import torch
    from torch import nn

    import syncbn

    class Block(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            out += x
            return self.relu(out)

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        Block(32),
        Block(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    return syncbn.convert_sync_batchnorm(model)


def worker(rank: int, world_size: int, channel: RankChannel, port: int, args: argparse.Namespace) -> Any:
    import copy

    import torch
    import torch._inductor.config
    import torch.distributed as dist

    torch._inductor.config.force_disable_caches = True  # the first step compiles from nothing, every run
    with gloo_group(rank, world_size, datetime.timedelta(seconds=args.timeout), port=port):
        torch.manual_seed(0)
        base = _model()
        models = {"eager": base}
        for backend in CONTENDERS[1:]:
            models[backend] = torch.compile(copy.deepcopy(base), backend=backend, fullgraph=True)
        optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01) for name, model in models.items()}
        generator = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(args.batch, 3, 32, 32, generator=generator)
        target = torch.randint(0, 10, (args.batch,), generator=generator)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(name: str) -> float:
            dist.barrier()
            began = time.perf_counter()
            optimizers[name].zero_grad()
            loss_fn(models[name](x), target).backward()
            optimizers[name].step()
            return time.perf_counter() - began

        first = {name: step(name) for name in CONTENDERS}  # compiles
        for _ in range(args.steps):  # warm-up
            for name in CONTENDERS:
                step(name)
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for rep in range(args.reps):
            order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]
            for name in order:
                times[name].append(step(name))
        return {"first_step_s": first, "step_s": times, "all_reduce_s": _collectives(args)}


def _collectives(args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    """Eager mode's choice: the forward payload's all-reduce in place, against the functional collective."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    group_name = dist.group.WORLD.group_name
    times: dict[int, dict[str, list[float]]] = {}
    for channels in args.channels:
        payload = torch.zeros(2 * channels + 4, dtype=torch.float64)  # sums of zeros stay finite
        calls = {
            "direct": lambda payload=payload: dist.all_reduce(payload),
            "functional": lambda payload=payload: funcol.wait_tensor(funcol.all_reduce(payload, "sum", group_name)),
        }
        times[channels] = {name: [] for name in COLLECTIVES}
        for rep in range(args.steps + args.collective_reps):
            for name in COLLECTIVES if rep % 2 else COLLECTIVES[::-1]:
                dist.barrier()
                began = time.perf_counter()
                calls[name]()
                if rep >= args.steps:
                    times[channels][name].append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per rank (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=60, help="timed steps per contender (default: %(default)s)")
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 512, 2048], help="payload sizes (2C + 4) of the all-reduces"
    )
    parser.add_argument(
        "--collective-reps", type=int, default=400, help="timed all-reduces per contender (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="hard limit in seconds (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write bench_compile_cpu.{json,md} there")
    args = parser.parse_args(argv)

    import torch

    from syncbn.cli import _machine

    deadline = time.monotonic() + args.timeout
    with LocalRanks(worker, WORLD_SIZE, args=(free_port(), args), name="syncbn-bench-compile") as ranks:
        results = ranks.wait(deadline)
        ranks.stop(grace=10.0)
    slowest = {
        name: [max(values) for values in zip(*(r["step_s"][name] for r in results), strict=True)] for name in CONTENDERS
    }
    medians = {name: statistics.median(values) * 1e3 for name, values in slowest.items()}
    first = {name: max(r["first_step_s"][name] for r in results) for name in CONTENDERS}
    rows = [
        f"| {name} | {medians[name]:.1f} | {medians[name] / medians['eager']:.2f} | {first[name]:.1f} |"
        for name in CONTENDERS
    ]
    collectives = {
        channels: {
            name: statistics.median(
                max(values) for values in zip(*(r["all_reduce_s"][channels][name] for r in results), strict=True)
            )
            * 1e6
            for name in COLLECTIVES
        }
        for channels in args.channels
    }
    collective_rows = [
        f"| {channels} | {2 * channels + 4} | {row['direct']:.0f} | {row['functional']:.0f} | "
        f"{row['functional'] / row['direct']:.2f} |"
        for channels, row in collectives.items()
    ]
    machine = _machine.describe()
    text = "\n".join(
        [
            "# A training step with SyncBatchNorm on 2 gloo ranks: eager against torch.compile",
            "",
            f"`python bench/bench_compile.py {' '.join(sys.argv[1:] if argv is None else argv)}` (method: the "
            "script's docstring). 6 SyncBatchNorm layers, batch of "
            f"{args.batch} images of 3x32x32 per rank, {args.reps} timed steps per contender after {args.steps}; "
            "medians of the slower rank.",
            "",
            "| contender | step (ms) | / eager | first step, compiling (s) |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "Eager mode's all-reduce of the forward payload (float64, in place with `dist.all_reduce`, as eager "
            "mode calls it) against the functional collective the compiled graphs hold "
            "(`_functional_collectives.all_reduce` and `wait_tensor`), called eagerly, interleaved, "
            f"{args.collective_reps} calls each after {args.steps}; medians of the slower rank:",
            "",
            "| C | values | direct (µs) | functional (µs) | functional / direct |",
            "|---:|---:|---:|---:|---:|",
            *collective_rows,
            "",
            f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores; torch {torch.__version__}; "
            f"{machine['date']}.",
        ]
    )
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "machine": machine,
            "medians_ms": medians,
            "first_step_s": first,
            "all_reduce_medians_us": collectives,
            "parameters": vars(args),
        }
        (args.out_dir / "bench_compile_cpu.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out_dir / "bench_compile_cpu.md").write_text(text + "\n")
        print(f"wrote {args.out_dir / 'bench_compile_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
