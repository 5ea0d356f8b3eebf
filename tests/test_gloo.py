"""The shared test bodies in real processes over torch.distributed gloo (2 and 4 ranks).

Also what only torch.distributed has: DistributedDataParallel, subgroups made
with ``new_group``, and the profiler's record of gloo collectives.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from tests import cases, cuda_emulator
from tests.gloo_world import GlooWorld

pytestmark = pytest.mark.gloo


@pytest.mark.parametrize(("ops", "name", "kwargs"), cases.ORACLE_MATRIX, ids=cases.ORACLE_IDS)
def test_oracle(world: GlooWorld, seed: int, ops: str, name: str, kwargs: dict) -> None:
    world.run(cases.check_against_oracle, group=None, seed=seed, ops=ops, **kwargs)


def test_ranks_on_the_python_and_the_compiled_cpu_path(world: GlooWorld, seed: int) -> None:
    """Which CPU path a rank takes is its own choice (its compiler, SYNCBN_EXTENSION): the group stays exact."""
    world.run(cases.check_mixed_paths, group=None, seed=seed)


@pytest.mark.emulated
@pytest.mark.parametrize(("name", "kwargs"), cases.CUDA_MATRIX, ids=cases.CUDA_IDS)
def test_oracle_on_the_cuda_kernels_emulated(world: GlooWorld, seed: int, name: str, kwargs: dict) -> None:
    """The CUDA implementation's kernels in the emulator (tests/cuda_emulator.py), on CPU tensors over gloo."""
    cuda_emulator.build()  # here, once, rather than in every rank at the same time
    world.run(cuda_emulator.check_against_oracle, group=None, seed=seed, **kwargs)


#: More of the shared bodies on the emulated kernels: empty ranks, errors raised on every rank, in-place use.
EMULATED_BODIES = [
    ("check_input_grad_on_some_ranks", {}),
    ("check_all_empty", {}),
    ("check_single_value_error", {}),
    ("check_backward_disagreement", {"mode": "requires_grad"}),
    ("check_backward_disagreement", {"mode": "no_grad"}),
    ("check_double_backward_raises", {"mode": "one"}),
    ("check_state_bitwise_equal", {"steps": 10}),
    ("check_inplace_block_with_empty_rank", {"dtype": torch.float32, "memory_format": "contiguous"}),
    ("check_inplace_block_with_empty_rank", {"dtype": torch.bfloat16, "memory_format": "channels_last"}),
    ("check_inplace_block_with_empty_rank", {"dtype": torch.float16, "memory_format": "channels_last_3d"}),
]


EMULATED_IDS = [f"{body}-{'-'.join(map(str, kwargs.values()))}" for body, kwargs in EMULATED_BODIES]


@pytest.mark.emulated
@pytest.mark.parametrize(("body", "kwargs"), EMULATED_BODIES, ids=EMULATED_IDS)
def test_cuda_kernels_emulated(world: GlooWorld, seed: int, body: str, kwargs: dict) -> None:
    cuda_emulator.build()
    world.run(cuda_emulator.run_emulated, body=body, group=None, seed=seed, **kwargs)


def test_one_sample_per_rank_2d(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_against_oracle, group=None, seed=seed, batch=1, tail=())


def test_collective_count(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_collective_count, group=None, seed=seed)


def test_input_grad_on_some_ranks(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_input_grad_on_some_ranks, group=None, seed=seed)


def test_eval_is_local(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_eval_is_local, group=None, seed=seed)


def test_all_empty(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_all_empty, group=None, seed=seed)


def test_single_value_error(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_single_value_error, group=None, seed=seed)


def test_ddp_training_matches_full_batch(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_training_matches_full_batch, group=None, seed=seed, use_ddp=True)


def test_average_gradients_training_matches_full_batch(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_training_matches_full_batch, group=None, seed=seed, bucket_bytes=200)


