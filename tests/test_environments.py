"""How a process was started: each launcher's variables, the rule that picks one, and the errors.

Environments here are plain dicts (what the launchers would set); the
launches themselves run for real in test_launch.py and test_slurm.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import syncbn
from syncbn.environments import (
    HydraEnvironment,
    LaunchError,
    OpenMPIEnvironment,
    SingleProcessEnvironment,
    SlurmEnvironment,
    TorchElasticEnvironment,
    detect_environment,
    expand_nodelist,
    first_host,
    port_from_job_id,
)
from tests.needs import require_mpi

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"}  # fmt: skip


def slurm_step(rank: int = 5, tasks: int = 8, nodes: int = 2, local: int = 1, **extra: str) -> dict[str, str]:
    """What srun sets in a task of a step (the batch script's variables included)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        **extra,
    }


# --- Slurm node lists ---


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
        ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
        ("a,b,c", ["a", "b", "c"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("n[1-2]x,m[5]", ["n1x", "n2x", "m5"]),
        ("node-0.cluster", ["node-0.cluster"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["", "node[1-", "node]1", "n[3-1]", "n[a-b]", "a,,b", "n[1-2"])
def test_malformed_nodelist(nodelist: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


def test_first_host_does_not_expand_the_whole_list() -> None:
    assert first_host("n[000001-999999]") == "n000001"


def test_port_from_job_id_is_stable_and_in_range() -> None:
    ports = {port_from_job_id(job) for job in range(100_000, 100_500)}
    assert len(ports) == 500
    assert all(1024 < port < 32768 for port in ports)
    assert port_from_job_id(4242) == port_from_job_id(4242)


# --- one class per launcher ---


def test_torchrun() -> None:
    env = detect_environment(TORCHRUN)
    assert isinstance(env, TorchElasticEnvironment)
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 1)
    assert (env.main_address, env.main_port) == ("n1", 29500)


def test_slurm_step() -> None:
    env = detect_environment(slurm_step())
    assert isinstance(env, SlurmEnvironment)
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes) == (5, 8, 1, 2)
    assert env.main_address == "gpu07"
    assert env.main_port == port_from_job_id(4242)


def test_slurm_master_variables_override() -> None:
    env = detect_environment(slurm_step(MASTER_ADDR="head", MASTER_PORT="23456"))
    assert (env.main_address, env.main_port) == ("head", 23456)


def test_mpich_hydra() -> None:
    env = detect_environment({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})
    assert isinstance(env, HydraEnvironment)
    assert (env.rank, env.world_size, env.local_rank, env.knows_local_rank) == (2, 4, 0, True)
    assert (env.main_address, env.main_port) == (None, None)


def test_hydra_without_local_rank_leaves_it_to_mpi() -> None:
    env = detect_environment({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert isinstance(env, HydraEnvironment) and not env.knows_local_rank


def test_open_mpi() -> None:
    env = detect_environment(
        {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    )
    assert isinstance(env, OpenMPIEnvironment)
    assert (env.rank, env.world_size, env.local_rank) == (5, 6, 2)


def test_plain_process() -> None:
    env = detect_environment({"PATH": "/usr/bin"})
    assert isinstance(env, SingleProcessEnvironment)
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)


# --- precedence when several launchers' variables are present ---


def test_torchrun_inside_srun_with_one_task_per_node() -> None:
    env = detect_environment({**slurm_step(rank=1, tasks=2, nodes=2, local=0), **TORCHRUN})
    assert isinstance(env, TorchElasticEnvironment)


def test_mpiexec_inside_an_allocation_wins_over_the_inherited_slurm_variables() -> None:
    # Hydra's proxies run in a Slurm step of one task per node: those variables describe the proxies.
    proxies = slurm_step(rank=0, tasks=1, nodes=1, local=0)
    env = detect_environment({**proxies, "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3"})
    assert isinstance(env, HydraEnvironment) and env.rank == 3


def test_srun_pmi2_is_read_as_slurm() -> None:
    env = detect_environment({**slurm_step(rank=5, tasks=8), "PMI_RANK": "5", "PMI_SIZE": "8"})
    assert isinstance(env, SlurmEnvironment) and env.local_rank == 1


def batch_script(tasks: int) -> dict[str, str]:
    """What the batch script of an sbatch job sees: the job's variables, no step."""
    return {k: v for k, v in slurm_step(rank=0, tasks=tasks, nodes=1, local=0).items() if "STEP" not in k}


def test_the_batch_script_itself_is_not_a_slurm_task() -> None:
    assert isinstance(detect_environment(batch_script(tasks=1)), SingleProcessEnvironment)
    assert isinstance(detect_environment({**batch_script(1), "SLURM_STEP_ID": "batch"}), SingleProcessEnvironment)


# --- misconfiguration: what was found, and the fix ---


def test_torchrun_started_by_srun_with_several_tasks_per_node() -> None:
    with pytest.raises(LaunchError, match=r"8 tasks on 2 node.*HINT: start one torchrun per node.*ntasks-per-node=1"):
        detect_environment({**slurm_step(), **TORCHRUN})


def test_plain_process_in_a_multi_task_batch_script() -> None:
    with pytest.raises(LaunchError, match=r"job 4242, which asked for 4 tasks.*HINT: .*srun python train.py"):
        detect_environment(batch_script(tasks=4))


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({**slurm_step(), "WORLD_SIZE": "16"}, r"WORLD_SIZE=16 is set.*\(slurm\) gives world size 8.*HINT: remove"),
        ({"PMI_RANK": "1", "PMI_SIZE": "4", "RANK": "0"}, r"RANK=0 is set.*gives rank 1.*HINT"),
    ],
    ids=["world-size", "rank"],
)
def test_torch_variables_that_disagree_with_the_launcher(environ: dict[str, str], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        detect_environment(environ)


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({**TORCHRUN, "RANK": "x"}, r"RANK='x' is not an integer"),
        ({**TORCHRUN, "RANK": "8"}, r"rank 8 is outside a world of size 8"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a port number"),
        (slurm_step(local=9), r"SLURM_LOCALID=9 is outside"),
        ({**slurm_step(), "SLURM_PROCID": "-1"}, r"rank -1 is outside"),
        ({**slurm_step(), "SLURM_STEP_NUM_TASKS": "0", "SLURM_NTASKS": "0"}, r"world size is 0"),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"}, r"OMPI_COMM_WORLD_SIZE='two'"),
    ],
    ids=["not-int", "rank-range", "local-range", "port", "localid", "negative", "zero-world", "ompi-size"],
)
def test_malformed_variables(environ: dict[str, str], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        detect_environment(environ)


def test_slurm_without_a_node_list_needs_master_addr() -> None:
    environ = {k: v for k, v in slurm_step().items() if "NODELIST" not in k}
    env = detect_environment(environ)
    with pytest.raises(LaunchError, match=r"SLURM_NODELIST is not set.*HINT: set MASTER_ADDR"):
        _ = env.main_address


# --- init_distributed in this process (a world of one) ---


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'nccl', 'gloo', 'mpi', got 'ucc'"):
        syncbn.init_distributed("ucc", environ={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_nccl_without_cuda() -> None:
    with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA.*HINT"):
        syncbn.init_distributed("nccl", environ={})


def test_init_distributed_single_process_gloo() -> None:
    assert not dist.is_initialized()
    with syncbn.init_distributed("gloo", timeout=30, environ={}) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (0, 1, 0, "gloo")
        assert ctx.launcher == "single process" and ctx.is_main
        assert ctx.device == torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert ctx.process_group is dist.group.WORLD
        assert syncbn.get_communicator(None).world_size == 1
        layer = syncbn.SyncBatchNorm(3)
        x = torch.randn(4, 3, 5)
        assert torch.allclose(layer(x), torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6)
    assert not dist.is_initialized()


def test_init_distributed_reuses_an_initialised_group() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        ctx = syncbn.init_distributed(environ={})
        assert ctx.backend == "gloo" and ctx.world_size == 1
        ctx.close()
        assert dist.is_initialized()  # not ours to destroy
    finally:
        dist.destroy_process_group()


def test_init_distributed_mpi_single_process_sets_the_default_group() -> None:
    MPI = require_mpi()
    with syncbn.init_distributed("mpi", environ={}) as ctx:
        assert ctx.process_group is MPI.COMM_WORLD and ctx.backend == "mpi"
        assert syncbn.get_default_process_group() is MPI.COMM_WORLD
        assert syncbn.get_communicator(None).name == "mpi"
    assert syncbn.get_default_process_group() is None
    assert syncbn.get_communicator(None).name == "local"


def test_mpi_backend_refuses_torchrun() -> None:
    require_mpi()
    with pytest.raises(LaunchError, match=r"backend='mpi' under torchrun.*HINT: launch with `mpiexec"):
        syncbn.init_distributed("mpi", environ=TORCHRUN)


def test_mpi_world_that_disagrees_with_the_launcher() -> None:
    # This process is an MPI world of one; a launcher claiming 4 ranks means another MPI's mpiexec started it.
    require_mpi()
    with pytest.raises(LaunchError, match=r"rank 2 of 4, but MPI.COMM_WORLD makes it rank 0 of 1.*HINT"):
        syncbn.init_distributed("mpi", environ={"PMI_RANK": "2", "PMI_SIZE": "4"})


def test_set_default_process_group_refuses_what_is_not_a_group() -> None:
    with pytest.raises(TypeError, match="process_group must be"):
        syncbn.set_default_process_group(object())
    assert syncbn.get_default_process_group() is None


# --- the CUDA device from the local rank (CUDA's answers patched: this machine may have no GPU) ---


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [(4, 0, 0), (4, 3, 3), (1, 0, 0), (1, 5, 0)],  # one visible GPU: Slurm's --gpus-per-task binding
    ids=["first", "last", "one-visible", "one-visible-high-rank"],
)
def test_device_from_local_rank(monkeypatch: pytest.MonkeyPatch, visible: int, local_rank: int, expected: int) -> None:
    from syncbn import distributed

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed._select_device(local_rank) == torch.device("cuda", expected)
    assert chosen == [expected]


def test_more_local_ranks_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from syncbn import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchError, match=r"local rank 2 but only 2 CUDA devices.*HINT: start at most 2 processes"):
        distributed._select_device(2)
