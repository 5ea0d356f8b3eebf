"""torchrun / torchelastic, and any launcher that sets torch.distributed's ``env://`` variables."""

from __future__ import annotations

from collections.abc import Mapping

from syncbn.environments.base import ClusterEnvironment, LaunchError, parse_port

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TorchElasticEnvironment(ClusterEnvironment):
    """A worker started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    With the c10d rendezvous, ``MASTER_ADDR``/``MASTER_PORT`` are those of
    the store torchrun's agents already agreed on, so every worker of every
    node reads the same ones.
    """

    name = "torchrun"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return all(environ.get(name) for name in _REQUIRED)

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self._rank = self._int("RANK")
        self._world_size = self._int("WORLD_SIZE")
        self._local_rank = self._int("LOCAL_RANK")
        self._local_world_size = self._int("LOCAL_WORLD_SIZE", default=0) or None
        self._address = self._get("MASTER_ADDR")
        port = self._get("MASTER_PORT")
        self._port = None if port is None else parse_port(port, "MASTER_PORT", self.name)

    @property
    def main_address(self) -> str | None:
        return self._address

    @property
    def main_port(self) -> int | None:
        return self._port

    @property
    def restart_count(self) -> int:
        """How many times torchrun restarted this job's workers (0 on the first run)."""
        return self._int("TORCHELASTIC_RESTART_COUNT", default=0)

    def validate(self) -> None:
        super().validate()
        if self._local_world_size is not None and not 0 <= self._local_rank < self._local_world_size:
            raise LaunchError(
                f"torchrun: LOCAL_RANK={self._local_rank} is outside LOCAL_WORLD_SIZE={self._local_world_size}"
            )
