"""What a launcher tells a process about the job it belongs to, behind one small interface."""

from __future__ import annotations

import abc
from collections.abc import Mapping


class LaunchError(RuntimeError):
    """The way this process was started does not make a consistent job.

    The message says what was found and how to fix the launch.
    """


class ClusterEnvironment(abc.ABC):
    """The job as one launcher (torchrun, Slurm's ``srun``, an MPI launcher...) describes it.

    Each subclass reads its launcher's environment variables, and only those,
    from the mapping it is given (``os.environ`` in a real job; a plain dict in
    tests). Parsing happens in the constructor, so a malformed variable is
    reported at once, naming the variable.
    """

    #: Short name of the launcher, for messages and reports.
    name: str = "abstract"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    @staticmethod
    @abc.abstractmethod
    def detect(environ: Mapping[str, str]) -> bool:
        """Whether ``environ`` is that of a process started by this launcher."""

    # Set by each subclass's constructor from its launcher's variables.
    _rank: int
    _world_size: int
    _local_rank: int

    @property
    def rank(self) -> int:
        """Global rank of this process, ``0 <= rank < world_size``."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of processes in the job."""
        return self._world_size

    @property
    def local_rank(self) -> int:
        """Rank of this process among those on its node (selects the GPU)."""
        return self._local_rank

    @property
    def knows_local_rank(self) -> bool:
        """Whether the launcher gave the local rank (otherwise MPI's shared-memory split can tell it)."""
        return True

    @property
    def main_address(self) -> str | None:
        """Host of torch.distributed's rendezvous: ``MASTER_ADDR`` when set, else the launcher's, else None."""
        return self._get("MASTER_ADDR")

    @property
    def main_port(self) -> int | None:
        """Port of torch.distributed's rendezvous: ``MASTER_PORT`` when set, else the launcher's, else None."""
        port = self._get("MASTER_PORT")
        return None if port is None else parse_port(port, "MASTER_PORT", self.name)

    def validate(self) -> None:
        """Raise :class:`LaunchError` if the values do not make a consistent job."""
        if self.world_size < 1:
            raise LaunchError(f"{self.name}: the world size is {self.world_size}; it must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.name}: rank {self.rank} is outside a world of size {self.world_size}")
        if self.local_rank < 0:
            raise LaunchError(f"{self.name}: the local rank is {self.local_rank}; it must be at least 0")

    # --- helpers for subclasses ---

    def _get(self, name: str) -> str | None:
        value = self._environ.get(name)
        return value if value not in (None, "") else None

    def _int(self, *names: str, default: int | None = None) -> int:
        """The integer value of the first of ``names`` that is set."""
        for name in names:
            value = self._get(name)
            if value is None:
                continue
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{self.name}: environment variable {name}={value!r} is not an integer") from None
        if default is not None:
            return default
        raise LaunchError(f"{self.name}: environment variable {' or '.join(names)} is not set")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"main_address={self.main_address!r}, main_port={self.main_port!r})"
        )


def parse_port(value: str, variable: str, launcher: str) -> int:
    """A TCP port from an environment variable, or :class:`LaunchError` naming it."""
    try:
        port = int(value)
    except ValueError:
        raise LaunchError(f"{launcher}: {variable}={value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise LaunchError(f"{launcher}: {variable}={port} is not a port number (1 to 65535)")
    return port
