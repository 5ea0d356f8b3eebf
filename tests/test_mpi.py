"""The shared test bodies over mpi4py communicators, with no torch.distributed at all.

Run at every size with the same file:

    python -m pytest --with-mpi tests/test_mpi.py                  # size 1
    mpiexec -n 2 python -m pytest --with-mpi tests/test_mpi.py
    mpiexec -n 4 python -m pytest --with-mpi tests/test_mpi.py

Without ``--with-mpi`` pytest-mpi skips them. A hung collective is caught by
pytest-timeout (the process exits, and mpiexec then ends the other ranks).
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests import cases, cuda_emulator
from tests.needs import require_mpi

MPI = require_mpi()

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture
def comm() -> Any:
    return MPI.COMM_WORLD


@pytest.fixture
def seed(comm: Any) -> int:
    """Fresh on every run, the same on every rank; printed so that a failure can be replayed."""
    value = comm.bcast(random.randrange(2**31) if comm.Get_rank() == 0 else None, root=0)
    print(f"seed={value}")
    return value


@pytest.mark.parametrize(("ops", "name", "kwargs"), cases.ORACLE_MATRIX, ids=cases.ORACLE_IDS)
def test_oracle(comm: Any, seed: int, ops: str, name: str, kwargs: dict) -> None:
    cases.check_against_oracle(comm, seed, ops=ops, **kwargs)


@pytest.mark.emulated
@pytest.mark.parametrize(("name", "kwargs"), cases.CUDA_MATRIX, ids=cases.CUDA_IDS)
def test_oracle_on_the_cuda_kernels_emulated(comm: Any, seed: int, name: str, kwargs: dict) -> None:
    """The CUDA implementation's kernels in the emulator (tests/cuda_emulator.py), on CPU tensors over MPI."""
    cuda_emulator.build()  # kept on disk: plain pytest has built it already
    cuda_emulator.check_against_oracle(comm, seed, **kwargs)


def test_one_sample_per_rank_2d(comm: Any, seed: int) -> None:
    if comm.Get_size() == 1:
        # One sample in the whole group is one value per channel: an error, and the layer stays usable.
        cases.check_single_value_error(comm, seed)
    else:
        cases.check_against_oracle(comm, seed, batch=1, tail=())


def test_split_communicator(comm: Any, seed: int) -> None:
    """Even and odd ranks normalise over their own halves only."""
    sub = comm.Split(color=comm.Get_rank() % 2, key=comm.Get_rank())
    try:
        cases.check_against_oracle(sub, seed + comm.Get_rank() % 2, batch=[2, 3])
    finally:
        sub.Free()


def test_collective_count(comm: Any, seed: int) -> None:
    cases.check_collective_count(comm, seed)


def test_input_grad_on_some_ranks(comm: Any, seed: int) -> None:
    cases.check_input_grad_on_some_ranks(comm, seed)


def test_eval_is_local(comm: Any, seed: int) -> None:
    cases.check_eval_is_local(comm, seed)
    comm.Barrier()


def test_all_empty(comm: Any, seed: int) -> None:
    cases.check_all_empty(comm, seed)


def test_single_value_error(comm: Any, seed: int) -> None:
    cases.check_single_value_error(comm, seed)


def test_big_count(comm: Any, seed: int) -> None:
    cases.check_big_count(comm, seed)


def test_training_matches_full_batch(comm: Any, seed: int) -> None:
    cases.check_training_matches_full_batch(comm, seed)


def test_world_size_is_the_communicators(comm: Any) -> None:
    from syncbn.comm import MPICommunicator, get_communicator

    communicator = get_communicator(comm)
    assert isinstance(communicator, MPICommunicator)
    assert (communicator.rank, communicator.world_size) == (comm.Get_rank(), comm.Get_size())
    buffer = torch.full((3,), float(comm.Get_rank() + 1), dtype=torch.float64)
    communicator.all_reduce(buffer)
    size = comm.Get_size()
    assert torch.equal(buffer, torch.full((3,), size * (size + 1) / 2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["requires_grad", "no_grad"])
def test_backward_disagreement(comm: Any, seed: int, mode: str) -> None:
    cases.check_backward_disagreement(comm, seed, mode)


@pytest.mark.parametrize("kind", cases.DEBUG_MISMATCHES)
def test_debug_mismatch(comm: Any, seed: int, kind: str) -> None:
    cases.check_debug_mismatch(comm, seed, kind)


def test_debug_collectives(comm: Any, seed: int) -> None:
    cases.check_debug_collectives(comm, seed)


@pytest.fixture
def shared_directory(comm: Any) -> Iterator[str]:
    """A directory every rank sees (rank 0's temporary one), removed at the end."""
    path = comm.bcast(tempfile.mkdtemp(prefix="syncbn-") if comm.Get_rank() == 0 else None, root=0)
    yield path
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def test_checkpoint_resume(comm: Any, seed: int, shared_directory: str) -> None:
    """Resume in the same communicator (bitwise), then every rank alone (COMM_SELF), the global batch kept."""
    cases.check_checkpoint_resume(comm, seed, shared_directory)
    cases.check_resume_with_other_world_size(MPI.COMM_SELF, seed, shared_directory)


def test_running_statistics_bitwise_equal_after_100_steps(comm: Any, seed: int) -> None:
    cases.check_state_bitwise_equal(comm, seed, steps=100)


@pytest.mark.parametrize(
    ("dtype", "memory_format"), cases.BLOCK_CASES, ids=[f"{d}-{f}".replace("torch.", "") for d, f in cases.BLOCK_CASES]
)
def test_inplace_block_with_an_empty_rank(comm: Any, seed: int, dtype: torch.dtype, memory_format: str) -> None:
    cases.check_inplace_block_with_empty_rank(comm, seed, dtype, memory_format)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_double_backward_raises_on_every_rank(comm: Any, seed: int, mode: str) -> None:
    cases.check_double_backward_raises(comm, seed, mode)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(comm: Any, seed: int, reentrant: bool) -> None:
    cases.check_activation_checkpointing(comm, seed, reentrant)


_CUDA_OPS = [
    pytest.param("cupy", marks=pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="no CuPy")),
    "torch",
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (make gpu-check runs this under mpiexec -n 2)")
@pytest.mark.parametrize("ops", _CUDA_OPS)
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("4d", {}), ("channels-last", {"memory_format": "channels_last"}), ("unequal-batches", {"batch": [3, 1, 6, 2]})],
)
def test_oracle_on_cuda(comm: Any, seed: int, ops: str, name: str, kwargs: dict) -> None:
    """CUDA tensors over MPI: handed over as they are to a CUDA-aware MPI, otherwise staged through the host."""
    cases.check_against_oracle(comm, seed, ops=ops, device="cuda", **kwargs)


