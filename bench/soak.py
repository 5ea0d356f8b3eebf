"""Soak benchmark: 4 ranks x 2,000 training steps of a small CNN with SyncBatchNorm on CPU.

    torchrun --standalone --nproc-per-node 4 bench/soak.py   # gloo, DistributedDataParallel
    mpiexec -n 4 python bench/soak.py --backend mpi         # mpi4py, gradients averaged by hand
    make soak                                               # both, with OMP_NUM_THREADS=1

Every rank trains the same float32 CNN (two Conv2d + BatchNorm2d, Linear +
BatchNorm1d, converted by ``convert_sync_batchnorm``) with SGD and momentum on
its own synthetic images, drawn from a generator seeded by (step, rank) so that
any process can redraw any rank's batch. DDP runs with
``forward_sync_buffers=False``: each rank's running statistics are its own.
When a criterion fails, every rank exits with status 1:

1. Running statistics. Rank 0 keeps a float64 oracle with plain ``nn.BatchNorm``
   layers. Before each step it loads the ranks' current parameters (so that the
   float32 drift of the trajectory is not what is measured) and runs forward in
   train mode on the global batch (all ranks' images, in rank order): its
   running statistics follow the exact global-batch moments. After every step,
   per ``running_mean``/``running_var`` tensor, relative error =
   max|a - b| / max|b| (a: rank 0's float32, b: the oracle's); the worst over
   tensors and steps must be <= 1e-6. For scale, the same error of plain float32
   ``nn.BatchNorm`` layers fed the same batches and parameters is reported. At
   the end every rank's running statistics must be bitwise equal to rank 0's.
2. Memory. Every ``--every`` steps, at the end of the warm-up and at the last
   step, each rank reads its RSS (VmRSS in /proc/self/status). Drift = max over
   the samples after the warm-up of |RSS - RSS_w| / RSS_w, RSS_w the RSS at the
   end of the warm-up; <= 5% on every rank.
3. No per-call allocation grows. At the same samples, after ``gc.collect()``:
   ``len(gc.get_objects())`` may exceed its value at the end of the warm-up by
   at most 200, and syncbn's caches (``syncbn.comm.cache_size()``, the constant
   tensors of ``syncbn.ops.cpu``) keep their sizes.

Samples go into tensors allocated before the loop and reach every rank in one
all-reduce over per-rank slots (a Communicator only sums): all ranks judge the
same numbers, and all-reduce the verdict before exiting. Rank 0 writes
``<out>.json``, ``<out>.md`` and ``<out>.png`` (``make soak`` gives
``--out bench/results/soak_cpu_<backend>``; by default a new temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from syncbn import comm as syncbn_comm
from syncbn.cli._extras import import_pyplot, import_tqdm
from syncbn.cli._machine import describe
from syncbn.ops import cpu as _cpu_ops

ORACLE_TOLERANCE = 1e-6  # max|a - b| / max|b| per running-statistics tensor
RSS_TOLERANCE = 0.05  # |RSS - RSS_w| / RSS_w
OBJECT_SLACK = 200  # Python objects a rank may gain after the warm-up
FIELDS = ("step", "rss_kib", "objects", "communicator_cache", "constants_cache", "loss")
MODEL = "Conv2d 3-16, BN2d, ReLU, Conv2d 16-32 stride 2, BN2d, ReLU, pool, Linear 32-32, BN1d, ReLU, Linear 32-10"
SEED = 0
# Class-dependent patterns added to the noise, so that the loss has something to learn.
PATTERNS = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(SEED))


def make_model() -> nn.Sequential:
    return nn.Sequential(
        *(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        *(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()),
        *(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        *(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)),
    )


def make_batch(step: int, rank: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s float32 images and labels at ``step``, the same in whichever process draws them."""
    generator = torch.Generator().manual_seed(SEED + (step << 16) + rank)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return torch.randn(batch_size, 3, 16, 16, generator=generator) * 2 + 0.5 + PATTERNS[labels], labels


def batchnorms(network: nn.Module) -> list[_BatchNorm]:
    return [module for module in network.modules() if isinstance(module, _BatchNorm)]


def relative_error(network: nn.Module, oracle: nn.Module) -> float:
    """The worst over running-statistics tensors of max|a - b| / max|b|, a ``network``'s and b ``oracle``'s."""
    worst = 0.0
    for layer, reference in zip(batchnorms(network), batchnorms(oracle), strict=True):
        for name in ("running_mean", "running_var"):
            a, b = getattr(layer, name).double(), getattr(reference, name)
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


