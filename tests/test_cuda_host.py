"""The CUDA implementation without a GPU: the kernels compiled by nvcc, and everything up to the launch.

* Every ``.cu`` family compiles with nvcc for sm_80, sm_90 and sm_100, warnings as
  errors, with no register spill, and defines every ``extern "C"`` name the
  launchers look up (in CI a missing nvcc is a failure).
* Layouts, launch configurations (every element covered exactly once, in a
  Python model of the kernels' loops), vectorisation, kernel names.
* A dry run of a whole training step through :class:`~syncbn.ops.cuda.CupyOps` with
  a stand-in for CuPy and the CUDA runtime: every launch passes the
  parameters the compiled kernel declares (count and PTX type), on the stream
  PyTorch reports, with the launch configuration the planner chose.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import syncbn
from syncbn.ops import cuda
from tests.needs import require_mpi, unavailable

ARCHITECTURES = ("sm_80", "sm_90", "sm_100")
NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-ftz=true",
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-v,-warn-spills,-warn-lmem-usage",
)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        unavailable("nvcc is not installed: CI compile-checks the CUDA kernels with it")
    return nvcc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per family: nvcc's output for each architecture, and the entry points' PTX parameter types."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("kernels")
    results: dict[str, dict[str, Any]] = {}
    for family, filename in cuda.FAMILIES.items():
        source = cuda.KERNEL_DIR / filename
        logs = {}
        for arch in ARCHITECTURES:
            done = subprocess.run(
                [nvcc, *NVCC_FLAGS, "-cubin", f"-arch={arch}", "-o", str(out / f"{family}_{arch}.cubin"), str(source)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            logs[arch] = (done.returncode, done.stdout + done.stderr)
        ptx = out / f"{family}.ptx"
        subprocess.run(
            [nvcc, "-std=c++17", "-O3", "-ftz=true", "-ptx", "-arch=sm_90", "-o", str(ptx), str(source)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        entries = {
            name: re.findall(r"\.param \.(\w+)", params)
            for name, params in re.findall(r"\.entry (\w+)\(([^)]*)\)", ptx.read_text())
        }
        results[family] = {"logs": logs, "entries": entries}
    return results


@pytest.mark.parametrize("family", sorted(cuda.FAMILIES))
def test_kernels_compile_for_every_architecture_without_warnings_or_spills(
    compiled: dict[str, dict[str, Any]], family: str
) -> None:
    for arch, (returncode, log) in compiled[family]["logs"].items():
        assert returncode == 0, f"{family} for {arch}:\n{log}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert spills and all(s == ("0", "0") for s in spills), f"{family} for {arch} spills registers:\n{log}"
        assert "warning" not in log.lower(), log


def test_every_kernel_the_launchers_use_is_compiled(compiled: dict[str, dict[str, Any]]) -> None:
    for family, name in cuda.KERNELS:
        assert name in compiled[family]["entries"], f"{name} is not an entry point of {cuda.FAMILIES[family]}"
    launched = {name for _, name in cuda.KERNELS}
    defined = {name for result in compiled.values() for name in result["entries"]}
    assert defined == launched, f"compiled but never launched: {sorted(defined - launched)}"


def test_source_for_nvrtc_needs_no_include_path() -> None:
    for family in cuda.FAMILIES:
        text = cuda.source(family)
        assert "#include" not in text and "struct Tile" in text and 'extern "C"' in text


# --- the run-time compile: NVRTC, as CuPy's RawModule calls it -------------------------------------


class _NVRTC:
    """NVRTC through its C API (``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel): it compiles without a GPU."""

    def __init__(self, library: Path) -> None:
        # NVRTC opens its builtins library by name: loaded first, from beside it, the name is found.
        builtins = sorted(library.parent.glob("libnvrtc-builtins.so.*"))
        for path in builtins[:1]:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        self._lib = ctypes.CDLL(str(library))

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        assert self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0
        return major.value, minor.value

    def compile(self, source: str, name: str, options: list[str]) -> tuple[int, str, bytes]:
        """``(result, log, cubin)``: result 0 is success; the log holds every warning."""
        program = ctypes.c_void_p()
        assert self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None) == 0
        try:
            encoded = [option.encode() for option in options]
            result = self._lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
            size = ctypes.c_size_t()
            self._lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self._lib.nvrtcGetProgramLog(program, log)
            cubin = b""
            if result == 0:
                self._lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
                binary = ctypes.create_string_buffer(size.value)
                assert self._lib.nvrtcGetCUBIN(program, binary) == 0
                cubin = binary.raw
            return result, log.value.decode(errors="replace"), cubin
        finally:
            self._lib.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.fixture(scope="module")
def nvrtc() -> _NVRTC:
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(root) for root in (spec.submodule_search_locations or [])] if spec else []
    found = sorted(path for root in roots for path in root.glob("*/lib/libnvrtc.so.*") if ".alt." not in path.name)
    if not found:
        unavailable("NVRTC is not installed (the test extra's nvidia-cuda-nvrtc): CI compiles the kernels with it")
    return _NVRTC(found[0])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("family", sorted(cuda.FAMILIES))
def test_the_run_time_compiler_builds_every_family_without_a_warning(nvrtc: _NVRTC, family: str, arch: str) -> None:
    """The text CupyOps hands to RawModule, with the options CuPy adds, compiles
    under NVRTC as under nvcc: no error, no warning, and every entry point the launchers look up is in the cubin."""
    # What CuPy 14's compiler.py adds for RawModule without jitify: -ftz=true, -arch=sm_XX (a cubin), and
    # --device-as-default-execution-space.
    options = [*cuda.NVRTC_OPTIONS, "-ftz=true", f"-arch={arch}", "--device-as-default-execution-space"]
    result, log, cubin = nvrtc.compile(cuda.source(family), f"{family}.cu", options)
    assert result == 0, f"NVRTC {nvrtc.version()} failed on {family} for {arch}:\n{log}"
    assert not log.strip(), f"NVRTC {nvrtc.version()} warned on {family} for {arch}:\n{log}"
    for kernel_family, name in cuda.KERNELS:
        if kernel_family == family:
            assert name.encode() + b"\0" in cubin, f"{name} is not in NVRTC's {family} cubin for {arch}"


def test_the_nvrtc_check_sees_a_warning(nvrtc: _NVRTC) -> None:
    """The check above can fail: an unused variable is a warning in NVRTC's log, a syntax error a failure."""
    result, log, _ = nvrtc.compile(
        'extern "C" __global__ void k(float* x) { int unused; x[0] = 1; }', "k.cu", ["-arch=sm_90"]
    )
    assert result == 0 and "#177" in log
    result, log, _ = nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = }', "k.cu", ["-arch=sm_90"])
    assert result != 0 and "error" in log


