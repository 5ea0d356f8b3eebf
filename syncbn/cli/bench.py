"""``syncbn bench``: one BatchNorm layer's forward + backward over world sizes, with tables, JSON and plots.

Usage::

    syncbn bench --output-dir bench/results     # the recorded run (a few minutes), what `make bench` runs
    syncbn bench --world-sizes 1,2 --shapes 2x64x56x56,2x256x14x14
    syncbn bench --quick                        # a smoke run in well under a minute
    syncbn bench --project --from-json bench/results/syncbn_bench_cpu.json --docs-dir docs   # the projection

Results go where ``--output-dir`` (``--docs-dir`` for ``--project``) says,
and only there: without it, to a new temporary directory (printed at the
end), so that no run, and no smoke run, overwrites results it was not asked to.

What it does, per world size: spawns that many processes on this machine,
joined in a torch.distributed gloo group over 127.0.0.1 (one thread each:
ranks beyond the number of cores share them), and times, per input shape:

* ``syncbn``: :class:`syncbn.SyncBatchNorm` over the default group;
* ``local``: ``nn.BatchNorm2d``, no synchronisation;
* ``fairscale``: fairscale's ``SyncBatchNorm`` (two all-reduces forward, one backward);
* ``syncbn_phases``: the same ``syncbn.ops`` and ``all_reduce`` calls as
  syncbn's autograd function, with a clock read between them: the phase
  breakdown (local statistics, collective, elementwise), taken in the
  benchmark so that the library's hot path carries no timer;
* ``torch.nn.SyncBatchNorm`` is tried once and reported as not applicable:
  it refuses CPU tensors.

Before timing, per shape, syncbn's output and input gradient are checked
against fairscale's and the phase replica's, and (beyond one rank) against
the unsynchronised layer's, which must differ. Then the contenders run
interleaved (rotating order, an untimed barrier before each iteration).
The figure reported for an iteration is the slowest rank's time: a
synchronised layer is done when its slowest rank is. Tables show medians.

After the layers, the same processes time ``all_reduce`` and
``all_gather`` of several sizes; an alpha-beta model is fitted to them
(:mod:`syncbn.cli.scaling`), which ``--project`` then carries to large GPU
clusters with published NCCL figures.

At one rank nothing is communicated, and on CPU the whole call runs on the
host: those times are the layer's host time per call, which the report
shows against ``nn.BatchNorm2d``'s (``host_time``; the goal is at most 1.25
times). The host time on CUDA, against ``torch.nn.SyncBatchNorm``'s, is
measured by ``bench/bench_gpu.py`` (``make gpu-check``).

Every run has a hard time limit (``--timeout``); past it the ranks are
killed and the command fails. This command times CPU tensors; GPUs are
timed by ``bench/bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncbn.cli import _extras, _machine
from syncbn.harness import LocalRanks, RankError, RanksTimeoutError, free_port

Shape = tuple[int, ...]

DEFAULT_SHAPES = "2x64x56x56,2x128x28x28,2x256x14x14,2x512x7x7,2x2048x7x7"
DEFAULT_WORLD_SIZES = "1,2,4,8"
#: float32 elements per rank of the collective sweep: 1 KiB to 2 MiB
DEFAULT_COLLECTIVE_SIZES = "256,2048,16384,131072,524288"
QUICK = {
    "shapes": "2x8x8x8,2x32x4x4",
    "world_sizes": "1,2",
    "warmup": 2,
    "reps": 8,
    "collective_sizes": "256,4096,65536",
    "collective_warmup": 1,
    "collective_reps": 8,
}
STEM = "syncbn_bench_cpu"


@dataclass(frozen=True)
class Config:
    """What to run, from the command line."""

    world_sizes: tuple[int, ...]
    plan: Any  # _bench_rank.Plan (imported with torch, after the argument checks)
    timeout_s: float
    output_dir: Path | None  # None: a new temporary directory
    stem: str
    quick: bool
    progress: bool


# --------------------------------------------------------------------------- command line


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``"2x64x56x56,64x512"`` -> ``((2, 64, 56, 56), (64, 512))``: 2D to 5D, at least 2 values per channel."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(size) for size in item.strip().lower().split("x"))
        except ValueError:
            shape = ()
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"expected NxC[xHxW] with 2 to 5 positive sizes, got {item!r}")
        if shape[0] * _product(shape[2:]) < 2:
            raise argparse.ArgumentTypeError(f"{item!r} has 1 value per channel: a layer in training needs 2 or more")
        shapes.append(shape)
    return tuple(shapes)


def _product(values: Sequence[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def parse_positive_ints(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; each at least 1."""
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``syncbn bench``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "Method: see the docstring of syncbn/cli/bench.py; figures of a full run: bench/results/."
    parser.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help="comma-separated input shapes NxC[xHxW] (default: %(default)s)"
    )
    parser.add_argument(
        "--world-sizes", default=DEFAULT_WORLD_SIZES, help="comma-separated numbers of ranks (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per shape (default: %(default)s)")
    parser.add_argument(
        "--reps", type=int, default=30, help="timed repetitions per shape and contender (default: %(default)s)"
    )
    parser.add_argument(
        "--collective-sizes",
        default=DEFAULT_COLLECTIVE_SIZES,
        help="float32 elements per rank of the all-reduce/all-gather sweep (default: %(default)s)",
    )
    parser.add_argument(
        "--collective-warmup", type=int, default=2, help="untimed repetitions of that sweep (default: %(default)s)"
    )
    parser.add_argument(
        "--collective-reps", type=int, default=20, help="timed repetitions of that sweep (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and parameters (default: %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="hard limit on the whole run in seconds; past it the ranks are killed (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny shapes, world sizes 1,2, few iterations (overrides the options above)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where results go (default: a new temporary directory; `make bench` writes bench/results/)",
    )
    parser.add_argument("--stem", default=STEM, help="file name stem of the results (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--project",
        action="store_true",
        help="time nothing: write the scaling projection (scaling.md, scaling.png) into --docs-dir from the "
        "measured JSON",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="with --project: the JSON of a run to read (default: OUTPUT_DIR/STEM.json, with --output-dir)",
    )
    parser.add_argument(
        "--docs-dir",
        type=Path,
        default=None,
        help="with --project: where to write (default: a new temporary directory; `make bench` writes docs/)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the options (``argparse.ArgumentTypeError`` says what is wrong) and build the plan."""
    from syncbn.cli._bench_rank import Plan

    values = {
        "shapes": args.shapes,
        "world_sizes": args.world_sizes,
        "warmup": args.warmup,
        "reps": args.reps,
        "collective_sizes": args.collective_sizes,
        "collective_warmup": args.collective_warmup,
        "collective_reps": args.collective_reps,
    }
    if args.quick:
        values.update(QUICK)
    if values["warmup"] < 0 or values["collective_warmup"] < 0:
        raise argparse.ArgumentTypeError("--warmup and --collective-warmup must be 0 or more")
    if values["reps"] < 1 or values["collective_reps"] < 1:
        raise argparse.ArgumentTypeError("--reps and --collective-reps must be 1 or more")
    if args.timeout <= 0:
        raise argparse.ArgumentTypeError(f"--timeout must be positive, got {args.timeout}")
    plan = Plan(
        shapes=parse_shapes(values["shapes"]),
        warmup=values["warmup"],
        reps=values["reps"],
        collective_numels=parse_positive_ints(values["collective_sizes"]),
        collective_warmup=values["collective_warmup"],
        collective_reps=values["collective_reps"],
        seed=args.seed,
        collective_timeout_s=min(args.timeout, 120.0),
    )
    return Config(
        world_sizes=parse_positive_ints(values["world_sizes"]),
        plan=plan,
        timeout_s=args.timeout,
        output_dir=args.output_dir,
        stem=args.stem,
        quick=args.quick,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or, with ``--project``, the projection); 0 on success, 1 on a failed run."""
    if args.project:
        from syncbn.cli.scaling import write_projection

        if args.from_json is None and args.output_dir is None:
            print(
                "syncbn bench: --project needs the results of a run; HINT: --from-json "
                f"bench/results/{STEM}.json, or --output-dir of a run",
                file=sys.stderr,
            )
            return 2
        source = args.from_json or args.output_dir / f"{args.stem}.json"
        docs_dir = args.docs_dir or Path(tempfile.mkdtemp(prefix="syncbn-projection-"))
        try:
            written = write_projection(source, docs_dir)
        except FileNotFoundError as error:
            print(f"syncbn bench: {error}", file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
        return 0
    try:
        config = config_from_args(args)
    except argparse.ArgumentTypeError as error:
        print(f"syncbn bench: {error}", file=sys.stderr)
        return 2
    _extras.check_bench_extras()  # a missing optional package stops the run before any process starts
    try:
        report = measure(config)
    except RankError as error:
        print(f"syncbn bench: {error}", file=sys.stderr)
        return 1

    from syncbn.cli import _bench_report

    print(_bench_report.text_report(report))
    output_dir = config.output_dir or Path(tempfile.mkdtemp(prefix="syncbn-bench-"))
    for path in _bench_report.write_results(report, output_dir, config.stem):
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- processes


def run_world(world_size: int, plan: Any, deadline: float, progress: Any) -> dict[str, Any]:
    """Spawn ``world_size`` ranks, run the plan, return rank 0's results; the ranks never outlive this call.

    Raises:
        syncbn.harness.RankError: a rank failed (its traceback is in the message) or died, or the run passed
            ``deadline`` (``time.monotonic()``; :class:`~syncbn.harness.RanksTimeoutError`); the ranks are killed.
    """
    from syncbn.cli._bench_rank import rank_main

    try:
        with LocalRanks(rank_main, world_size, args=(free_port(), plan), name="syncbn-bench") as ranks:
            results = ranks.wait(deadline, on_message=lambda message: progress.update(message[2]))
            ranks.stop(grace=max(1.0, min(10.0, deadline - time.monotonic())))  # they destroy their process group
            if ranks.unclean_exits():  # the results are in; say so, since a launcher would call it a failure
                print(f"syncbn bench: after sending their results: {ranks.unclean_exits()}", file=sys.stderr)
    except RanksTimeoutError as error:
        raise RanksTimeoutError(
            f"the run at {world_size} rank{'s' if world_size > 1 else ''} passed the time limit (--timeout): {error}",
            error.ranks,
        ) from None
    return dict(results[0])


# --------------------------------------------------------------------------- analysis


def slowest(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per iteration, the largest of the ranks' times: ``[rank][rep] -> [rep]``."""
    return [max(values) for values in zip(*per_rank, strict=True)]


def summary_us(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and minimum, in microseconds."""
    values = [s * 1e6 for s in seconds]
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": quartiles[0], "p75": quartiles[2], "min": min(values)}


def phase_breakdown(step_seconds: Sequence[Sequence[Sequence[float]]]) -> tuple[dict[str, float], dict[str, float]]:
    """Medians (µs) of each step and each phase, per iteration on the rank whose steps took longest.

    ``step_seconds`` is ``[rank][rep][step]``. Taking one rank per
    iteration, the slowest, keeps the phases of one iteration consistent
    (they add up to that rank's total) and matches the layer's figure, the
    slowest rank's time. Ranks leave each all-reduce together, so their
    totals are close, and the collective phase of the rank taken includes
    any wait for a peer that reached the all-reduce later (its computation
    or its scheduling). ``collective_min_rank`` separates the two: per
    iteration, the smallest time any rank spent in each all-reduce (the
    last to arrive waits least), summed over the two.
    """
    from syncbn.cli._bench_rank import PHASES, STEPS

    index = {name: i for i, name in enumerate(STEPS)}
    rows = [max(ranks, key=sum) for ranks in zip(*step_seconds, strict=True)]
    steps = {name: statistics.median(row[i] for row in rows) * 1e6 for i, name in enumerate(STEPS)}
    phases = {
        phase: statistics.median(sum(row[index[name]] for name in names) for row in rows) * 1e6
        for phase, names in PHASES.items()
    }
    phases["sum"] = sum(phases[phase] for phase in PHASES)
    phases["total"] = statistics.median(sum(row) for row in rows) * 1e6
    phases["collective_min_rank"] = (
        statistics.median(
            sum(min(rank[index[name]] for rank in ranks) for name in PHASES["collective"])
            for ranks in zip(*step_seconds, strict=True)
        )
        * 1e6
    )
    return steps, phases


def analyse_world(world_size: int, raw: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Summaries of one world size's raw per-rank times (the raw times are not kept)."""
    from syncbn.cli.scaling import allgather_wire_bytes, allreduce_wire_bytes

    layers = []
    for layer in raw["layers"]:
        summaries = {name: summary_us(slowest(per_rank)) for name, per_rank in layer["seconds"].items()}
        medians = {name: s["median"] for name, s in summaries.items()}
        steps, phases = phase_breakdown(layer["step_seconds"])
        layers.append(
            {
                "shape": layer["shape"],
                "check": layer["check"],
                "median_us": medians,
                "summary_us": summaries,
                "ratios": {
                    "syncbn_over_local": medians["syncbn"] / medians["local"],
                    "syncbn_over_fairscale": medians["syncbn"] / medians["fairscale"],
                },
                "steps_us": steps,
                "phases_us": phases,
                "phases_sum_over_layer": phases["sum"] / medians["syncbn"],
            }
        )
    collectives = []
    for item in raw["collectives"]:
        wire = (allreduce_wire_bytes if item["op"] == "all_reduce" else allgather_wire_bytes)(
            item["bytes_per_rank"], world_size
        )
        collectives.append(
            {
                "op": item["op"],
                "numel": item["numel"],
                "bytes_per_rank": item["bytes_per_rank"],
                "wire_bytes": wire,
                "summary_us": summary_us(slowest(item["seconds"])),
            }
        )
    return {
        "world_size": world_size,
        "oversubscribed": world_size > (os.cpu_count() or 1),
        "wall_s": wall_s,
        "torch_syncbn": raw["torch_syncbn"],
        "layers": layers,
        "collectives": collectives,
    }


#: The goal for syncbn's host time per call against nn.BatchNorm's, in one process.
HOST_TIME_GOAL = 1.25


def host_time(worlds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape, at one rank (nothing communicated): syncbn's and nn.BatchNorm's time per call, all host time on CPU.

    Empty when world size 1 was not measured.
    """
    single = [world for world in worlds if world["world_size"] == 1]
    if not single:
        return []
    rows = []
    for layer in single[0]["layers"]:
        medians = layer["median_us"]
        ratio = medians["syncbn"] / medians["local"]
        rows.append(
            {
                "shape": layer["shape"],
                "syncbn_us": medians["syncbn"],
                "batchnorm_us": medians["local"],
                "syncbn_over_batchnorm": ratio,
                "goal": HOST_TIME_GOAL,
                "within_goal": ratio <= HOST_TIME_GOAL,
            }
        )
    return rows


def fit_collectives(worlds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The alpha-beta fit of each collective over the world sizes measured beyond 1 (medians of the slower rank).

    A world of one puts nothing on the wire: its times are the cost of the
    call (and, for an all-gather, of copying the input into the output),
    which the tables show but the model of communication leaves out.
    """
    from syncbn.cli.scaling import Point, fit_alpha_beta

    fits = {}
    for op in ("all_reduce", "all_gather"):
        points = [
            Point(world["world_size"], item["wire_bytes"], item["summary_us"]["median"] / 1e6)
            for world in worlds
            for item in world["collectives"]
            if item["op"] == op and world["world_size"] > 1
        ]
        try:
            fits[op] = fit_alpha_beta(points).to_json()
        except ValueError as error:  # e.g. only world size 1 was measured
            fits[op] = {"error": str(error)}
    return fits


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, versions, date and how busy the machine is."""
    description = _machine.describe("numpy", "fairscale")
    description["load_average_1_5_15min_before"] = description.pop("load_average")
    return description


# --------------------------------------------------------------------------- the run


def measure(config: Config) -> dict[str, Any]:
    """Run every world size in turn under one deadline; return the report (summaries, fits, machine)."""
    tqdm = _extras.import_tqdm()
    plan = config.plan
    started = time.monotonic()
    deadline = started + config.timeout_s
    description = machine()
    per_world = len(plan.shapes) * (plan.warmup + plan.reps) + plan.collective_warmup + plan.collective_reps
    worlds = []
    with tqdm(
        total=per_world * len(config.world_sizes),
        file=sys.stderr,
        unit="rep",
        disable=not config.progress,
        mininterval=0.5,
    ) as progress:
        for world_size in config.world_sizes:
            progress.set_description(f"{world_size} rank{'s' if world_size > 1 else ''}")
            world_started = time.monotonic()
            raw = run_world(world_size, plan, deadline, progress)
            worlds.append(analyse_world(world_size, raw, time.monotonic() - world_started))
    description["load_average_1_5_15min_after"] = list(os.getloadavg())
    return {
        "machine": description,
        "parameters": {
            "backend": "gloo (127.0.0.1)",
            "device": "cpu",
            "dtype": "float32",
            "memory_format": "contiguous",
            "threads_per_rank": 1,
            "world_sizes": list(config.world_sizes),
            "shapes": [list(shape) for shape in plan.shapes],
            "warmup": plan.warmup,
            "reps": plan.reps,
            "collective_numels": list(plan.collective_numels),
            "collective_warmup": plan.collective_warmup,
            "collective_reps": plan.collective_reps,
            "seed": plan.seed,
            "quick": config.quick,
            "command": " ".join(["syncbn", *sys.argv[1:]]),
        },
        "contenders": {
            "syncbn": "syncbn.SyncBatchNorm over the default gloo group",
            "syncbn_phases": "syncbn's ops and all_reduce calls, timed step by step (the phase breakdown)",
            "local": "torch.nn.BatchNorm2d, no synchronisation",
            "fairscale": (
                f"fairscale {_machine.package_version('fairscale')} experimental.nn.sync_batchnorm.SyncBatchNorm"
            ),
            "torch": f"torch.nn.SyncBatchNorm: {worlds[0]['torch_syncbn'] if worlds else 'not run'}",
        },
        "results": worlds,
        "host_time": host_time(worlds),
        "collective_fit": fit_collectives(worlds),
        "wall_s": time.monotonic() - started,
    }
