"""CPU benchmark of one BatchNorm layer's forward + backward over 2 torch.distributed gloo ranks.

Usage::

    python bench/bench_cpu.py --out-dir bench/results   # the recorded run, `make bench-2ranks` (a few minutes)
    python bench/bench_cpu.py --quick                   # a short smoke run; prints the table, writes nothing

Methodology
-----------
* The script spawns 2 processes (:class:`syncbn.harness.LocalRanks`, "spawn") that
  join a gloo group over TCP on 127.0.0.1, on a free port. Each rank runs
  ``torch.set_num_threads(1)``, so the 2 ranks fill a 2-core machine. The
  whole run has a hard time limit: past it the children are killed and the
  script exits with an error, it never hangs.
* Contenders, timed on the same input per shape:

  - ``local``: ``nn.BatchNorm1d/2d`` in training mode, no synchronisation;
  - ``fairscale``: ``fairscale.experimental.nn.sync_batchnorm.SyncBatchNorm``
    over the default (world) group;
  - ``syncbn``: ``syncbn.SyncBatchNorm`` (``process_group=None``: the default group);
  - ``allreduce_fwd`` / ``allreduce_bwd``: one ``dist.all_reduce`` of the
    payloads that syncbn sends, ``2C + 4`` float64 values forward and ``2C + 1``
    float32 values backward;
  - ``local_2ar`` (diagnostic, no target): the local layer with those two
    all-reduces issued between its forward and backward and after its
    backward, i.e. after computation, as in a real synchronised layer.

  One iteration of a layer is ``bn(x).backward(grad)`` with ``x.grad`` and
  the parameters' gradients reset (untimed) beforehand.
* Before the timing, a sanity check per shape: with inputs whose mean and
  spread differ between the ranks, syncbn's output must equal fairscale's
  within 1e-4 (and its input gradient within 1e-3) and differ clearly from
  the unsynchronised layer's, so that both are known to synchronise. The run
  aborts otherwise.
* Timing is interleaved: each repetition runs every contender once, in an
  order that rotates from one repetition to the next, so that any drift of
  the machine (frequency, noisy neighbours) affects all of them alike. Every
  timed iteration is preceded by a ``dist.barrier()`` (not timed), so that
  both ranks start together, and timed with ``time.perf_counter``. The first
  ``--warmup`` repetitions are discarded.
* A synchronised layer is only done when the slower rank is, so the figure
  that counts is, per iteration, the maximum of the 2 ranks' times (one
  all-reduce with MAX after the loop); the tables report medians of those.
  Rank 0's own medians are kept in the JSON file and the Markdown report.
* ``floor = local + allreduce_fwd + allreduce_bwd`` (medians): the cost of an
  unsynchronised layer plus the two unavoidable reductions. Targets:
  ``syncbn / floor <= 1.25`` and ``syncbn / fairscale <= 0.8``.
  ``syncbn / local_2ar`` is reported too: on a machine where a collective
  costs more after computation than right after a barrier (it waits for the
  peer's communication threads to get a core), it separates syncbn's own
  overhead from that of the collectives.

Results go to ``cpu_gloo_2ranks.json`` (every median and summary
statistic, the parameters and the machine) and ``cpu_gloo_2ranks.md`` in
``--out-dir`` (default: a new temporary directory; the committed ones in
``bench/results/`` change only when it is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from syncbn.harness import LocalRanks, RankChannel, RankError, free_port, gloo_group

WORLD_SIZE = 2
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULT_STEM = "cpu_gloo_2ranks"
REGENERATE_COMMAND = "make bench-2ranks"

DEFAULT_SHAPES = "2x64x56x56,2x256x28x28,2x1024x7x7,8x2048x7x7,64x512"
CONTENDERS = ("local", "fairscale", "syncbn", "allreduce_fwd", "allreduce_bwd", "local_2ar")
LAYER_NAMES = ("local", "fairscale", "syncbn")

OUTPUT_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3
MIN_SYNC_EFFECT = 1e-2  # syncbn's output must differ at least this much from the unsynchronised layer's
FLOOR_TARGET = 1.25
FAIRSCALE_TARGET = 0.8

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Config:
    """What to run, as parsed from the command line."""

    shapes: tuple[Shape, ...]
    memory_formats: tuple[str, ...]
    warmup: int
    reps: int
    seed: int
    timeout_s: float
    out_dir: Path | None


@dataclass(frozen=True)
class Case:
    """One timed configuration: an input shape in a memory format."""

    shape: Shape
    memory_format: str

    @property
    def label(self) -> str:
        return f"({', '.join(map(str, self.shape))}) {self.memory_format}"


@dataclass
class Contender:
    """Something to time: ``run`` is timed, ``reset`` (untimed) runs before it."""

    name: str
    run: Callable[[], None]
    reset: Callable[[], None]


# --------------------------------------------------------------------------- command line


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``"2x64x56x56,64x512"`` -> ``((2, 64, 56, 56), (64, 512))``; only 2D and 4D shapes."""
    shapes = []
    for item in text.split(","):
        shape = tuple(int(size) for size in item.strip().lower().split("x"))
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"expected NxC or NxCxHxW with positive sizes, got {item!r}")
        shapes.append(shape)
    return tuple(shapes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time forward+backward of BatchNorm layers (local, fairscale, syncbn) over 2 gloo ranks on CPU.",
    )
    parser.add_argument(
        "--shapes", type=parse_shapes, default=DEFAULT_SHAPES, help="comma-separated NxC[xHxW] (default: %(default)s)"
    )
    parser.add_argument(
        "--memory-format",
        choices=("contiguous", "channels_last", "both"),
        default="both",
        help="memory format(s) of the 4D inputs; 2D inputs are always contiguous (default: %(default)s)",
    )
    parser.add_argument("--channels-last", action="store_true", help="shorthand for --memory-format channels_last")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed iterations per contender (default: %(default)s)"
    )
    parser.add_argument("--reps", type=int, default=100, help="timed iterations per contender (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and parameters (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="hard limit on the whole run, in seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 warm-up and 10 timed iterations, writes no file"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where to write the results (default: a new temporary directory; none with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    fmt = "channels_last" if args.channels_last else args.memory_format
    formats = ("contiguous", "channels_last") if fmt == "both" else (fmt,)
    warmup, reps = (2, 10) if args.quick else (args.warmup, args.reps)
    out_dir = args.out_dir
    if out_dir is None and not args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="syncbn-bench-cpu-"))
    if args.no_write:
        out_dir = None
    if warmup < 0 or reps < 1:
        raise SystemExit("--warmup must be >= 0 and --reps >= 1")
    return Config(args.shapes, formats, warmup, reps, args.seed, args.timeout, out_dir)


