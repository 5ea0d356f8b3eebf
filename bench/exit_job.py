"""The smallest job that shows how a run ends: start communication, eight all-reduces, close, exit.

    torchrun --standalone --nproc-per-node 4 bench/exit_job.py
    mpiexec -n 4 python bench/exit_job.py --backend mpi
    python bench/exit_job.py --no-close        # leave the closing to syncbn at interpreter exit

Every rank prints ``rank R/W: 8 all-reduces of 4 values: OK`` when the sums
are right, then ends; a run is clean when every rank then exits with status 0
(``bench/reliability.py`` runs this many times under every launcher).
"""

from __future__ import annotations

import argparse
import sys

import torch

import syncbn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=syncbn.distributed.BACKENDS)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the other ranks")
    parser.add_argument("--no-close", action="store_true", help="do not call close(): the interpreter's exit does")
    args = parser.parse_args()

    ctx = syncbn.init_distributed(args.backend, timeout=args.timeout)
    communicator = syncbn.get_communicator(ctx.process_group)
    right = True
    for _ in range(8):
        values = torch.full((4,), float(ctx.rank + 1))
        communicator.all_reduce(values)
        right &= bool((values == ctx.world_size * (ctx.world_size + 1) / 2).all())
    sys.stdout.write(f"rank {ctx.rank}/{ctx.world_size}: 8 all-reduces of 4 values: {'OK' if right else 'WRONG'}\n")
    sys.stdout.flush()
    if not args.no_close:
        ctx.close()
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
