"""One process, no torch.distributed, no MPI: the layer must be exactly nn.BatchNorm."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn.comm import LocalCommunicator, get_communicator
from tests import cases

#: torch's BatchNorm layers take ``bias=`` from torch 2.13 (syncbn's take it on every torch it supports).
needs_torch_bias_keyword = pytest.mark.skipif(
    "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
    reason=f"torch {torch.__version__}'s BatchNorm has no bias= keyword (torch 2.13 has)",
)


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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_channels_raise_before_any_collective(training: bool) -> None:
    # A layer of 0 features matches a (N, 0, ...) input: the check must come before any per-channel division.
    counting = cases.CountingCommunicator(LocalCommunicator())
    for layer in (syncbn.SyncBatchNorm(0, process_group=counting), syncbn.LazySyncBatchNorm(process_group=counting)):
        layer.train(training)
        with pytest.raises(ValueError, match=r"at least one channel.*got input of shape \(4, 0, 3\)"):
            layer(torch.randn(4, 0, 3, requires_grad=True))
    assert counting.payload_sizes == []
    lazy = syncbn.LazySyncBatchNorm()
    with pytest.raises(ValueError, match="at least one channel"):
        lazy(torch.randn(4, 0))
    lazy(torch.randn(4, 5))  # still lazy after the refused input
    assert type(lazy) is syncbn.SyncBatchNorm and lazy.num_features == 5


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
    # Not seen an input: cls says which class, BatchNorm2d by default.
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm2d
    assert type(syncbn.revert_sync_batchnorm(layer, cls=nn.BatchNorm1d)) is nn.BatchNorm1d
    layer(torch.randn(4, 3, 2, 2, 2, generator=torch.Generator().manual_seed(seed)))
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm3d
    assert type(syncbn.revert_sync_batchnorm(layer, cls=nn.BatchNorm1d)) is nn.BatchNorm3d  # what it has seen wins


def test_the_classmethod_converts_as_torch_users_call_it() -> None:
    class Mine(syncbn.SyncBatchNorm):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    converted = Mine.convert_sync_batchnorm(model, process_group=LocalCommunicator())
    assert [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [Mine] * 2
    assert converted[2][0].layer_name == "2.0"
    assert type(syncbn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))) is syncbn.SyncBatchNorm


@needs_torch_bias_keyword
def test_weight_without_bias_against_torch(seed: int) -> None:
    """bias=False (a weight, no bias): training equal to torch's layer, state_dict both ways, convert and revert."""
    generator = torch.Generator().manual_seed(seed)
    theirs = nn.BatchNorm2d(5, bias=False)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(5, generator=generator) + 0.5)
    mine = syncbn.SyncBatchNorm(5, bias=False)
    assert mine.bias is None and "bias=False" in repr(mine)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, 3, 3, generator=generator) * 2 + 1
    grad = torch.randn(4, 5, 3, 3, generator=generator)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for layer, inputs in zip((theirs, mine), xs, strict=True):
        layer(inputs).backward(grad)
    assert_close(xs[1].grad, xs[0].grad)
    assert_close(mine.weight.grad, theirs.weight.grad)
    for key, value in theirs.state_dict().items():
        assert_close(mine.state_dict()[key], value, msg=key)
    converted = syncbn.convert_sync_batchnorm(nn.Sequential(theirs))
    assert isinstance(converted[0], syncbn.SyncBatchNorm) and converted[0].bias is None
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted[0]) is nn.BatchNorm2d and reverted[0].bias is None and reverted[0].weight is theirs.weight
    theirs.load_state_dict(mine.state_dict())


@needs_torch_bias_keyword
@pytest.mark.parametrize("bias", [True, False])
def test_lazy_layers_convert_before_their_first_input(seed: int, bias: bool) -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d(bias=bias), nn.Flatten(), nn.LazyBatchNorm1d())

    reference, converted = model(), syncbn.convert_sync_batchnorm(model())
    assert [type(m) for m in converted][1::2] == [syncbn.LazySyncBatchNorm] * 2
    # Reverted before any input: lazy torch layers again.
    assert [type(m) for m in syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model()))][1::2] == [
        nn.LazyBatchNorm2d,
        nn.LazyBatchNorm1d,
    ]
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(seed)) * 3 - 1
    torch.manual_seed(seed)  # the convolutions are initialised at their first input: alike in both models
    expected = reference(x)
    torch.manual_seed(seed)
    output = converted(x)
    assert [type(m) for m in converted][1::2] == [syncbn.SyncBatchNorm] * 2
    assert converted[1].num_features == 4 and converted[3].num_features == 16
    assert (converted[1].bias is None) == (not bias)
    assert_close(output, expected)
    for key, value in reference.state_dict().items():
        assert_close(converted.state_dict()[key], value, msg=key)
    assert [type(m) for m in syncbn.revert_sync_batchnorm(converted)][1::2] == [nn.BatchNorm2d, nn.BatchNorm1d]


