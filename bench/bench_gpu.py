"""GPU benchmark of one BatchNorm layer's forward + backward on ResNet-50's BatchNorm shapes.

Usage::

    python bench/bench_gpu.py --out-dir DIR          # on a GPU machine (make gpu-check runs it)
    python bench/bench_gpu.py --dry-run              # anywhere: the plan, stopping before the first CUDA call

Methodology
-----------
* One process, one GPU. Shapes: every BatchNorm shape of ResNet-50 (12 channel
  x size pairs) at 2, 8 and 32 images per GPU, NCHW and ``channels_last``,
  float32 and bfloat16.
* Contenders, each ``y = layer(x); y.backward(dy)`` in training mode:

  - ``syncbn_cupy``: :class:`syncbn.SyncBatchNorm` on syncbn's CuPy kernels, world size 1 (no collective);
  - ``syncbn_torch``: the same layer on the generic torch implementation;
  - ``syncbn_cupy_nccl``: syncbn's kernels with one NCCL all-reduce each way (a one-rank NCCL group,
    the collective forced: it stands for a second rank by doubling the sums), and its one host read;
  - ``torch_syncbn``: torch's SyncBatchNorm kernels (``torch.nn.modules._functions.SyncBatchNorm``
    with the one-rank NCCL group: an all-gather forward and an all-reduce backward; the module
    itself falls back to cuDNN at world size 1);
  - ``cudnn``: ``nn.BatchNorm2d`` (cuDNN, no synchronisation).

  ``floor``: the bytes of 3 + 5 passes over the tensor at the device-to-device copy bandwidth
  measured at the start (``y.copy_(x)`` over 1 GiB).
* Timing: CUDA events around each call, contenders interleaved in a rotating
  order within every repetition, medians after a warm-up; every call takes
  the next of enough input pairs to hold 4 times the L2 cache, so that no
  call reads a warm cache. Host time per call: ``time.perf_counter``
  around the Python call: launches only for the layers that make no host read
  (``syncbn_cupy``, ``syncbn_torch``, ``cudnn``); ``torch_syncbn`` and
  ``syncbn_cupy_nccl`` read from the device, so theirs includes waiting for it.
* Results: ``bench_gpu.json`` (every median, the device, driver and
  versions) and ``bench_gpu.md`` in ``--out-dir`` (default: a new temporary
  directory), rewritten after every configuration, so that a run cut short
  (``--time-limit``, an error, the caller's timeout) still leaves what it
  measured; the report says when it is incomplete, and why.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import syncbn  # noqa: E402
from syncbn.comm.base import Communicator  # noqa: E402

#: ResNet-50's BatchNorm layers: (channels, height = width).
RESNET50_SHAPES = [
    (64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28),
    (256, 28), (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7),
]  # fmt: skip
BATCHES = (2, 8, 32)
FORMATS = ("nchw", "channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONTENDERS = ("syncbn_cupy", "syncbn_torch", "syncbn_cupy_nccl", "torch_syncbn", "cudnn")
PASSES = 3 + 5


def plan(batches: tuple[int, ...], shapes: list[tuple[int, int]], quick: bool) -> list[dict[str, Any]]:
    """Every configuration to time, in order."""
    configurations = []
    for n in batches:
        for channels, size in shapes[:3] if quick else shapes:
            for memory_format in FORMATS:
                for dtype in DTYPES:
                    configurations.append({"shape": (n, channels, size, size), "format": memory_format, "dtype": dtype})
    return configurations


class _Doubled(Communicator):
    """A one-rank group standing for two identical ranks: its real all-reduce, then the sum doubled."""

    name = "nccl"
    world_size = 2
    rank = 0

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.inner.all_reduce(tensor)
        tensor.mul_(2)


def _layers(channels: int, group: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

    cuda = torch.device("cuda")
    ours = syncbn.SyncBatchNorm(channels).to(cuda)
    forced = syncbn.SyncBatchNorm(channels, process_group=_Doubled(syncbn.get_communicator(group))).to(cuda)
    reference = torch.nn.BatchNorm2d(channels).to(cuda)
    theirs = torch.nn.BatchNorm2d(channels).to(cuda)

    def with_ops(name: str, layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with syncbn.ops.using(name):
                return layer(x)  # type: ignore[no-any-return]

        return run

    def torch_kernels(x: torch.Tensor) -> torch.Tensor:
        return TorchSyncBatchNormFunction.apply(  # type: ignore[no-any-return]
            x, theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var, theirs.eps, theirs.momentum,
            group, 1,
        )  # fmt: skip

    return {
        "syncbn_cupy": with_ops("cupy", ours),
        "syncbn_torch": with_ops("torch", ours),
        "syncbn_cupy_nccl": with_ops("cupy", forced),
        "torch_syncbn": torch_kernels,
        "cudnn": reference,
    }


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write) over 1 GiB, median of 10."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * x.element_size() / statistics.median(times[3:])


def time_configuration(
    configuration: dict[str, Any], layers: dict[str, Callable[[torch.Tensor], torch.Tensor]], warmup: int, reps: int
) -> dict[str, Any]:
    shape, dtype = configuration["shape"], DTYPES[configuration["dtype"]]
    memory_format = torch.channels_last if configuration["format"] == "channels_last" else torch.contiguous_format
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    element = torch.finfo(dtype).bits // 8
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20)
    # Every call reads the next (x, dy) pair: enough pairs that all of them together hold 4 times the L2
    # cache, so that no call finds its input there; at most 4 GiB.
    per_copy = 2 * numel * element
    copies = max(2, min(-(-4 * l2 // per_copy) + 1, (4 << 30) // per_copy))

    def draw() -> torch.Tensor:
        return torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=memory_format)

    inputs = [draw() for _ in range(copies)]
    grads = [draw() for _ in range(copies)]
    device_times: dict[str, list[float]] = {name: [] for name in layers}
    host_times: dict[str, list[float]] = {name: [] for name in layers}
    names = list(layers)
    call = 0
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            x = inputs[call % copies].detach().requires_grad_()
            dy = grads[call % copies]
            call += 1
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            began = time.perf_counter()
            layers[name](x).backward(dy)
            host = time.perf_counter() - began
            end.record()
            end.synchronize()
            if rep >= warmup:
                device_times[name].append(start.elapsed_time(end) * 1e3)  # microseconds
                host_times[name].append(host * 1e6)
    return {
        "device_us": {name: statistics.median(values) for name, values in device_times.items()},
        "host_us": {name: statistics.median(values) for name, values in host_times.items()},
        "bytes_per_pass": numel * element,
        "input_copies": copies,
    }


def _versions() -> dict[str, Any]:
    import cupy

    properties = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm": f"sm_{properties.major}{properties.minor}",
        "sms": properties.multi_processor_count,
        "driver": cupy.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),  # type: ignore[no-untyped-call]
        "cupy": cupy.__version__,
        "python": platform.python_version(),
        "syncbn": syncbn.__version__,
    }


def run_configurations(
    configurations: list[dict[str, Any]],
    time_one: Callable[[dict[str, Any]], dict[str, Any]],
    time_limit: float | None,
    on_result: Callable[[list[dict[str, Any]], str | None], None],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[dict[str, Any]], str | None]:
    """Time the configurations in order; ``(results, why it stopped early or None)``.

    No configuration starts once ``time_limit`` seconds have passed, and the first error stops the run
    (a CUDA error leaves the context unusable); ``on_result`` gets what there is after each one, and at the end.
    """
    began = clock()
    results: list[dict[str, Any]] = []
    stopped: str | None = None
    for index, configuration in enumerate(configurations):
        if time_limit is not None and clock() - began > time_limit:
            stopped = f"time limit of {time_limit:g} s reached after {index} of {len(configurations)} configurations"
            break
        try:
            timed = time_one(configuration)
        except Exception as error:  # reported, with what was measured before it
            stopped = f"{configuration}: {type(error).__name__}: {error}"
            break
        results.append({**configuration, **timed})
        print(configuration, {k: round(v, 1) for k, v in timed["device_us"].items()}, flush=True)
        on_result(results, None)
    on_result(results, stopped)
    return results, stopped


#: The contenders that make no host read: their host time is the launches alone.
NO_HOST_READ = ("syncbn_cupy", "syncbn_torch", "cudnn")


def _host_bound(row: dict[str, Any], name: str) -> bool:
    """Whether the launches, not the kernels, set this contender's device time (the GPU waited for the host)."""
    return name in NO_HOST_READ and row["host_us"][name] >= 0.9 * row["device_us"][name]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# GPU benchmark: one BatchNorm layer, forward + backward",
        "",
        *([f"**Incomplete: {report['stopped']}.**", ""] if report.get("stopped") else []),
        f"Device: {report['versions']['device']} ({report['versions']['sm']}), torch {report['versions']['torch']}, "
        f"CuPy {report['versions']['cupy']}, NCCL {report['versions']['nccl']}. Copy bandwidth "
        f"{report['copy_bandwidth'] / 1e12:.2f} TB/s. Medians of {report['reps']} interleaved repetitions, "
        "CUDA events, inputs rotated beyond the L2 cache. Times in microseconds. A * marks a device time "
        "that the host bounds: that contender's host time per call is at least 90 % of it (the GPU waited for "
        "the launches), so it is launch overhead more than kernel time.",
        "",
        "| shape | format | dtype | " + " | ".join(CONTENDERS) + " | floor | cupy / cudnn | cupy_nccl / torch_syncbn | "
        "cupy / floor | host us: syncbn_cupy / torch_syncbn (which syncs) |",
        "|" + "---|" * (len(CONTENDERS) + 8),
    ]
    for row in report["results"]:
        device = row["device_us"]
        floor = PASSES * row["bytes_per_pass"] / report["copy_bandwidth"] * 1e6
        cells = [f"{device[name]:.1f}{'*' if _host_bound(row, name) else ''}" for name in CONTENDERS]
        lines.append(
            f"| {tuple(row['shape'])} | {row['format']} | {row['dtype']} | " + " | ".join(cells)
            + f" | {floor:.1f} | {device['syncbn_cupy'] / device['cudnn']:.2f} | "
            f"{device['syncbn_cupy_nccl'] / device['torch_syncbn']:.2f} | {device['syncbn_cupy'] / floor:.2f} | "
            f"{row['host_us']['syncbn_cupy']:.0f} / {row['host_us']['torch_syncbn']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, help="where bench_gpu.{json,md} go (default: a new temporary dir)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="3 shapes per batch size, for a smoke run")
    parser.add_argument("--time-limit", type=float, help="start no configuration after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop before any CUDA call")
    args = parser.parse_args(argv)
    configurations = plan(BATCHES, RESNET50_SHAPES, args.quick)
    if args.dry_run:
        print(f"{len(configurations)} configurations x {len(CONTENDERS)} contenders x {args.warmup}+{args.reps} reps")
        for configuration in configurations[:3]:
            print(" ", configuration)
        return 0
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="syncbn-bench-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from syncbn.harness import free_port

    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
        timeout=timedelta(seconds=120), device_id=torch.device("cuda", 0),
    )  # fmt: skip
    try:
        versions, bandwidth = _versions(), copy_bandwidth()
        layers_by_channels: dict[int, dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}

        def time_one(configuration: dict[str, Any]) -> dict[str, Any]:
            channels = configuration["shape"][1]
            if channels not in layers_by_channels:
                layers_by_channels[channels] = _layers(channels, dist.group.WORLD)
            return time_configuration(configuration, layers_by_channels[channels], args.warmup, args.reps)

        def write(results: list[dict[str, Any]], stopped: str | None) -> None:
            report = {
                "versions": versions, "copy_bandwidth": bandwidth, "warmup": args.warmup, "reps": args.reps,
                "configurations": len(configurations), "stopped": stopped, "results": results,
            }  # fmt: skip
            (out_dir / "bench_gpu.json").write_text(json.dumps(report, indent=1, default=str))
            (out_dir / "bench_gpu.md").write_text(markdown(report))

        results, stopped = run_configurations(configurations, time_one, args.time_limit, write)
    finally:
        dist.destroy_process_group()
    print(f"wrote {out_dir / 'bench_gpu.json'}, {out_dir / 'bench_gpu.md'} ({len(results)} configurations)")
    if stopped:
        print(f"bench_gpu: stopped early: {stopped}", file=sys.stderr)
    return 0 if stopped is None else 3 if stopped.startswith("time limit") else 1


if __name__ == "__main__":
    sys.exit(main())
