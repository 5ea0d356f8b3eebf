"""The optional packages of ``syncbn bench`` and ``syncbn demo``, imported when they are used.

``pip install syncbn`` does not bring matplotlib, tqdm, fairscale or
scikit-learn; each is imported at the moment it is needed, and a missing one
is reported as a ``ModuleNotFoundError`` that names the extra that installs
it (the extras are named after the commands: ``bench``, ``demo``).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

from syncbn._install import install_command


@contextlib.contextmanager
def requires(package: str, command: str) -> Iterator[None]:
    """Turn a missing optional ``package`` of ``syncbn <command>`` into an error that names its extra."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"`syncbn {command}` needs {package}, which is not installed ({error}); HINT: {install_command(command)}",
            name=error.name,
        ) from error


def _import(module_name: str, package: str, command: str = "bench") -> Any:
    with requires(package, command):
        return importlib.import_module(module_name)


def import_pyplot(command: str = "bench") -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    matplotlib = _import("matplotlib", "matplotlib", command)
    matplotlib.use("Agg")
    return _import("matplotlib.pyplot", "matplotlib", command)


def import_tqdm(command: str = "bench") -> Any:
    """The ``tqdm`` progress-bar class."""
    return _import("tqdm", "tqdm", command).tqdm


def import_fairscale_syncbn() -> Any:
    """fairscale's ``SyncBatchNorm`` class (``fairscale.experimental.nn.sync_batchnorm``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairscale's import warns about deprecated torch APIs
        module = _import("fairscale.experimental.nn.sync_batchnorm", "fairscale")
    return module.SyncBatchNorm


def check_bench_extras() -> None:
    """Import every optional package of the benchmark now, so that a missing one stops it before any work."""
    import_pyplot()
    import_tqdm()
    import_fairscale_syncbn()