@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal-with-empty"])
def test_compiled_training_equals_eager(comm: Any, seed: int, unequal: bool) -> None:
    """torch.compile(fullgraph=True) over an mpi4py communicator: training equal to eager's."""
    from tests import test_compile

    size = comm.Get_size()
    batch_sizes = [2 + rank for rank in range(size - 1)] + [0 if size > 1 else 3] if unequal else [3] * size
    test_compile.compiled_training_body(seed, "auto", "aot_eager", True if unequal else None, batch_sizes, comm)


def test_compiled_inductor_with_an_empty_rank(comm: Any, seed: int) -> None:
    """Inductor with dynamic shapes over an mpi4py communicator, the last rank's batch empty (without
    convolutions: see tests/test_compile.py's MLP), training equal to eager's."""
    from tests import test_compile

    size = comm.Get_size()
    batch_sizes = [2 + rank for rank in range(size - 1)] + [0 if size > 1 else 3]
    test_compile.compiled_training_body(seed, "auto", "inductor", True, batch_sizes, comm, architecture="mlp")


def test_compiled_independent_branches_stay_in_step(comm: Any, seed: int) -> None:
    """Inductor over an mpi4py communicator: two layers on independent branches keep one order on every rank.

    The all-reduce is an opaque operator here (torch.distributed does not know the communicator), registered as
    an ordered effect; without the order, unequal batches would mix the two layers' statistics.
    """
    from tests import test_compile

    batch_sizes = [2 + rank for rank in range(comm.Get_size())]
    test_compile.compiled_training_body(seed, "auto", "inductor", True, batch_sizes, comm, architecture="downsample")


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_new_groups(comm: Any, seed: int, group_size: int) -> None:
    """Groups of consecutive ranks by Split; a size that does not divide the communicator's raises on every rank."""
    cases.check_new_groups(comm, seed, group_size)


def test_sync_running_stats(comm: Any, seed: int) -> None:
    cases.check_sync_running_stats(comm, seed)


def test_sync_running_stats_refuses_different_models(comm: Any) -> None:
    """Rank 0 has a layer more: MPICH sums the common prefix without a word, the head of the payload does not."""
    import syncbn
    from syncbn.faults import RankMismatchError

    layers = [torch.nn.BatchNorm1d(3)] + ([torch.nn.BatchNorm1d(2)] if comm.Get_rank() == 0 else [])
    if comm.Get_size() == 1:  # one rank agrees with itself
        assert syncbn.sync_running_stats(torch.nn.Sequential(*layers), comm) == 2
        return
    with pytest.raises(RankMismatchError, match="do not hold the same BatchNorm layers"):
        syncbn.sync_running_stats(torch.nn.Sequential(*layers), comm)


@pytest.mark.parametrize("bucket_bytes", [25 * 1024 * 1024, 200], ids=["one-bucket", "many-buckets"])
def test_average_gradients_trains_as_the_full_batch(comm: Any, seed: int, bucket_bytes: int) -> None:
    """syncbn.average_gradients over mpi4py: each rank's share trains as one process with the whole batch."""
    cases.check_training_matches_full_batch(comm, seed, bucket_bytes=bucket_bytes)


def test_average_gradients_of_unused_parameters(comm: Any, seed: int) -> None:
    cases.check_average_gradients_of_unused_parameters(comm, seed)


def test_average_gradients_refuses_different_models(comm: Any) -> None:
    import syncbn
    from syncbn.faults import RankMismatchError

    parameters = [torch.nn.Parameter(torch.ones(3))] + ([torch.nn.Parameter(torch.ones(2))] if comm.Get_rank() else [])
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    if comm.Get_size() == 1:  # one rank agrees with itself
        syncbn.average_gradients(parameters, comm)
        return
    with pytest.raises(RankMismatchError, match="do not hold the same parameters"):
        syncbn.average_gradients(parameters, comm)


def test_precise_bn(comm: Any, seed: int) -> None:
    cases.check_precise_bn(comm, seed)
