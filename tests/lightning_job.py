"""A 2-rank Lightning job on CPU (DDP over gloo) with syncbn's plugin: ``python tests/lightning_job.py OUT_DIR``.

Lightning starts rank 1 itself, by running this script again. Each rank writes
``OUT_DIR/rank<r>.json``: the layer classes during and after training, and, for
every step, how far the layer's output and running statistics are from the
float64 oracle (``nn.functional.batch_norm`` on the batches of both ranks, gathered).
tests/test_lightning.py runs it and checks what it wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.environments import LightningEnvironment
from torch import nn

from syncbn.lightning import SyncBatchNormPlugin

STEPS = 3
MOMENTUM = 0.1


class Model(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        )
        self.during: list[str] = []
        self.errors: list[dict[str, float]] = []
        self._seen: dict[str, torch.Tensor] = {}

    def on_fit_start(self) -> None:
        self.during = sorted({type(m).__name__ for m in self.modules()})
        self.net[1].register_forward_hook(self._record)

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self._seen = {"input": inputs[0].detach(), "output": output.detach()}

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        layer = self.net[1]
        before = layer.running_mean.clone(), layer.running_var.clone()
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        # The oracle: batch norm over the batches of both ranks, in float64.
        everything = self.all_gather(self._seen["input"]).double()  # (world, N, C, H, W)
        whole = everything.flatten(0, 1)
        expected = F.batch_norm(
            whole, None, None, layer.weight.detach().double(), layer.bias.detach().double(), True, 0.0, layer.eps
        )
        mine = expected.view_as(everything)[self.global_rank]
        mean = whole.mean((0, 2, 3))
        var = whole.var((0, 2, 3), correction=1)
        self.errors.append(
            {
                "output": float((self._seen["output"].double() - mine).abs().max()),
                "running_mean": float(
                    (layer.running_mean.double() - ((1 - MOMENTUM) * before[0].double() + MOMENTUM * mean)).abs().max()
                ),
                "running_var": float(
                    (layer.running_var.double() - ((1 - MOMENTUM) * before[1].double() + MOMENTUM * var)).abs().max()
                ),
            }
        )
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 3, 6, 6, generator=generator) * 2 + 1, torch.randn(16, 2, generator=generator)
    )
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        # The cluster environment named, not detected: Lightning would probe for MPI and Slurm otherwise.
        plugins=[SyncBatchNormPlugin(), LightningEnvironment()],
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Model()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    report = {
        "world_size": trainer.world_size,
        "during": model.during,
        "after": sorted({type(m).__name__ for m in model.modules()}),
        "errors": model.errors,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
