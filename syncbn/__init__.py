"""syncbn: synchronised Batch Normalization across processes (torch.distributed or MPI).

>>> import syncbn
>>> bn = syncbn.SyncBatchNorm(64)                         # a drop-in for torch.nn.SyncBatchNorm
>>> ctx = syncbn.init_distributed()                       # doctest: +SKIP
>>> model = syncbn.convert_sync_batchnorm(model)          # doctest: +SKIP
"""

from syncbn import debug, faults, ops
from syncbn.batchnorm import (
    LazySyncBatchNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
    name_layers,
    revert_sync_batchnorm,
)
from syncbn.comm import Communicator, get_communicator, get_default_process_group, set_default_process_group
from syncbn.distributed import DistributedContext, init_distributed
from syncbn.environments import LaunchError, detect_environment
from syncbn.frozen import FrozenBatchNorm, freeze_batchnorm, unfreeze_batchnorm
from syncbn.gradients import average_gradients
from syncbn.groups import new_groups
from syncbn.statistics import precise_bn, sync_running_stats

__all__ = [
    "Communicator",
    "DistributedContext",
    "FrozenBatchNorm",
    "LaunchError",
    "LazySyncBatchNorm",
    "SyncBatchNorm",
    "average_gradients",
    "convert_sync_batchnorm",
    "debug",
    "detect_environment",
    "faults",
    "freeze_batchnorm",
    "get_communicator",
    "get_default_process_group",
    "init_distributed",
    "name_layers",
    "new_groups",
    "ops",
    "precise_bn",
    "revert_sync_batchnorm",
    "set_default_process_group",
    "sync_running_stats",
    "unfreeze_batchnorm",
]
__version__ = "0.1.0"
