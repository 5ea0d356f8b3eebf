"""The ``syncbn`` command: ``syncbn env``, ``syncbn bench``, ``syncbn demo``.

Each subcommand is a module of this package with ``add_arguments(parser)``
and ``run(args) -> int``; it is imported only when it is asked for, so that
``syncbn env`` works with the base install and ``bench``/``demo`` load their
optional dependencies (matplotlib, tqdm, scikit-learn, fairscale) themselves.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from syncbn.harness import Terminated

#: subcommand -> (module, one-line help)
COMMANDS = {
    "env": ("syncbn.cli.env", "what this machine offers: torch, CUDA, NCCL, MPI, CuPy, launcher variables"),
    "bench": ("syncbn.cli.bench", "per-layer benchmarks over world sizes, with tables, JSON and plots"),
    "demo": ("syncbn.cli.demo", "small per-rank batches: unsynchronised BN vs SyncBatchNorm vs GroupNorm"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``syncbn`` console script (and ``python -m syncbn``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="syncbn", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(subparser)
    args = parser.parse_args(argv)
    # The ranks a command started are stopped on the way out of it (syncbn.harness); only the words remain.
    try:
        return int(modules[args.command].run(args))
    except Terminated:
        print(f"syncbn {args.command}: stopped by SIGTERM; its processes are stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"syncbn {args.command}: interrupted; its processes are stopped", file=sys.stderr)
        return 128 + signal.SIGINT
