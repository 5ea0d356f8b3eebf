"""The latency-bandwidth (alpha-beta) model of the collectives, fitted here and projected to large jobs.

Two uses, one model. A collective that moves ``wire`` bytes per rank costs

    t = alpha(W) + beta * wire

* **Fitted** on what ``syncbn bench`` measured on this machine: all-reduces
  and all-gathers of several payload sizes at each world size, over gloo.
  For a ring all-reduce of ``n`` bytes ``wire = 2 (W - 1) / W * n`` (reduce-
  scatter then all-gather, each ``W - 1`` steps of ``n / W``); for a ring
  all-gather of ``n`` bytes per rank ``wire = (W - 1) * n``. One ``alpha``
  per world size (it holds the steps' latencies, whatever their number) and
  one ``beta`` (seconds per byte) shared by all, by least squares on the
  relative error, so that 100 µs and 10 ms points count alike.
* **Projected** to 8-1,024 GPUs with published NCCL figures (no fit: this
  machine has no GPU): ``alpha(W)`` constant within a node and growing by a
  fixed step per doubling of the node count (the depth of NCCL's tree,
  which it uses for small messages), ``beta`` from the slowest link a byte
  crosses (NVLink inside a node, the InfiniBand port across nodes).

What the projection compares, per training step (every BN layer once
forward and once backward), with ``C`` channels per layer:

* ours: forward all-reduce of ``2C + 4`` float64 values (channel count, sums, count, backward flag),
  backward all-reduce of ``2C + 1`` float32 values (sums, and how many ranks create a graph);
  the payload does not depend on ``W``;
* an all-gather design (``torch.nn.SyncBatchNorm``): forward all-gather of
  ``(mean, invstd, count)``, ``2C + 1`` float32 values per rank, so every
  rank receives ``W (2C + 1)`` values; backward all-reduce of ``2C`` float32.

``syncbn bench --project`` writes ``docs/scaling.md`` and ``docs/scaling.png``
from the JSON a measured run left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from syncbn.cli._extras import import_pyplot

# --------------------------------------------------------------------------- networks

#: ResNet-50's 53 BatchNorm layers, in order (torchvision's ``resnet50``): the stem,
#: then per bottleneck block (width, width, 4 * width), and one more 4 * width on
#: the shortcut of each stage's first block. 3, 4, 6, 3 blocks of width 64 ... 512.
RESNET50_BN_CHANNELS: tuple[int, ...] = (
    64,
    *(
        channels
        for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3))
        for block in range(blocks)
        for channels in ((width, width, 4 * width, 4 * width) if block == 0 else (width, width, 4 * width))
    ),
)

#: Mask R-CNN R50-FPN as detectron2 trains it with SyncBN everywhere
#: (``mask_rcnn_R_50_FPN_3x_syncbn``: backbone unfrozen, ``FPN.NORM``,
#: ``ROI_BOX_HEAD.NORM`` and ``ROI_MASK_HEAD.NORM`` set to SyncBN): ResNet-50's
#: 53 layers, the FPN's lateral and output convolution norms (2 x 4 levels of
#: 256 channels), the 4conv1fc box head (4 x 256) and the mask head (4 x 256).
MASK_RCNN_R50_FPN_BN_CHANNELS: tuple[int, ...] = (*RESNET50_BN_CHANNELS, *(256,) * (8 + 4 + 4))

NETWORKS: dict[str, tuple[int, ...]] = {
    "ResNet-50": RESNET50_BN_CHANNELS,
    "Mask R-CNN R50-FPN": MASK_RCNN_R50_FPN_BN_CHANNELS,
}

FLOAT64_BYTES = 8
FLOAT32_BYTES = 4

# --------------------------------------------------------------------------- payloads and traffic


def ours_payload_bytes(num_channels: int) -> tuple[int, int]:
    """Bytes of syncbn's (forward, backward) all-reduce for one layer: ``2C + 4`` float64, ``2C + 1`` float32."""
    return (2 * num_channels + 4) * FLOAT64_BYTES, (2 * num_channels + 1) * FLOAT32_BYTES


def allgather_design_payload_bytes(num_channels: int, world_size: int) -> tuple[int, int]:
    """Bytes of the all-gather design's (forward result, backward all-reduce) for one layer.

    Forward: every rank ends up with ``W`` copies of ``(mean, invstd, count)``,
    ``W (2C + 1)`` float32 values. Backward: one all-reduce of ``2C`` float32.
    """
    return world_size * (2 * num_channels + 1) * FLOAT32_BYTES, 2 * num_channels * FLOAT32_BYTES


