"""The CUDA implementation run on the CPU: CupyOps and syncbn's kernels, in the emulator, against the oracle.

There is no GPU here, but ``tests/cuda_emulator.py`` compiles the kernel
families (the source NVRTC gets) with g++ and runs every launch block by
block, each CUDA thread a fibre. So the whole CUDA path (layouts, launch
plans, workspaces, argument lists, the kernels' loops, reductions, centring
and half-precision conversions) runs the same oracle matrix as the CPU and
generic implementations, with the same tolerances, every allocation poisoned
with NaN. The planner is told of 1 multiprocessor (few blocks, long loops) and
of 132 (an H100: many splits per channel, rows cut into pieces).

What only a GPU can tell (``tests/test_cuda.py``, ``make gpu-check``): races
between blocks, the device's rounding, streams, graphs, NCCL, speed.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import syncbn
from syncbn.ops import cuda
from tests import cases, cuda_emulator
from tests.oracle import TOLERANCES

pytestmark = pytest.mark.emulated

#: Multiprocessors the launch planner is told of.
SM_COUNTS = (1, 132)


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    cuda_emulator.build()


@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize(("name", "kwargs"), cases.CUDA_MATRIX, ids=cases.CUDA_IDS)
def test_oracle(seed: int, sm_count: int, name: str, kwargs: dict) -> None:
    cuda_emulator.check_against_oracle(None, seed, sm_count=sm_count, **kwargs)
    assert cuda_emulator.LAUNCHES, "no kernel ran"


def _random_case(rng: random.Random) -> dict:
    """A shape, layout and dtype drawn at random, at most a few hundred values per channel (so that the
    float32 sums stay within the oracle's tolerances)."""
    ndim = rng.choice((2, 3, 4, 4, 5))
    tail = tuple(rng.choice((1, 2, 3, 4, 5, 7, 8, 9, 16)) for _ in range(ndim - 2))
    formats = {4: ("contiguous", "channels_last"), 5: ("contiguous", "channels_last_3d")}.get(ndim, ("contiguous",))
    batch = rng.choice((1, 2, 3, 4)) if math.prod(tail) > 1 else rng.choice((2, 3, 5, 9))
    return {
        "batch": batch,
        "channels": rng.choice((1, 2, 3, 5, 8, 31, 32, 33, 65)),
        "tail": tail,
        "dtype": rng.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16)),
        "memory_format": rng.choice(formats),
        "steps": 1,
    }


def test_random_shapes(seed: int) -> None:
    """Thirty shapes drawn from the seed (1 to 65 channels, 2D to 5D, every layout and dtype), each planned
    for 1, 8 or 132 multiprocessors."""
    rng = random.Random(seed)
    for _ in range(30):
        case, sm_count = _random_case(rng), rng.choice((1, 8, 132))
        try:
            cuda_emulator.check_against_oracle(None, rng.randrange(2**31), sm_count=sm_count, **case)
        except AssertionError as error:
            raise AssertionError(f"{case} on {sm_count} multiprocessors: {error}") from error


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_two_equal_ranks(seed: int, memory_format: torch.memory_format) -> None:
    """A group whose sums are twice this rank's: the global count and statistics are the group's."""
    with cuda_emulator.emulated():
        cases.check_doubled(cases.TwoEqualRanks(), seed, "cupy", memory_format, "cpu")


