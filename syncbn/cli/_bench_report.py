"""The outputs of ``syncbn bench``: terminal tables, JSON, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from syncbn.cli._extras import import_pyplot

LAYER_COLUMNS = ("shape", "ranks", "syncbn", "local", "fairscale", "torch", "syncbn/local", "syncbn/fairscale")
PHASE_COLUMNS = (
    "shape",
    "ranks",
    "local stats",
    "collective",
    "elementwise",
    "sum",
    "coll. min rank",
    "syncbn layer",
    "sum/layer",
)
CONTENDER_STYLE = {"syncbn": "tab:blue", "local": "tab:gray", "fairscale": "tab:orange"}
PHASE_STYLE = {"local_statistics": "tab:green", "collective": "tab:red", "elementwise": "tab:purple"}


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ranks(world: dict[str, Any]) -> str:
    return f"{world['world_size']}{'*' if world['oversubscribed'] else ''}"


def layer_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per shape and world size: medians (µs) of the slower rank and syncbn's ratios to the peers."""
    rows = []
    for index, shape in enumerate(report["parameters"]["shapes"]):
        for world in report["results"]:
            layer = world["layers"][index]
            meds, ratios = layer["median_us"], layer["ratios"]
            rows.append(
                [
                    _shape(shape),
                    _ranks(world),
                    f"{meds['syncbn']:.0f}",
                    f"{meds['local']:.0f}",
                    f"{meds['fairscale']:.0f}",
                    "n/a",
                    f"{ratios['syncbn_over_local']:.2f}",
                    f"{ratios['syncbn_over_fairscale']:.2f}",
                ]
            )
    return rows


HOST_COLUMNS = ("shape", "syncbn", "nn.BatchNorm", "syncbn/BatchNorm", "goal")


def host_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per shape: the host time per call in one process (µs), and syncbn's ratio to nn.BatchNorm's."""
    return [
        [
            _shape(row["shape"]),
            f"{row['syncbn_us']:.0f}",
            f"{row['batchnorm_us']:.0f}",
            f"{row['syncbn_over_batchnorm']:.2f}",
            f"<= {row['goal']:.2f} {'met' if row['within_goal'] else 'NOT met'}",
        ]
        for row in report.get("host_time", [])
    ]


HOST_NOTE = (
    "One rank, nothing communicated: on CPU the whole forward + backward runs on the host, so these are the "
    "host times per call (medians), syncbn against nn.BatchNorm."
)


def phase_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per shape and world size: syncbn's phases (µs), their sum, the whole layer's time and the ratio."""
    rows = []
    for index, shape in enumerate(report["parameters"]["shapes"]):
        for world in report["results"]:
            layer = world["layers"][index]
            phases = layer["phases_us"]
            rows.append(
                [
                    _shape(shape),
                    _ranks(world),
                    f"{phases['local_statistics']:.0f}",
                    f"{phases['collective']:.0f}",
                    f"{phases['elementwise']:.0f}",
                    f"{phases['sum']:.0f}",
                    f"{phases['collective_min_rank']:.0f}",
                    f"{layer['median_us']['syncbn']:.0f}",
                    f"{layer['phases_sum_over_layer']:.2f}",
                ]
            )
    return rows