class Oracle:
    """Rank 0's plain-BatchNorm networks, float64 (the oracle) and float32 (for scale), on the global batch."""

    def __init__(self, network: nn.Module, world_size: int, batch_size: int) -> None:
        self.float64, self.float32 = make_model().double().train(), make_model().train()
        self.parameters = list(network.parameters())
        self.world_size, self.batch_size = world_size, batch_size

    @torch.no_grad()
    def forward(self, step: int) -> None:
        """Load the ranks' current parameters and update the running statistics from the global batch of ``step``."""
        images = torch.cat([make_batch(step, rank, self.batch_size)[0] for rank in range(self.world_size)])
        for reference, dtype in ((self.float64, torch.float64), (self.float32, torch.float32)):
            for mine, theirs in zip(reference.parameters(), self.parameters, strict=True):
                mine.copy_(theirs)
            reference(images.to(dtype))

    def errors(self, network: nn.Module) -> tuple[float, float]:
        """Relative errors of ``network``'s running statistics and of the float32 network's."""
        return relative_error(network, self.float64), relative_error(self.float32, self.float64)


def rss_kib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cache_sizes() -> tuple[int, int]:
    """Entries in syncbn's communicator cache and in its cache of per-channel constant tensors."""
    return syncbn_comm.cache_size(), _cpu_ops._zeros_and_ones.cache_info().currsize


