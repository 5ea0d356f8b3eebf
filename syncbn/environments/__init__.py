"""How this process was started: one class per launcher, and the rule that picks one.

Every environment variable syncbn reads is read here, by the class of the
launcher that sets it. :func:`detect_environment` tries them in an order that
resolves the cases where several launchers' variables are present at once:

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), even inside ``srun``;
2. Open MPI's ``mpirun`` (``OMPI_COMM_WORLD_*``);
3. MPICH/Hydra's ``mpiexec`` (``PMI_RANK``, ``PMI_SIZE``); when a Slurm step
   agrees with it, it is ``srun --mpi=pmi2`` and the Slurm view is taken (it
   knows the local rank);
4. a Slurm job step (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``);
5. a plain process (a world of one).

An MPI launcher comes before Slurm because ``mpiexec`` run inside an
allocation inherits the batch script's Slurm variables (or those of the step
that started its proxies), which describe the launcher, not the ranks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from syncbn.environments.base import ClusterEnvironment, LaunchError
from syncbn.environments.mpi import HydraEnvironment, OpenMPIEnvironment
from syncbn.environments.single import SingleProcessEnvironment
from syncbn.environments.slurm import SlurmEnvironment, expand_nodelist, first_host, port_from_job_id
from syncbn.environments.torchelastic import TorchElasticEnvironment

__all__ = [
    "ClusterEnvironment",
    "HydraEnvironment",
    "LaunchError",
    "OpenMPIEnvironment",
    "SingleProcessEnvironment",
    "SlurmEnvironment",
    "TorchElasticEnvironment",
    "detect_environment",
    "expand_nodelist",
    "first_host",
    "launcher_variables",
    "port_from_job_id",
]

# The variables of every launcher above (and the CUDA/NCCL ones a report should show), by prefix or name.
_REPORTED = re.compile(
    r"^(SLURM_(JOB_ID|JOB_NAME|PROCID|LOCALID|NTASKS|NNODES|NODELIST|STEP_ID|STEP_NUM_TASKS|STEP_NUM_NODES|"
    r"CPUS_PER_TASK|GPUS.*|TASKS_PER_NODE)|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|"
    r"MASTER_PORT|TORCHELASTIC_.*|PMI_RANK|PMI_SIZE|MPI_LOCALRANKID|MPI_LOCALNRANKS|OMPI_COMM_WORLD_.*|PMIX_RANK|"
    r"CUDA_VISIBLE_DEVICES|NCCL_.*|TORCH_NCCL_.*|OMP_NUM_THREADS)$"
)


def detect_environment(environ: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """The launcher that started this process, read from ``environ`` (default ``os.environ``).

    Raises:
        LaunchError: when the variables found do not make a consistent job;
            the message says what was found and how to fix the launch.
    """
    environ = os.environ if environ is None else environ
    slurm = SlurmEnvironment(environ) if SlurmEnvironment.detect(environ) else None
    environment: ClusterEnvironment
    if TorchElasticEnvironment.detect(environ):
        environment = TorchElasticEnvironment(environ)
        if slurm is not None and slurm.world_size > slurm.num_nodes:
            raise LaunchError(
                f"torchrun runs inside a Slurm step of {slurm.world_size} tasks on {slurm.num_nodes} node(s): "
                "several torchrun agents per node each start their own workers, and the rendezvous fails or "
                "hangs; HINT: start one torchrun per node, `srun --ntasks-per-node=1 torchrun "
                "--nnodes=$SLURM_NNODES --nproc-per-node=<GPUs per node> ...` (see slurm/torchrun_per_node.sbatch), "
                "or let srun start every task without torchrun (see slurm/srun_per_gpu.sbatch)"
            )
    elif OpenMPIEnvironment.detect(environ):
        environment = OpenMPIEnvironment(environ)
    elif HydraEnvironment.detect(environ):
        hydra = HydraEnvironment(environ)
        agrees = slurm is not None and (slurm.rank, slurm.world_size) == (hydra.rank, hydra.world_size)
        environment = slurm if agrees and slurm is not None else hydra
    elif slurm is not None:
        environment = slurm
    else:
        environment = SingleProcessEnvironment(environ)
        _check_batch_script(environ)
    environment.validate()
    if not isinstance(environment, TorchElasticEnvironment):
        _check_torch_variables(environ, environment)
    return environment


def _check_torch_variables(environ: Mapping[str, str], environment: ClusterEnvironment) -> None:
    """``WORLD_SIZE``/``RANK`` left in the environment must agree with the launcher that is in charge."""
    for variable, launcher_value in (("WORLD_SIZE", environment.world_size), ("RANK", environment.rank)):
        value = environ.get(variable)
        if value and value.strip() != str(launcher_value):
            raise LaunchError(
                f"{variable}={value} is set in the environment, but the launcher ({environment.name}) gives "
                f"{variable.lower().replace('_', ' ')} {launcher_value}; HINT: remove {variable} from the job "
                "script or the shell: the launcher sets the ranks itself"
            )


def _check_batch_script(environ: Mapping[str, str]) -> None:
    """A plain process in the batch script of a multi-task Slurm job was almost surely meant to be ``srun``."""
    tasks = environ.get("SLURM_NTASKS")
    if environ.get("SLURM_JOB_ID") and tasks and tasks.isdigit() and int(tasks) > 1:
        raise LaunchError(
            f"this process runs in the batch script of Slurm job {environ['SLURM_JOB_ID']}, which asked for "
            f"{tasks} tasks, but no launcher started it, so it would train alone; HINT: start the tasks with "
            "`srun python train.py` (or `srun --ntasks-per-node=1 torchrun ...`, or `mpiexec`)"
        )


def launcher_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher, CUDA and NCCL variables set in ``environ`` (default ``os.environ``), sorted by name."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in sorted(environ) if _REPORTED.match(name)}
