"""Lightning integration: a ``LayerSync`` plugin that trains with syncbn's layers instead of torch's.

Lightning's ``Trainer(sync_batchnorm=True)`` converts a model's BatchNorm
layers to ``torch.nn.SyncBatchNorm``, which DDP refuses on CPU ("SyncBatchNorm
layers only work with GPU modules"), and reverts only that class. Give the
trainer this plugin instead::

    import lightning
    from syncbn.lightning import SyncBatchNormPlugin

    trainer = lightning.Trainer(strategy="ddp", plugins=[SyncBatchNormPlugin()])

Lightning converts the model when it sets up the strategy, before DDP wraps it,
and reverts it when training ends, as :func:`syncbn.revert_sync_batchnorm`
does (each layer to the class it was converted from; ``nn.BatchNorm1d/2d/3d``
by the input it has seen for one built as a SyncBatchNorm, ``nn.BatchNorm2d``
for one that never ran). A ``torch.distributed`` subgroup for
``process_group`` can only exist once Lightning has initialised the default
group: set ``trainer.strategy._layer_sync.process_group`` in the module's
``setup()`` hook, which runs before the conversion. Lightning refuses the plugin together with
``sync_batchnorm=True``: choose one. Needs the ``lightning`` package
(``lightning.pytorch``; tested with Lightning 2.6).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from syncbn._install import install_command
from syncbn.batchnorm import convert_sync_batchnorm, revert_sync_batchnorm

try:
    from lightning.pytorch.plugins.layer_sync import LayerSync
except ModuleNotFoundError as error:  # pragma: no cover - depends on what is installed
    if error.name is None or error.name.split(".")[0] != "lightning":
        raise  # lightning is there but something it imports is not: that error says what
    raise ModuleNotFoundError(
        f"syncbn.lightning needs the lightning package with lightning.pytorch.plugins.layer_sync (Lightning 2), "
        f"which could not be imported ({error}). HINT: " + install_command("lightning"),
        name="lightning",
    ) from error

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Converts every BatchNorm layer to :class:`syncbn.SyncBatchNorm` for training, and back after it.

    Args:
        process_group: the group the layers synchronise over, as in
            :func:`syncbn.convert_sync_batchnorm` (``None``: the default group,
            the one Lightning's DDP strategy initialises).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model, process_group=self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
