"""``syncbn demo``: small per-rank batches, unsynchronised BatchNorm vs SyncBatchNorm vs GroupNorm.

A miniature of the small-batch experiment of the Group Normalization paper
(Wu & He, ECCV 2018, Table 2: ResNet-50 on ImageNet, 32 to 2 images per GPU;
BatchNorm's error grows from 23.6 % to 34.7 % while GroupNorm's stays near
24 %), run for real: one global batch is split over 1, 2, 4 and 8 processes
on this machine, joined by torch.distributed gloo.

Usage::

    syncbn demo --output-dir docs    # the recorded run, what `make demo` runs (about 2.5 minutes on 2 cores)
    syncbn demo --quick              # a smoke run in well under a minute, written to a new temporary directory

Results go where ``--output-dir`` says, and only there: without it, to a new
temporary directory (printed at the end), so that no run, and no smoke run,
overwrites results it was not asked to.

What is trained: an MLP ``64 -> 128 -> 128 -> 10`` (normalisation and ReLU
after each hidden layer) on scikit-learn's 8x8 ``digits`` (1797 images, no
download), 70 % for training and a fixed stratified 30 % for the test,
features standardised with the training set's statistics. The global batch
(default 16) holds the same images in every world size; rank ``r`` takes the
``r``-th slice of it. Three normalisations, each from the same initial
weights and over the same data order for a given seed:

* **BN, unsynchronised**: ``nn.BatchNorm1d``; each rank normalises with the
  statistics of its own slice, and gradients are averaged over the ranks, as
  ``DistributedDataParallel`` does. The test uses rank 0's running
  statistics, which is also what DDP keeps (it broadcasts rank 0's buffers).
* **SyncBatchNorm**: the same model through :func:`syncbn.convert_sync_batchnorm`,
  synchronised over the default (world) group: every rank normalises with the
  statistics of the whole global batch.
* **GroupNorm**: ``nn.GroupNorm(16, 128)``, which needs no batch statistics.

Why an MLP and not a small CNN: a convolution layer's BatchNorm averages over
every pixel of every image, so on 8x8 digits even 2 images per rank give it
128 values per channel and the effect of small batches hardly shows; an MLP's
BatchNorm1d has only as many values per channel as there are images.

How it runs: for each world size the command starts that many processes
(``multiprocessing``, forked from a server process that imported torch once;
spawned where there is no such method), which meet in a ``TCPStore`` that
this process holds on 127.0.0.1 at a port the OS chose, and join a gloo
group. Every rank holds every model and trains them side by side: the seeds
of one method are packed into one network (:class:`PackedMLPs`, whose layers
never mix the copies), so that per step there are SyncBatchNorm's two
all-reduces per layer for all seeds at once, plus one all-reduce of all the
models' gradients. A collective costs milliseconds
when 8 processes share 2 cores, far more than the arithmetic of these small
models. Rank 0 evaluates and sends the results back. Each world size has a
hard time limit (``--timeout``, also the limit of every collective): past it
the ranks are killed and the command fails; it never hangs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._distributed_c10d import TCPStore

import syncbn
from syncbn.cli import _machine
from syncbn.cli._extras import requires
from syncbn.harness import LocalRanks, RankChannel, RankError, RanksTimeoutError, gloo_group

#: method key -> label in the table and the plot, in the order they are shown
METHODS = {
    "bn": "BN, unsynchronised",
    "syncbn": "SyncBatchNorm",
    "gn": "GroupNorm (16 groups)",
}
HIDDEN = (128, 128)
GROUPS = 16
NUM_CLASSES = 10
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TEST_FRACTION = 0.3
SPLIT_SEED = 0
#: rank 0 reports its progress every this many steps
PROGRESS_EVERY = 10
#: The BatchNorm methods whose statistics are also recomputed with syncbn.precise_bn, over one epoch of batches.
PRECISE_METHODS = ("bn", "syncbn")
#: Seeds the order of the images precise_bn sees (another order than training's).
PRECISE_ORDER_SEED = 10_000

#: The Group Normalization paper's Table 2 (ResNet-50, ImageNet validation error, %), for the report.
PAPER_TABLE = {
    "images per GPU": (32, 16, 8, 4, 2),
    "BN": (23.6, 23.7, 24.8, 27.3, 34.7),
    "GN": (24.1, 24.2, 24.0, 24.2, 24.1),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What one run of the demo does."""

    world_sizes: tuple[int, ...] = (1, 2, 4, 8)
    global_batch: int = 16
    seeds: int = 3
    epochs: int = 5
    timeout_s: float = 300.0
    output_dir: Path | None = None  # None: a new temporary directory

    def per_rank_batch(self, world_size: int) -> int:
        return self.global_batch // world_size


