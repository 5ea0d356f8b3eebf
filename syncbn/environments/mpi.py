"""MPI launchers: MPICH's Hydra ``mpiexec`` (and Intel MPI) and Open MPI's ``mpirun``."""

from __future__ import annotations

from collections.abc import Mapping

from syncbn.environments.base import ClusterEnvironment


class _MPILauncherEnvironment(ClusterEnvironment):
    """Rank and size from the launcher's variables; the local rank too when it sets one."""

    _RANK: str
    _SIZE: str
    _LOCAL_RANK: str

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return bool(environ.get(cls._RANK)) and bool(environ.get(cls._SIZE))

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self._rank = self._int(self._RANK)
        self._world_size = self._int(self._SIZE)
        # Without the launcher's local rank, 0 here; init_distributed then asks MPI when a GPU depends on it.
        self._knows_local_rank = self._get(self._LOCAL_RANK) is not None
        self._local_rank = self._int(self._LOCAL_RANK, default=0)

    @property
    def knows_local_rank(self) -> bool:
        return self._knows_local_rank


class HydraEnvironment(_MPILauncherEnvironment):
    """MPICH's (and Intel MPI's) ``mpiexec``: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``."""

    name = "mpiexec (MPICH/Hydra)"
    _RANK, _SIZE, _LOCAL_RANK = "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"


class OpenMPIEnvironment(_MPILauncherEnvironment):
    """Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``."""

    name = "mpirun (Open MPI)"
    _RANK, _SIZE, _LOCAL_RANK = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"