# --- layouts, launch configurations --------------------------------------------------------------


def _strides(shape: tuple[int, ...], memory_format: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").contiguous(memory_format=memory_format).stride()


@pytest.mark.parametrize(
    ("shape", "memory_format", "layout", "S"),
    [
        ((8, 5), torch.contiguous_format, "nhwc", 1),
        ((8, 5, 7), torch.contiguous_format, "nchw", 7),
        ((2, 64, 56, 56), torch.contiguous_format, "nchw", 3136),
        ((2, 64, 56, 56), torch.channels_last, "nhwc", 3136),
        ((2, 37, 1, 1), torch.channels_last, "nhwc", 1),
        ((2, 37, 1, 1), torch.contiguous_format, "nhwc", 1),
        ((2, 8, 3, 4, 5), torch.contiguous_format, "nchw", 60),
        ((2, 8, 3, 4, 5), torch.channels_last_3d, "nhwc", 60),
        ((1, 3, 4, 4), torch.channels_last, "nhwc", 16),
    ],
)
def test_geometry(shape: tuple[int, ...], memory_format: torch.memory_format, layout: str, S: int) -> None:
    geom = cuda.geometry(shape, _strides(shape, memory_format))
    assert geom is not None and (geom.layout, geom.N, geom.C, geom.S) == (layout, shape[0], shape[1], S)


def test_other_strides_are_copied_first() -> None:
    transposed = torch.empty(4, 6, 5).transpose(0, 2)  # (5, 6, 4), strides (1, 5, 30)
    assert cuda.geometry(tuple(transposed.shape), transposed.stride()) is None
    sliced = torch.empty(4, 10, 3)[:, ::2]
    assert cuda.geometry(tuple(sliced.shape), sliced.stride()) is None


# ResNet-50's BatchNorm shapes at 2 and 32 images, and odd channel counts.
SHAPES = [
    (2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28), (2, 2048, 7, 7), (32, 64, 56, 56), (32, 2048, 7, 7),
    (3, 37, 5, 5), (5, 129, 3, 1), (1, 3, 1, 1), (64, 512), (7, 129), (2, 16, 4, 4, 4), (4097, 3),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("elementwise", [False, True])
def test_launch_covers_every_element_once(
    shape: tuple[int, ...], memory_format: str, dtype: torch.dtype, elementwise: bool
) -> None:
    fmt = {
        "contiguous": torch.contiguous_format,
        "channels_last": {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format),
    }[memory_format]
    geom = cuda.geometry(shape, _strides(shape, fmt))
    assert geom is not None
    for vec in (False, True) if geom.layout == "nchw" and geom.S % cuda.VECTOR_WIDTH[dtype] == 0 else (False,):
        launch = cuda.plan(geom, dtype, 132, vec, elementwise)
        threads = launch.block[0] * launch.block[1] * launch.block[2]
        assert threads <= 1024 and launch.grid[1] <= cuda.MAX_GRID_Y and launch.grid[0] < 2**31
        assert launch.splits >= 1
        if not elementwise:
            assert cuda.workspace_numel(launch, geom.C) == 2 * geom.C * launch.splits
        visits = _visits(geom, launch, cuda.VECTOR_WIDTH[dtype] if vec else 1)
        assert visits.min() == 1 and visits.max() == 1, (shape, memory_format, launch)


def _visits(geom: cuda.Geometry, launch: cuda.Launch, width: int) -> np.ndarray:
    """How often the kernels' loops (modelled in NumPy) touch each element of an (N, C, S) tensor."""
    visits = np.zeros((geom.N, geom.C, geom.S), dtype=np.int64)
    if geom.layout == "nchw":  # for_each_load in common.cuh
        tid = np.arange(launch.block[0])
        column, row = tid & ((1 << launch.ts_bits) - 1), tid >> launch.ts_bits
        columns, rows = 1 << launch.ts_bits, launch.block[0] >> launch.ts_bits
        units = geom.S // width
        for split in range(launch.grid[1]):
            for r, col in zip(row, column, strict=True):
                for piece in range(split * rows + r, geom.N * launch.chunks, launch.grid[1] * rows):
                    n, begin = piece // launch.chunks, (piece % launch.chunks) * launch.chunk
                    for unit in range(begin + col, min(begin + launch.chunk, units), columns):
                        visits[n, :, unit * width : (unit + 1) * width] += 1  # every channel: grid.x = C
        return visits
    flat = visits.transpose(0, 2, 1).reshape(geom.M, geom.C)  # rows of channels
    for block_x in range(launch.grid[0]):
        channels = np.arange(block_x * 32, min(block_x * 32 + 32, geom.C))
        for split in range(launch.grid[1]):
            for ty in range(launch.block[1]):
                rows = np.arange(split * cuda.ROWS + ty, geom.M, launch.grid[1] * cuda.ROWS)
                flat[np.ix_(rows, channels)] += 1
    return flat.reshape(geom.N, geom.S, geom.C).transpose(0, 2, 1)


def test_vectorised_only_when_aligned_and_whole() -> None:
    geom = cuda.Geometry("nchw", 2, 4, 12)
    assert cuda.vectorizable(geom, torch.float32, (0, 4096))
    assert not cuda.vectorizable(geom, torch.float32, (4, 4096))  # misaligned
    assert not cuda.vectorizable(geom, torch.float16, (0,))  # 12 is not a multiple of 8 halves
    assert not cuda.vectorizable(cuda.Geometry("nhwc", 2, 4, 12), torch.float32, (0,))


def test_small_rows_use_narrow_tiles() -> None:
    assert cuda.row_bits(49) == 6 and cuda.row_bits(1) == 0 and cuda.row_bits(10_000) == 8
    launch = cuda.plan(cuda.Geometry("nchw", 32, 2048, 49), torch.float32, 132, False, elementwise=False)
    assert launch.block == (256, 1, 1) and launch.ts_bits == 6 and launch.grid == (2048, 1, 1)
    launch = cuda.plan(cuda.Geometry("nchw", 32, 64, 3136), torch.float32, 132, True, elementwise=False)
    assert launch.grid == (64, 5, 1) and launch.chunks == 1  # 2 blocks per SM: 5 splits of the 32 samples


def test_few_long_rows_are_cut_into_pieces() -> None:
    """2 images of 112 x 112 and 64 channels: rows cut in 3, so that 5 blocks per channel have work."""
    launch = cuda.plan(cuda.Geometry("nchw", 2, 64, 112 * 112), torch.float32, 132, True, elementwise=False)
    assert (launch.chunks, launch.chunk, launch.grid) == (3, 1046, (64, 5, 1))
    one = cuda.plan(cuda.Geometry("nchw", 1, 3, 4096), torch.float32, 132, False, elementwise=True)
    assert one.chunks == 4 and one.grid == (3, 4, 1)


def test_momentum_argument() -> None:
    assert cuda.momentum_argument(0.1, False) == 0.1 and cuda.momentum_argument(None, True) == -1.0
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        cuda.momentum_argument(None, False)


def test_names() -> None:
    assert cuda.kernel_name("moments", torch.bfloat16, "nhwc") == "syncbn_moments_nhwc_bf16"
    assert cuda.kernel_name("stats_finalize", torch.float16) == "syncbn_stats_finalize_f16"
    assert len(cuda.KERNELS) == len(set(cuda.KERNELS)) == 42


# --- a dry run with a stand-in for CuPy and the CUDA runtime --------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[Any, ...], int]] = []
        self.compiled: list[str] = []
        self.stream = 0
        self.stream_api = "from_external"  # how CupyOps wrapped PyTorch's stream: CuPy 14's way, or "ExternalStream"
        self.cupy_13 = False  # the stand-in without Stream.from_external, as CuPy 13 is


class _TorchStream:
    """What ``torch.cuda.current_stream`` returns, as far as CupyOps looks: its pointer, and the stream protocol."""

    def __init__(self, pointer: int) -> None:
        self.cuda_stream = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.cuda_stream)


def _fake_cupy(recorder: _Recorder) -> Any:
    class Device:
        def __init__(self, index: int) -> None:
            assert index == 0

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    class ExternalStream:
        def __init__(self, pointer: int, device: int) -> None:
            assert device == 0
            self.pointer = pointer
            recorder.stream_api = "ExternalStream"

        def __enter__(self) -> None:
            recorder.stream = self.pointer

        def __exit__(self, *exc: object) -> None:
            recorder.stream = 0

    class Stream(ExternalStream):
        @classmethod
        def from_external(cls, obj: Any) -> Stream:
            # as CuPy 14 reads the CUDA stream protocol: a (version, pointer) pair
            _version, pointer = obj.__cuda_stream__()
            stream = cls.__new__(cls)
            stream.pointer = pointer
            recorder.stream_api = "from_external"
            return stream

    class Module:
        def __init__(self, code: str, options: tuple[str, ...]) -> None:
            assert "#include" not in code and options == cuda.NVRTC_OPTIONS
            recorder.compiled.append(code)

        def get_function(self, name: str) -> Any:
            def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
                recorder.launches.append((name, grid, block, args, recorder.stream))

            return launch

    runtime = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream, Stream=Stream)
    if recorder.cupy_13:
        del runtime.Stream
    return types.SimpleNamespace(cuda=runtime, RawModule=Module)