def fit_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The alpha-beta fits: one row per collective."""
    fits = report["collective_fit"]
    world_sizes = [str(w) for w in report["parameters"]["world_sizes"] if w > 1]
    header = ["collective", *(f"alpha W={w} (µs)" for w in world_sizes), "beta (ns/B)", "1/beta (GB/s)", "worst resid."]
    rows = []
    for op, fit in fits.items():
        if "error" in fit:
            rows.append([op, *("-" for _ in world_sizes), "-", "-", fit["error"]])
            continue
        alphas = [f"{fit['alpha_us'][w]:.0f}" if w in fit["alpha_us"] else "-" for w in world_sizes]
        rows.append(
            [
                op,
                *alphas,
                f"{fit['beta_us_per_byte'] * 1e3:.3f}",
                "-" if fit["bandwidth_GB_per_s"] is None else f"{fit['bandwidth_GB_per_s']:.2f}",
                f"{fit['max_relative_residual']:.0%}",
            ]
        )
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def _notes(report: dict[str, Any]) -> list[str]:
    env, params = report["machine"], report["parameters"]
    return [
        f"Machine: {env['cpu_model']}, {env['cpu_count']} cores; torch {env['torch']}, fairscale {env['fairscale']}, "
        f"syncbn {env['syncbn']} ({env['syncbn_git'] or 'not a git checkout'}); {env['date']}; load average "
        f"before {'/'.join(f'{v:.2f}' for v in env['load_average_1_5_15min_before'])}, "
        f"after {'/'.join(f'{v:.2f}' for v in env['load_average_1_5_15min_after'])}.",
        f"{params['warmup']} warm-up and {params['reps']} timed repetitions per shape, contenders interleaved "
        f"(rotating order, a barrier before each); one thread per rank; {params['dtype']}, {params['memory_format']}.",
        f"A `*` after the number of ranks: more ranks than the {env['cpu_count']} cores; they share them, and "
        "the times include waiting for one.",
        f"torch: {report['contenders']['torch']}",
        *(
            ["CUDA is available but not used: this command times CPU tensors (GPUs: bench/bench_gpu.py)."]
            if env["cuda_available"]
            else []
        ),
    ]


def text_report(report: dict[str, Any]) -> str:
    """What the command prints: the two tables, the fits and the notes."""
    fit_header, fits = fit_rows(report)
    return "\n".join(
        [
            "",
            "Forward + backward of one layer: medians of the slower rank per iteration (µs)",
            text_table(LAYER_COLUMNS, layer_rows(report)),
            "",
            *(
                [
                    "Host time per call in one process (µs): " + HOST_NOTE,
                    text_table(HOST_COLUMNS, host_rows(report)),
                    "",
                ]
                if host_rows(report)
                else []
            ),
            "syncbn's phases on the slowest rank of each iteration, medians (µs); sum/layer = their sum / syncbn;",
            "coll. min rank = the least time any rank spent in the two all-reduces (without waiting for a peer)",
            text_table(PHASE_COLUMNS, phase_rows(report)),
            "",
            "Collectives over gloo here: t = alpha(W) + beta * bytes on the wire per rank (ring)",
            text_table(fit_header, fits),
            "",
            *_notes(report),
            f"Total time: {report['wall_s']:.0f} s.",
        ]
    )


def markdown_report(report: dict[str, Any], stem: str) -> str:
    """``<stem>.md``: the tables and the plots, with how to read them."""
    fit_header, fits = fit_rows(report)
    worlds = ", ".join(f"{_plural(w['world_size'], 'rank')} {w['wall_s']:.0f} s" for w in report["results"])
    collective_rows = []
    for world in report["results"]:
        for item in world["collectives"]:
            collective_rows.append(
                [
                    str(world["world_size"]),
                    item["op"],
                    f"{item['bytes_per_rank']:,}",
                    f"{item['wire_bytes']:,.0f}",
                    f"{item['summary_us']['median']:.0f}",
                    f"{item['summary_us']['p25']:.0f}-{item['summary_us']['p75']:.0f}",
                ]
            )
    return "\n".join(
        [
            "# syncbn bench: one BatchNorm layer, forward + backward, over gloo ranks on CPU",
            "",
            f"Regenerate with `{report['parameters']['command']}` (method: `syncbn/cli/bench.py`). "
            "The scaling projection built on these figures is in `docs/scaling.md` (`syncbn bench --project`).",
            "",
            *(f"{line}\n" for line in _notes(report)),
            "Absolute times on this shared 2-core virtual machine are noisy; compare within a run, not across runs.",
            "",
            f"Wall time: {report['wall_s']:.0f} s ({worlds}).",
            "",
            "## Per layer: medians of the slower rank per iteration (µs)",
            "",
            "`torch` is `torch.nn.SyncBatchNorm`, which refuses CPU tensors. Ratios below 1 favour syncbn.",
            "",
            markdown_table(LAYER_COLUMNS, layer_rows(report)),
            "",
            f"![time per layer against the number of ranks]({stem}_time_vs_world_size.png)",
            "",
            f"![syncbn against each peer]({stem}_ratios.png)",
            "",
            *(
                [
                    "## Host time per call in one process (µs)",
                    "",
                    HOST_NOTE,
                    "",
                    markdown_table(HOST_COLUMNS, host_rows(report)),
                    "",
                ]
                if host_rows(report)
                else []
            ),
            "## syncbn's phases (µs)",
            "",
            "The same `syncbn.ops` and `all_reduce` calls as `syncbn/_functions.py`, timed step by step in the "
            "benchmark, on the slowest rank of each iteration: *local stats* = `local_moments` + the per-channel "
            "arithmetic after the reduction; *collective* = the two all-reduces; *elementwise* = `normalize`, "
            "`backward_reduce` (one pass that also sums), `backward_elemt`. The collective phase of that rank "
            "includes any wait for a peer that reached the all-reduce later; *coll. min rank* is, per iteration, "
            "the least time any rank spent in the two all-reduces (the last to arrive waits least): the collectives "
            "without the wait. *syncbn layer* is the module's own time (autograd and input checks included); "
            "*sum/layer* near 1 means the phases account for it.",
            "",
            markdown_table(PHASE_COLUMNS, phase_rows(report)),
            "",
            f"![phases]({stem}_phases.png)",
            "",
            "## Collectives and the alpha-beta fit",
            "",
            "`t = alpha(W) + beta * wire`, `wire = 2 (W-1)/W * bytes` for a ring all-reduce and "
            "`(W-1) * bytes per rank` for a ring all-gather; one alpha per world size, one beta per collective, "
            "least squares on the relative error.",
            "",
            markdown_table(fit_header, fits),
            "",
            f"![collectives and the fit]({stem}_collectives.png)",
            "",
            markdown_table(["ranks", "op", "bytes/rank", "wire bytes", "median µs", "p25-p75 µs"], collective_rows),
            "",
        ]
    )


# --------------------------------------------------------------------------- plots


def _world_axis(ax: Any, world_sizes: Sequence[int], cpu_count: int) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(world_sizes, [str(w) for w in world_sizes])
    ax.set_xlabel("ranks")
    if max(world_sizes) > cpu_count:
        ax.axvspan(cpu_count * 1.2, max(world_sizes) * 1.3, color="0.9", zorder=0)


def plot_time_vs_world_size(report: dict[str, Any], path: Path) -> None:
    """One panel per shape: each contender's median (and quartiles) against the number of ranks."""
    plt = import_pyplot()
    shapes = report["parameters"]["shapes"]
    world_sizes = [w["world_size"] for w in report["results"]]
    columns = min(3, len(shapes))
    rows = -(-len(shapes) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for index, shape in enumerate(shapes):
        ax = axes[index // columns][index % columns]
        layers = [w["layers"][index] for w in report["results"]]
        for name, color in CONTENDER_STYLE.items():
            summary = [layer["summary_us"][name] for layer in layers]
            ax.plot(world_sizes, [s["median"] / 1e3 for s in summary], "-o", color=color, label=name)
            ax.fill_between(
                world_sizes,
                [s["p25"] / 1e3 for s in summary],
                [s["p75"] / 1e3 for s in summary],
                color=color,
                alpha=0.2,
            )
        ax.plot(
            world_sizes,
            [layer["phases_us"]["collective"] / 1e3 for layer in layers],
            ":",
            color="tab:red",
            label="syncbn: its 2 all-reduces",
        )
        _world_axis(ax, world_sizes, report["machine"]["cpu_count"])
        ax.set_ylim(bottom=0)
        ax.set_ylabel("forward + backward (ms)")
        ax.set_title(_shape(shape))
        ax.grid(True, alpha=0.3)
    for index in range(len(shapes), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=8, loc="upper left")
    figure.suptitle(
        "One BN layer over gloo on CPU: medians of the slower rank (bands: quartiles; grey: more ranks than cores)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_ratios(report: dict[str, Any], path: Path) -> None:
    """syncbn's median over each peer's, per shape (groups) and world size (bars)."""
    plt = import_pyplot()
    shapes = [_shape(s) for s in report["parameters"]["shapes"]]
    worlds = report["results"]
    figure, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / len(worlds)
    for ax, (key, peer) in zip(
        axes,
        (("syncbn_over_fairscale", "fairscale SyncBatchNorm"), ("syncbn_over_local", "local nn.BatchNorm2d")),
        strict=True,
    ):
        for offset, world in enumerate(worlds):
            values = [layer["ratios"][key] for layer in world["layers"]]
            positions = [i + (offset - (len(worlds) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(
                positions, values, width, label=f"{world['world_size']} rank{'s' if world['world_size'] > 1 else ''}"
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        if key == "syncbn_over_local":
            ax.set_yscale("log")  # from about 1 at one rank to tens where the collectives dominate
        ax.set_xticks(range(len(shapes)), shapes, rotation=15)
        ax.set_ylabel("syncbn time / peer time")
        ax.set_title(f"syncbn against {peer}" + (" (below 1: syncbn faster)" if "fairscale" in key else ""))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("torch.nn.SyncBatchNorm: not applicable on CPU (it refuses CPU tensors)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_phases(report: dict[str, Any], path: Path) -> None:
    """Per shape and world size: the phases stacked, in ms (with the whole layer's time) and in shares."""
    plt = import_pyplot()
    shapes = [_shape(s) for s in report["parameters"]["shapes"]]
    worlds = report["results"]
    figure, (absolute, shares) = plt.subplots(2, 1, figsize=(14, 9))
    width = 0.8 / len(worlds)
    for offset, world in enumerate(worlds):
        positions = [i + (offset - (len(worlds) - 1) / 2) * width for i in range(len(shapes))]
        totals = [sum(layer["phases_us"][phase] for phase in PHASE_STYLE) for layer in world["layers"]]
        bottom = [0.0] * len(shapes)
        share_bottom = [0.0] * len(shapes)
        for phase, color in PHASE_STYLE.items():
            values = [layer["phases_us"][phase] / 1e3 for layer in world["layers"]]
            label = phase.replace("_", " ") if offset == 0 else None
            absolute.bar(positions, values, width * 0.9, bottom=bottom, color=color, label=label)
            fractions = [100 * v * 1e3 / t for v, t in zip(values, totals, strict=True)]
            shares.bar(positions, fractions, width * 0.9, bottom=share_bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
            share_bottom = [b + f for b, f in zip(share_bottom, fractions, strict=True)]
        layer_ms = [layer["median_us"]["syncbn"] / 1e3 for layer in world["layers"]]
        absolute.plot(positions, layer_ms, "k_", markersize=14, label="syncbn layer" if offset == 0 else None)
        for x, top in zip(positions, layer_ms, strict=True):
            absolute.text(x, top, str(world["world_size"]), ha="center", va="bottom", fontsize=9)
        for x in positions:
            shares.text(x, 101, str(world["world_size"]), ha="center", va="bottom", fontsize=9)
    absolute.set_ylabel("ms (medians, slowest rank)")
    absolute.set_title("syncbn's forward + backward by phase; bars per shape: 1 ... N ranks (number above)")
    shares.set_ylabel("% of the sum of the phases")
    shares.set_ylim(0, 108)
    for ax in (absolute, shares):
        ax.set_xticks(range(len(shapes)), shapes)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_collectives(report: dict[str, Any], path: Path) -> None:
    """Measured all-reduce and all-gather times against the payload, per world size, with the fitted lines."""
    plt = import_pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.get_cmap("tab10")
    worlds = report["results"]
    for ax, op in zip(axes, ("all_reduce", "all_gather"), strict=True):
        fit = report["collective_fit"][op]
        for index, world in enumerate(worlds):
            color = colors(index % 10)
            items = [item for item in world["collectives"] if item["op"] == op]
            sizes = [item["bytes_per_rank"] for item in items]
            fitted = "error" not in fit and str(world["world_size"]) in fit["alpha_us"]
            label = _plural(world["world_size"], "rank")
            ax.plot(
                sizes,
                [item["summary_us"]["median"] for item in items],
                "o",
                color=color,
                label=None if fitted else f"{label} (no wire: not fitted)",
            )
            if fitted:
                predicted = [
                    fit["alpha_us"][str(world["world_size"])] + fit["beta_us_per_byte"] * item["wire_bytes"]
                    for item in items
                ]
                ax.plot(sizes, predicted, "-", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel("µs (median, slower rank)")
        title = {"all_reduce": "all_reduce: wire = 2(W-1)/W x bytes", "all_gather": "all_gather: wire = (W-1) x bytes"}
        ax.set_title(f"gloo {title[op]}; dots measured, lines fitted")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_results(report: dict[str, Any], output_dir: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and the four PNGs in ``output_dir``; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"{stem}.json", output_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown_report(report, stem))
    for suffix, plot in (
        ("time_vs_world_size", plot_time_vs_world_size),
        ("ratios", plot_ratios),
        ("phases", plot_phases),
        ("collectives", plot_collectives),
    ):
        path = output_dir / f"{stem}_{suffix}.png"
        plot(report, path)
        paths.append(path)
    return paths