def test_all_empty_and_single_value() -> None:
    with cuda_emulator.emulated():
        layer = syncbn.SyncBatchNorm(3)
        x = torch.empty(0, 3, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and int(layer.num_batches_tracked) == 1
        assert_close(layer.running_mean, torch.zeros(3))
        assert_close(layer.running_var, torch.ones(3))
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(torch.randn(1, 3))


def _vec(launch: cuda_emulator.Launched) -> int:
    return int(launch.args[5])  # NCHW reductions: x, N, C, S, ts_bits, vec, ...


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rows_of_whole_vectors_take_the_vector_loads(seed: int, dtype: torch.dtype) -> None:
    """16-byte loads where rows are whole vectors and the tensors aligned, one at a time where not."""
    for tail, vectorised in (((4, 8), True), ((3, 5), False)):
        with cuda_emulator.emulated():
            cases.check_against_oracle(None, seed, ops="cupy", batch=3, channels=6, tail=tail, dtype=dtype, steps=1)
        moments = [launch for launch in cuda_emulator.LAUNCHES if launch.name.startswith("syncbn_moments_nchw")]
        assert moments and all(_vec(launch) == vectorised for launch in moments), (tail, moments)


def test_a_misaligned_input_takes_the_loads_one_at_a_time(seed: int) -> None:
    """A view 4 bytes into its storage: no 16-byte load (the emulator refuses one, as the device faults)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(3 * 6 * 32 + 1, generator=generator, dtype=torch.float64) * 2 + 1).float()[1:].view(3, 6, 4, 8)
    assert x.data_ptr() % 16
    with cuda_emulator.emulated():
        y = syncbn.SyncBatchNorm(6)(x)
    moments = [launch for launch in cuda_emulator.LAUNCHES if launch.name.startswith("syncbn_moments_nchw")]
    assert moments and not any(_vec(launch) for launch in moments)
    assert_close(y.double(), torch.nn.BatchNorm2d(6).double()(x.double()), rtol=1e-5, atol=2e-5)


def _plans(**case: object) -> dict[str, set[tuple[int, int]]]:
    """(splits, chunks) of the NCHW and channels-last reductions of one training step at 132 SMs."""
    seen: dict[str, set[tuple[int, int]]] = {"nchw": set(), "nhwc": set()}
    cuda_emulator.check_against_oracle(None, 1, sm_count=132, steps=1, **case)
    for launch in cuda_emulator.LAUNCHES:
        if launch.name.startswith("syncbn_moments_nchw"):
            seen["nchw"].add((launch.grid[1], int(launch.args[6])))
        elif launch.name.startswith("syncbn_moments_nhwc"):
            seen["nhwc"].add((launch.grid[1], 1))
    return seen


def test_the_cases_reach_split_channels_and_rows_cut_in_pieces() -> None:
    """The CUDA cases exercise what a large GPU's launch plans do: several blocks per channel, in both
    layouts, and rows cut into pieces."""
    extra = dict(cases.CUDA_CASES)
    assert any(chunks > 1 for _, chunks in _plans(**extra["rows-cut-in-pieces"])["nchw"])
    assert any(splits > 1 for splits, _ in _plans(**extra["large-spatial"])["nchw"])
    assert any(splits > 1 for splits, _ in _plans(**extra["large-spatial-channels-last"])["nhwc"])


#: ResNet-50 BatchNorm shapes the GPU benchmark times, in the layouts and dtypes where their plans differ most:
#: rows cut in pieces (2 images of 112 x 112), 132 splits of 2 channel columns, 2048 channels of 7 x 7.
RESNET_CASES = [
    ((2, 64, 112, 112), torch.contiguous_format, torch.float32),
    ((2, 64, 112, 112), torch.channels_last, torch.bfloat16),
    ((2, 2048, 7, 7), torch.channels_last, torch.float32),
    ((32, 64, 56, 56), torch.channels_last, torch.float32),
]


@pytest.mark.parametrize(("shape", "memory_format", "dtype"), RESNET_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_resnet50_shapes_on_a_large_gpu(seed: int, shape: tuple[int, ...], memory_format: Any, dtype: Any) -> None:
    """A training step on a shape the GPU benchmark runs, planned for 132 SMs, against float64 nn.BatchNorm2d."""
    generator = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    x = x64.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    with cuda_emulator.emulated(sm_count=132):
        layer = syncbn.SyncBatchNorm(shape[1])
        y = layer(x)
        y.backward(dy)
    assert cuda_emulator.LAUNCHES
    reference = torch.nn.BatchNorm2d(shape[1]).double()
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(dy.double())
    tolerance = TOLERANCES[dtype]
    assert_close(y.double(), y_ref.detach(), **tolerance.elementwise)
    assert x.grad is not None and x_ref.grad is not None and layer.weight.grad is not None
    assert_close(x.grad.double(), x_ref.grad, **tolerance.elementwise)
    # Sums of up to 25,000 values per channel: relative to the largest, in float32's accumulation.
    scale = float(reference.weight.grad.abs().max())
    assert_close(layer.weight.grad.double() / scale, reference.weight.grad / scale, rtol=0, atol=1e-5)
    assert_close(layer.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_under_autocast(seed: int, dtype: torch.dtype) -> None:
    """The kernels under torch.autocast: half-precision activations from a convolution, float32 parameters."""
    cuda_emulator.run_emulated("check_under_autocast", seed=seed, ops="cupy", dtype=dtype, device="cpu")


def test_every_kernel_the_launchers_use_has_run(seed: int) -> None:
    ran: set[str] = set()
    for dtype in cuda.DTYPE_NAMES:
        for memory_format in ("contiguous", "channels_last"):
            with cuda_emulator.emulated():
                cases.check_against_oracle(None, seed, ops="cupy", dtype=dtype, memory_format=memory_format, steps=1)
            ran |= {launch.name for launch in cuda_emulator.LAUNCHES}
    # The statistics kernel is chosen by the running statistics' dtype: float16 and bfloat16 ones too.
    for dtype in (torch.float16, torch.bfloat16):
        with cuda_emulator.emulated():
            layer = syncbn.SyncBatchNorm(4).to(dtype)
            x = torch.randn(3, 4, 5, dtype=dtype)
            y = layer(x)
            reference = torch.nn.BatchNorm1d(4).double()
            assert_close(y.double(), reference(x.double()), rtol=1e-2, atol=1e-2)
            assert_close(layer.running_var.double(), reference.running_var, rtol=1e-2, atol=1e-2)
        ran |= {launch.name for launch in cuda_emulator.LAUNCHES}
    assert ran == {name for _, name in cuda.KERNELS}, sorted({name for _, name in cuda.KERNELS} - ran)


# --- the emulator itself --------------------------------------------------------------------------

_TOY = r"""
extern "C" __global__ void toy_block_sum(const float* x, int n, double* out) {
    __shared__ float shared[2 * 8];
    float a = 0, b = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        a += x[i];
        b += x[i] * x[i];
    }
    block_sum2<256>(a, b, shared);
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = a;
        out[2 * blockIdx.x + 1] = b;
    }
}
extern "C" __global__ void toy_conversions(const unsigned short* h, float* widened, const float* f,
                                           unsigned short* to_half, unsigned short* to_bfloat16, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    widened[i] = Type<F16>::load(h[i]);
    to_half[i] = Type<F16>::store(f[i]);
    to_bfloat16[i] = Type<BF16>::store(f[i]);
}
extern "C" __global__ void toy_unwritten_shared(float* out) {
    __shared__ float shared[4];
    if (blockIdx.x == 0 && threadIdx.x == 0) shared[0] = 42.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = shared[0];
}
extern "C" __global__ void toy_shuffle_after_return(float* x) {
    if (threadIdx.x >= 16) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 16);
}
__device__ float toy_deep(volatile float* x, int depth) {  // 4 KiB a frame, until the stack ends
    volatile float frame[1024];
    frame[0] = x[0] + static_cast<float>(depth);
    return depth == 0 ? frame[0] : toy_deep(x, depth - 1) + frame[0];
}

