"""syncbn: synchronised Batch Normalization across processes (torch.distributed or MPI).

>>> import syncbn
>>> bn = syncbn.SyncBatchNorm(64)                         # a drop-in for torch.nn.SyncBatchNorm
>>> model = syncbn.convert_sync_batchnorm(model)          # doctest: +SKIP
"""

from syncbn.batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.comm import Communicator, get_communicator

__all__ = [
    "Communicator",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "get_communicator",
    "revert_sync_batchnorm",
]
__version__ = "0.1.0"