#: ``--quick``: a smoke test of the whole pipeline (values given explicitly still win).
QUICK: dict[str, Any] = {"world_sizes": (1, 2), "seeds": 1, "epochs": 1}


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The standardised digits, split once by the parent; the ranks read them from a file it writes."""

    x_train: np.ndarray[Any, np.dtype[np.float32]]
    y_train: np.ndarray[Any, np.dtype[np.int64]]
    x_test: np.ndarray[Any, np.dtype[np.float32]]
    y_test: np.ndarray[Any, np.dtype[np.int64]]

    def save(self, path: Path) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> DemoData:
        with np.load(path) as arrays:
            return cls(**{field.name: arrays[field.name] for field in dataclasses.fields(cls)})


class DemoError(RuntimeError):
    """A world of ranks failed, died or ran past its time limit."""


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``syncbn demo``."""
    defaults = DemoConfig()
    parser.epilog = (
        "The default run takes about 2.5 minutes on 2 CPU cores and writes demo.md, demo.png and demo.json "
        "into --output-dir; see the module's documentation (syncbn/cli/demo.py) for the method."
    )
    parser.add_argument(
        "--world-sizes",
        type=_world_sizes,
        default=None,
        metavar="N,N,...",
        help=f"numbers of ranks, each a run of its own (default {','.join(map(str, defaults.world_sizes))})",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        metavar="B",
        help=f"images per step over all ranks, split equally among them (default {defaults.global_batch})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="S",
        help=f"seeds (initial weights, data order) (default {defaults.seeds})",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, metavar="E", help=f"training epochs (default {defaults.epochs})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"time limit per world size, start-up included (default {defaults.timeout_s:.0f})",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where demo.md, demo.png and demo.json go (default: a new temporary directory; `make demo` writes docs/)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: world sizes {','.join(map(str, QUICK['world_sizes']))}, {QUICK['seeds']} seed, "
        f"{QUICK['epochs']} epoch (options given explicitly still apply)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the table; write demo.md, demo.png and demo.json. Returns the exit status."""
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"syncbn demo: error: {error}", file=sys.stderr)
        return 2
    _check_optional_dependencies()
    load_before = _machine.load_average()
    data = load_digits_split()
    try:
        results = run_all(config, data)
    except DemoError as error:
        print(f"syncbn demo: error: {error}", file=sys.stderr)
        return 1
    report = make_report(config, data, results)
    report["machine"]["load_average_before"] = load_before
    print(format_table(report))
    output_dir = config.output_dir or Path(tempfile.mkdtemp(prefix="syncbn-demo-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "demo.md").write_text(format_markdown(report))
    plot(report, output_dir / "demo.png")
    print(f"wrote {', '.join(str(output_dir / name) for name in ('demo.md', 'demo.png', 'demo.json'))}")
    return 0


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The defaults, then ``--quick``'s values, then the options given; checked.

    Raises:
        ValueError: a value that cannot make a run (the message gives the fix).
    """
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    given = {
        "world_sizes": args.world_sizes,
        "global_batch": args.global_batch,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "timeout_s": args.timeout,
        "output_dir": args.output_dir,
    }
    values.update({name: value for name, value in given.items() if value is not None})
    config = DemoConfig(**values)
    for name, value in (
        ("--global-batch", config.global_batch),
        ("--seeds", config.seeds),
        ("--epochs", config.epochs),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.timeout_s <= 0:
        raise ValueError(f"--timeout must be positive, got {config.timeout_s}")
    for world_size in config.world_sizes:
        if config.global_batch % world_size or config.global_batch // world_size < 2:
            raise ValueError(
                f"a global batch of {config.global_batch} cannot be split into {world_size} equal per-rank "
                "batches of at least 2 images (BatchNorm needs 2 values per channel on each rank); HINT: use "
                f"world sizes that divide the global batch at least twice, e.g. --world-sizes "
                f"{','.join(str(n) for n in _divisors(config.global_batch))}"
            )
    return config


def _world_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers of ranks like 1,2,4,8, got {text!r}"
        ) from None
    if any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"expected distinct positive numbers of ranks like 1,2,4,8, got {text!r}")
    return sizes


def _divisors(global_batch: int) -> list[int]:
    return [n for n in range(1, global_batch // 2 + 1) if global_batch % n == 0 and global_batch // n >= 2][:4]


def _command(config: DemoConfig) -> str:
    """The command line that makes ``config``: ``syncbn demo`` and every option that differs from the default."""
    defaults = DemoConfig()
    parts = ["syncbn", "demo"]
    if config.world_sizes != defaults.world_sizes:
        parts += ["--world-sizes", ",".join(map(str, config.world_sizes))]
    for option, name in (("--global-batch", "global_batch"), ("--seeds", "seeds"), ("--epochs", "epochs")):
        if getattr(config, name) != getattr(defaults, name):
            parts += [option, str(getattr(config, name))]
    if config.timeout_s != defaults.timeout_s:
        parts += ["--timeout", f"{config.timeout_s:g}"]
    if config.output_dir is not None:
        parts += ["--output-dir", str(config.output_dir)]
    return " ".join(parts)


# --------------------------------------------------------------------------- optional dependencies


def _check_optional_dependencies() -> None:
    """Fail before any training when the plot, the progress bar or the dataset cannot be had."""
    with requires("scikit-learn", "demo"):
        import sklearn  # noqa: F401
    with requires("matplotlib", "demo"):
        import matplotlib  # noqa: F401
    with requires("tqdm", "demo"):
        import tqdm  # noqa: F401


def load_digits_split() -> DemoData:
    """scikit-learn's bundled digits: a fixed stratified split, standardised with the training statistics."""
    with requires("scikit-learn", "demo"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are blank in every training image
    return DemoData(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test.astype(np.int64),
    )


# --------------------------------------------------------------------------- the ranks


def make_mlp(method: str, seed: int) -> nn.Sequential:
    """One MLP with the normalisation of ``method`` (``"bn"``, ``"syncbn"`` or ``"gn"``), as plain torch layers.

    The seed fixes the initial weights, and they are the same for every
    method: only the Linear layers draw random numbers (the norm layers start
    at ones and zeros). ``"syncbn"`` has ``nn.BatchNorm1d`` here too; it is
    converted once packed (see :func:`make_model`).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for hidden in HIDDEN:
        norm: nn.Module = nn.GroupNorm(GROUPS, hidden) if method == "gn" else nn.BatchNorm1d(hidden)
        layers += [nn.Linear(width, hidden), norm, nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


class PackedLinear(nn.Module):
    """``copies`` independent Linear layers side by side: ``(N, copies * in)`` -> ``(N, copies * out)``.

    Copy ``k`` reads input features ``[k * in, (k + 1) * in)`` and writes output
    features ``[k * out, (k + 1) * out)``, with its own weight and bias.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.copies = len(linears)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = nn.Parameter(torch.stack([linear.weight.detach() for linear in linears]))  # (copies, out, in)
        self.bias = nn.Parameter(torch.stack([linear.bias.detach() for linear in linears]))  # (copies, out)

    def extra_repr(self) -> str:
        return f"copies={self.copies}, in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        by_copy = input.view(input.shape[0], self.copies, self.in_features)
        output = torch.einsum("nki,koi->nko", by_copy, self.weight) + self.bias
        return output.reshape(input.shape[0], self.copies * self.out_features)


class PackedMLPs(nn.Module):
    """Independent MLPs of one architecture evaluated side by side, as one network of ``copies`` times the width.

    Input ``(copies, N, features)``: copy ``k`` gets its own batch ``input[k]``;
    output ``(copies, N, classes)``. Inside, copy ``k`` owns the ``k``-th block
    of every layer's features: Linear layers are block-diagonal
    (:class:`PackedLinear`), and BatchNorm (per feature) and GroupNorm (per group
    of consecutive features, never across a block's edge) never mix copies. So
    each copy computes exactly what it would alone, while one call of a norm
    layer, and for SyncBatchNorm one all-reduce each way, serves every copy.
    """

    def __init__(self, mlps: Sequence[nn.Sequential]) -> None:
        super().__init__()
        self.copies = len(mlps)
        self.layers = nn.Sequential(*(_pack([mlp[i] for mlp in mlps]) for i in range(len(mlps[0]))))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        copies, batch = input.shape[0], input.shape[1]
        output: torch.Tensor = self.layers(input.transpose(0, 1).reshape(batch, -1))
        return output.view(batch, copies, -1).transpose(0, 1)


def _pack(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer that does the work of ``layers`` (the same position in each copy) on the copies' feature blocks."""
    first = layers[0]
    if isinstance(first, nn.Linear):
        return PackedLinear([layer for layer in layers if isinstance(layer, nn.Linear)])
    packed: nn.Module
    if isinstance(first, nn.BatchNorm1d):
        packed = nn.BatchNorm1d(len(layers) * first.num_features, first.eps, first.momentum)
    elif isinstance(first, nn.GroupNorm):
        packed = nn.GroupNorm(len(layers) * first.num_groups, len(layers) * first.num_channels, first.eps)
    elif isinstance(first, nn.ReLU):
        return nn.ReLU()
    else:
        raise TypeError(f"cannot pack a {type(first).__name__}")
    # Parameters and buffers of the copies, concatenated block after block.
    with torch.no_grad():
        for name, tensor in packed.state_dict().items():
            if tensor.dim() > 0:
                tensor.copy_(torch.cat([layer.state_dict()[name] for layer in layers]))
    return packed


def make_model(method: str, seeds: Sequence[int]) -> PackedMLPs:
    """The MLPs of ``method``, one per seed, packed; for ``"syncbn"`` with :class:`syncbn.SyncBatchNorm` layers."""
    model = PackedMLPs([make_mlp(method, seed) for seed in seeds])
    if method == "syncbn":
        # In place (the model is no norm layer itself); process_group=None: the default (world) group.
        syncbn.convert_sync_batchnorm(model)
    return model


def steps_per_epoch(config: DemoConfig, data: DemoData) -> int:
    return len(data.x_train) // config.global_batch


def _average_gradients(parameters: Sequence[nn.Parameter], communicator: syncbn.Communicator) -> None:
    """What DDP does to gradients (their mean over the ranks), for every model at once.

    One all-reduce of all the gradients flattened together, rather than one
    per tensor: a collective costs far more than these few values.
    """
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    communicator.all_reduce(flat)
    flat /= communicator.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _running_stats(model: nn.Module) -> torch.Tensor:
    """Every running mean and variance of ``model``'s BatchNorm layers, as one float64 vector."""
    buffers = [
        buffer.double().flatten()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    ]
    return torch.cat(buffers)


def _spread_over_ranks(values: torch.Tensor, communicator: syncbn.Communicator) -> float:
    """The largest relative difference of ``values`` on any rank from their mean over the ranks.

    Relative to the mean's magnitude (or to 1 where it is smaller), as examples/train_cnn.py
    measures it. Every rank gets the same answer.
    """
    mean = values.clone()
    communicator.all_reduce(mean)
    mean /= communicator.world_size
    # A sum is all a Communicator offers: each rank writes its own entry, the sum gathers them all.
    spread = torch.zeros(communicator.world_size, dtype=torch.float64)
    spread[communicator.rank] = ((values - mean).abs() / mean.abs().clamp_min(1.0)).max()
    communicator.all_reduce(spread)
    return float(spread.max())


def train_and_evaluate(rank: int, config: DemoConfig, data: DemoData, channel: RankChannel) -> dict[str, Any]:
    """Train every method and seed side by side on this rank's slices; rank 0 returns the test errors."""
    communicator = syncbn.get_communicator()  # the group SyncBatchNorm(process_group=None) synchronises over
    world_size = communicator.world_size
    per_rank = config.global_batch // world_size
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    seeds = list(range(config.seeds))
    models = {method: make_model(method, seeds) for method in METHODS}
    parameters = [parameter for model in models.values() for parameter in model.parameters()]
    # SGD updates each value on its own, so one optimizer over all the models trains each as if alone.
    optimizer = torch.optim.SGD(parameters, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    steps = steps_per_epoch(config, data)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
    data_order = [torch.Generator().manual_seed(seed) for seed in seeds]

    done = 0
    started = time.perf_counter()
    for _ in range(config.epochs):
        # The same permutations on every rank and at every world size: the global batches are the same images.
        orders = torch.stack([torch.randperm(len(x_train), generator=generator) for generator in data_order])
        for step in range(steps):
            start = step * config.global_batch + rank * per_rank
            batch = orders[:, start : start + per_rank]  # (seeds, per_rank): this rank's slice, per seed
            inputs, labels = x_train[batch], y_train[batch]
            optimizer.zero_grad()
            # Per model, the sum over seeds of each seed's mean loss: the copies share no parameter,
            # so each gets the gradient of its own loss, and one backward serves every model.
            losses = [
                F.cross_entropy(model(inputs).transpose(1, 2), labels, reduction="sum") / per_rank
                for model in models.values()
            ]
            torch.autograd.backward(torch.stack(losses).sum())
            _average_gradients(parameters, communicator)
            optimizer.step()
            scheduler.step()
            done += 1
            if rank == 0 and done % PROGRESS_EVERY == 0:
                channel.send("progress", PROGRESS_EVERY)
    training_seconds = time.perf_counter() - started
    if rank == 0 and done % PROGRESS_EVERY:
        channel.send("progress", done % PROGRESS_EVERY)
    # Evidence of what was synchronised: SyncBatchNorm's running statistics should be the same on every rank.
    rank_spread = {
        method: _spread_over_ranks(_running_stats(models[method]), communicator) for method in ("bn", "syncbn")
    }
    # PreciseBN: the same trained models with their statistics recomputed over one epoch of batches of this
    # rank's images (every rank takes part: the sums cross the ranks once, at the end), on copies.
    precise_order = torch.stack(
        [torch.randperm(len(x_train), generator=torch.Generator().manual_seed(PRECISE_ORDER_SEED + s)) for s in seeds]
    )
    starts = [step * config.global_batch + rank * per_rank for step in range(steps)]
    precise_batches = [x_train[precise_order[:, start : start + per_rank]] for start in starts]
    precise_models = {method: copy.deepcopy(models[method]) for method in PRECISE_METHODS}
    for model in precise_models.values():
        syncbn.precise_bn(model, precise_batches, num_batches=steps)
    if rank != 0:
        return {}

    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    def test_errors(model: nn.Module) -> list[float]:
        model.eval()  # running statistics; for unsynchronised BN, rank 0's own
        with torch.no_grad():
            predictions = model(x_test.expand(len(seeds), -1, -1)).argmax(dim=2)  # (seeds, test images)
        return (100.0 * (predictions != y_test).double().mean(dim=1)).tolist()  # type: ignore[no-any-return]

    errors = {method: test_errors(model) for method, model in models.items()}
    sync_layers = [layer for layer in models["syncbn"].modules() if isinstance(layer, syncbn.SyncBatchNorm)]
    return {
        "world_size": world_size,
        "per_rank_batch": per_rank,
        "steps": done,
        "training_seconds": round(training_seconds, 1),
        "syncbatchnorm_group_size": syncbn.get_communicator(sync_layers[0].process_group).world_size,
        "running_stats_max_relative_difference_between_ranks": rank_spread,
        "test_error_percent": errors,
        "precise_bn_test_error_percent": {method: test_errors(model) for method, model in precise_models.items()},
    }


def rank_main(
    rank: int, world_size: int, channel: RankChannel, store_port: int, config: DemoConfig, data_path: Path
) -> dict[str, Any]:
    """One rank (run by :class:`syncbn.harness.LocalRanks`): join the gloo group, train; rank 0's results."""
    data = DemoData.load(data_path)
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store = TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=timeout)
    with gloo_group(rank, world_size, timeout, store=store):
        return train_and_evaluate(rank, config, data, channel)


# --------------------------------------------------------------------------- the parent


def run_world(world_size: int, config: DemoConfig, data_path: Path, progress: Any) -> dict[str, Any]:
    """Start ``world_size`` ranks, wait for rank 0's result; the ranks never outlive this call.

    How the ranks are started: forked from a server that has imported torch
    once (the "forkserver" method, where it exists), since importing torch
    takes seconds of CPU per process and 8 processes share 2 cores here.

    Raises:
        DemoError: a rank failed or died, or the ranks ran past ``config.timeout_s``.
    """
    # The rendezvous lives here, on a port the OS picked when binding it: no other job can take it.
    store = TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=config.timeout_s),
        wait_for_workers=False,
    )
    started = time.monotonic()
    deadline = started + config.timeout_s
    # The data go by file: arguments go down a pipe that a child drains only after importing torch,
    # so large ones would make the processes start one after the other.
    ranks = LocalRanks(
        rank_main,
        world_size,
        args=(store.port, config, data_path),
        start_method="forkserver",
        preload=[__name__],
        name="syncbn-demo",
    )
    try:
        with ranks:
            results = ranks.wait(deadline, on_message=lambda message: progress.update(message[2]))
            ranks.stop(grace=max(1.0, min(10.0, deadline - time.monotonic())))
            if ranks.unclean_exits():  # the results are in; say so, since a launcher would call it a failure
                print(f"syncbn demo: after sending their results: {ranks.unclean_exits()}", file=sys.stderr)
    except RanksTimeoutError:
        raise DemoError(
            f"{world_size} ranks did not finish within {config.timeout_s:g} s; HINT: on a busy or slow machine "
            "give them longer with --timeout, or train less with --epochs"
        ) from None
    except RankError as error:
        raise DemoError(str(error)) from None
    finally:
        del store
    result = dict(results[0])
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def run_all(config: DemoConfig, data: DemoData) -> list[dict[str, Any]]:
    """Every world size in turn, with one progress bar (on stderr) over all their training steps."""
    with requires("tqdm", "demo"):
        from tqdm import tqdm

    total = len(config.world_sizes) * config.epochs * steps_per_epoch(config, data)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="syncbn-demo-") as directory,
        tqdm(total=total, unit="step", file=sys.stderr, mininterval=0.5, dynamic_ncols=True) as progress,
    ):
        data_path = Path(directory) / "digits.npz"
        data.save(data_path)
        for world_size in config.world_sizes:
            progress.set_description(f"{_ranks(world_size)} x {config.per_rank_batch(world_size)}")
            result = run_world(world_size, config, data_path, progress)
            if result["syncbatchnorm_group_size"] != world_size:
                raise DemoError(
                    f"SyncBatchNorm synchronised over {result['syncbatchnorm_group_size']} ranks, not {world_size}"
                )
            results.append(result)
    return results