def test_average_gradients_of_unused_parameters(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_average_gradients_of_unused_parameters, group=None, seed=seed)


def subgroup_body(seed: int) -> None:
    """Even and odd ranks, each in a ``new_group`` of their own (every rank creates both, in order)."""
    world_size = dist.get_world_size()
    groups = [dist.new_group(list(range(parity, world_size, 2))) for parity in (0, 1)]
    parity = dist.get_rank() % 2
    cases.check_against_oracle(groups[parity], seed + parity, batch=[2, 3])


def test_subgroup(world: GlooWorld, seed: int) -> None:
    world.run(subgroup_body, seed=seed)


@pytest.mark.parametrize("group_size", [2, 3])
def test_new_groups(world: GlooWorld, seed: int, group_size: int) -> None:
    """Groups of consecutive ranks (3 divides neither 2 nor 4: every rank raises ValueError)."""
    world.run(cases.check_new_groups, group=None, seed=seed, group_size=group_size)


def new_groups_of_a_subgroup_body(seed: int, group_size: int) -> None:
    """new_groups of a group of some ranks (even or odd ones), called by its members only."""
    world_size = dist.get_world_size()
    parents = [dist.new_group(list(range(parity, world_size, 2))) for parity in (0, 1)]
    parity = dist.get_rank() % 2
    cases.check_new_groups(parents[parity], seed + 10 * parity, group_size)


@pytest.mark.parametrize("group_size", [1, 2])
def test_new_groups_of_a_subgroup(world: GlooWorld, seed: int, group_size: int) -> None:
    world.run(new_groups_of_a_subgroup_body, seed=seed, group_size=group_size)


def test_sync_running_stats(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_sync_running_stats, group=None, seed=seed)


def test_precise_bn(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_precise_bn, group=None, seed=seed)