extern "C" __global__ void toy_stack_overflow(float* x, int depth) { x[0] = toy_deep(x, depth); }

extern "C" __global__ void toy_divergent_barrier(float* x) {
    float v = x[threadIdx.x];
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    x[threadIdx.x] = v;
}
"""


def _toy_module() -> cuda_emulator.Module:
    common = (cuda.KERNEL_DIR / "common.cuh").read_text()
    names = ("toy_block_sum", "toy_conversions", "toy_unwritten_shared", "toy_shuffle_after_return",
             "toy_divergent_barrier", "toy_stack_overflow")  # fmt: skip
    return cuda_emulator.Module(common + _TOY, names=names)


def _pointers(*tensors: torch.Tensor) -> tuple[np.uint64, ...]:
    return tuple(np.uint64(t.data_ptr()) for t in tensors)


def test_the_emulator_converts_half_precision_as_the_device() -> None:
    """Every float16 widened exactly; float32 values (ties, subnormals, overflow, signed zeros) narrowed to
    float16 and bfloat16 as torch rounds them (to nearest even); NaN stays NaN."""
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    special = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 3 * 2.0**-25, 2.0**-25, 1 + 2.0**-11,
               1 + 3 * 2.0**-11, float("inf"), -float("inf"), float("nan"), 3.0e38, 1.0 + 2.0**-8]  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    floats = torch.cat((torch.tensor(special), torch.randn(40000, generator=generator) * 10.0 ** torch.randint(
        -9, 6, (40000,), generator=generator).float()))  # fmt: skip
    n = halves.numel()
    floats = torch.cat((floats, torch.zeros(n - floats.numel())))
    widened, to_half, to_bf16 = torch.empty(n), torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    _toy_module().get_function("toy_conversions")(
        (n // 256, 1, 1), (256, 1, 1), (*_pointers(halves, widened, floats, to_half, to_bf16), np.int32(n))
    )
    assert_close(widened, halves.view(torch.float16).float(), rtol=0, atol=0, equal_nan=True)
    for ours, dtype in ((to_half, torch.float16), (to_bf16, torch.bfloat16)):
        expected = floats.to(dtype)
        nan = expected.isnan()
        assert torch.equal(ours.view(dtype).isnan(), nan)
        assert torch.equal(ours[~nan], expected.view(torch.int16)[~nan]), dtype


def test_the_emulator_poisons_shared_memory_and_checks_launches() -> None:
    module, out = _toy_module(), torch.zeros(3)
    module.get_function("toy_unwritten_shared")((3, 1, 1), (32, 1, 1), _pointers(out))
    assert out[0] == 42 and out[1:].isnan().all(), "a block read shared memory another block wrote"
    for grid, block in (((1, 1, 1), (1025, 1, 1)), ((1, 70000, 1), (32, 1, 1)), ((0, 1, 1), (32, 1, 1))):
        with pytest.raises(cuda_emulator.EmulatorError, match="beyond the device's limits"):
            module.get_function("toy_unwritten_shared")(grid, block, _pointers(out))
    with pytest.raises(cuda_emulator.EmulatorError, match="lane that has returned"):
        module.get_function("toy_shuffle_after_return")((1, 1, 1), (32, 1, 1), _pointers(torch.zeros(32)))


@pytest.mark.parametrize("depth", [4, 15])
def test_a_thread_that_overflows_its_stack_crashes_the_process(depth: int) -> None:
    """A fibre's stack (64 KiB) has a guard page below it. 5 frames of 4 KiB fit; 16 overflow it by less
    than a page, so they hit the guard (SIGSEGV, in a child process) where they would otherwise write
    silently over whatever lies below the stack."""
    _toy_module()  # compiled here, once, so that the child only loads it
    code = (
        "import numpy as np, torch; from tests import test_cuda_emulated as t; x = torch.ones(1); "
        f"t._toy_module().get_function('toy_stack_overflow')((1, 1, 1), (1, 1, 1), (*t._pointers(x), "
        f"np.int32({depth}))); print(float(x[0]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if depth == 4:
        assert done.returncode == 0 and float(done.stdout) == 5 * 1 + (4 + 3 + 2 + 1), done.stderr
    else:
        assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stdout, done.stderr)


def test_the_emulator_refuses_vector_loads_that_would_fault() -> None:
    moments = cuda_emulator.Module(cuda.source("moments")).get_function("syncbn_moments_nchw_f32")
    x, partial = torch.randn(2 * 3 * 8 + 1)[1:], torch.empty(16, dtype=torch.float64)
    args = (*_pointers(x), np.int32(2), np.int32(3), np.int64(8), np.int32(1), np.int32(1), np.int32(1),
            np.int64(2), *_pointers(partial))  # fmt: skip
    with pytest.raises(cuda_emulator.EmulatorError, match="not 16-byte aligned"):
        moments((3, 1, 1), (256, 1, 1), args)
    with pytest.raises(cuda_emulator.EmulatorError, match="over its launch bounds"):
        moments((3, 1, 1), (512, 1, 1), args)


def test_the_emulator_runs_blocks_warps_and_shared_memory() -> None:
    x = torch.randn(10_000)
    out = torch.zeros(2 * 3, dtype=torch.float64)
    _toy_module().get_function("toy_block_sum")(
        (3, 1, 1), (256, 1, 1), (np.uint64(x.data_ptr()), np.int32(x.numel()), np.uint64(out.data_ptr()))
    )
    sums = out.view(3, 2).sum(0)
    assert_close(sums, torch.stack((x.double().sum(), x.double().square().sum())), rtol=1e-5, atol=1e-3)


def test_the_emulator_refuses_wrong_arguments_and_reports_a_deadlock() -> None:
    module, x = _toy_module(), torch.randn(32)
    block_sum = module.get_function("toy_block_sum")
    with pytest.raises(cuda_emulator.EmulatorError, match="wrong number"):
        block_sum((1, 1, 1), (256, 1, 1), (np.uint64(x.data_ptr()),))
    with pytest.raises(cuda_emulator.EmulatorError, match="wrong kind or size"):
        block_sum((1, 1, 1), (256, 1, 1), (np.uint64(x.data_ptr()), np.int64(32), np.uint64(x.data_ptr())))
    with pytest.raises(cuda_emulator.EmulatorError, match="deadlocked"):
        module.get_function("toy_divergent_barrier")((1, 1, 1), (32, 1, 1), (np.uint64(x.data_ptr()),))


@pytest.mark.parametrize(("backend", "channels_last"), [("aot_eager", False), ("aot_eager", True), ("inductor", True)])
def test_compiled_training_equals_eager(seed: int, backend: str, channels_last: bool) -> None:
    """torch.compile (fullgraph) of a small network trains as its eager twin, both on the CUDA
    implementation: its outputs' shapes and strides are what the custom operators' fake implementations
    declare. (Not poisoned: the fake implementations allocate too, while tracing.)"""
    from tests import test_compile

    with cuda_emulator.emulated(sm_count=8, poison=False):
        test_compile.compiled_training_body(seed, "cupy", backend, None, [4], channels_last=channels_last)
    assert cuda_emulator.LAUNCHES
