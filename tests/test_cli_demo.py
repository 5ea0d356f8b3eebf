"""``syncbn demo``: the quick run for real (ranks in processes of their own, over gloo), and its parts in-process."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from syncbn.cli import demo, main
from tests import processes
from tests.launching import (
    PYTHON,
    ROOT,
    assert_a_dead_rank_fails_the_command,
    assert_a_signal_ends_every_process,
    end_while_running,
    run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


COMMITTED = [ROOT / "docs" / name for name in ("demo.md", "demo.png", "demo.json")]


@pytest.fixture(scope="module")
def quick_run() -> tuple[str, Path]:
    """``syncbn demo --quick`` once for the module, from the repository root with no ``--output-dir``.

    Returns its stdout and the folder it says it wrote to, which must be a new
    temporary one: the committed results in docs/ are left as they were.
    """
    before = {path: path.read_bytes() for path in COMMITTED}
    result = run([PYTHON, "-m", "syncbn", "demo", "--quick"], timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert {path: path.read_bytes() for path in COMMITTED} == before, "a smoke run changed the committed docs/demo.*"
    written = re.search(r"^wrote (\S+)/demo\.md, ", result.stdout, re.MULTILINE)
    assert written, result.stdout
    output_dir = Path(written[1])
    assert output_dir.is_dir() and ROOT not in output_dir.resolve().parents, output_dir
    return result.stdout, output_dir


@pytest.mark.gloo
def test_quick_run_prints_the_table_and_writes_the_files(quick_run: tuple[str, Path]) -> None:
    stdout, output_dir = quick_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("images per rank (ranks)"))
    assert [cell.strip() for cell in header.split("   ") if cell.strip()][1:] == ["16 (1 rank)", "8 (2 ranks)"]
    for label in demo.METHODS.values():
        row = next(line for line in lines if line.startswith(label))
        cells = row[len(label) :].split()  # one seed: the mean alone, one cell per world size
        assert len(cells) == 2 and all(0.0 <= float(cell) <= 100.0 for cell in cells), row
    assert (output_dir / "demo.png").read_bytes().startswith(PNG_SIGNATURE)
    markdown = (output_dir / "demo.md").read_text()
    assert "| images per rank (ranks) | 16 (1 rank) | 8 (2 ranks) |" in markdown
    assert "syncbn demo --world-sizes 1,2 --seeds 1 --epochs 1\n" in markdown  # the command to regenerate
    assert torch.__version__ in markdown


@pytest.mark.gloo
def test_quick_run_numbers_are_sane(quick_run: tuple[str, Path]) -> None:
    _, output_dir = quick_run
    report = json.loads((output_dir / "demo.json").read_text())
    assert report["config"]["world_sizes"] == [1, 2] and report["config"]["seeds"] == [0]
    by_world = {result["world_size"]: result for result in report["results"]}
    assert sorted(by_world) == [1, 2]
    for world_size, result in by_world.items():
        assert result["per_rank_batch"] == 16 // world_size
        assert result["syncbatchnorm_group_size"] == world_size  # SyncBatchNorm saw every rank
        errors = result["test_error_percent"]
        assert set(errors) == set(demo.METHODS)
        for per_seed in errors.values():
            assert len(per_seed) == 1
            # One epoch of this MLP on digits: far better than chance (90 %), short of perfect.
            assert all(0.0 < error < 20.0 for error in per_seed), errors
    # Two real ranks saw different images: their plain BatchNorm running statistics differ, while
    # SyncBatchNorm's, computed from the whole global batch, are the same on both.
    spread = by_world[2]["running_stats_max_relative_difference_between_ranks"]
    assert spread["bn"] > 1e-2 and spread["syncbn"] <= 1e-5, spread
    # Synchronisation is exact, so two ranks train the model one rank does, up to float rounding.
    sync_1, sync_2 = by_world[1]["test_error_percent"]["syncbn"][0], by_world[2]["test_error_percent"]["syncbn"][0]
    assert abs(sync_1 - sync_2) <= 1.0, (sync_1, sync_2)
    # PreciseBN's statistics, the same on every rank, give a model as good as the one it recomputed (one epoch).
    for result in by_world.values():
        precise = result["precise_bn_test_error_percent"]
        assert set(precise) == {"bn", "syncbn"}
        for method, per_seed in precise.items():
            assert all(0.0 < error < 20.0 for error in per_seed), precise
            assert per_seed[0] <= result["test_error_percent"][method][0] + 5.0, (method, result)
    assert [entry["per_rank_batch"] for entry in report["precise_bn_summary"]["syncbn"]] == [16, 8]
    summary = report["summary"]["gn"]
    assert [entry["per_rank_batch"] for entry in summary] == [16, 8]
    assert summary[0]["mean"] == by_world[1]["test_error_percent"]["gn"][0] and summary[0]["std"] == 0.0


@pytest.mark.gloo
def test_time_limit_stops_the_ranks(tmp_path: Path, no_process_left: str) -> None:
    """Ranks that cannot finish in time are killed, and the command fails in bounded time with the fix.

    The ranks report progress all the time: the limit must hold between messages too.
    """
    started = time.monotonic()
    command = [PYTHON, "-m", "syncbn", "demo", "--quick", "--world-sizes", "2", "--epochs", "1000"]
    result = run([*command, "--timeout", "3", "--output-dir", str(tmp_path)], timeout=60)
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "2 ranks did not finish within 3 s; HINT:" in result.stderr
    assert time.monotonic() - started < 45
    assert not list(tmp_path.iterdir())  # no report from a run that did not finish
    assert not processes.wait_gone(no_process_left, 5.0)


LONG_RUN = [PYTHON, "-m", "syncbn", "demo", "--quick", "--world-sizes", "2", "--epochs", "1000"]


@pytest.mark.gloo
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_ends_every_process(sig: int, tmp_path: Path, no_process_left: str) -> None:
    """What ``timeout``, Slurm (SIGTERM) and Ctrl-C (SIGINT) send: the ranks, forkserver and tracker go too."""
    assert_a_signal_ends_every_process(LONG_RUN, sig, tmp_path / "demo.log", no_process_left)


@pytest.mark.gloo
def test_a_rank_that_dies_fails_the_command_at_once(tmp_path: Path, no_process_left: str) -> None:
    assert_a_dead_rank_fails_the_command(LONG_RUN, tmp_path / "demo.log", no_process_left)


@pytest.mark.gloo
def test_a_hung_rank_ends_at_the_time_limit(tmp_path: Path, no_process_left: str) -> None:
    """A rank stopped with SIGSTOP (a hang no signal but SIGKILL ends): the limit ends the run and the rank."""
    ending = end_while_running(
        [*LONG_RUN, "--timeout", "20"],
        2,
        lambda process, ranks: os.kill(ranks[1], signal.SIGSTOP),
        tmp_path / "demo.log",
        exit_within=40.0,
    )
    assert ending.returncode == 1, ending.output
    assert "2 ranks did not finish within 20 s" in ending.output or "failed" in ending.output, ending.output
    assert not processes.wait_gone(no_process_left, 5.0)


@pytest.mark.parametrize("method", ["bn", "gn"])
def test_packed_mlps_compute_what_separate_mlps_compute(method: str) -> None:
    seeds = [0, 1, 2]
    separate = [demo.make_mlp(method, seed) for seed in seeds]
    packed = demo.make_model(method, seeds)
    inputs = torch.randn(len(seeds), 6, 64, generator=torch.Generator().manual_seed(1))
    output = packed(inputs)
    expected = torch.stack([mlp(inputs[k]) for k, mlp in enumerate(separate)])
    torch.testing.assert_close(output, expected)
    output.square().sum().backward()
    expected.square().sum().backward()
    for position in (0, 3, 6):  # the Linear layers
        for k, mlp in enumerate(separate):
            torch.testing.assert_close(packed.layers[position].weight.grad[k], mlp[position].weight.grad)
    width = demo.HIDDEN[0]
    for k, mlp in enumerate(separate):  # the norm layers' parameters, and running statistics for BN
        torch.testing.assert_close(packed.layers[1].weight.grad[k * width : (k + 1) * width], mlp[1].weight.grad)
        if method == "bn":
            torch.testing.assert_close(packed.layers[1].running_var[k * width : (k + 1) * width], mlp[1].running_var)


def test_same_initial_weights_for_every_method() -> None:
    weights = {method: demo.make_mlp(method, seed=3)[0].weight for method in demo.METHODS}
    torch.testing.assert_close(weights["bn"], weights["gn"], rtol=0, atol=0)
    torch.testing.assert_close(weights["bn"], weights["syncbn"], rtol=0, atol=0)
    assert not torch.equal(weights["bn"], demo.make_mlp("bn", seed=4)[0].weight)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--world-sizes", "1,3"], "cannot be split into 3 equal per-rank batches"),
        (["--global-batch", "8", "--world-sizes", "8"], "HINT: use world sizes that divide the global batch"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--timeout", "-1"], "--timeout must be positive"),
    ],
)
def test_configuration_errors(options: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *options]) == 2
    assert message in capsys.readouterr().err


def test_world_sizes_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--world-sizes", "1,two"])
    assert exit_info.value.code == 2
    assert "expected comma-separated numbers of ranks" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "package"), [("tqdm", "tqdm"), ("sklearn", "scikit-learn")])
def test_a_missing_extra_is_named(module: str, package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ModuleNotFoundError
    from syncbn._install import install_command

    hint = re.escape(f"HINT: {install_command('demo')}")
    with pytest.raises(ModuleNotFoundError, match=rf"`syncbn demo` needs {package}.*{hint}"):
        demo._check_optional_dependencies()
