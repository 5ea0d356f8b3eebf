"""The CUDA path on a GPU: the oracle matrix, graph capture, communication over gloo, NCCL and MPI.

Skipped without a CUDA GPU (CI prints the skip; ``make gpu-check`` runs this
file on a GPU machine). Every test body is the CPU suite's
(``tests/cases.py``), given ``device="cuda"``; the implementation runs once on
syncbn's CuPy kernels (``cupy``) and once on the generic torch one
(``torch``), against the float64 oracle on the CPU, with the same tolerances.
Outputs and scratch are poisoned with NaN when allocated, so that an element
a kernel forgot to write fails the comparison.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import syncbn
from syncbn.harness import free_port
from tests import cases
from tests.needs import require_mpi

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
HAS_CUPY = importlib.util.find_spec("cupy") is not None

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (make gpu-check runs these)")]

#: The implementations run on CUDA tensors; the kernels need CuPy.
OPS = [
    pytest.param("cupy", marks=pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")),
    "torch",
]


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    cases.poison_allocations(monkeypatch)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize(("name", "kwargs"), cases.CUDA_MATRIX, ids=cases.CUDA_IDS)
def test_oracle(ops: str, name: str, kwargs: dict, seed: int) -> None:
    cases.check_against_oracle(None, seed, ops=ops, device="cuda", **kwargs)


@pytest.mark.parametrize("ops", OPS)
def test_all_empty_and_single_value(ops: str, seed: int) -> None:
    with syncbn.ops.using(ops):
        layer = syncbn.SyncBatchNorm(3).cuda()
        x = torch.empty(0, 3, 4, device="cuda", requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and int(layer.num_batches_tracked) == 1
        assert_close(layer.running_mean.cpu(), torch.zeros(3))
        assert_close(layer.running_var.cpu(), torch.ones(3))
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(torch.randn(1, 3, device="cuda"))


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_under_autocast(ops: str, seed: int, dtype: torch.dtype) -> None:
    """torch.autocast("cuda"): half-precision activations, float32 parameters, CUDA's autocast casts inside."""
    cases.check_under_autocast(seed, ops, dtype, "cuda")


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
def test_kernels_run_on_a_side_stream_without_deprecation_warnings(seed: int) -> None:
    """A stream CupyOps has not seen is wrapped without CuPy's deprecation warning (ExternalStream is
    deprecated in CuPy 14), and the kernels run on it: the result is nn.BatchNorm's in float64."""
    torch.manual_seed(seed)
    layer = syncbn.SyncBatchNorm(5).cuda()
    x = torch.randn(4, 5, 6, 7, device="cuda") * 3 + 1
    reference = torch.nn.BatchNorm2d(5).cuda().double()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with syncbn.ops.using("cupy"), warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with torch.cuda.stream(side):
            y = layer(x)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(y.double(), reference(x.double()), **cases.TOLERANCES[torch.float32].elementwise)


