"""``syncbn bench``: a real quick run in spawned gloo ranks, its outputs, the alpha-beta fit and the projection."""

from __future__ import annotations

import datetime
import json
import math
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import syncbn
from syncbn.cli import _extras, main, scaling
from syncbn.cli.scaling import Fabric, Point
from tests.launching import (
    PYTHON,
    ROOT,
    assert_a_dead_rank_fails_the_command,
    assert_a_signal_ends_every_process,
    run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_SHAPES = [[2, 8, 8, 8], [2, 32, 4, 4]]
PLOTS = ("time_vs_world_size", "ratios", "phases", "collectives")

QuickRun = tuple[subprocess.CompletedProcess[str], Path]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``syncbn bench --quick`` run once for the tests below, as a user runs it."""
    output_dir = tmp_path_factory.mktemp("bench")
    result = run([PYTHON, "-m", "syncbn", "bench", "--quick", "--output-dir", str(output_dir)], timeout=150)
    return result, output_dir


def _report(quick_run: QuickRun) -> dict[str, Any]:
    result, output_dir = quick_run
    assert result.returncode == 0, result.stderr
    return json.loads((output_dir / "syncbn_bench_cpu.json").read_text())  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the quick run, for real


@pytest.mark.gloo
def test_quick_run_prints_the_tables_and_a_progress_bar(quick_run: QuickRun) -> None:
    result, _ = quick_run
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"shape\s+ranks\s+syncbn\s+local\s+fairscale\s+torch\s+syncbn/local\s+syncbn/fairscale", out)
    assert re.search(r"shape\s+ranks\s+local stats\s+collective\s+elementwise\s+sum\s+coll\. min rank", out)
    for shape in ("2x8x8x8", "2x32x4x4"):
        for world_size in (1, 2):
            # shape, ranks, three medians, torch n/a, two ratios
            assert re.search(rf"^\s*{shape}\s+{world_size}\s+(\d+\s+){{3}}n/a\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE)
    assert re.search(r"^all_reduce\s+-?\d+\s+[\d.]+\s+([\d.]+|-)\s+\d+%$", out, re.MULTILINE), out
    assert "torch.nn.SyncBatchNorm: not applicable on CPU" in out
    assert re.search(r"shape\s+syncbn\s+nn\.BatchNorm\s+syncbn/BatchNorm\s+goal", out)  # the host time per call
    for shape in ("2x8x8x8", "2x32x4x4"):
        assert re.search(rf"^\s*{shape}\s+\d+\s+\d+\s+[\d.]+\s+<= 1\.25 (met|NOT met)$", out, re.MULTILINE), out
    assert "100%" in result.stderr and "rep" in result.stderr  # tqdm's bar, on stderr


@pytest.mark.gloo
def test_quick_run_json(quick_run: QuickRun) -> None:
    report = _report(quick_run)
    machine = report["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["cpu_count"] >= 1 and machine["cpu_model"]
    assert len(machine["load_average_1_5_15min_before"]) == 3 and len(machine["load_average_1_5_15min_after"]) == 3
    datetime.datetime.fromisoformat(machine["date"])
    assert report["parameters"]["shapes"] == QUICK_SHAPES and report["parameters"]["quick"] is True
    assert "not applicable on CPU" in report["contenders"]["torch"]
    assert [world["world_size"] for world in report["results"]] == [1, 2]
    for world in report["results"]:
        assert [layer["shape"] for layer in world["layers"]] == QUICK_SHAPES
        for layer in world["layers"]:
            for contender in ("syncbn", "syncbn_phases", "local", "fairscale"):
                summary = layer["summary_us"][contender]
                assert 0 < summary["min"] <= summary["p25"] <= summary["median"] <= summary["p75"]
                assert layer["median_us"][contender] == summary["median"]
            phases = layer["phases_us"]
            parts = [phases[name] for name in ("local_statistics", "collective", "elementwise")]
            assert all(part > 0 for part in parts)
            assert phases["sum"] == pytest.approx(sum(parts))
            assert 0 < phases["collective_min_rank"] <= phases["collective"] * 1.5
            assert set(layer["steps_us"]) == {
                "local_moments",
                "all_reduce_forward",
                "per_channel",
                "normalize",
                "backward_reduce",
                "all_reduce_backward",
                "backward_elemt",
            }
            # The phases are the Python implementation's calls; the layer runs the compiled CPU path, which
            # makes the same reductions and elementwise passes as loops of its own, with less around them:
            # the phases add up to about its time or more (loosely: a quick run on a shared machine is noisy).
            assert 0.25 < layer["phases_sum_over_layer"] < 5.0
            assert layer["ratios"]["syncbn_over_local"] == pytest.approx(
                layer["median_us"]["syncbn"] / layer["median_us"]["local"]
            )
            check = layer["check"]
            assert check["max_abs_diff_vs_phase_replica"] <= 1e-6
            assert check["max_abs_diff_output_vs_fairscale"] <= 1e-4
            if world["world_size"] > 1:
                assert check["min_over_ranks_max_abs_diff_output_vs_local"] >= 1e-2
        collectives = {(item["op"], item["numel"]) for item in world["collectives"]}
        assert collectives == {(op, n) for op in ("all_reduce", "all_gather") for n in (256, 4096, 65536)}
    # The host time per call: the one-rank layers, syncbn against nn.BatchNorm.
    single = report["results"][0]["layers"]
    assert [row["shape"] for row in report["host_time"]] == QUICK_SHAPES
    for row, layer in zip(report["host_time"], single, strict=True):
        assert row["syncbn_us"] == layer["median_us"]["syncbn"] and row["batchnorm_us"] == layer["median_us"]["local"]
        assert row["syncbn_over_batchnorm"] == pytest.approx(row["syncbn_us"] / row["batchnorm_us"])
        assert row["goal"] == 1.25 and row["within_goal"] == (row["syncbn_over_batchnorm"] <= 1.25)
    fit = report["collective_fit"]["all_reduce"]
    assert set(fit["alpha_us"]) == {"2"}  # a world of one puts nothing on the wire: not in the fit
    assert fit["alpha_us"]["2"] > 0 and math.isfinite(fit["beta_us_per_byte"])


@pytest.mark.gloo
def test_quick_run_markdown_and_plots(quick_run: QuickRun) -> None:
    _report(quick_run)
    _, output_dir = quick_run
    markdown = (output_dir / "syncbn_bench_cpu.md").read_text()
    for plot in PLOTS:
        path = output_dir / f"syncbn_bench_cpu_{plot}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
        assert f"(syncbn_bench_cpu_{plot}.png)" in markdown
    assert "| 2x8x8x8 | 2 |" in markdown
    assert "## Host time per call in one process (µs)" in markdown


@pytest.mark.gloo
def test_project_from_the_measured_json(quick_run: QuickRun, tmp_path: Path) -> None:
    _report(quick_run)
    _, output_dir = quick_run
    docs = tmp_path / "docs"
    command = [PYTHON, "-m", "syncbn", "bench", "--project", "--output-dir", str(output_dir), "--docs-dir", str(docs)]
    result = run(command, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (docs / "scaling.png").read_bytes()[:8] == PNG_SIGNATURE
    text = (docs / "scaling.md").read_text()
    assert "### ResNet-50" in text and "### Mask R-CNN R50-FPN" in text
    assert re.search(r"^\| 1024 \| 128 \|", text, re.MULTILINE)
    assert "| 2 | 2x8x8x8 |" in text  # the measured section, from the JSON


def test_project_without_results_says_how_to_make_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.json"
    assert main(["bench", "--project", "--from-json", str(missing), "--docs-dir", str(tmp_path)]) == 1
    assert "HINT: run `syncbn bench` first" in capsys.readouterr().err
    assert not (tmp_path / "scaling.md").exists()


LONG_RUN = [PYTHON, "-m", "syncbn", "bench", "--world-sizes", "2", "--shapes", "2x8x8x8", "--reps", "100000"]
LONG_RUN += ["--warmup", "0", "--no-progress"]


@pytest.mark.gloo
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_ends_every_process(sig: int, tmp_path: Path, no_process_left: str) -> None:
    """SIGTERM (what `timeout` and Slurm send) or SIGINT (Ctrl-C) to `syncbn bench`: everything gone within 5 s."""
    assert_a_signal_ends_every_process(LONG_RUN, sig, tmp_path / "bench.log", no_process_left)


@pytest.mark.gloo
def test_a_rank_that_dies_fails_the_command_at_once(tmp_path: Path, no_process_left: str) -> None:
    assert_a_dead_rank_fails_the_command(LONG_RUN, tmp_path / "bench.log", no_process_left)


def test_results_go_to_a_new_temporary_directory_unless_given(tmp_path: Path) -> None:
    """``--project`` without ``--docs-dir`` writes nothing into the working directory, nor into docs/."""
    committed = [ROOT / "docs" / name for name in ("scaling.md", "scaling.png")]
    before = {path: path.read_bytes() for path in committed}
    source = ROOT / "bench" / "results" / "syncbn_bench_cpu.json"
    result = run([PYTHON, "-m", "syncbn", "bench", "--project", "--from-json", str(source)], timeout=120)
    assert result.returncode == 0, result.stderr
    written = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written and all(path.exists() and ROOT not in path.resolve().parents for path in written), written
    assert {path: path.read_bytes() for path in committed} == before
    assert main(["bench", "--project"]) == 2  # no results named: nothing to project, nothing written


@pytest.mark.gloo
def test_a_run_past_its_time_limit_fails_and_stops(tmp_path: Path) -> None:
    command = [PYTHON, "-m", "syncbn", "bench", "--quick", "--timeout", "2", "--output-dir", str(tmp_path)]
    result = run(command, timeout=60)
    assert result.returncode == 1
    assert "passed the time limit (--timeout)" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--shapes", "2x64x", "expected NxC[xHxW]"),
        ("--shapes", "1x64", "1 value per channel"),
        ("--world-sizes", "1,0", "positive integers"),
        ("--reps", "0", "--reps and --collective-reps must be 1 or more"),
    ],
)
def test_bad_options_are_refused(option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", option, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "load"),
    [
        ("matplotlib", _extras.import_pyplot),
        ("tqdm", _extras.import_tqdm),
        ("fairscale.experimental.nn.sync_batchnorm", _extras.import_fairscale_syncbn),
    ],
)
def test_a_missing_extra_names_the_install_command(module: str, load: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to the import system
    from syncbn._install import install_command

    # From this clone, the command that works installs the clone with the extra.
    assert install_command("bench") == f"pip install -e '{Path(syncbn.__file__).resolve().parent.parent}[bench]'"
    with pytest.raises(ModuleNotFoundError, match=re.escape(install_command("bench"))):
        load()


def test_an_installed_package_names_the_package_index_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from syncbn import _install

    monkeypatch.setattr(_install, "_source_tree", lambda: None)
    assert _install.install_command("bench") == "pip install 'syncbn[bench]'"


# --------------------------------------------------------------------------- the alpha-beta fit


def _points(alpha_s: dict[int, float], beta: float, numels: list[int], noise: float = 0.0) -> list[Point]:
    generator = random.Random(0)
    points = []
    for world_size, alpha in alpha_s.items():
        for numel in numels:
            wire = scaling.allreduce_wire_bytes(4 * numel, world_size)
            seconds = (alpha + beta * wire) * (1.0 + generator.uniform(-noise, noise))
            points.append(Point(world_size, wire, seconds))
    return points


def test_fit_recovers_known_alpha_and_beta() -> None:
    alpha_s, beta = {2: 450e-6, 4: 2.1e-3, 8: 25e-3}, 2.5e-9
    fit = scaling.fit_alpha_beta(_points(alpha_s, beta, [256, 2048, 16384, 131072, 524288]))
    assert fit.alpha_s.keys() == alpha_s.keys()
    for world_size, alpha in alpha_s.items():
        assert fit.alpha_s[world_size] == pytest.approx(alpha, rel=1e-9)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1 / beta)
    assert fit.max_relative_residual < 1e-9
    assert fit.predict(4, 1e6) == pytest.approx(2.1e-3 + beta * 1e6)
    again = scaling.AlphaBetaFit.from_json(json.loads(json.dumps(fit.to_json())))  # through the results file
    assert again.alpha_s == pytest.approx(fit.alpha_s) and again.beta_s_per_byte == pytest.approx(beta)


def test_fit_with_noise_stays_close() -> None:
    alpha_s, beta = {2: 600e-6, 4: 3e-3}, 1e-9
    fit = scaling.fit_alpha_beta(_points(alpha_s, beta, [256, 2048, 16384, 131072, 524288, 2097152], noise=0.03))
    for world_size, alpha in alpha_s.items():
        assert fit.alpha_s[world_size] == pytest.approx(alpha, rel=0.1)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=0.1)
    assert 0.0 < fit.max_relative_residual < 0.1


def test_fit_never_returns_a_negative_slope() -> None:
    # Times that fall as the payload grows (noise): no bandwidth is negative, so beta is 0.
    points = [Point(2, 1e3, 5e-4), Point(2, 1e5, 4e-4), Point(4, 1e3, 9e-4), Point(4, 1e5, 8e-4)]
    fit = scaling.fit_alpha_beta(points)
    assert fit.beta_s_per_byte == 0.0 and fit.bandwidth_bytes_per_s == math.inf
    assert fit.to_json()["bandwidth_GB_per_s"] is None  # JSON has no infinity
    assert 4e-4 < fit.alpha_s[2] < 5e-4 and 8e-4 < fit.alpha_s[4] < 9e-4


def test_fit_refuses_what_cannot_determine_beta() -> None:
    with pytest.raises(ValueError, match="at least one"):
        scaling.fit_alpha_beta([])
    with pytest.raises(ValueError, match="beta is undetermined"):
        scaling.fit_alpha_beta([Point(1, 0.0, 5e-5), Point(1, 0.0, 6e-5)])
    with pytest.raises(ValueError, match="positive times"):
        scaling.fit_alpha_beta([Point(2, 100.0, 0.0)])


# --------------------------------------------------------------------------- the projection's arithmetic


def test_payloads_ours_fixed_all_gather_grows_with_the_world() -> None:
    assert scaling.ours_payload_bytes(64) == (132 * 8, 129 * 4)  # 2C + 4 float64 forward, 2C + 1 float32 backward
    assert scaling.allgather_design_payload_bytes(64, 1) == (129 * 4, 128 * 4)
    assert scaling.allgather_design_payload_bytes(64, 512) == (512 * 129 * 4, 128 * 4)
    assert scaling.allreduce_wire_bytes(1000, 1) == 0
    assert scaling.allreduce_wire_bytes(1000, 2) == 1000
    assert scaling.allreduce_wire_bytes(1024, 1024) == pytest.approx(2 * 1023)
    assert scaling.allgather_wire_bytes(100, 8) == 700
    # Per step: syncbn's traffic stays under twice its payload; the all-gather's grows like W.
    channels = scaling.RESNET50_BN_CHANNELS
    payload = sum(sum(scaling.ours_payload_bytes(c)) for c in channels)
    for world_size in (8, 64, 1024):
        assert payload < scaling.step_received_bytes(channels, world_size, "ours") < 2 * payload
    gathered = [scaling.step_received_bytes(channels, w, "allgather") for w in (64, 128)]
    assert gathered[1] / gathered[0] == pytest.approx(127 / 63, rel=0.02)


def test_network_channel_lists() -> None:
    resnet = scaling.RESNET50_BN_CHANNELS
    assert len(resnet) == 53 and sum(resnet) == 26_560
    assert Counter(resnet) == {64: 7, 128: 8, 256: 16, 512: 11, 1024: 7, 2048: 4}
    maskrcnn = scaling.MASK_RCNN_R50_FPN_BN_CHANNELS
    assert len(maskrcnn) == 69 and maskrcnn[:53] == resnet and set(maskrcnn[53:]) == {256}


def test_latency_and_step_time_by_hand() -> None:
    fabric = Fabric("test", intra_node_latency_s=5e-6, two_node_latency_s=15e-6, intra_node_bandwidth=100e9,
                    inter_node_bandwidth=10e9, gpus_per_node=4)  # fmt: skip
    assert fabric.latency_s(1) == 0 and fabric.latency_s(4) == 5e-6
    assert fabric.latency_s(8) == pytest.approx(15e-6)  # 2 nodes
    assert fabric.latency_s(32) == pytest.approx(5e-6 + 10e-6 * 3)  # 8 nodes: 3 tree levels
    world_size, channels, latency = 32, 100, 35e-6
    ours = 2 * latency + 2 * 31 / 32 * (204 * 8 + 201 * 4) / 10e9
    allgather = 2 * latency + (31 * 201 * 4 + 2 * 31 / 32 * 200 * 4) / 10e9
    assert scaling.step_sync_seconds([channels], world_size, fabric, "ours") == pytest.approx(ours)
    assert scaling.step_sync_seconds([channels], world_size, fabric, "allgather") == pytest.approx(allgather)
    assert scaling.step_sync_seconds([channels] * 3, world_size, fabric, "ours") == pytest.approx(3 * ours)
    with pytest.raises(ValueError, match="design"):
        scaling.step_sync_seconds([channels], world_size, fabric, "broadcast")


def test_projection_all_gather_never_cheaper_and_falls_behind_with_scale() -> None:
    rows = [r for r in scaling.projection_rows() if r["network"] == "ResNet-50"]
    assert [r["world_size"] for r in rows] == list(scaling.PROJECTED_WORLD_SIZES)
    for fabric in scaling.FABRICS:
        ratios = [r["seconds"][fabric.name]["allgather"] / r["seconds"][fabric.name]["ours"] for r in rows]
        assert all(ratio >= 1.0 for ratio in ratios)
        assert ratios == sorted(ratios) and ratios[-1] > ratios[0]
    # 106 collectives of ~6 µs inside a node: the 0.6 ms per step the published latency implies.
    assert rows[0]["seconds"][scaling.FABRICS[0].name]["ours"] == pytest.approx(106 * 6e-6, rel=0.01)


def test_host_time_needs_the_one_rank_run() -> None:
    from syncbn.cli import bench

    assert bench.host_time([{"world_size": 2, "layers": []}]) == []