def allreduce_wire_bytes(nbytes: float, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: ``2 (W - 1) / W * nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes


def allgather_wire_bytes(bytes_per_rank: float, world_size: int) -> float:
    """Bytes each rank receives in a ring all-gather of ``bytes_per_rank`` from each rank: ``(W - 1) * n``."""
    return float(world_size - 1) * bytes_per_rank


# --------------------------------------------------------------------------- the fit


class Point(NamedTuple):
    """One measured collective: world size, bytes on the wire per rank (see above), seconds."""

    world_size: int
    wire_bytes: float
    seconds: float


@dataclass(frozen=True)
class AlphaBetaFit:
    """``t = alpha[W] + beta * wire_bytes``, fitted by least squares on the relative error."""

    alpha_s: dict[int, float]  # per world size
    beta_s_per_byte: float
    max_relative_residual: float  # the worst |fit - measured| / measured over the points

    def predict(self, world_size: int, wire_bytes: float) -> float:
        """Seconds the fit gives for ``wire_bytes`` at ``world_size`` (a world size it was fitted on)."""
        return self.alpha_s[world_size] + self.beta_s_per_byte * wire_bytes

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """``1 / beta`` (infinite when the points gave no slope)."""
        return math.inf if self.beta_s_per_byte <= 0 else 1.0 / self.beta_s_per_byte

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha_us": {str(w): a * 1e6 for w, a in sorted(self.alpha_s.items())},
            "beta_us_per_byte": self.beta_s_per_byte * 1e6,
            # None for no slope: JSON has no infinity
            "bandwidth_GB_per_s": None if self.beta_s_per_byte <= 0 else self.bandwidth_bytes_per_s / 1e9,
            "max_relative_residual": self.max_relative_residual,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlphaBetaFit:
        return cls(
            {int(w): a / 1e6 for w, a in data["alpha_us"].items()},
            data["beta_us_per_byte"] / 1e6,
            data["max_relative_residual"],
        )


def fit_alpha_beta(points: Iterable[Point]) -> AlphaBetaFit:
    """Fit one ``alpha`` per world size and one shared ``beta`` to measured points.

    Least squares on ``(fit - t) / t``: each point counts by its relative
    error, so that the small payloads (which fix ``alpha``) weigh as much as
    the large ones (which fix ``beta``). A world size whose points all have
    ``wire_bytes = 0`` (``W = 1``) only fixes its own ``alpha``.

    A negative slope (noise on a few points) is replaced by ``beta = 0``.

    Raises:
        ValueError: with no point, a non-positive time, or no point with
            ``wire_bytes > 0`` (then ``beta`` is undetermined).
    """
    points = list(points)
    if not points:
        raise ValueError("fit_alpha_beta needs at least one measured point, got none")
    if any(p.seconds <= 0 for p in points):
        raise ValueError(f"expected positive times, got {[p.seconds for p in points if p.seconds <= 0]}")
    if not any(p.wire_bytes > 0 for p in points):
        raise ValueError("no point moves any byte (all at world size 1?): beta is undetermined")
    world_sizes = sorted({p.world_size for p in points})
    column = {w: i for i, w in enumerate(world_sizes)}
    design = np.zeros((len(points), len(world_sizes) + 1))
    for row, p in enumerate(points):
        design[row, column[p.world_size]] = 1.0
        design[row, -1] = p.wire_bytes
    times = np.array([p.seconds for p in points])
    solution, *_ = np.linalg.lstsq(design / times[:, None], np.ones(len(points)), rcond=None)
    if solution[-1] < 0:
        # Noise can tilt a few points into a negative slope, which no network has: fit the latencies alone.
        solution[:-1], *_ = np.linalg.lstsq(design[:, :-1] / times[:, None], np.ones(len(points)), rcond=None)
        solution[-1] = 0.0
    fitted = design @ solution
    return AlphaBetaFit(
        {w: float(solution[column[w]]) for w in world_sizes},
        float(solution[-1]),
        float(np.max(np.abs(fitted - times) / times)),
    )


# --------------------------------------------------------------------------- the projection


@dataclass(frozen=True)
class Fabric:
    """Published small-message latencies and link bandwidths of a GPU cluster, as the model uses them.

    ``alpha(W)``: ``intra_node_latency_s`` for ``2 <= W <= gpus_per_node``;
    beyond, that plus ``(two_node_latency_s - intra_node_latency_s)`` per
    doubling of the node count (``log2(nodes)`` tree levels). ``beta``: one
    over the bandwidth per GPU of the slowest link crossed.
    """

    name: str
    intra_node_latency_s: float
    two_node_latency_s: float
    intra_node_bandwidth: float  # bytes/s per GPU, one direction
    inter_node_bandwidth: float  # bytes/s per GPU, one direction
    gpus_per_node: int = 8

    def latency_s(self, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        if world_size <= self.gpus_per_node:
            return self.intra_node_latency_s
        nodes = math.ceil(world_size / self.gpus_per_node)
        return self.intra_node_latency_s + (self.two_node_latency_s - self.intra_node_latency_s) * math.log2(nodes)

    def bandwidth(self, world_size: int) -> float:
        return self.intra_node_bandwidth if world_size <= self.gpus_per_node else self.inter_node_bandwidth

    def allreduce_s(self, nbytes: float, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        return self.latency_s(world_size) + allreduce_wire_bytes(nbytes, world_size) / self.bandwidth(world_size)

    def allgather_s(self, bytes_per_rank: float, world_size: int) -> float:
        # The same latency term as the all-reduce: generous to the all-gather,
        # whose NCCL implementation is a ring (W - 1 steps, no tree).
        if world_size <= 1:
            return 0.0
        return self.latency_s(world_size) + allgather_wire_bytes(bytes_per_rank, world_size) / self.bandwidth(
            world_size
        )


GB = 1e9
#: The two clusters projected; the figures and their sources are in docs/scaling.md.
FABRICS: tuple[Fabric, ...] = (
    Fabric("H100 NVLink + HDR InfiniBand", 6e-6, 20e-6, 450 * GB, 25 * GB),
    Fabric("slow inter-node (75 µs)", 6e-6, 75e-6, 450 * GB, 25 * GB),
)
PROJECTED_WORLD_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)


def step_sync_seconds(channels: Sequence[int], world_size: int, fabric: Fabric, design: str) -> float:
    """Seconds per training step spent in BN collectives (every layer forward and backward).

    Args:
        channels: ``C`` of each BN layer.
        design: ``"ours"`` (two all-reduces) or ``"allgather"`` (an all-gather
            forward, an all-reduce backward).
    """
    total = 0.0
    for num_channels in channels:
        if design == "ours":
            forward, backward = ours_payload_bytes(num_channels)
            total += fabric.allreduce_s(forward, world_size) + fabric.allreduce_s(backward, world_size)
        elif design == "allgather":
            _, backward = allgather_design_payload_bytes(num_channels, world_size)
            per_rank = (2 * num_channels + 1) * FLOAT32_BYTES
            total += fabric.allgather_s(per_rank, world_size) + fabric.allreduce_s(backward, world_size)
        else:
            raise ValueError(f"design must be 'ours' or 'allgather', got {design!r}")
    return total


def step_received_bytes(channels: Sequence[int], world_size: int, design: str) -> float:
    """Bytes each rank receives per step in BN collectives (ring algorithms; 0 at ``W = 1``)."""
    total = 0.0
    for num_channels in channels:
        if design == "ours":
            forward, backward = ours_payload_bytes(num_channels)
            total += allreduce_wire_bytes(forward, world_size) + allreduce_wire_bytes(backward, world_size)
        elif design == "allgather":
            _, backward = allgather_design_payload_bytes(num_channels, world_size)
            per_rank = (2 * num_channels + 1) * FLOAT32_BYTES
            total += allgather_wire_bytes(per_rank, world_size) + allreduce_wire_bytes(backward, world_size)
        else:
            raise ValueError(f"design must be 'ours' or 'allgather', got {design!r}")
    return total


def projection_rows(world_sizes: Sequence[int] = PROJECTED_WORLD_SIZES) -> list[dict[str, Any]]:
    """One row per (network, world size): per-step seconds per fabric and design, and received bytes."""
    rows = []
    for network, channels in NETWORKS.items():
        for world_size in world_sizes:
            row: dict[str, Any] = {
                "network": network,
                "world_size": world_size,
                "received_bytes": {d: step_received_bytes(channels, world_size, d) for d in ("ours", "allgather")},
                "seconds": {
                    fabric.name: {d: step_sync_seconds(channels, world_size, fabric, d) for d in ("ours", "allgather")}
                    for fabric in FABRICS
                },
            }
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- docs/scaling.{md,png}


def _fmt_bytes(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _projection_table(rows: Sequence[dict[str, Any]], network: str) -> list[str]:
    header = ["ranks", "nodes", "received/rank ours", "received/rank all-gather"]
    for fabric in FABRICS:
        header += [f"ours, {fabric.name}", f"all-gather, {fabric.name}", "ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        if row["network"] != network:
            continue
        world_size = row["world_size"]
        cells = [
            str(world_size),
            str(max(1, math.ceil(world_size / FABRICS[0].gpus_per_node))),
            _fmt_bytes(row["received_bytes"]["ours"]),
            _fmt_bytes(row["received_bytes"]["allgather"]),
        ]
        for fabric in FABRICS:
            ours, allgather = row["seconds"][fabric.name]["ours"], row["seconds"][fabric.name]["allgather"]
            cells += [f"{ours * 1e3:.2f} ms", f"{allgather * 1e3:.2f} ms", f"{allgather / ours:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _measured_section(bench: dict[str, Any]) -> list[str]:
    """The fit on this machine's gloo measurements and how well it predicts the measured collective phase."""
    fits = bench["collective_fit"]
    machine = bench["machine"]
    lines = [
        "## The model on this machine (gloo, measured)",
        "",
        f"Measured by `syncbn bench` on {machine['cpu_model']} ({machine['cpu_count']} cores), "
        f"{machine['date']}, torch {machine['torch']}; ranks beyond {machine['cpu_count']} share the cores, "
        "so their figures include waiting for a core. One alpha per world size, one beta per collective:",
        "",
    ]
    if "error" in fits["all_reduce"]:
        return [*lines, f"No fit: {fits['all_reduce']['error']}."]
    world_sizes = list(fits["all_reduce"]["alpha_us"])
    lines += [
        "| collective | " + " | ".join(f"alpha(W={w})" for w in world_sizes) + " | beta | 1/beta "
        "| worst relative residual |",
        "|---|" + "---:|" * (len(world_sizes) + 3),
    ]
    for name, fit in fits.items():
        if "error" in fit:
            continue
        alphas = " | ".join(f"{fit['alpha_us'][w]:.0f} µs" if w in fit["alpha_us"] else "-" for w in world_sizes)
        bandwidth = "-" if fit["bandwidth_GB_per_s"] is None else f"{fit['bandwidth_GB_per_s']:.2f} GB/s"
        lines.append(
            f"| {name} | {alphas} | {fit['beta_us_per_byte'] * 1e3:.3f} ns/B | {bandwidth} "
            f"| {fit['max_relative_residual']:.0%} |"
        )
    lines += [
        "",
        "Predicted against measured, per layer: the fit's two all-reduces of syncbn's payloads against the "
        "collective phase of syncbn's forward + backward (medians, on the slowest rank of each iteration), and "
        "the least time any rank spent in them (the last to arrive, which waits for no peer). The fit comes "
        "from collectives issued right after a barrier; in the layer they follow computation, and a rank "
        "often waits there for a peer that is still computing or waiting for a core.",
        "",
        "| ranks | shape | predicted | measured, slowest rank | measured, least of the ranks |",
        "|---:|---|---:|---:|---:|",
    ]
    all_reduce = AlphaBetaFit.from_json(fits["all_reduce"])
    for world in bench["results"]:
        world_size = world["world_size"]
        if world_size not in all_reduce.alpha_s:
            continue
        for layer in world["layers"]:
            predicted = sum(
                all_reduce.predict(world_size, allreduce_wire_bytes(nbytes, world_size))
                for nbytes in ours_payload_bytes(layer["shape"][1])
            )
            shape = "x".join(map(str, layer["shape"]))
            measured, least = layer["phases_us"]["collective"], layer["phases_us"]["collective_min_rank"]
            lines.append(f"| {world_size} | {shape} | {predicted * 1e6:.0f} µs | {measured:.0f} µs | {least:.0f} µs |")
    return lines


def scaling_markdown(bench: dict[str, Any], bench_json: str, figure: str) -> str:
    """The text of ``docs/scaling.md``: assumptions, the projection tables, the fit measured here."""
    rows = projection_rows()
    fast, slow = FABRICS
    resnet_layers, maskrcnn_layers = len(RESNET50_BN_CHANNELS), len(MASK_RCNN_R50_FPN_BN_CHANNELS)
    top = rows[len(PROJECTED_WORLD_SIZES) - 1]  # ResNet-50 at the largest world size
    lines = [
        "# Scaling the BN synchronisation beyond one machine: a latency-bandwidth projection",
        "",
        f"Regenerate with `make bench` (its last step, `syncbn bench --project --from-json {bench_json} "
        "--docs-dir docs`; model in `syncbn/cli/scaling.py`).",
        "Nothing below the next section was measured: it is arithmetic on published figures.",
        "",
        f"![per-step BN synchronisation time against the number of ranks]({figure})",
        "",
        "## What is compared",
        "",
        "Per training step, every BatchNorm layer synchronises once forward and once backward. With `C` channels:",
        "",
        "- **syncbn**: forward all-reduce of `2C + 4` float64 values (the channel count and its square, per-channel "
        "sums, the count and the number of ranks that will run backward), backward "
        "all-reduce of `2C + 1` float32 values (per-channel sums and the number of ranks that create a graph of "
        "the gradient). The payload does not depend on the number of ranks `W`.",
        "- **all-gather design** (`torch.nn.SyncBatchNorm`): forward all-gather of `(mean, invstd, count)`, "
        "`2C + 1` float32 values per rank, so each rank receives `W (2C + 1)` values; backward all-reduce of "
        "`2C` float32 values.",
        "",
        f"Networks: **ResNet-50**, its {resnet_layers} BN layers (torchvision's `resnet50`; "
        f"{sum(RESNET50_BN_CHANNELS):,} channels in all); **Mask R-CNN R50-FPN** as detectron2's "
        f"`mask_rcnn_R_50_FPN_3x_syncbn` trains it, {maskrcnn_layers} BN layers: ResNet-50's 53, the FPN's "
        "lateral and output norms (8 x 256), the 4conv1fc box head (4 x 256) and the mask head (4 x 256).",
        "",
        "## The model and its assumptions",
        "",
        "A collective costs `alpha(W) + beta * bytes on the wire per rank`:",
        "",
        "- ring all-reduce of `n` bytes: `2 (W - 1) / W * n` on the wire; ring all-gather of `n` bytes per rank: "
        "`(W - 1) * n`.",
        f"- `alpha(W)`: {fast.intra_node_latency_s * 1e6:.0f} µs inside a node of {fast.gpus_per_node} GPUs "
        "(NCCL small-message all-reduce over NVLink on H100); across nodes it grows by a fixed step per doubling "
        "of the node count, the depth of NCCL's tree (which NCCL uses for small messages): "
        f"`alpha = {fast.intra_node_latency_s * 1e6:.0f} µs + (alpha_2nodes - "
        f"{fast.intra_node_latency_s * 1e6:.0f} µs) * log2(nodes)`. Two clusters:",
        f"  - *{fast.name}*: `alpha_2nodes` = {fast.two_node_latency_s * 1e6:.0f} µs (NCCL across two nodes "
        "on HDR InfiniBand);",
        f"  - *{slow.name}*: `alpha_2nodes` = {slow.two_node_latency_s * 1e6:.0f} µs, the upper end of the "
        "46-75 µs reported on some H100/H20 clusters.",
        f"- `beta`: {fast.intra_node_bandwidth / GB:.0f} GB/s per GPU inside a node (NVLink 4 on H100 SXM: "
        "900 GB/s bidirectional, NVIDIA's H100 datasheet) and "
        f"{fast.inter_node_bandwidth / GB:.0f} GB/s per GPU across nodes (one HDR InfiniBand port, "
        "200 Gb/s, per GPU, as in a DGX A100).",
        "- The all-gather gets the same `alpha(W)` as the all-reduce. That is generous to it: NCCL's all-gather "
        "is a ring, whose latency term grows with `W`, not `log W`. The gap below is therefore a lower bound "
        "set by the payload alone.",
        "- Not modelled: overlap of the collectives with computation (a BN collective blocks the layer: its "
        "result is needed at once), contention with DDP's gradient all-reduces, stragglers, the all-gather "
        "design's extra work on the gathered `W x (2C + 1)` buffer and the host synchronisation its count "
        "mask causes, kernel launches. The latencies cited are figures quoted for small messages; real "
        "`alpha(W)` depends on topology, NCCL version and protocol.",
        "",
        "## Projection: BN collectives per training step",
        "",
        "Time per step in BN collectives (all layers, forward and backward) and the bytes each rank receives "
        "for them; `ratio` = all-gather design / syncbn.",
        "",
    ]
    for network in NETWORKS:
        lines += [f"### {network}", "", *_projection_table(rows, network), ""]
    ours, allgather = (top["seconds"][fast.name][design] for design in ("ours", "allgather"))
    ours_latency = 2 * len(RESNET50_BN_CHANNELS) * fast.latency_s(top["world_size"])
    lines += [
        f"Reading it: syncbn's cost is almost all latency (ResNet-50 at {top['world_size']} ranks, first "
        f"cluster: {ours_latency * 1e3:.1f} ms of {ours * 1e3:.1f} ms), so it grows with `log W` only. The "
        "all-gather design pays the same latency plus a bandwidth term that grows linearly with `W`: "
        f"{(allgather - ours) * 1e3:.1f} ms more at {top['world_size']} ranks ({allgather / ours:.2f}x). Inside "
        "one node the two are alike. On the slow cluster the latency is so large that the payload matters "
        "less in proportion. The lever on what remains is the number of collectives (two per layer per step "
        "here, the fewest a synchronised BN can make, since each layer needs its statistics before it can "
        "produce its output) and the per-collective latency of the fabric.",
        "",
        *_measured_section(bench),
        "",
    ]
    return "\n".join(lines)


def plot_scaling(path: Path) -> None:
    """``docs/scaling.png``: per-step BN collective time for each network, and the bytes received per rank."""
    plt = import_pyplot()
    rows = projection_rows()
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = ("tab:blue", "tab:red")
    for ax, network in zip(axes[:2], NETWORKS, strict=True):
        network_rows = [r for r in rows if r["network"] == network]
        sizes = [r["world_size"] for r in network_rows]
        for fabric, color in zip(FABRICS, colors, strict=True):
            for design, style, marker, label in (
                ("ours", "-", "o", "syncbn (all-reduce)"),
                ("allgather", "--", "s", "all-gather design"),
            ):
                values = [r["seconds"][fabric.name][design] * 1e3 for r in network_rows]
                ax.plot(
                    sizes,
                    values,
                    style,
                    color=color,
                    marker=marker,
                    markerfacecolor="white" if design == "allgather" else color,
                    label=f"{label}, {fabric.name}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("ranks (GPUs, 8 per node)")
        ax.set_ylabel("BN collectives per training step (ms)")
        ax.set_title(f"{network}: {len(NETWORKS[network])} BN layers (projected)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, handlelength=3)
    ax = axes[2]
    for network, marker in zip(NETWORKS, ("o", "s"), strict=True):
        network_rows = [r for r in rows if r["network"] == network]
        sizes = [r["world_size"] for r in network_rows]
        for design, style, label in (("ours", "-", "syncbn"), ("allgather", "--", "all-gather")):
            values = [r["received_bytes"][design] / 1e6 for r in network_rows]
            ax.plot(sizes, values, style, marker=marker, color="black", label=f"{label}, {network}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("ranks")
    ax.set_ylabel("MB received per rank per step (ring algorithms)")
    ax.set_title("BN collective traffic per step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, handlelength=3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_projection(bench_json: Path, docs_dir: Path) -> list[Path]:
    """Write ``scaling.md`` and ``scaling.png`` into ``docs_dir`` from a measured run's JSON.

    Raises:
        FileNotFoundError: when ``bench_json`` does not exist (with the command that makes it).
    """
    if not bench_json.is_file():
        raise FileNotFoundError(
            f"no benchmark results at {bench_json}; HINT: run `syncbn bench` first (or give --from-json PATH)"
        )
    bench = json.loads(bench_json.read_text())
    docs_dir.mkdir(parents=True, exist_ok=True)
    markdown, figure = docs_dir / "scaling.md", docs_dir / "scaling.png"
    plot_scaling(figure)
    try:
        shown_json = bench_json.resolve().relative_to(docs_dir.resolve().parent).as_posix()
    except ValueError:
        shown_json = str(bench_json)
    markdown.write_text(scaling_markdown(bench, shown_json, figure.name))
    return [markdown, figure]
