"""syncbn's Lightning plugin in a real 2-rank Lightning job on CPU (DDP over gloo): tests/lightning_job.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import launching

JOB = launching.ROOT / "tests" / "lightning_job.py"


def test_the_plugin_imports_with_lightning() -> None:
    from lightning.pytorch.plugins.layer_sync import LayerSync

    from syncbn.lightning import SyncBatchNormPlugin

    assert issubclass(SyncBatchNormPlugin, LayerSync)


@pytest.mark.gloo
def test_lightning_trains_with_synchronised_statistics(tmp_path: Path) -> None:
    """Both ranks train with our layers (torch's SyncBatchNorm would be refused on CPU), matching the oracle of
    the two ranks' batches in every step, the layers are BatchNorm2d again after fit, and the job exits 0."""
    result = launching.run([launching.PYTHON, str(JOB), str(tmp_path)], timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert report["world_size"] == 2
        assert "SyncBatchNorm" in report["during"] and "BatchNorm2d" not in report["during"], (rank, report)
        assert "BatchNorm2d" in report["after"] and "SyncBatchNorm" not in report["after"], (rank, report)
        assert len(report["errors"]) == 3
        for step, errors in enumerate(report["errors"]):
            # float32 against the float64 oracle of both ranks' batches (unsynchronised layers miss it by 0.38 in
            # the output and by 0.01 to 0.06 in the running statistics)
            assert errors["output"] < 2e-5, (rank, step, errors)
            assert errors["running_mean"] < 1e-6 and errors["running_var"] < 1e-6, (rank, step, errors)


@pytest.mark.parametrize(
    ("missing", "expected"),
    [("lightning", "syncbn.lightning needs the lightning package"), ("lightning_utilities", "lightning_utilities")],
)
def test_import_error_names_what_is_missing(missing: str, expected: str) -> None:
    """Without Lightning: the hint that installs it; with Lightning but not one of its own dependencies:
    Lightning's error, as it is (installing Lightning again would not help)."""
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "try:\n    import syncbn.lightning\n"
        "except ModuleNotFoundError as error:\n    print(type(error).__name__, error.name, '|', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ModuleNotFoundError {missing}") and expected in done.stdout, done.stdout
    if missing == "lightning":
        assert "pip install" in done.stdout