def cases_of(config: Config) -> list[Case]:
    """Every shape in every requested memory format; 2D shapes once, contiguous."""
    cases = []
    for shape in config.shapes:
        formats = config.memory_formats if len(shape) == 4 else ("contiguous",)
        cases.extend(Case(shape, fmt) for fmt in formats)
    return cases


# --------------------------------------------------------------------------- layers and inputs


def import_fairscale_syncbn() -> type[nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairscale's import warns about deprecated torch APIs
        from fairscale.experimental.nn.sync_batchnorm import SyncBatchNorm

    return SyncBatchNorm  # type: ignore[no-any-return]


def make_layers(num_channels: int, ndim: int, seed: int) -> dict[str, nn.Module]:
    """The three layers, in training mode, with the same (random, rank-independent) weight and bias."""
    import syncbn

    local_cls = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d
    fairscale_cls = import_fairscale_syncbn()
    layers = {
        "local": local_cls(num_channels),
        "fairscale": fairscale_cls(num_channels, process_group=dist.group.WORLD),
        "syncbn": syncbn.SyncBatchNorm(num_channels),
    }
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(num_channels, generator=generator) + 0.5
    bias = torch.randn(num_channels, generator=generator)
    for layer in layers.values():
        layer.train()
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layers


def make_inputs(case: Case, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input (a leaf that requires grad) and output gradient, in the case's memory format.

    The ranks' inputs differ in mean and spread, so that a layer that does not
    synchronise gives visibly different results from one that does.
    """
    generator = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    x = torch.randn(case.shape, generator=generator) * (1.0 + 0.5 * rank) + rank
    grad = torch.randn(case.shape, generator=generator)
    if case.memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), grad


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of one training step, on a fresh copy of ``x``."""
    leaf = x.detach().clone().requires_grad_()
    output = layer(leaf)
    output.backward(grad)
    assert leaf.grad is not None
    return output.detach(), leaf.grad


# --------------------------------------------------------------------------- sanity check


def check_agreement(layers: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Compare syncbn with fairscale and with the local layer; raise on every rank together if they disagree."""
    results = {name: forward_backward(layer, x, grad) for name, layer in layers.items()}
    (y_ours, dx_ours), (y_fs, dx_fs), (y_local, _) = results["syncbn"], results["fairscale"], results["local"]
    diffs = torch.tensor(
        [
            (y_ours - y_fs).abs().max().item(),
            (dx_ours - dx_fs).abs().max().item(),
            -(y_ours - y_local).abs().max().item(),  # negated: the MAX below keeps the smallest effect
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    report = {
        "max_abs_diff_output_vs_fairscale": diffs[0].item(),
        "max_abs_diff_grad_input_vs_fairscale": diffs[1].item(),
        "min_over_ranks_max_abs_diff_output_vs_local": -diffs[2].item(),
    }
    ok = (
        report["max_abs_diff_output_vs_fairscale"] <= OUTPUT_TOLERANCE
        and report["max_abs_diff_grad_input_vs_fairscale"] <= GRAD_TOLERANCE
        and report["min_over_ranks_max_abs_diff_output_vs_local"] >= MIN_SYNC_EFFECT
    )
    if not ok:
        raise RuntimeError(f"sanity check failed for input shape {tuple(x.shape)}: {report}")
    return report


# --------------------------------------------------------------------------- timing


def _noop() -> None:
    return None


def grad_resetter(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A function that clears the gradients of ``x`` and of ``layer``'s parameters."""

    def reset() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return reset


def layer_contender(name: str, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Contender:
    def run() -> None:
        layer(x).backward(grad)

    return Contender(name, run, grad_resetter(layer, x))


def allreduce_contender(name: str, numel: int, dtype: torch.dtype) -> Contender:
    payload = torch.zeros(numel, dtype=dtype)  # zeros stay zeros: no overflow over many reductions

    def run() -> None:
        dist.all_reduce(payload)

    return Contender(name, run, _noop)


def local_2ar_contender(name: str, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Contender:
    """Diagnostic: the local layer with syncbn's two all-reduces in between its steps.

    ``y = bn(x)``, all-reduce of the forward payload, ``y.backward(grad)``,
    all-reduce of the backward payload: what a synchronised layer with no
    overhead of its own would cost, with the collectives issued after
    computation as they are in a real layer (unlike ``allreduce_fwd/bwd``,
    which are issued right after a barrier).
    """
    num_channels = x.shape[1]
    forward_payload = torch.zeros(2 * num_channels + 4, dtype=torch.float64)
    backward_payload = torch.zeros(2 * num_channels + 1, dtype=torch.float32)

    def run() -> None:
        output = layer(x)
        dist.all_reduce(forward_payload)
        output.backward(grad)
        dist.all_reduce(backward_payload)

    return Contender(name, run, grad_resetter(layer, x))


def make_contenders(layers: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor) -> list[Contender]:
    num_channels = x.shape[1]
    contenders = [layer_contender(name, layers[name], x, grad) for name in LAYER_NAMES]
    contenders.append(allreduce_contender("allreduce_fwd", 2 * num_channels + 4, torch.float64))
    contenders.append(allreduce_contender("allreduce_bwd", 2 * num_channels + 1, torch.float32))
    contenders.append(local_2ar_contender("local_2ar", layers["local"], x, grad))
    assert tuple(c.name for c in contenders) == CONTENDERS
    return contenders


def time_one(contender: Contender) -> float:
    contender.reset()
    dist.barrier()
    start = time.perf_counter()
    contender.run()
    return time.perf_counter() - start


def time_interleaved(contenders: Sequence[Contender], warmup: int, reps: int) -> torch.Tensor:
    """Seconds per timed iteration, shape ``(len(contenders), reps)``; the order rotates every repetition."""
    count = len(contenders)
    times = torch.zeros(count, reps, dtype=torch.float64)
    for rep in range(warmup + reps):
        for offset in range(count):
            index = (rep + offset) % count
            elapsed = time_one(contenders[index])
            if rep >= warmup:
                times[index, rep - warmup] = elapsed
    return times


def by_contender_us(times: torch.Tensor) -> dict[str, list[float]]:
    """``(contenders, reps)`` seconds -> ``{contender: [microseconds, ...]}``."""
    return {
        name: [round(value * 1e6, 2) for value in row.tolist()] for name, row in zip(CONTENDERS, times, strict=True)
    }


def bench_case(case: Case, config: Config, rank: int) -> dict[str, Any]:
    """Sanity-check then time every contender on one case; raw times in microseconds."""
    layers = make_layers(case.shape[1], len(case.shape), config.seed)
    x, grad = make_inputs(case, rank, config.seed)
    check = check_agreement(layers, x, grad)
    times = time_interleaved(make_contenders(layers, x, grad), config.warmup, config.reps)
    slowest = times.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {
        "shape": list(case.shape),
        "memory_format": case.memory_format,
        "check": check,
        "raw_us": {"rank0": by_contender_us(times), "max_over_ranks": by_contender_us(slowest)},
    }


# --------------------------------------------------------------------------- processes


def worker(rank: int, world_size: int, channel: RankChannel, port: int, config: Config) -> dict[str, Any] | None:
    """One rank (run by :class:`syncbn.harness.LocalRanks`): join the gloo group, run every case.

    Returns rank 0's results (None on the other rank).
    """
    # fairscale calls a deprecated torch API in every backward
    warnings.filterwarnings("ignore", message="non-inplace resize_as is deprecated", category=UserWarning)
    with gloo_group(rank, world_size, datetime.timedelta(seconds=config.timeout_s), port=port):
        source = describe_syncbn()  # of the code imported now, which is the code timed
        cases = cases_of(config)
        measured = []
        for number, case in enumerate(cases, 1):
            started = time.perf_counter()
            measured.append(bench_case(case, config, rank))
            if rank == 0:
                print(f"[{number}/{len(cases)}] {case.label}: {time.perf_counter() - started:.1f} s", flush=True)
        dist.barrier()
        return {"cases": measured, "syncbn": source} if rank == 0 else None


def run_ranks(config: Config) -> dict[str, Any]:
    """Spawn the ranks, return rank 0's results; the children never outlive this call."""
    deadline = time.monotonic() + config.timeout_s
    with LocalRanks(worker, WORLD_SIZE, args=(free_port(), config), name="syncbn-bench-cpu") as ranks:
        measured = ranks.wait(deadline)[0]
        ranks.stop(grace=max(1.0, min(10.0, deadline - time.monotonic())))
    return dict(measured)


# --------------------------------------------------------------------------- analysis


def summarize(values_us: Sequence[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values_us, n=4) if len(values_us) > 1 else [values_us[0]] * 3
    return {
        "median": statistics.median(values_us),
        "p25": quartiles[0],
        "p75": quartiles[2],
        "min": min(values_us),
        "mean": statistics.fmean(values_us),
    }


def medians(raw_us: dict[str, list[float]]) -> dict[str, float]:
    """Median per contender, plus ``floor``."""
    result = {name: statistics.median(raw_us[name]) for name in CONTENDERS}
    result["floor"] = result["local"] + result["allreduce_fwd"] + result["allreduce_bwd"]
    return result


def ratios(meds: dict[str, float]) -> dict[str, float]:
    """syncbn against the floor and fairscale (the targets) and against ``local_2ar`` (diagnostic)."""
    return {
        "syncbn_over_floor": meds["syncbn"] / meds["floor"],
        "syncbn_over_fairscale": meds["syncbn"] / meds["fairscale"],
        "syncbn_over_local_2ar": meds["syncbn"] / meds["local_2ar"],
    }


def analyse(case: dict[str, Any]) -> dict[str, Any]:
    """Add summaries, medians, ratios and PASS/MISS (on the slower rank's medians) to one case's raw results."""
    stats = {view: {name: summarize(raw[name]) for name in CONTENDERS} for view, raw in case["raw_us"].items()}
    meds = {view: medians(raw) for view, raw in case["raw_us"].items()}
    main = ratios(meds["max_over_ranks"])
    return {
        **case,
        "summary_us": stats,
        "median_us": meds,
        "ratios": {view: ratios(view_meds) for view, view_meds in meds.items()},
        "targets": {
            "syncbn_over_floor": {"target": FLOOR_TARGET, "pass": main["syncbn_over_floor"] <= FLOOR_TARGET},
            "syncbn_over_fairscale": {
                "target": FAIRSCALE_TARGET,
                "pass": main["syncbn_over_fairscale"] <= FAIRSCALE_TARGET,
            },
        },
    }


# --------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_output(*args: str) -> str | None:
    """stdout of a read-only git command in the repository, or None if it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout


def describe_syncbn() -> dict[str, Any]:
    """Where the imported syncbn comes from, and whether its files are those of the checkout's HEAD commit."""
    import syncbn

    package = Path(syncbn.__file__).resolve().parent
    commit = (git_output("rev-parse", "HEAD") or "unknown").strip()
    changed = [
        str(path.relative_to(package.parent))
        for path in sorted(package.rglob("*.py"))
        if git_output("show", f"HEAD:{path.relative_to(package.parent).as_posix()}") != path.read_text()
    ]
    return {
        "version": syncbn.__version__,
        "path": str(package),
        "head_commit": commit,
        "files_differing_from_head": changed,
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fairscale": package_version("fairscale"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parameters(config: Config) -> dict[str, Any]:
    return {
        "world_size": WORLD_SIZE,
        "backend": "gloo",
        "threads_per_rank": 1,
        "shapes": [list(shape) for shape in config.shapes],
        "memory_formats": list(config.memory_formats),
        "warmup": config.warmup,
        "reps": config.reps,
        "seed": config.seed,
        "contenders": list(CONTENDERS),
        "floor": "local + allreduce_fwd + allreduce_bwd (medians)",
        "targets": {"syncbn_over_floor": f"<= {FLOOR_TARGET}", "syncbn_over_fairscale": f"<= {FAIRSCALE_TARGET}"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


# (column title, key in the medians) of the timing columns of the tables
MEDIAN_COLUMNS = (
    ("local", "local"),
    ("fairscale", "fairscale"),
    ("syncbn", "syncbn"),
    ("ar_fwd", "allreduce_fwd"),
    ("ar_bwd", "allreduce_bwd"),
    ("floor", "floor"),
    ("local+2ar", "local_2ar"),
)
TABLE_HEADER = (
    "shape",
    "format",
    *(title for title, _ in MEDIAN_COLUMNS),
    "syncbn/floor",
    f"≤{FLOOR_TARGET}",
    "syncbn/fairscale",
    f"≤{FAIRSCALE_TARGET}",
    "syncbn/(local+2ar)",
)


def table_rows(cases: Sequence[dict[str, Any]], view: str) -> list[list[str]]:
    """One row per case: medians in microseconds of ``view`` ("max_over_ranks" or "rank0"), ratios, verdicts."""
    rows = []
    for case in cases:
        meds, ratio = case["median_us"][view], case["ratios"][view]
        rows.append(
            [
                "x".join(map(str, case["shape"])),
                case["memory_format"],
                *(f"{meds[key]:.0f}" for _, key in MEDIAN_COLUMNS),
                f"{ratio['syncbn_over_floor']:.2f}",
                verdict(ratio["syncbn_over_floor"] <= FLOOR_TARGET),
                f"{ratio['syncbn_over_fairscale']:.2f}",
                verdict(ratio["syncbn_over_fairscale"] <= FAIRSCALE_TARGET),
                f"{ratio['syncbn_over_local_2ar']:.2f}",
            ]
        )
    return rows


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in [TABLE_HEADER, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] * 2 + ["---:"] * (len(TABLE_HEADER) - 2)
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def syncbn_line(source: dict[str, Any]) -> str:
    """``syncbn 0.1.0 from <path>, commit <sha>`` and the files that differ from that commit, if any."""
    changed = source["files_differing_from_head"]
    state = f"with uncommitted changes in {', '.join(changed)}" if changed else "unmodified"
    return f"syncbn {source['version']} from {source['path']}, commit {source['head_commit'][:12]} {state}"


def markdown_report(report: dict[str, Any]) -> str:
    env, params, cases = report["machine"], report["parameters"], report["cases"]
    checks = [
        f"| {'x'.join(map(str, c['shape']))} | {c['memory_format']} "
        f"| {c['check']['max_abs_diff_output_vs_fairscale']:.2e} "
        f"| {c['check']['max_abs_diff_grad_input_vs_fairscale']:.2e} "
        f"| {c['check']['min_over_ranks_max_abs_diff_output_vs_local']:.2e} |"
        for c in cases
    ]
    return "\n".join(
        [
            "# syncbn CPU benchmark: 2 gloo ranks, one BatchNorm layer, forward + backward",
            "",
            f"Regenerate with `{REGENERATE_COMMAND}` (runs `python bench/bench_cpu.py`; method in its docstring).",
            "",
            f"Machine: {env['cpu_model']}, {env['cpu_count']} CPUs, {env['platform']}; "
            f"Python {env['python']}, torch {env['torch']}, fairscale {env['fairscale']}; {env['date']}.",
            "",
            f"Timed: {syncbn_line(report['syncbn'])}.",
            "",
            "Load average (1, 5, 15 min) before the run: {}, after: {} (other jobs make the figures noisy).".format(
                *(", ".join(f"{v:.2f}" for v in report["load_average_1_5_15min"][k]) for k in ("before", "after"))
            ),
            "",
            f"{params['world_size']} ranks over gloo (127.0.0.1), {params['threads_per_rank']} thread per rank; "
            f"{params['warmup']} warm-up and {params['reps']} timed iterations per contender, interleaved "
            "in a rotating order, each after a `dist.barrier()`.",
            "",
            "## Medians of the slower rank per iteration (µs) — the figures the targets apply to",
            "",
            "`floor = local + ar_fwd + ar_bwd`; `ar_fwd`/`ar_bwd`: one all-reduce of syncbn's forward "
            "(2C+4 float64) and backward (2C+1 float32) payload, each timed alone right after a barrier. "
            "`local+2ar` (diagnostic, no target): the local layer with those two all-reduces issued after its "
            "forward and after its backward, in one timed iteration.",
            "",
            markdown_table(table_rows(cases, "max_over_ranks")),
            "",
            "## Medians of rank 0's own times (µs)",
            "",
            markdown_table(table_rows(cases, "rank0")),
            "",
            "## Sanity check (before timing): syncbn against fairscale and the unsynchronised layer",
            "",
            "| shape | format | max abs diff output | max abs diff input grad | output vs local (min over ranks) |",
            "|---|---|---:|---:|---:|",
            *checks,
            "",
        ]
    )


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{RESULT_STEM}.json", out_dir / f"{RESULT_STEM}.md"
    # Per-iteration times stay out of the committed file (hundreds of KB per run); summaries stay in.
    kept = {**report, "cases": [{k: v for k, v in case.items() if k != "raw_us"} for case in report["cases"]]}
    json_path.write_text(json.dumps(kept, indent=1) + "\n")
    md_path.write_text(markdown_report(report))
    return [json_path, md_path]


def print_tables(cases: Sequence[dict[str, Any]]) -> None:
    print("\nMedians in µs of the slower rank per iteration (syncbn/floor target ≤ 1.25, syncbn/fairscale ≤ 0.8):")
    print(text_table(table_rows(cases, "max_over_ranks")))
    print("\nMedians in µs of rank 0's own times:")
    print(text_table(table_rows(cases, "rank0")))


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    started = time.perf_counter()
    load_before = os.getloadavg()  # other jobs on the machine make the figures noisy: keep a trace of them
    try:
        measured = run_ranks(config)
    except RankError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    cases = [analyse(case) for case in measured["cases"]]
    print_tables(cases)
    print(f"\nsyncbn timed: {syncbn_line(measured['syncbn'])}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    if config.out_dir is not None:
        report = {
            "machine": machine(),
            "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
            "syncbn": measured["syncbn"],
            "parameters": parameters(config),
            "cases": cases,
        }
        for path in write_reports(report, config.out_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
