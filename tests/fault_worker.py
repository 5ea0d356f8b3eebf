"""One rank of a training job in which one rank fails on purpose (run by tests/test_faults.py).

    python tests/fault_worker.py --backend gloo --fail-rank 2 --fail-step 3 --mode kill --timeout 5

Every rank trains a small CNN with SyncBatchNorm. At ``--fail-step`` the rank
``--fail-rank`` prints ``FAILING rank R pid P mode M at <unix time>`` and then:

* ``raise``: raises an uncaught exception;
* ``kill``: kills itself with SIGKILL (no Python code runs after it);
* ``hang``: sleeps, alive but out of the collectives, until the test kills it;
* ``channels``: calls a layer of 5 channels where the others are in one of 8
  (a model built differently on one rank), without debug mode;
* ``exit``: ends its program early with status 0 (fewer batches than the
  others), leaving the closing to syncbn at interpreter exit;
* ``close``: calls ``ctx.close()``, then ends with status 0.

``--debug`` turns on debug mode (a check before every collective).

The others are left to what syncbn does: they must exit with an error within
the timeout. Nothing here catches their exceptions.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import syncbn


def say(line: str) -> None:
    """One write per line: with ``PYTHONUNBUFFERED`` set, ``print`` writes the line and its newline
    separately, and another rank's output sharing the file can land between them."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--fail-rank", type=int, default=2)
    parser.add_argument("--fail-step", type=int, default=3)
    parser.add_argument("--mode", choices=("raise", "kill", "hang", "channels", "exit", "close"), default="raise")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--abort-on-exception", action="store_true")
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    syncbn.debug.set_debug(args.debug)

    ctx = syncbn.init_distributed(args.backend, timeout=args.timeout, abort_on_exception=args.abort_on_exception)
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(ctx.rank)
    for step in range(args.steps):
        if step == args.fail_step and ctx.rank == args.fail_rank:
            say(f"FAILING rank {ctx.rank} pid {os.getpid()} mode {args.mode} at {time.time():.3f}")
            if args.mode == "raise":
                raise RuntimeError(f"injected failure on rank {ctx.rank} at step {step}")
            if args.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.mode == "channels":
                syncbn.SyncBatchNorm(5)(torch.randn(4, 5))
            if args.mode == "close":
                ctx.close()
            if args.mode in ("exit", "close"):
                return 0
            time.sleep(3600)
        x = torch.randn(4, 3, 8, 8, generator=data)
        y = torch.randint(0, 4, (4,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step == 0:
            say(f"rank {ctx.rank} trained its first step")
    say(f"rank {ctx.rank} finished")
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