def test_lazy_layer_built_directly(seed: int) -> None:
    layer = syncbn.LazySyncBatchNorm(momentum=None)
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(seed))
    output = layer(x)
    assert type(layer) is syncbn.SyncBatchNorm and layer.num_features == 7 and layer.momentum is None
    assert_close(output, nn.functional.batch_norm(x, None, None, training=True))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        syncbn.LazySyncBatchNorm()(torch.randn(3))


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


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(seed: int, reentrant: bool) -> None:
    cases.check_activation_checkpointing(None, seed, reentrant)


def test_new_groups_in_one_process() -> None:
    assert syncbn.new_groups(1) is None  # this process alone
    for bad in (0, -2, True, 1.0):
        with pytest.raises(ValueError, match="expected a positive group_size"):
            syncbn.new_groups(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size 2 does not divide"):
        syncbn.new_groups(2)
    with pytest.raises(TypeError, match="process_group must be"):
        syncbn.new_groups(1, process_group=object())


def test_sync_running_stats_in_one_process_changes_nothing(seed: int) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), syncbn.SyncBatchNorm(4), nn.BatchNorm1d(2, track_running_stats=False))
    with torch.no_grad():
        model[0](torch.randn(5, 3, 4, 2, generator=torch.Generator().manual_seed(seed)))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert syncbn.sync_running_stats(model) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="run one forward pass first"):
        syncbn.sync_running_stats(nn.LazyBatchNorm2d())


def _trained_model(seed: int, **kwargs: Any) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), syncbn.SyncBatchNorm(4, **kwargs), nn.Flatten(), nn.BatchNorm1d(16))
    for _ in range(3):
        model(torch.randn(6, 3, 2, 2, generator=generator) * 2 + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"affine": False}, {"momentum": None}],
    ids=["affine", "no-bias", "no-affine", "cma"],
)
def test_freeze_batchnorm_is_the_layers_eval_mode_and_learns_nothing(seed: int, kwargs: dict) -> None:
    model = _trained_model(seed, **kwargs)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed + 1)) * 2 + 1
    expected = model.eval()(x)
    state = model.state_dict()
    frozen = syncbn.freeze_batchnorm(model).train()  # training mode: frozen all the same
    assert [type(m) for m in frozen][1::2] == [syncbn.FrozenBatchNorm] * 2
    assert not list(frozen[1].parameters()) and not list(frozen[3].parameters())
    xs = x.clone().requires_grad_()
    output = frozen(xs)
    assert_close(output, expected)
    output.sum().backward()
    assert xs.grad is not None
    after = frozen.state_dict()
    for key, value in state.items():  # the same keys, and the same values once absent ones take 1 and 0
        assert key in after, key
        assert_close(after[key], value.to(after[key].dtype), msg=key)
    # A frozen checkpoint loads into a BatchNorm model and back, strictly, whenever the layer has a bias.
    if kwargs.get("affine", True) and kwargs.get("bias", True):
        fresh = _trained_model(seed + 2, **kwargs)
        fresh.load_state_dict(after)
        assert_close(fresh.eval()(x), expected)
        again = syncbn.freeze_batchnorm(_trained_model(seed + 3, **kwargs))
        again.load_state_dict(fresh.state_dict())
        assert_close(again(x), expected)


def test_unfreeze_gives_back_trainable_layers(seed: int) -> None:
    model = _trained_model(seed)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed + 1))
    expected = model.eval()(x)
    thawed = syncbn.unfreeze_batchnorm(syncbn.freeze_batchnorm(model))
    assert [type(m) for m in thawed][1::2] == [syncbn.SyncBatchNorm, nn.BatchNorm1d]
    assert all(p.requires_grad for p in thawed[1].parameters()) and len(list(thawed[1].parameters())) == 2
    assert_close(thawed.eval()(x), expected)


def test_freeze_leaves_layers_without_running_stats_and_refuses_lazy_ones() -> None:
    layer = nn.BatchNorm2d(3, track_running_stats=False)
    assert syncbn.freeze_batchnorm(layer) is layer
    with pytest.raises(ValueError, match="run one forward pass first"):
        syncbn.freeze_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(ValueError, match="expected an input"):
        syncbn.FrozenBatchNorm(3)(torch.randn(2, 4))


def test_mpi_backend_without_an_mpi_library_says_what_is_missing() -> None:
    """mpi4py installed, no MPI library it can load (the [mpi] extra installs none): the error names the fixes."""
    environment = {**os.environ, "MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}
    result = subprocess.run(
        [sys.executable, "-c", "import syncbn; syncbn.init_distributed(backend='mpi')"],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "mpi4py is installed but finds no MPI library" in result.stderr, result.stderr
    assert "pip install mpich" in result.stderr and "--no-binary mpi4py" in result.stderr


def test_precise_bn_in_one_process(seed: int) -> None:
    cases.check_precise_bn(None, seed)


def test_precise_bn_stops_at_num_batches_and_refuses_lazy_layers(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layer = syncbn.SyncBatchNorm(3)
    batches = [torch.randn(4, 3, generator=generator) for _ in range(5)]
    assert syncbn.precise_bn(layer, iter(batches), num_batches=2) == 2
    values = torch.cat(batches[:2]).double()
    assert_close(layer.running_mean.double(), values.mean(0), rtol=1e-6, atol=1e-6)
    assert_close(layer.running_var.double(), values.var(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="run one forward pass first"):
        syncbn.precise_bn(nn.LazyBatchNorm1d(), batches)


def test_instance_norm_is_no_batchnorm_to_the_tools(seed: int) -> None:
    """InstanceNorm shares torch's base class but keeps per-instance statistics: converted, frozen, pooled by none."""
    model = nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True), nn.BatchNorm2d(3))
    model(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)))
    before = model[0].running_var.clone()
    assert type(syncbn.convert_sync_batchnorm(model)[0]) is nn.InstanceNorm2d
    assert syncbn.sync_running_stats(model) == 1
    syncbn.precise_bn(model, [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 1))])
    assert torch.equal(model[0].running_var, before)
    assert type(syncbn.freeze_batchnorm(model)[0]) is nn.InstanceNorm2d