# --------------------------------------------------------------------------- the report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def machine() -> dict[str, Any]:
    """What the run ran on."""
    return _machine.describe("scikit-learn")


def make_report(config: DemoConfig, data: DemoData, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the table, the plot and the JSON file show."""
    summary: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
    precise: dict[str, list[dict[str, float]]] = {method: [] for method in PRECISE_METHODS}
    for result in results:
        for method in METHODS:
            mean, std = _mean_std(result["test_error_percent"][method])
            summary[method].append({"per_rank_batch": result["per_rank_batch"], "mean": mean, "std": std})
        for method in PRECISE_METHODS:
            mean, std = _mean_std(result["precise_bn_test_error_percent"][method])
            precise[method].append({"per_rank_batch": result["per_rank_batch"], "mean": mean, "std": std})
    return {
        "command": _command(config),
        "config": {
            "world_sizes": list(config.world_sizes),
            "global_batch": config.global_batch,
            "per_rank_batches": [config.per_rank_batch(n) for n in config.world_sizes],
            "seeds": list(range(config.seeds)),
            "epochs": config.epochs,
            "steps_per_epoch": steps_per_epoch(config, data),
            "timeout_s": config.timeout_s,
            "dataset": "sklearn.datasets.load_digits (8x8, 10 classes)",
            "train_size": len(data.x_train),
            "test_size": len(data.x_test),
            "split": f"stratified, test fraction {TEST_FRACTION}, random_state {SPLIT_SEED}; standardised",
            "model": f"MLP 64-{'-'.join(map(str, HIDDEN))}-{NUM_CLASSES}, norm + ReLU after each hidden Linear",
            "groupnorm_groups": GROUPS,
            "optimizer": f"SGD lr {LEARNING_RATE}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, cosine to 0",
            "backend": "gloo over 127.0.0.1, one process per rank, 1 thread each",
            "unsynchronised_bn_evaluation": "rank 0's running statistics",
            "precise_bn": f"syncbn.precise_bn over one epoch ({steps_per_epoch(config, data)} batches per rank, "
            "another order), after training, on copies of the BatchNorm models",
        },
        "methods": dict(METHODS),
        "machine": machine(),
        "results": list(results),
        "summary": summary,
        "precise_bn_summary": precise,
        "total_seconds": round(sum(result["seconds"] for result in results), 1),
    }


def _cell(entry: dict[str, float], seeds: int) -> str:
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}" if seeds > 1 else f"{entry['mean']:.1f}"


def _loads(loads: list[float] | None) -> str:
    return "unknown" if loads is None else ", ".join(f"{load:.2f}" for load in loads)


def _ranks(world_size: int) -> str:
    return f"{world_size} rank{'s' if world_size > 1 else ''}"


def _column(result: dict[str, Any]) -> str:
    return f"{result['per_rank_batch']} ({_ranks(result['world_size'])})"


def _rows(report: dict[str, Any]) -> list[list[str]]:
    """The table's rows: each method, then the BatchNorm ones with PreciseBN statistics."""
    seeds = len(report["config"]["seeds"])
    rows = [
        [label, *(_cell(entry, seeds) for entry in report["summary"][method])]
        for method, label in report["methods"].items()
    ]
    for method, entries in report["precise_bn_summary"].items():
        rows.append([f"{report['methods'][method]} + PreciseBN", *(_cell(entry, seeds) for entry in entries)])
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The plain-text table: rows = methods, columns = images per rank."""
    seeds = len(report["config"]["seeds"])
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    rows = [["images per rank (ranks)", *(_column(result) for result in report["results"])], *_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"Test error (%) on digits, {spread}; global batch {report['config']['global_batch']} split over the ranks"
    ]
    for row in rows:
        label, *cells = row
        lines.append(
            "   ".join([label.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(cells, widths[1:], strict=True))])
        )
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """demo.md: the table, what it means, the command that regenerates it and the machine."""
    config, machine_info = report["config"], report["machine"]
    seeds = len(config["seeds"])
    header = ["images per rank (ranks)", *(_column(result) for result in report["results"])]
    rows = _rows(report)
    table = [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    paper = [
        "| images per GPU | " + " | ".join(map(str, PAPER_TABLE["images per GPU"])) + " |",
        "|---" + "|---:" * len(PAPER_TABLE["images per GPU"]) + "|",
        "| BN | " + " | ".join(map(str, PAPER_TABLE["BN"])) + " |",
        "| GN | " + " | ".join(map(str, PAPER_TABLE["GN"])) + " |",
    ]
    per_world = ", ".join(f"{_ranks(r['world_size'])}: {r['seconds']:.0f} s" for r in report["results"])
    spread = f"mean ± sample standard deviation over {seeds} seeds" if seeds > 1 else "one seed"
    several = [result for result in report["results"] if result["world_size"] > 1]
    spread_line = "every run had a single rank"
    if several:
        largest = {
            method: max(result["running_stats_max_relative_difference_between_ranks"][method] for result in several)
            for method in ("bn", "syncbn")
        }
        spread_line = (
            f"SyncBatchNorm's running statistics were the same on every rank (largest relative difference "
            f"from their mean over the ranks {largest['syncbn']:.1e}); those of unsynchronised BN differed "
            f"(up to {largest['bn']:.1e})"
        )
    lines = [
        "# syncbn demo: small per-rank batches",
        "",
        "Test error (%) of an MLP on scikit-learn's 8x8 digits, trained with a global batch of "
        f"{config['global_batch']} images split equally over 1 to {max(config['world_sizes'])} real processes "
        f"(torch.distributed gloo), {spread}.",
        "",
        *table,
        "",
        _reading(report),
        "",
        "![test error against images per rank](demo.png)",
        "",
        "- **BN, unsynchronised**: `nn.BatchNorm1d`, each rank normalises with its own images; gradients averaged "
        "over the ranks as DDP does; tested with rank 0's running statistics (those DDP keeps).",
        "- **SyncBatchNorm**: the same model through `syncbn.convert_sync_batchnorm`: every rank normalises with the "
        "statistics of the whole global batch.",
        f"- **GroupNorm**: `nn.GroupNorm({config['groupnorm_groups']}, 128)`, no batch statistics at all.",
        "- **+ PreciseBN**: the same trained BatchNorm model, its running statistics replaced by "
        f"`syncbn.precise_bn`'s ({config['precise_bn']}): the population statistics of the final weights, "
        "pooled over the ranks, instead of the exponential average kept while training.",
        "",
        "For a given seed the three models start from the same weights and see the same global batches in the same "
        "order at every world size; only the normalisation and the number of ranks differ.",
        "",
        f"Checked at the end of each run: {spread_line}.",
        "",
        "The experiment this mimics, Wu & He, *Group Normalization* (ECCV 2018), Table 2: ResNet-50 ImageNet "
        "validation error (%):",
        "",
        *paper,
        "",
        "## Setup",
        "",
        f"- Data: {config['dataset']}; {config['train_size']} training and {config['test_size']} test images "
        f"({config['split']}).",
        f"- Model: {config['model']}.",
        f"- Training: {config['epochs']} epochs of {config['steps_per_epoch']} steps; {config['optimizer']}.",
        f"- Processes: {config['backend']}; every rank trains all methods and seeds side by side.",
        "",
        "Regenerate with:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {machine_info['cpu_model']}, {machine_info['cpu_count']} CPUs, {machine_info['platform']}; "
        f"Python {machine_info['python']}, torch {machine_info['torch']}, syncbn {machine_info['syncbn']}; "
        f"{machine_info['date']}.",
        "",
        f"Wall time {report['total_seconds']:.0f} s ({per_world}, process start-up included); load average "
        f"(1, 5, 15 min) before the run {_loads(machine_info.get('load_average_before'))}, after "
        f"{_loads(machine_info['load_average'])} (other jobs on the machine slow the ranks down).",
        "",
    ]
    return "\n".join(lines)


def _reading(report: dict[str, Any]) -> str:
    """One sentence that states the table's extremes: the whole batch on one rank against the smallest slices."""
    first, last = report["results"][0], report["results"][-1]
    summary = report["summary"]
    mean = {method: (entries[0]["mean"], entries[-1]["mean"]) for method, entries in summary.items()}
    precise = {
        method: (entries[0]["mean"], entries[-1]["mean"]) for method, entries in report["precise_bn_summary"].items()
    }
    return (
        f"From {first['per_rank_batch']} images per rank on {_ranks(first['world_size'])} to "
        f"{last['per_rank_batch']} on each of {_ranks(last['world_size'])}, the test error goes: unsynchronised BN "
        f"{mean['bn'][0]:.1f} % → {mean['bn'][1]:.1f} %, SyncBatchNorm {mean['syncbn'][0]:.1f} % → "
        f"{mean['syncbn'][1]:.1f} %, GroupNorm {mean['gn'][0]:.1f} % → {mean['gn'][1]:.1f} %; with PreciseBN "
        f"statistics, unsynchronised BN {precise['bn'][0]:.1f} % → {precise['bn'][1]:.1f} %, SyncBatchNorm "
        f"{precise['syncbn'][0]:.1f} % → {precise['syncbn'][1]:.1f} %."
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Test error against images per rank (log2 axis, decreasing as in the paper), error bars = std over seeds."""
    with requires("matplotlib", "demo"):
        from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    per_rank = [result["per_rank_batch"] for result in report["results"]]
    # Distinct line styles and marker sizes: where two methods coincide (at 1 rank, BN and
    # SyncBatchNorm are the same computation) both stay visible.
    styles = [("o", "-", 9), ("s", "--", 6), ("D", ":", 5)]
    for (method, label), (marker, line, size) in zip(report["methods"].items(), styles, strict=True):
        entries = report["summary"][method]
        axes.errorbar(
            per_rank,
            [entry["mean"] for entry in entries],
            yerr=[entry["std"] for entry in entries],
            label=label,
            marker=marker,
            markersize=size,
            linestyle=line,
            capsize=4,
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(per_rank, [_column(result).replace(" (", "\n(") for result in report["results"]])
    axes.minorticks_off()
    axes.invert_xaxis()  # fewer images per rank to the right, as in the paper's figures
    axes.set_xlabel(f"images per rank (ranks); global batch {report['config']['global_batch']}")
    axes.set_ylabel("test error (%)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    seeds = len(report["config"]["seeds"])
    axes.set_title(f"Test error on digits (MLP), mean ± std over {seeds} seed{'s' if seeds > 1 else ''}")
    figure.savefig(path, dpi=150)