@pytest.fixture
def dry_run(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """CupyOps on CPU tensors: CuPy and the CUDA runtime replaced, the kernels recorded instead of run."""
    recorder = _Recorder()
    monkeypatch.setattr(cuda, "import_cupy", lambda: _fake_cupy(recorder))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(multi_processor_count=132)
    )
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: _TorchStream(4242))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    implementation = cuda.CupyOps()
    monkeypatch.setattr(syncbn.ops, "for_device", lambda device_type: implementation)
    return recorder


def test_the_kernels_say_once_that_they_have_not_run_on_a_gpu(
    dry_run: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real table, with CuPy's stand-in
    monkeypatch.setattr(cuda, "import_cupy", lambda: _fake_cupy(dry_run))
    properties = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.setattr(syncbn.ops, "cupy_installed", lambda: True)
    with syncbn.ops.using("auto"), pytest.warns(UserWarning, match="CUDA kernels have not yet been run on a GPU"):
        assert syncbn.ops.for_device("cuda").name == "cupy"


_KINDS = {np.uint64: "u64", np.int64: "u64", np.int32: "u32", np.float64: "f64"}


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_training_step_launches_what_the_kernels_declare(
    dry_run: _Recorder, compiled: dict[str, dict[str, Any]], memory_format: str, dtype: torch.dtype
) -> None:
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    layer = syncbn.SyncBatchNorm(6).to(dtype if dtype == torch.float64 else torch.float32)
    x = torch.randn(2, 6, 4, 5, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    layer(x).backward(torch.randn(2, 6, 4, 5, dtype=dtype).contiguous(memory_format=fmt))
    entries = {name: kinds for result in compiled.values() for name, kinds in result["entries"].items()}
    layout = "nhwc" if memory_format == "channels_last" else "nchw"
    suffix = cuda.DTYPE_NAMES[dtype]
    arithmetic = "f64" if dtype == torch.float64 else "f32"
    assert [name for name, *_ in dry_run.launches] == [
        f"syncbn_moments_{layout}_{suffix}", f"syncbn_moments_merge_{suffix}",
        f"syncbn_stats_finalize_{'f64' if dtype == torch.float64 else 'f32'}", f"syncbn_normalize_{layout}_{suffix}",
        f"syncbn_backward_reduce_{layout}_{suffix}", f"syncbn_backward_merge_{arithmetic}",
        f"syncbn_backward_elemt_{layout}_{suffix}",
    ]  # fmt: skip
    for name, grid, block, args, stream in dry_run.launches:
        assert stream == 4242, f"{name} was not launched on PyTorch's current stream"
        assert [_KINDS[type(a)] for a in args] == entries[name], f"{name}: arguments do not match the kernel"
        assert len(grid) == len(block) == 3 and all(v >= 1 for v in (*grid, *block))
    assert len(dry_run.compiled) == 3  # each family compiled once, then cached
    layer(x).backward(torch.ones_like(x))
    assert len(dry_run.compiled) == 3 and len(dry_run.launches) == 14


@pytest.mark.parametrize("cupy_13", [False, True], ids=["cupy14", "cupy13"])
def test_kernels_run_on_pytorchs_stream_through_either_cupy_api(dry_run: _Recorder, cupy_13: bool) -> None:
    """CuPy 14 deprecates ExternalStream (a DeprecationWarning on every new stream): the stream protocol
    is used where CuPy has it, ExternalStream only on CuPy 13."""
    dry_run.cupy_13 = cupy_13
    implementation = cuda.CupyOps()
    x = torch.randn(3, 4, 5)
    implementation.forward_moments(x, False)
    assert dry_run.launches and {launch[-1] for launch in dry_run.launches} == {4242}
    assert dry_run.stream_api == ("ExternalStream" if cupy_13 else "from_external")


# --- the direct NCCL communicator, with a stand-in for NCCL ----------------------------------------


class _FakeNccl:
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    available = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.aborted = False
        outer = self

        class NcclCommunicator:
            def __init__(self, world_size: int, unique_id: Any, rank: int) -> None:
                if not isinstance(unique_id, bytes):  # as CuPy 14's check of commId
                    raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(unique_id)})")
                outer.calls.append(("init", world_size, unique_id, rank))

            def allReduce(self, *args: Any) -> None:
                outer.calls.append(("allReduce", *args))

            def abort(self) -> None:
                outer.aborted = True

            def destroy(self) -> None:
                outer.calls.append(("destroy",))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self) -> bytes:
        return bytes(range(128))  # CuPy 14: the 128 bytes of an ncclUniqueId


