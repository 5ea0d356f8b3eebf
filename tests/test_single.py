"""One process, no torch.distributed, no MPI: the layer must be exactly nn.BatchNorm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn.comm import LocalCommunicator, get_communicator
from tests import cases


@pytest.mark.parametrize(("ops", "name", "kwargs"), cases.ORACLE_MATRIX, ids=cases.ORACLE_IDS)
def test_oracle(ops: str, name: str, kwargs: dict, seed: int) -> None:
    cases.check_against_oracle(None, seed, ops=ops, **kwargs)


def test_collective_count(seed: int) -> None:
    cases.check_collective_count(None, seed)


def test_all_empty(seed: int) -> None:
    cases.check_all_empty(None, seed)


def test_single_value_error(seed: int) -> None:
    cases.check_single_value_error(None, seed)


def test_training_matches_full_batch(seed: int) -> None:
    cases.check_training_matches_full_batch(None, seed)


def test_default_group_is_local_without_torch_distributed() -> None:
    assert isinstance(get_communicator(None), LocalCommunicator)


# --- bad input: raised before any collective, with what was expected and what came ---


@pytest.mark.parametrize(
    ("make_input", "error", "match"),
    [
        (lambda: torch.randn(4), ValueError, r"at least 2 dimensions.*got a 1D input"),
        (lambda: torch.tensor(1.0), ValueError, r"at least 2 dimensions.*got a 0D input"),
        (lambda: torch.randn(2, 5, 3), ValueError, r"expected input with 4 channels.*got 5"),
        (lambda: torch.ones(2, 4, 3, dtype=torch.int64), TypeError, r"float32 or float64 input, got torch.int64"),
        (lambda: torch.ones(2, 4, dtype=torch.complex64), TypeError, r"got torch.complex64"),
        (lambda: [[1.0] * 4] * 2, TypeError, r"expected a torch.Tensor input, got list"),
    ],
    ids=["1d", "0d", "channels", "int64", "complex", "not-a-tensor"],
)
def test_bad_input_raises_before_any_collective(make_input, error, match) -> None:
    counting = cases.CountingCommunicator(LocalCommunicator())
    layer = syncbn.SyncBatchNorm(4, process_group=counting)
    with pytest.raises(error, match=match):
        layer(make_input())
    assert counting.payload_sizes == []


def test_input_on_another_device_than_the_layer() -> None:
    counting = cases.CountingCommunicator(LocalCommunicator())
    layer = syncbn.SyncBatchNorm(4, process_group=counting)
    with pytest.raises(ValueError, match=r"expected input on cpu.*got input on meta"):
        layer(torch.empty(2, 4, device="meta"))
    assert counting.payload_sizes == []


def test_other_devices_take_the_generic_implementation() -> None:
    """A device without a tuned implementation (here ``meta``) trains on the generic one, reading nothing back."""
    layer = syncbn.SyncBatchNorm(4, device="meta")
    x = torch.empty(2, 4, 3, 3, device="meta").to(memory_format=torch.channels_last).requires_grad_()
    with syncbn.ops.using("auto"):  # the default choice, whatever SYNCBN_OPS says
        y = layer(x)
        assert y.device.type == "meta" and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert syncbn.ops.for_device("meta").name == "torch" and syncbn.ops.for_device("cpu").name == "cpu"


def test_bad_process_group() -> None:
    layer = syncbn.SyncBatchNorm(2, process_group="world")
    with pytest.raises(TypeError, match=r"process_group must be None, a torch\.distributed ProcessGroup or an mpi4py"):
        layer(torch.randn(3, 2))


# --- conversion and checkpoints ---


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6, affine=False)),
        nn.Unflatten(1, (4, 6, 6)),
        nn.Unflatten(2, (1, 6)),
        nn.BatchNorm3d(4, momentum=None),
    )


def test_convert_shares_parameters_and_buffers() -> None:
    model = _model()
    model[1].eval()
    originals = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    converted = syncbn.convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [syncbn.SyncBatchNorm] * 3
    for name, tensor in [*converted.named_parameters(), *converted.named_buffers()]:
        assert tensor is originals[name], name
    assert not converted[1].training and converted[5].training
    assert converted[5].momentum is None and not converted[2][1].affine


def test_convert_then_revert_gives_back_the_classes() -> None:
    model = _model()
    before = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    reverted = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model))
    assert [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm2d,
        nn.BatchNorm1d,
        nn.BatchNorm3d,
    ]
    for name, tensor in reverted.state_dict(keep_vars=True).items():
        assert tensor is before[name], name


def test_convert_torch_syncbatchnorm_and_revert_by_input_dim(seed: int) -> None:
    layer = syncbn.convert_sync_batchnorm(nn.SyncBatchNorm(3))
    assert isinstance(layer, syncbn.SyncBatchNorm)
    with pytest.raises(ValueError, match="run one forward pass before reverting"):
        syncbn.revert_sync_batchnorm(layer)
    layer(torch.randn(4, 3, 2, 2, 2, generator=torch.Generator().manual_seed(seed)))
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm3d


def test_convert_single_layer_and_process_group() -> None:
    group = LocalCommunicator()
    layer = syncbn.convert_sync_batchnorm(nn.BatchNorm1d(5), process_group=group)
    assert isinstance(layer, syncbn.SyncBatchNorm) and layer.process_group is group


@pytest.mark.parametrize("source", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_state_dict_round_trip(source: type[nn.Module], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    mine = syncbn.SyncBatchNorm(6)
    x = torch.randn(4, 6, 3, 3, generator=generator) * 3 + 1
    mine(x)  # some training so that every buffer holds a real value
    theirs = source(6)
    theirs.load_state_dict(mine.state_dict())
    again = syncbn.SyncBatchNorm(6)
    again.load_state_dict(theirs.state_dict())
    assert list(mine.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for key, value in mine.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    mine.eval()
    reference = nn.BatchNorm2d(6).eval()
    reference.load_state_dict(mine.state_dict())
    assert_close(mine(x), reference(x), rtol=0, atol=0)


def test_old_checkpoint_without_num_batches_tracked() -> None:
    layer = syncbn.SyncBatchNorm(3)
    state = layer.state_dict()
    del state["num_batches_tracked"]
    layer._load_from_state_dict(state, "", {"version": 1}, True, [], [], [])
    assert int(layer.num_batches_tracked) == 0


def test_half_parameters_give_half_grads(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layer = syncbn.SyncBatchNorm(3).to(torch.bfloat16)
    x = torch.randn(4, 3, 5, generator=generator).to(torch.bfloat16).requires_grad_()
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.bfloat16


def test_extra_repr_and_isinstance() -> None:
    layer = syncbn.SyncBatchNorm(8, momentum=None)
    assert "8, eps=1e-05, momentum=None" in repr(layer)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)


# --- the two ways the local sums are taken ---


def test_centred_input_is_used_as_it_is(seed: int) -> None:
    """A mean within a few standard deviations of zero: one pass over x, no copy."""
    from syncbn.ops.cpu import CPUOps

    x = torch.randn(8, 5, 4, 4, generator=torch.Generator().manual_seed(seed))
    assert CPUOps().forward_moments(x, False)[0] is x
    cases.check_against_oracle(None, seed, loc_range=(-0.2, 0.2), scale_range=(0.8, 1.2))


def test_offset_input_is_centred_first(seed: int) -> None:
    """A mean far from zero against the spread: centred by the rough mean before the sums."""
    from syncbn.ops.cpu import CPUOps

    x = torch.randn(8, 5, 4, 4, generator=torch.Generator().manual_seed(seed)) + 50.0
    centered = CPUOps().forward_moments(x, False)[0]
    assert centered is not x
    assert_close(centered.mean((0, 2, 3)), torch.zeros(5), rtol=0, atol=1e-3)


@pytest.mark.parametrize("view", ["channel-slice", "transposed"])
def test_non_contiguous_input(view: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1
    x = base[:, ::2] if view == "channel-slice" else base[:, :3].transpose(2, 3)
    assert not x.is_contiguous()
    layer = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    reference = nn.BatchNorm2d(3, dtype=torch.float64)
    x_mine = x.detach().requires_grad_()  # the strided view itself, not a contiguous copy
    x_ref = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    layer(x_mine).backward(grad)
    reference(x_ref).backward(grad)
    assert_close(x_mine.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    assert_close(layer.running_var, reference.running_var, rtol=1e-9, atol=1e-9)


def test_input_grad_on_some_ranks(seed: int) -> None:
    cases.check_input_grad_on_some_ranks(None, seed)


@pytest.mark.parametrize("mode", ["requires_grad", "no_grad"])
def test_backward_disagreement_needs_others(mode: str, seed: int) -> None:
    cases.check_backward_disagreement(None, seed, mode)


@pytest.mark.parametrize("kind", cases.DEBUG_MISMATCHES)
def test_debug_mismatch(kind: str, seed: int) -> None:
    """Alone, only the rank's own problems (bad input, NaN) can be found; the rest must just work."""
    cases.check_debug_mismatch(None, seed, kind)