class TestNCCL:
    """torch.distributed over NCCL at world size 1 (NCCL refuses two ranks on one GPU), for this class only:
    the other tests run with torch.distributed uninitialised."""

    @pytest.fixture(scope="class")
    def nccl_world(self) -> Iterator[Any]:
        if not dist.is_nccl_available():
            pytest.skip("this torch build has no NCCL")
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
            timeout=timedelta(seconds=60), device_id=torch.device("cuda", 0),
        )  # fmt: skip
        yield dist.group.WORLD
        dist.destroy_process_group()

    @pytest.mark.parametrize("ops", OPS)
    @pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
    def test_with_the_collective_forced(self, nccl_world: Any, ops: str, seed: int, memory_format: Any) -> None:
        """The one-rank NCCL group reduces on the current stream; doubling stands for the second rank."""
        communicator = syncbn.get_communicator(nccl_world)
        assert communicator.name == "nccl"
        cases.check_doubled(cases.TwoEqualRanks(communicator), seed, ops, memory_format, "cuda")

    @pytest.mark.parametrize("ops", OPS)
    def test_compiled_reduce_overhead_trains_like_eager(
        self, nccl_world: Any, ops: str, seed: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """torch.compile(mode="reduce-overhead") (inductor, CUDA graphs where it can) over the NCCL group.

        Inductor compiles in this process: its pool of compile workers would outlive the test (and be
        killed as a leftover). TF32 is off: eager and compiled convolutions may take different cuDNN
        algorithms, whose TF32 rounding (about 1e-3) would be compared against a float32 tolerance.
        """
        import torch._inductor.config

        from tests import test_compile

        monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            test_compile.compiled_training_body(
                seed, ops, "inductor", None, batch_sizes=[4], device="cuda", mode="reduce-overhead"
            )


@pytest.mark.parametrize("ops", OPS)
def test_direct_nccl_communicator_at_world_size_1(ops: str, seed: int) -> None:
    if not HAS_CUPY:
        pytest.skip("CuPy is not installed")
    MPI = require_mpi()  # the GPU machine's own mpi4py has no MPI library: make gpu-wheels brings MPICH

    from syncbn.comm.nccl import NCCLCommunicator, import_nccl

    try:
        import_nccl()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    group = NCCLCommunicator(MPI.COMM_SELF, timeout=60)
    try:
        cases.check_doubled(cases.TwoEqualRanks(group), seed, ops, torch.contiguous_format, "cuda")
    finally:
        group.close()


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cuda_graph_capture_replays_like_eager(ops: str, seed: int, memory_format: Any) -> None:
    """Forward + backward captured in a CUDA graph (no host read in it), replayed on new data = eager."""
    generator = torch.Generator().manual_seed(seed)
    with syncbn.ops.using(ops):
        layer = syncbn.SyncBatchNorm(8).cuda()
        static_x = torch.randn(4, 8, 6, 6, generator=generator).cuda().contiguous(memory_format=memory_format)
        static_x.requires_grad_()
        static_dy = torch.randn(4, 8, 6, 6, generator=generator).cuda().contiguous(memory_format=memory_format)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the eager warm-up capture needs
            for _ in range(3):
                torch.autograd.grad(layer(static_x), (static_x,), static_dy)
        torch.cuda.current_stream().wait_stream(side)
        eager = copy.deepcopy(layer)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
            (static_dx,) = torch.autograd.grad(static_y, (static_x,), static_dy)
        for _ in range(3):
            x = torch.randn(4, 8, 6, 6, generator=generator).cuda().contiguous(memory_format=memory_format)
            with torch.no_grad():
                static_x.copy_(x)
            graph.replay()
            x_eager = x.clone().requires_grad_()
            y_eager = eager(x_eager)
            (dx_eager,) = torch.autograd.grad(y_eager, (x_eager,), static_dy)
            torch.cuda.synchronize()
            assert_close(static_y, y_eager, rtol=1e-5, atol=2e-5)
            assert_close(static_dx, dx_eager, rtol=1e-5, atol=2e-5)
            assert_close(layer.running_mean, eager.running_mean)
            assert_close(layer.running_var, eager.running_var)
        # 3 warm-up calls, then 3 replays (capturing records the kernels without running them).
        assert int(layer.num_batches_tracked) == int(eager.num_batches_tracked) == 3 + 3


@pytest.fixture(scope="module")
def gloo_pair() -> Iterator[Any]:
    from tests.gloo_world import GlooWorld

    world = GlooWorld(2)
    yield world
    world.close()


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("4d", {}),
        ("unequal-channels-last-bf16", {"batch": [3, 1], "memory_format": "channels_last", "dtype": torch.bfloat16}),
        ("empty-first-rank", {"batch": [0, 3]}),
        ("cancellation", dict(cases.ORACLE_CASES)["cancellation"]),
    ],
)
def test_two_gloo_ranks_on_one_gpu(gloo_pair: Any, ops: str, name: str, kwargs: dict, seed: int) -> None:
    """gloo stages CUDA tensors through the host: two ranks can share the GPU (NCCL refuses that)."""
    gloo_pair.run(cases.check_against_oracle, group=None, seed=seed, ops=ops, device="cuda", **kwargs)


def test_mpi_staging_under_mpiexec() -> None:
    """``mpiexec -n 2`` on one GPU: the MPI wheels are not CUDA-aware, so CUDA payloads are staged through the host."""
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    if not Path(mpiexec).exists() or importlib.util.find_spec("pytest_mpi") is None:
        pytest.skip("mpiexec or pytest-mpi is not installed (see REFERENCES for bringing the MPI wheels)")
    try:
        done = subprocess.run(
            [mpiexec, "-n", "2", sys.executable, "-m", "pytest", "-q", "--with-mpi", "-p", "no:cacheprovider",
             "-o", "timeout=60", "tests/test_mpi.py", "-m", "cuda"],
            cwd=ROOT, capture_output=True, text=True, timeout=110, env={**os.environ, "SYNCBN_MPI_CUDA_AWARE": "0"},
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        limit = "mpiexec -n 2 did not finish within 110 s (the GPU check gives a test 120)"
        pytest.fail(f"{limit}:\n{expired.stdout}\n{expired.stderr}")
    assert done.returncode == 0 and " passed" in done.stdout and "skipped" not in done.stdout, done.stdout + done.stderr
