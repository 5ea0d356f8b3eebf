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

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self._rank, self._world_size, self._local_rank = 0, 1, 0

    @property
    def knows_local_rank(self) -> bool:
        return False  # an unknown launcher may have started several processes per node