@pytest.fixture
def fake_nccl(monkeypatch: pytest.MonkeyPatch) -> _FakeNccl:
    require_mpi()
    from syncbn.comm import nccl as comm_nccl

    fake = _FakeNccl()
    monkeypatch.setattr(comm_nccl, "import_nccl", lambda: fake)
    monkeypatch.setitem(__import__("sys").modules, "cupy", types.SimpleNamespace(cuda=_fake_cupy(_Recorder()).cuda))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=99))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return fake


class _NeverDone:
    def record(self, stream: Any) -> None:
        return None

    def query(self) -> bool:
        return False


def test_nccl_communicator_reduces_on_the_current_stream(fake_nccl: _FakeNccl) -> None:
    from mpi4py import MPI

    from syncbn.comm.nccl import NCCLCommunicator

    group = NCCLCommunicator(MPI.COMM_SELF, timeout=None)
    assert fake_nccl.calls[0] == ("init", 1, bytes(range(128)), 0) and (group.rank, group.world_size) == (0, 1)
    group.device = torch.device("cpu")  # the stand-in reduces nothing: any tensor will do
    payload = torch.zeros(6, dtype=torch.float64)
    group.all_reduce(payload)
    assert fake_nccl.calls[1] == ("allReduce", payload.data_ptr(), payload.data_ptr(), 6, 8, 0, 99)
    with pytest.raises(TypeError, match="float32 and float64"):
        group.all_reduce(torch.zeros(2, dtype=torch.float16))
    group.close()
    assert fake_nccl.calls[-1] == ("destroy",)