def gather(communicator: syncbn.Communicator, local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local``, stacked in rank order, on every rank: a sum of slots all zero but one."""
    slots = torch.zeros(communicator.world_size, *local.shape, dtype=torch.float64)
    slots[communicator.rank] = local
    communicator.all_reduce(slots)
    return slots


def average_gradients(model: nn.Module, communicator: syncbn.Communicator) -> None:
    """What DDP does, over an MPI communicator: the mean of every gradient over the ranks."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            grad = parameter.grad.detach().contiguous()
            communicator.all_reduce(grad)
            parameter.grad.copy_(grad / communicator.world_size)


def train(args: argparse.Namespace, ctx: syncbn.DistributedContext) -> dict[str, Any]:
    communicator = syncbn.get_communicator(ctx.process_group)
    torch.manual_seed(SEED)  # the same initial model on every rank
    network = syncbn.convert_sync_batchnorm(make_model())
    model = network
    if ctx.backend != "mpi" and ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(network, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    oracle = Oracle(network, ctx.world_size, args.batch_size) if ctx.rank == 0 else None
    sampled = sorted({*range(args.every, args.steps + 1, args.every), args.warmup, args.steps})
    row_of = {step: row for row, step in enumerate(sampled)}
    samples = torch.zeros(len(sampled), len(FIELDS), dtype=torch.float64)
    errors = torch.zeros(args.steps, 2, dtype=torch.float64)  # rank 0's (syncbn, float32 torch); zero elsewhere
    progress = import_tqdm()(total=args.steps, desc="soak", file=sys.stderr, mininterval=2, disable=ctx.rank != 0)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = make_batch(step, ctx.rank, args.batch_size)
        if oracle is not None:
            oracle.forward(step)  # with the parameters that this step's forward uses
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        if ctx.backend == "mpi":
            average_gradients(network, communicator)
        optimizer.step()
        if oracle is not None:
            errors[step - 1] = torch.tensor(oracle.errors(network), dtype=torch.float64)
        if step in row_of:
            gc.collect()
            values = (step, rss_kib(), len(gc.get_objects()), *cache_sizes(), loss.item())
            samples[row_of[step]] = torch.tensor(values, dtype=torch.float64)
        progress.update()
    wall_s = time.perf_counter() - started
    progress.close()
    communicator.all_reduce(errors)  # rank 0's values on every rank
    state = [torch.cat((m.running_mean, m.running_var, m.num_batches_tracked.view(1))) for m in batchnorms(network)]
    states = gather(communicator, torch.cat(state).double())
    return {
        "samples": gather(communicator, samples),  # (ranks, samples, FIELDS)
        "errors": errors,
        "ranks_bitwise_equal": all(torch.equal(row, states[0]) for row in states),
        "wall_s": float(gather(communicator, torch.tensor(wall_s, dtype=torch.float64)).max()),
        "warmup_row": row_of[args.warmup],
    }


def judge(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three criteria, from numbers that every rank holds alike."""
    errors, float32_torch = run["errors"].unbind(1)
    after = run["samples"][:, run["warmup_row"] :]  # from the end of the warm-up on
    rss, objects, caches = after[..., 1], after[..., 2], after[..., 3:5]
    drift = ((rss - rss[:, :1]).abs() / rss[:, :1]).amax(dim=1)
    growth = (objects - objects[:, :1]).amax(dim=1)
    worst, equal = float(errors.max()), run["ranks_bitwise_equal"]
    caches_constant = bool((caches == caches[:, :1]).all())
    return {
        "running_statistics": {
            "worst_relative_error": worst,
            "step_of_worst": int(errors.argmax()) + 1,
            "last_relative_error": float(errors[-1]),
            "float32_worst_relative_error": float(float32_torch.max()),
            "ranks_bitwise_equal": equal,
            "pass": worst <= ORACLE_TOLERANCE and equal,
        },
        "rss": {
            "drift_per_rank": drift.tolist(),
            "rss_at_warmup_kib": rss[:, 0].tolist(),
            "pass": float(drift.max()) <= RSS_TOLERANCE,
        },
        "allocations": {
            "object_growth_per_rank": growth.tolist(),
            "objects_at_warmup": objects[:, 0].tolist(),
            "caches_at_warmup": caches[:, 0].tolist(),
            "caches_constant": caches_constant,
            "pass": float(growth.max()) <= OBJECT_SLACK and caches_constant,
        },
    }


def per_rank(values: list[float], fmt: str) -> str:
    return " / ".join(format(value, fmt) for value in values)


def markdown(report: dict[str, Any]) -> str:
    machine, config, (stats, rss, alloc) = report["machine"], report["config"], report["verdicts"].values()
    verdict = {True: "PASS", False: "FAIL"}
    oracle = (
        f"worst {stats['worst_relative_error']:.2e} (step {stats['step_of_worst']}), "
        f"last step {stats['last_relative_error']:.2e} | ≤ {ORACLE_TOLERANCE:.0e} "
        f"| {verdict[stats['worst_relative_error'] <= ORACLE_TOLERANCE]}"
    )
    equal = f"{'bitwise equal' if stats['ranks_bitwise_equal'] else 'differ'} | bitwise equal"
    growth = (
        f"{per_rank(alloc['object_growth_per_rank'], '+.0f')}; {'constant' if alloc['caches_constant'] else 'changed'}"
    )
    samples = "\n".join(
        f"| {row['step']} | {row['loss'][0]:.3f} | {row['relative_error']:.2e} "
        f"| {row['float32_relative_error']:.2e} | {per_rank([kib / 1024 for kib in row['rss_kib']], '.1f')} "
        f"| {per_rank(row['objects'], '.0f')} | {row['communicator_cache'][0]:.0f}, {row['constants_cache'][0]:.0f} |"
        for row in report["samples"]
    )
    return f"""\
# syncbn soak: {config["world_size"]} ranks x {config["steps"]} training steps on CPU ({config["backend"]})

Regenerate with `make soak`; this run: `{config["command"]}` (method: the docstring of `bench/soak.py`).

Machine: {machine["cpu_model"]}, {machine["cpu_count"]} cores; torch {machine["torch"]}, syncbn {machine["syncbn"]}
({machine["syncbn_git"]}); {machine["date"]}; load average (1, 5, 15 min) {machine["load_average"]}.

{config["world_size"]} ranks ({config["launcher"]}, {config["backend"]}) x {config["batch_size"]} images per step,
{config["threads_per_rank"]} thread per rank; {MODEL}; SGD lr 0.05, momentum 0.9; {config["steps"]} steps, the first
{config["warmup"]} warm-up; memory sampled every {config["every"]}. Wall time {report["wall_s"]:.0f} s,
{report["steps_per_s"]:.1f} steps/s (rank 0's oracle included).

| criterion | measured | limit | verdict |
|---|---|---|---|
| running statistics vs float64 oracle | {oracle} |
| running statistics on every rank, at the end | {equal} | {verdict[stats["ranks_bitwise_equal"]]} |
| RSS drift after warm-up, per rank | {per_rank(rss["drift_per_rank"], ".2%")} | ≤ {RSS_TOLERANCE:.0%} \
| {verdict[rss["pass"]]} |
| Python objects gained after warm-up, per rank; syncbn caches | {growth} | ≤ +{OBJECT_SLACK}; constant \
| {verdict[alloc["pass"]]} |

Relative error: max|a - b| / max|b| per `running_mean` / `running_var` tensor of each SyncBatchNorm layer, a rank 0's
(float32), b the oracle's (float64), worst over the tensors, after every step. For scale: plain float32 `nn.BatchNorm`
layers fed the same global batches and parameters reach {stats["float32_worst_relative_error"]:.2e}.
RSS drift: max over the samples after the warm-up of |RSS - RSS_w| / RSS_w, RSS_w the rank's RSS at the end of the
warm-up ({per_rank([kib / 1024 for kib in rss["rss_at_warmup_kib"]], ".1f")} MiB). Objects: `len(gc.get_objects())`
after `gc.collect()`, minus its value at the end of the warm-up ({per_rank(alloc["objects_at_warmup"], ".0f")}).
Caches: entries of syncbn's communicator cache and constant-tensor cache. Per-rank values in rank order.

| step | loss (rank 0) | rel. error | float32 nn.BatchNorm | RSS MiB per rank | objects per rank | caches |
|---:|---:|---:|---:|---|---|---|
{samples}
"""


def plot(report: dict[str, Any], errors: torch.Tensor, path: Path) -> None:
    plt = import_pyplot()
    figure, (memory, accuracy) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    config, steps = report["config"], [row["step"] for row in report["samples"]]
    for rank in range(config["world_size"]):
        memory.plot(steps, [row["rss_kib"][rank] / 1024 for row in report["samples"]], marker=".", label=f"rank {rank}")
    memory.set(ylabel="RSS (MiB)", title=f"syncbn soak: {config['world_size']} ranks, {config['backend']}")
    for column, label in enumerate(("SyncBatchNorm (rank 0)", "float32 nn.BatchNorm, for scale")):
        accuracy.semilogy(range(1, len(errors) + 1), errors[:, column].clamp_min(1e-12), linewidth=0.7, label=label)
    accuracy.axhline(ORACLE_TOLERANCE, color="tab:red", linestyle="--", label="limit")
    accuracy.set(xlabel="step", ylabel="running statistics: max|a - b| / max|b|")
    for axes in (memory, accuracy):
        axes.axvline(config["warmup"], color="gray", linestyle=":", label="end of warm-up")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(args: argparse.Namespace, ctx: syncbn.DistributedContext, run: dict[str, Any], verdicts: dict) -> None:
    samples, errors = run["samples"], run["errors"]
    config = {key: getattr(args, key) for key in ("steps", "batch_size", "warmup", "every", "timeout")}
    config |= {"world_size": ctx.world_size, "backend": ctx.backend, "launcher": ctx.launcher, "model": MODEL}
    config |= {"threads_per_rank": torch.get_num_threads(), "command": " ".join(["python", *sys.argv])}
    limits = {"relative_error": ORACLE_TOLERANCE, "rss_drift": RSS_TOLERANCE, "object_growth": OBJECT_SLACK}
    rows = [  # one value per rank for every field
        {name: samples[:, row, column].tolist() for column, name in enumerate(FIELDS)} for row in range(len(samples[0]))
    ]
    for row in rows:
        row["step"] = step = int(row["step"][0])
        row["relative_error"], row["float32_relative_error"] = errors[step - 1].tolist()
    report = {
        "machine": describe(),
        "config": config,
        "limits": limits,
        "wall_s": run["wall_s"],
        "steps_per_s": args.steps / run["wall_s"],
        "verdicts": verdicts,
        "samples": rows,
        "relative_error_per_step": [float(f"{error:.3e}") for error in errors[:, 0].tolist()],
    }
    out = Path(args.out or Path(tempfile.mkdtemp(prefix="syncbn-soak-")) / f"soak_cpu_{ctx.backend}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(report))
    plot(report, errors, Path(f"{out}.png"))
    print(f"wrote {out}.json, {out}.md, {out}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4, help="images per rank and step (default 4)")
    parser.add_argument("--warmup", type=int, default=200, help="steps before memory is judged (default 200)")
    parser.add_argument("--every", type=int, default=50, help="steps between memory samples (default 50)")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "mpi"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the other ranks (gloo)")
    parser.add_argument(
        "--out",
        help="path prefix of the results (default: a new temporary directory; `make soak` writes "
        "bench/results/soak_cpu_<backend>)",
    )
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps or args.every < 1 or args.batch_size < 1:
        parser.error("need 1 <= --warmup < --steps, --every >= 1 and --batch-size >= 1")

    with syncbn.init_distributed(args.backend, timeout=args.timeout) as ctx:
        try:
            run = train(args, ctx)
        except BaseException:
            if ctx.backend == "mpi" and ctx.world_size > 1:  # the others would wait in their next all-reduce forever
                from mpi4py import MPI

                traceback.print_exc()
                MPI.COMM_WORLD.Abort(1)
            raise
        verdicts = judge(run)
        # Every rank judged the same gathered numbers; the sum makes sure that all exit alike.
        failed = torch.tensor([sum(not verdict["pass"] for verdict in verdicts.values())], dtype=torch.float64)
        syncbn.get_communicator(ctx.process_group).all_reduce(failed)
        if ctx.rank == 0:
            for name, verdict in verdicts.items():
                print(f"{name}: {'PASS' if verdict['pass'] else 'FAIL'} {verdict}")
            write(args, ctx, run, verdicts)
        return 1 if float(failed) > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