def precise_bn_collectives_body(seed: int, convert: bool) -> int:
    """The gloo all-reduces of precise_bn over 4 batches of a model of 3 BatchNorm layers."""
    model: nn.Module = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    )
    if convert:
        model = syncbn.convert_sync_batchnorm(model)
    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    batches = [torch.randn(2, 3, 4, 4, generator=generator) for _ in range(4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        syncbn.precise_bn(model, batches)
    names = [event.name for event in profile.events() if event.name.startswith("gloo:")]
    assert set(names) <= {"gloo:all_reduce"}, names
    return len(names)


@pytest.mark.parametrize("convert", [False, True], ids=["torch-layers", "syncbn-layers"])
def test_precise_bn_reduces_the_statistics_once(world: GlooWorld, seed: int, convert: bool) -> None:
    """One all-reduce for the statistics of every layer, at the end; with SyncBatchNorm layers, also what training
    makes (one all-reduce per layer and batch, forward only) and one agreement (1 value) before each batch and
    before finding that there are no more."""
    expected = 1 + (4 * 3 + 5 if convert else 0)
    assert world.run(precise_bn_collectives_body, seed=seed, convert=convert) == [expected] * world.world_size


def profiled_collectives_body(seed: int) -> list[str]:
    """The names of the collectives the torch profiler records in one training step and one eval step."""
    layer = syncbn.SyncBatchNorm(4)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x).backward(torch.randn(2, 4, 3, 3, generator=generator))
        layer.eval()
        layer(x)
    return [event.name for event in profile.events() if event.name.startswith("gloo:")]


def test_profiler_sees_one_collective_each_way(world: GlooWorld, seed: int) -> None:
    for names in world.run(profiled_collectives_body, seed=seed):
        assert names == ["gloo:all_reduce", "gloo:all_reduce"]


def default_group_body() -> tuple[str, int, int]:
    communicator = syncbn.get_communicator(None)
    return communicator.name, communicator.rank, communicator.world_size


def test_default_group_is_torch_distributed(world: GlooWorld) -> None:
    answers: list[Any] = world.run(default_group_body)
    assert answers == [("gloo", rank, world.world_size) for rank in range(world.world_size)]


def hanging_body(seed: int) -> None:
    """Rank 0 skips the collective the others enter: the world must time out, not hang the suite."""
    if dist.get_rank() != 0:
        layer = syncbn.SyncBatchNorm(2)
        layer(torch.randn(3, 2, generator=torch.Generator().manual_seed(seed)))


def test_a_hang_is_a_failure_not_a_stuck_suite(world: GlooWorld, seed: int) -> None:
    """The harness itself: a rank that never answers fails the call within its timeout."""
    with pytest.raises((TimeoutError, AssertionError)):
        world.run(hanging_body, timeout=15, seed=seed)
    # The world was restarted and works again.
    assert world.run(default_group_body)[0][2] == world.world_size


@pytest.mark.parametrize("mode", ["requires_grad", "no_grad"])
def test_backward_disagreement(world: GlooWorld, seed: int, mode: str) -> None:
    world.run(cases.check_backward_disagreement, group=None, seed=seed, mode=mode)


@pytest.mark.parametrize("kind", cases.DEBUG_MISMATCHES)
def test_debug_mismatch(world: GlooWorld, seed: int, kind: str) -> None:
    world.run(cases.check_debug_mismatch, group=None, seed=seed, kind=kind)


def test_debug_collectives(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_debug_collectives, group=None, seed=seed)


def test_checkpoint_resume(world: GlooWorld, seed: int, tmp_path: Path) -> None:
    """Resume in the same number of ranks (bitwise), then in one process with the same global batch."""
    world.run(cases.check_checkpoint_resume, group=None, seed=seed, directory=str(tmp_path))
    cases.check_resume_with_other_world_size(None, seed, str(tmp_path))


def test_running_statistics_bitwise_equal_after_100_steps(world: GlooWorld, seed: int) -> None:
    world.run(cases.check_state_bitwise_equal, group=None, seed=seed, steps=100)


@pytest.mark.parametrize(
    ("dtype", "memory_format"), cases.BLOCK_CASES, ids=[f"{d}-{f}".replace("torch.", "") for d, f in cases.BLOCK_CASES]
)
def test_inplace_block_with_an_empty_rank(world: GlooWorld, seed: int, dtype: torch.dtype, memory_format: str) -> None:
    world.run(
        cases.check_inplace_block_with_empty_rank, group=None, seed=seed, dtype=dtype, memory_format=memory_format
    )


@pytest.mark.parametrize("mode", ["all", "one"])
def test_double_backward_raises_on_every_rank(world: GlooWorld, seed: int, mode: str) -> None:
    world.run(cases.check_double_backward_raises, group=None, seed=seed, mode=mode)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(world: GlooWorld, seed: int, reentrant: bool) -> None:
    """torch.utils.checkpoint recomputes the layers in backward: one more forward all-reduce on every rank."""
    world.run(cases.check_activation_checkpointing, group=None, seed=seed, reentrant=reentrant)


def group_timeout_body(seed: int) -> str:
    """Rank 0 stays out of a collective on a group made with a 3 s timeout: the others must say 3 s."""
    group = dist.new_group(list(range(dist.get_world_size())), timeout=timedelta(seconds=3))
    layer = syncbn.SyncBatchNorm(2, process_group=group)
    message = ""
    if dist.get_rank() != 0:
        with pytest.raises(syncbn.faults.CollectiveTimeoutError) as caught:
            layer(torch.randn(3, 2, generator=torch.Generator().manual_seed(seed)))
        message = str(caught.value)
    return message


def test_timeout_message_gives_the_groups_own_timeout(world: GlooWorld, seed: int) -> None:
    messages = world.run(group_timeout_body, timeout=60, seed=seed)
    for message in messages[1:]:
        assert "no answer from the other ranks within 3 s" in message, message
        assert "within 60 s" not in message
    world.restart()  # the group that timed out is not reused