def test_nccl_watchdog_aborts_a_stuck_reduction(fake_nccl: _FakeNccl, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpi4py import MPI

    from syncbn.comm.nccl import NCCLCommunicator
    from syncbn.faults import CollectiveTimeoutError

    monkeypatch.setattr(torch.cuda, "Event", _NeverDone)
    group = NCCLCommunicator(MPI.COMM_SELF, timeout=0.2)
    group.device = torch.device("cpu")
    group.all_reduce(torch.zeros(4))
    deadline = time.monotonic() + 10
    while not fake_nccl.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_nccl.aborted
    with pytest.raises(CollectiveTimeoutError, match=r"rank 0 of 1 \(nccl\): a reduction did not finish within 0.2 s"):
        group.all_reduce(torch.zeros(4))
    group.close()


# --- the GPU command, up to its first CUDA call ----------------------------------------------------


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """``bash bench/gpu_check.sh --dry-run``: the plan of the GPU check and its benchmark, no CUDA call."""
    import sys

    root = Path(__file__).resolve().parent.parent
    environ = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=root, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tests/test_cuda.py" in done.stdout and "144 configurations x 5 contenders" in done.stdout, done.stdout
    assert re.search(r"\d+ tests collected", done.stdout), done.stdout


@functools.cache
def _bench_gpu() -> Any:
    """bench/bench_gpu.py as a module (it stops before any CUDA call until main() runs on a GPU)."""
    spec = importlib.util.spec_from_file_location(
        "bench_gpu", Path(__file__).resolve().parent.parent / "bench" / "bench_gpu.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(configuration: dict[str, Any]) -> dict[str, Any]:
    bench_gpu = _bench_gpu()
    n, c, h, w = configuration["shape"]
    return {
        "device_us": {name: 10.0 + i for i, name in enumerate(bench_gpu.CONTENDERS)},
        "host_us": {name: 20.0 for name in bench_gpu.CONTENDERS},
        "bytes_per_pass": n * c * h * w * 4,
        "input_copies": 3,
    }


def test_gpu_benchmark_keeps_what_it_measured_when_cut_short() -> None:
    """The time limit and the first error stop the run; what was measured before is reported, and why it stopped."""
    bench_gpu = _bench_gpu()
    configurations = bench_gpu.plan(bench_gpu.BATCHES, bench_gpu.RESNET50_SHAPES, False)
    assert len(configurations) == 144
    seen: list[tuple[int, str | None]] = []
    ticks = iter(range(1000))
    results, stopped = bench_gpu.run_configurations(
        configurations, _timed, 4.5, lambda r, s: seen.append((len(r), s)), clock=lambda: float(next(ticks))
    )
    # The clock reads 0 at the start, then 1, 2, ... before each configuration: the fifth would start at 5 s.
    assert len(results) == 4 and stopped == "time limit of 4.5 s reached after 4 of 144 configurations"
    assert seen == [(1, None), (2, None), (3, None), (4, None), (4, stopped)]

    def failing(configuration: dict[str, Any]) -> dict[str, Any]:
        if configuration is configurations[2]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _timed(configuration)

    results, stopped = bench_gpu.run_configurations(configurations, failing, None, lambda r, s: None)
    assert len(results) == 2 and stopped is not None and stopped.endswith("RuntimeError: CUDA error: an illegal "
                                                                          "memory access was encountered")  # fmt: skip
    results, stopped = bench_gpu.run_configurations(configurations[:3], _timed, None, lambda r, s: None)
    assert len(results) == 3 and stopped is None


@pytest.mark.parametrize("stopped", [None, "time limit of 120 s reached after 2 of 144 configurations"])
def test_gpu_benchmark_markdown(stopped: str | None) -> None:
    """Every row of the Markdown table has the header's columns; an incomplete run says so first."""
    bench_gpu = _bench_gpu()
    configurations = bench_gpu.plan((2,), bench_gpu.RESNET50_SHAPES[:1], False)
    report = {
        "versions": {"device": "NVIDIA H200", "sm": "sm_90", "torch": "2.11.0", "cupy": "14.2.0", "nccl": "2.28.9"},
        "copy_bandwidth": 4e12, "warmup": 5, "reps": 25, "configurations": 144, "stopped": stopped,
        "results": [{**c, **_timed(c)} for c in configurations],
    }  # fmt: skip
    text = bench_gpu.markdown(report)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(configurations)
    assert len({line.count("|") for line in table}) == 1, text
    assert ("**Incomplete: time limit" in text) == (stopped is not None)
    # Host 20 us against device 10 + i: the contenders without a host read are marked as host-bound.
    row = next(line for line in table[2:])
    assert "| 10.0* | 11.0* | 12.0 | 13.0 | 14.0* |" in row, row
