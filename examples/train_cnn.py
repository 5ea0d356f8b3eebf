"""Train a small CNN with SyncBatchNorm on synthetic data, under any launcher.

    python examples/train_cnn.py                                   # one process
    torchrun --standalone --nproc-per-node 4 examples/train_cnn.py # launch/torchrun_single_node.sh
    mpiexec -n 4 python examples/train_cnn.py --backend mpi        # launch/mpiexec.sh
    srun python examples/train_cnn.py                              # slurm/*.sbatch

``syncbn.init_distributed()`` reads how the process was started (torchrun,
Slurm, an MPI launcher, or none), picks the device (a GPU per local rank when
CUDA is there, else the CPU) and starts communication. Each rank draws its
own synthetic images, so without synchronisation every rank's BatchNorm
statistics would differ.

Every rank prints one line per step::

    rank 1/4 step 3/5 loss 2.3120 global batch 16 = 4 ranks x 4 local

``global batch`` is the sum of the ranks' batches over the group that
SyncBatchNorm synchronises. At the end each rank compares its running
statistics and parameters with the mean over all ranks; they must be equal
(they come from the same global moments), and the script exits with status 1
on every rank when they are not. ``--unsynced`` keeps plain per-rank
BatchNorm, to see that check fail.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import syncbn

# Relative difference between ranks above which the statistics count as different.
# Synchronised ranks hold bitwise-equal values; unsynchronised ones differ by ~1e-2.
TOLERANCE = 1e-9


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def state_vector(model: nn.Module) -> torch.Tensor:
    """Every parameter and running statistic of the model, as one float64 vector on the CPU."""
    return torch.cat([t.detach().double().flatten().cpu() for t in model.state_dict().values()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="images per rank and step (default 4)")
    parser.add_argument("--backend", default="auto", choices=syncbn.distributed.BACKENDS)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other ranks")
    parser.add_argument("--unsynced", action="store_true", help="plain per-rank BatchNorm (the check then fails)")
    args = parser.parse_args()

    with syncbn.init_distributed(args.backend, timeout=args.timeout) as ctx:
        communicator = syncbn.get_communicator(ctx.process_group)  # the group SyncBatchNorm(process_group=None) uses
        torch.manual_seed(0)  # the same initial model on every rank
        model = make_model()
        if not args.unsynced:
            model = syncbn.convert_sync_batchnorm(model)
        model = model.to(ctx.device)
        if ctx.backend != "mpi" and ctx.world_size > 1:
            model = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(1000 + ctx.rank)  # different images on every rank

        for step in range(1, args.steps + 1):
            images = torch.randn(args.batch_size, 3, 16, 16, generator=data) * 2 + 0.5
            labels = torch.randint(0, 10, (args.batch_size,), generator=data)
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            if ctx.backend == "mpi":  # no DDP without torch.distributed: syncbn averages the gradients
                syncbn.average_gradients(model)
            optimizer.step()
            global_batch = torch.tensor([float(args.batch_size)], dtype=torch.float64)
            communicator.all_reduce(global_batch)
            say(
                f"rank {ctx.rank}/{ctx.world_size} step {step}/{args.steps} loss {loss.item():.4f} "
                f"global batch {int(global_batch.item())} = {communicator.world_size} ranks x {args.batch_size} "
                f"local (launcher: {ctx.launcher}, backend: {ctx.backend}, device: {ctx.device})"
            )

        # Equal on every rank <=> equal to the mean over ranks. The verdict is summed too,
        # so that every rank reaches the same one and exits with the same status.
        local = state_vector(model)
        mean = local.clone()
        communicator.all_reduce(mean)
        mean /= communicator.world_size
        difference = float(((local - mean).abs() / mean.abs().clamp_min(1.0)).max())
        verdict = torch.tensor([difference], dtype=torch.float64)
        communicator.all_reduce(verdict)
        equal = float(verdict) <= TOLERANCE
        say(
            f"rank {ctx.rank}/{ctx.world_size}: running statistics and parameters "
            f"{'EQUAL' if equal else 'DIFFER'} on every rank (largest relative difference {difference:.1e})"
        )
        return 0 if equal else 1


def say(line: str) -> None:
    """One write per line, so that the lines of ranks sharing an output file do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
