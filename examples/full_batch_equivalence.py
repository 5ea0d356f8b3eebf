"""Train a small CNN on 4 MPI ranks and show that SyncBatchNorm equals full-batch training.

    mpiexec -n 4 python examples/full_batch_equivalence.py      # what `make demo` runs

Every rank holds 4 of the 16 images of each step. Three copies of the same
model train side by side on every rank:

* ``syncbn``: BatchNorm layers converted to ``syncbn.SyncBatchNorm`` over
  ``MPI.COMM_WORLD``, gradients averaged over the ranks (what DDP does);
* ``unsynced``: plain ``nn.BatchNorm`` (each rank normalises its 4 images on
  its own), gradients averaged the same way;
* ``full batch``: one process that sees all 16 images, the target.

Rank 0 prints, per step, the largest difference of any parameter or running
statistic from the full-batch model. The script exits with status 1 if the
synchronised model drifts from it by more than 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import syncbn


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


def average_gradients(model: nn.Module, comm: MPI.Comm) -> None:
    for parameter in model.parameters():
        if parameter.grad is not None:
            comm.Allreduce(MPI.IN_PLACE, parameter.grad.numpy(), op=MPI.SUM)
            parameter.grad /= comm.Get_size()


def max_difference(model: nn.Module, reference: nn.Module) -> float:
    pairs = zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    return max(float((a.double() - b.double()).abs().max()) for a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=16)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    if args.global_batch % world_size:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world_size}")
    per_rank = args.global_batch // world_size
    torch.manual_seed(0)
    torch.set_num_threads(1)

    full_batch = make_model()
    synced = syncbn.convert_sync_batchnorm(copy.deepcopy(full_batch), process_group=comm)
    unsynced = copy.deepcopy(full_batch)
    models = {"full": full_batch, "synced": synced, "unsynced": unsynced}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for name, m in models.items()}
    data = torch.Generator().manual_seed(1234)  # the same global batches on every rank

    if rank == 0:
        library = MPI.Get_library_version().splitlines()[0]
        print(f"{world_size} ranks x {per_rank} images = global batch {args.global_batch}; {library}")
        print(f"{'step':>4}  {'loss':>8}  {'syncbn vs full batch':>21}  {'unsynced BN vs full batch':>26}")
    worst = 0.0
    for step in range(1, args.steps + 1):
        images = torch.randn(args.global_batch, 3, 16, 16, generator=data) * 2 + 0.5
        labels = torch.randint(0, 10, (args.global_batch,), generator=data)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for name, model in models.items():
            optimizers[name].zero_grad()
            if name == "full":
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                full_loss = loss.item()
            else:
                F.cross_entropy(model(images[mine]), labels[mine]).backward()
                average_gradients(model, comm)
            optimizers[name].step()
        synced_gap = max_difference(synced, full_batch)
        unsynced_gap = max_difference(unsynced, full_batch)
        worst = max(worst, synced_gap)
        if rank == 0:
            print(f"{step:>4}  {full_loss:>8.4f}  {synced_gap:>21.2e}  {unsynced_gap:>26.2e}")
    worst = comm.allreduce(worst, op=MPI.MAX)
    ok = worst <= 1e-4
    if rank == 0:
        verdict = "equals" if ok else "DIFFERS FROM"
        print(f"syncbn {verdict} full-batch training (largest difference {worst:.1e}, float32)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
