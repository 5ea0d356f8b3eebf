"""A plain process that no launcher started: a world of one."""

from __future__ import annotations

from collections.abc import Mapping

from syncbn.environments.base import ClusterEnvironment


class SingleProcessEnvironment(ClusterEnvironment):
    """``python train.py``: rank 0 of 1. Always detected; the last resort."""

    name = "single process"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return True

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def knows_local_rank(self) -> bool:
        return False  # an unknown launcher may have started several processes per node