def test_lazy_layers_without_parameters_or_buffers(seed: int) -> None:
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(seed))
    expected = nn.functional.batch_norm(x, None, None, training=True)
    options = {"affine": False, "track_running_stats": False}
    for layer in (syncbn.LazySyncBatchNorm(**options), syncbn.convert_sync_batchnorm(nn.LazyBatchNorm1d(**options))):
        assert_close(layer(x), expected)
        assert type(layer) is syncbn.SyncBatchNorm and layer.num_features == 3
    converted = syncbn.LazySyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm1d(), nn.BatchNorm1d(3)))
    assert [type(m) for m in converted] == [syncbn.LazySyncBatchNorm, syncbn.SyncBatchNorm]


def test_reset_parameters_keeps_a_missing_bias() -> None:
    layer = syncbn.SyncBatchNorm(3, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    layer.reset_parameters()
    assert layer.bias is None and torch.equal(layer.weight, torch.ones(3))


def test_frozen_layer_loads_a_checkpoint_without_num_batches_tracked_and_unfreezes_with_its_momentum() -> None:
    frozen = syncbn.freeze_batchnorm(nn.BatchNorm2d(3, momentum=0.3))
    state = frozen.state_dict()
    del state["num_batches_tracked"]  # as detectron2's FrozenBatchNorm2d saves it
    frozen.load_state_dict(state)
    thawed = syncbn.unfreeze_batchnorm(frozen)
    assert type(thawed) is nn.BatchNorm2d and thawed.momentum == 0.3


class _DeviceRecordingGroup(cases.TwoEqualRanks):
    """Two ranks whose backend reduces on another device (``meta`` here, as NCCL on a GPU): records where
    each collective's buffer is, and stops there."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def buffer_device(self, device: torch.device) -> torch.device:
        return torch.device("meta")

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.devices.append(tensor.device)
        raise _Stop


class _Stop(Exception):
    pass


@pytest.mark.parametrize("tool", ["sync_running_stats", "average_gradients", "precise_bn", "precise_bn-untracked"])
def test_a_rank_with_nothing_to_send_joins_on_the_groups_device(tool: str) -> None:
    """A model without BatchNorm layers (or parameters) on one rank still makes the collective, on the device
    the group reduces on (a NCCL group: CUDA), instead of failing alone with a CPU buffer."""
    group = _DeviceRecordingGroup()
    calls = {
        "sync_running_stats": lambda: syncbn.sync_running_stats(nn.Linear(2, 2), group),
        "average_gradients": lambda: syncbn.average_gradients([], group),
        "precise_bn": lambda: syncbn.precise_bn(nn.Linear(2, 2), [torch.randn(3, 2)], 1, process_group=group),
        # A synchronised layer that tracks nothing: the ranks still agree on every batch.
        "precise_bn-untracked": lambda: syncbn.precise_bn(
            syncbn.SyncBatchNorm(2, track_running_stats=False, process_group=group),
            [torch.randn(3, 2)],
            1,
            process_group=group,
        ),
    }
    with pytest.raises(_Stop):
        calls[tool]()
    assert group.devices == [torch.device("meta")]


def test_buffer_device_of_torch_distributed_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL groups take CUDA tensors only: a CPU buffer goes to the current GPU; other backends keep it."""
    from syncbn.comm.torch_dist import TorchDistributedCommunicator

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    communicator = object.__new__(TorchDistributedCommunicator)
    communicator.name = "nccl"
    group = types.SimpleNamespace(bound_device_id=None)
    communicator._group = lambda: group
    assert communicator.buffer_device(torch.device("cpu")) == torch.device("cuda", 3)
    assert communicator.buffer_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    group.bound_device_id = torch.device("cuda", 5)  # init_process_group(device_id=...): the group's own GPU
    assert communicator.buffer_device(torch.device("cpu")) == torch.device("cuda", 5)
    communicator.name = "gloo"
    assert communicator.buffer_device(torch.device("cpu")) == torch.device("cpu")
    assert LocalCommunicator().buffer_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("ops", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_under_autocast(seed: int, ops: str, dtype: torch.dtype) -> None:
    cases.check_under_autocast(seed, ops, dtype, "cpu")