def test_debug_collectives(seed: int) -> None:
    cases.check_debug_collectives(None, seed)


def test_debug_mode_follows_the_environment_variable() -> None:
    """SYNCBN_DEBUG is read at import; set_debug overrides it; a layer's own debug= overrides both."""
    code = "import syncbn.debug as d; print(d.is_debug()); d.set_debug(False); print(d.is_debug())"
    for value, first in (("1", "True"), ("0", "False"), ("", "False"), ("yes", "True")):
        done = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "SYNCBN_DEBUG": value}, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        assert done.stdout.split() == [first, "False"], (value, done.stdout)


def test_debug_reports_nan_in_a_single_process(seed: int) -> None:
    layer = syncbn.SyncBatchNorm(2, debug=True)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed))
    x[0, 1] = float("inf")
    with pytest.raises(syncbn.faults.RankMismatchError, match="NaN or Inf"):
        layer(x)
    layer.debug = False
    assert torch.isnan(layer(x)[:, 1]).all()  # as nn.BatchNorm: the channel's statistics are not finite


def test_convert_names_layers_after_their_path() -> None:
    model = syncbn.convert_sync_batchnorm(cases.SmallCNN())
    names = [m.layer_name for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert names == ["features.1", "features.4", "head.1"]
    assert syncbn.convert_sync_batchnorm(nn.BatchNorm1d(3)).layer_name is None


# --- outputs in-place operations accept; double backward -----------------------------------


@pytest.mark.parametrize(
    ("dtype", "memory_format"), cases.BLOCK_CASES, ids=[f"{d}-{f}".replace("torch.", "") for d, f in cases.BLOCK_CASES]
)
def test_inplace_block_with_empty_batch(seed: int, dtype: torch.dtype, memory_format: str) -> None:
    cases.check_inplace_block_with_empty_rank(None, seed, dtype, memory_format)


def test_double_backward_raises(seed: int) -> None:
    cases.check_double_backward_raises(None, seed, "all")
