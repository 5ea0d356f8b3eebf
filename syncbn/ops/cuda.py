"""SyncBatchNorm's work on CUDA tensors, through syncbn's own kernels (``syncbn/kernels/*.cu``) and CuPy.

The kernels are compiled at run time by CuPy's ``RawModule`` (NVRTC), once per
family and device, and looked up by their ``extern "C"`` names
(``syncbn_<what>_<layout>_<dtype>``, the names nvcc gives them too, so that
CI compile-checks the same entry points and profiles read well). They are
launched on PyTorch's current stream, with the tensors' device pointers
(zero-copy: no CuPy array is made, nothing is synchronised).

Passes per training call: forward 3 (moments: read x; normalise: read x, write
y), backward 5 (reduce: read x and dy; input gradient: read x and dy, write
dx), plus a few kernels of ``O(C)`` work. NCHW and channels-last inputs run
their own kernels; any other strides are copied to contiguous first.

Everything up to the launch (layouts, launch configurations, kernel names,
cache keys, the workspace size, vectorisation) is plain Python, tested
without a GPU (``tests/test_cuda_host.py``). The launches and the kernels
themselves run on CPU tensors in an emulator of CUDA's execution model
(``tests/cuda_emulator.py``, ``tests/test_cuda_emulated.py``), and on a GPU
in ``tests/test_cuda.py`` (``make gpu-check``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from syncbn import settings
from syncbn._install import install_command
from syncbn.ops.base import Ops, Summary, backward_payload, compute_dtype, host_summary
from syncbn.ops.generic import GenericOps

#: Where the kernel sources are.
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
#: Kernel families: one ``.cu`` file each, sharing ``common.cuh``.
FAMILIES = {"moments": "moments.cu", "normalize": "normalize.cu", "backward": "backward.cu"}
DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
#: Elements per 16-byte vector load.
VECTOR_WIDTH = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}
THREADS = 256  # NCHW kernels: 1-D blocks
ROWS = 8  # channels-last kernels: blocks of 32 channels x ROWS rows
MERGE_THREADS = 128  # one thread per channel
FINALIZE_THREADS = 1024  # one block
MAX_GRID_Y = 65535
REDUCE_BLOCKS_PER_SM = 2  # reductions: enough blocks to fill the device, few partial sums to merge
ELEMENTWISE_BLOCKS_PER_SM = 4
MIN_ROWS_PER_THREAD = 4  # channels-last reductions: rows each thread sums at least before splitting further
MIN_LOADS_PER_THREAD = 4  # NCHW: loads each thread makes at least in a piece of a row, before rows are cut

Layout = Literal["nchw", "nhwc"]

#: Every (family, kernel) the launchers look up; CI checks that nvcc emits each of these names.
KERNELS: tuple[tuple[str, str], ...] = tuple(
    [("moments", f"syncbn_moments_{layout}_{d}") for layout in ("nchw", "nhwc") for d in DTYPE_NAMES.values()]
    + [("moments", f"syncbn_moments_merge_{d}") for d in DTYPE_NAMES.values()]
    + [("normalize", f"syncbn_stats_finalize_{d}") for d in DTYPE_NAMES.values()]
    + [("normalize", f"syncbn_normalize_{layout}_{d}") for layout in ("nchw", "nhwc") for d in DTYPE_NAMES.values()]
    + [
        ("backward", f"syncbn_backward_{what}_{layout}_{d}")
        for what in ("reduce", "elemt")
        for layout in ("nchw", "nhwc")
        for d in DTYPE_NAMES.values()
    ]
    + [("backward", f"syncbn_backward_merge_{d}") for d in ("f32", "f64")]
)


@functools.lru_cache(maxsize=1024)
def kernel_name(what: str, dtype: torch.dtype, layout: Layout | None = None) -> str:
    """``syncbn_<what>_<layout>_<dtype>`` (no layout for the per-channel kernels)."""
    return f"syncbn_{what}_{layout}_{DTYPE_NAMES[dtype]}" if layout else f"syncbn_{what}_{DTYPE_NAMES[dtype]}"


# --------------------------------------------------------------------------- host-side decisions


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How the kernels see an ``(N, C, *)`` tensor: ``nchw`` as ``(N, C, S)``, ``nhwc`` as ``(M, C)`` rows."""

    layout: Layout
    N: int
    C: int
    S: int  # elements per (sample, channel): the product of the spatial sizes

    @property
    def M(self) -> int:
        """Rows of the channels-last view: one per (sample, position)."""
        return self.N * self.S


@functools.lru_cache(maxsize=1024)
def geometry(shape: tuple[int, ...], strides: tuple[int, ...]) -> Geometry | None:
    """The layout the kernels read a tensor of ``shape`` and ``strides`` in, or None when it needs a copy.

    ``(N, C)`` and inputs with one position per channel are rows of channels
    (``nhwc``); contiguous ``(N, C, *)`` is ``nchw``; ``channels_last`` and
    ``channels_last_3d`` are ``nhwc``. Any other strides (a slice, a
    transpose) are copied to contiguous by the caller.
    """
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    if _is_dense(shape, strides, tuple(range(len(shape)))):
        return Geometry("nhwc" if S == 1 else "nchw", N, C, S)
    channels_last_order = (0, *range(2, len(shape)), 1)
    if _is_dense(shape, strides, channels_last_order):
        return Geometry("nhwc", N, C, S)
    return None


def _is_dense(shape: tuple[int, ...], strides: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """Whether the dimensions, outermost first in ``order``, are packed without gaps (size-1 dims: any stride)."""
    expected = 1
    for dim in reversed(order):
        if shape[dim] != 1 and strides[dim] != expected:
            return False
        expected *= shape[dim]
    return True


@dataclasses.dataclass(frozen=True)
class Launch:
    """A kernel launch: CUDA grid and block, and the NCHW tile and vectorisation."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    ts_bits: int = 0  # NCHW: 2^ts_bits threads along a row
    vec: bool = False
    chunks: int = 1  # NCHW: pieces each row is cut into
    chunk: int = 0  # NCHW: loads per piece

    @property
    def splits(self) -> int:
        """Blocks per channel (the reductions' partial sums per channel)."""
        return self.grid[1]


def row_bits(units: int) -> int:
    """log2 of the threads along an NCHW row of ``units`` loads: the row's size rounded up, at most THREADS."""
    return min(math.ceil(math.log2(max(units, 1))), int(math.log2(THREADS)))


def vectorizable(geom: Geometry, dtype: torch.dtype, pointers: tuple[int, ...]) -> bool:
    """16-byte loads: NCHW rows a whole number of vectors long, and every tensor 16-byte aligned."""
    return geom.layout == "nchw" and geom.S % VECTOR_WIDTH[dtype] == 0 and all(p % 16 == 0 for p in pointers)


@functools.lru_cache(maxsize=1024)
def plan(geom: Geometry, dtype: torch.dtype, sm_count: int, vec: bool, elementwise: bool) -> Launch:
    """The launch of a reduction (``elementwise=False``) or an elementwise pass over ``geom``.

    NCHW: blocks of THREADS per channel (``splits`` of them); a channel's N
    rows are cut into ``chunks`` pieces when the samples alone are too few to
    give every block work (2 images of 112 x 112), and the pieces are dealt
    to groups of ``2^ts_bits`` threads that read consecutive loads (coalesced),
    narrow groups for short rows (7 x 7). Channels-last: blocks of 32
    channels x ROWS rows. Splits are added until the device has a few blocks
    per SM, no more than there is work for.
    """
    per_sm = ELEMENTWISE_BLOCKS_PER_SM if elementwise else REDUCE_BLOCKS_PER_SM
    if geom.layout == "nchw":
        units = geom.S // VECTOR_WIDTH[dtype] if vec else geom.S
        bits = row_bits(units)
        rows, columns = THREADS >> bits, 1 << bits
        wanted = max(math.ceil(per_sm * sm_count / geom.C), 1)
        chunks = 1
        if wanted * rows > geom.N:
            chunks = max(min(math.ceil(wanted * rows / geom.N), units // (columns * MIN_LOADS_PER_THREAD)), 1)
        chunk = math.ceil(units / chunks)
        chunks = math.ceil(units / chunk)
        if geom.N * chunks >= 2**31:
            raise ValueError(f"SyncBatchNorm's CUDA kernels take fewer than 2^31 rows, got {geom.N} x {chunks}")
        splits = min(wanted, math.ceil(geom.N * chunks / rows), MAX_GRID_Y)
        return Launch((geom.C, splits, 1), (THREADS, 1, 1), bits, vec, chunks, chunk)
    columns = math.ceil(geom.C / 32)
    most = min(math.ceil(geom.M / (ROWS * (1 if elementwise else MIN_ROWS_PER_THREAD))), MAX_GRID_Y)
    splits = min(max(math.ceil(per_sm * sm_count / columns), 1), max(most, 1))
    return Launch((columns, splits, 1), (32, ROWS, 1))


@functools.lru_cache(maxsize=1024)
def per_channel_launch(num_channels: int) -> Launch:
    """The merge kernels: one thread per channel."""
    return Launch((math.ceil(num_channels / MERGE_THREADS), 1, 1), (MERGE_THREADS, 1, 1))


@functools.lru_cache(maxsize=1024)
def finalize_launch(num_channels: int) -> Launch:
    """The statistics kernel: one block (it reads ``num_batches_tracked`` before adding 1)."""
    return Launch((1, 1, 1), (min(FINALIZE_THREADS, 32 * math.ceil(num_channels / 32)), 1, 1))


def workspace_numel(launch: Launch, num_channels: int) -> int:
    """float64 partial sums a reduction writes: two per channel and split."""
    return 2 * num_channels * launch.splits


def momentum_argument(momentum: float | None, has_num_batches_tracked: bool) -> float:
    """What the statistics kernel takes for ``momentum``: itself, or -1 for the cumulative average."""
    if momentum is None:
        if not has_num_batches_tracked:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        return -1.0
    return float(momentum)


# --------------------------------------------------------------------------- CuPy: modules, streams, launches


def import_cupy() -> Any:
    """CuPy, or a ModuleNotFoundError that names the extra to install."""
    try:
        import cupy
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"syncbn's CUDA kernels need CuPy; install it with `{install_command('cuda13')}` (CUDA 13) or "
            f"`{install_command('cuda12')}` (CUDA 12), or set {settings.OPS}=torch for the generic implementation"
        ) from error
    return cupy


def source(family: str) -> str:
    """A family's CUDA source with ``common.cuh`` pasted in (NVRTC then needs no include path)."""
    common = (KERNEL_DIR / "common.cuh").read_text().replace("#pragma once", "")
    return (KERNEL_DIR / FAMILIES[family]).read_text().replace('#include "common.cuh"', common)


#: Options of the run-time compile: what CI's nvcc check uses (CuPy adds -ftz=true itself).
NVRTC_OPTIONS = ("-std=c++17",)


class _Kernels:
    """The compiled functions of one device, by name; compiled once per family, on first use."""

    def __init__(self, cupy: Any, device_index: int) -> None:
        self._cupy = cupy
        self._device_index = device_index
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Any] = {}
        self.sm_count = torch.cuda.get_device_properties(device_index).multi_processor_count

    def function(self, family: str, name: str) -> Any:
        function = self._functions.get(name)
        if function is None:
            module = self._modules.get(family)
            if module is None:
                with self._cupy.cuda.Device(self._device_index):
                    module = self._modules[family] = self._cupy.RawModule(code=source(family), options=NVRTC_OPTIONS)
            with self._cupy.cuda.Device(self._device_index):
                function = self._functions[name] = module.get_function(name)
        return function


def _index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (``cuda`` without an index: the current device)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _tile(launch: Launch) -> tuple[Any, ...]:
    """The NCHW kernels' last scalar arguments: ts_bits, vec, chunks, chunk."""
    return np.int32(launch.ts_bits), np.int32(launch.vec), np.int32(launch.chunks), np.int64(launch.chunk)


def _pointer(t: torch.Tensor | None) -> Any:
    return np.uint64(0 if t is None else t.data_ptr())


class CupyOps(Ops):
    """The CuPy implementation: syncbn's kernels on CUDA tensors (``SYNCBN_OPS=cupy``)."""

    name = "cupy"

    def __init__(self) -> None:
        self._cupy = import_cupy()
        self._kernels: dict[int, _Kernels] = {}
        self._streams: dict[tuple[int, int], Any] = {}
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self._generic = GenericOps()  # the empty batch: no kernel has anything to read
        self._zeros: dict[tuple[int, int], torch.Tensor] = {}

    # ---- launching

    def _device(self, index: int) -> _Kernels:
        kernels = self._kernels.get(index)
        if kernels is None:
            kernels = self._kernels[index] = _Kernels(self._cupy, index)
        return kernels

    def _stream(self, device_index: int) -> Any:
        """PyTorch's current stream on the device, as a CuPy stream (one object per stream, kept).

        Through the CUDA stream protocol (``Stream.from_external``) where CuPy has it: CuPy 14
        deprecates ``ExternalStream``, which older versions need.
        """
        current = torch.cuda.current_stream(device_index)
        pointer = current.cuda_stream
        stream = self._streams.get((device_index, pointer))
        if stream is None:
            from_external = getattr(getattr(self._cupy.cuda, "Stream", None), "from_external", None)
            if from_external is not None and hasattr(current, "__cuda_stream__"):
                stream = from_external(current)
            else:
                stream = self._cupy.cuda.ExternalStream(pointer, device_index)
            self._streams[(device_index, pointer)] = stream
        return stream

    def _launch(self, t: torch.Tensor, family: str, name: str, launch: Launch, args: tuple[Any, ...]) -> None:
        index = _index(t)
        function = self._device(index).function(family, name)
        with self._cupy.cuda.Device(index), self._stream(index):
            function(launch.grid, launch.block, args)

    def _workspace(self, t: torch.Tensor, numel: int) -> torch.Tensor:
        """float64 scratch for partial sums, kept per device and stream and grown when needed.

        While a CUDA graph is captured, a new one each call, from the graph's own memory pool: a
        kept one could be grown (freed) later while the graph still replays into it, or be shared
        by two graphs captured on the same stream.
        """
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(numel, dtype=torch.float64, device=t.device)
        index = _index(t)
        key = (index, torch.cuda.current_stream(index).cuda_stream)
        workspace = self._workspaces.get(key)
        if workspace is None or workspace.numel() < numel:
            workspace = self._workspaces[key] = torch.empty(max(numel, 1024), dtype=torch.float64, device=t.device)
        return workspace

    def _zero_shift(self, t: torch.Tensor, num_channels: int) -> torch.Tensor:
        """Zeros, kept per device and channel count; made anew while a CUDA graph is captured (a kept one
        would live in the graph's memory pool, its zeros written only when the graph replays)."""
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(num_channels, dtype=torch.float64, device=t.device)
        key = (_index(t), num_channels)
        zeros = self._zeros.get(key)
        if zeros is None:
            zeros = self._zeros[key] = torch.zeros(num_channels, dtype=torch.float64, device=t.device)
        return zeros

    @staticmethod
    def _readable(x: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        geom = geometry(tuple(x.shape), x.stride())
        if geom is None:
            x = x.contiguous()
            geom = geometry(tuple(x.shape), x.stride())
            assert geom is not None
        return x, geom

    def _plan(self, x: torch.Tensor, geom: Geometry, others: tuple[torch.Tensor, ...], elementwise: bool) -> Launch:
        pointers = (x.data_ptr(), *(t.data_ptr() for t in others))
        return plan(geom, x.dtype, self._device(_index(x)).sm_count, vectorizable(geom, x.dtype, pointers), elementwise)

    # ---- the interface

    def forward_moments(self, x: torch.Tensor, runs_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_channels = x.shape[1]
        if x.numel() == 0:
            return self._generic.forward_moments(x, runs_backward)
        x, geom = self._readable(x)
        payload = torch.empty(2 * num_channels + 4, dtype=torch.float64, device=x.device)
        launch = self._plan(x, geom, (), elementwise=False)
        partial = self._workspace(x, workspace_numel(launch, num_channels))
        if geom.layout == "nchw":
            args: tuple[Any, ...] = (
                _pointer(x), np.int32(geom.N), np.int32(geom.C), np.int64(geom.S), *_tile(launch), _pointer(partial),
            )  # fmt: skip
        else:
            args = (_pointer(x), np.int64(geom.M), np.int32(geom.C), _pointer(partial))
        self._launch(x, "moments", kernel_name("moments", x.dtype, geom.layout), launch, args)
        self._launch(
            x, "moments", kernel_name("moments_merge", x.dtype), per_channel_launch(num_channels),
            (
                _pointer(x), np.int64(geom.S if geom.layout == "nchw" else 1), _pointer(partial),
                np.int32(launch.splits), np.int32(num_channels), np.float64(geom.N * geom.S),
                np.float64(runs_backward), _pointer(payload),
            ),
        )  # fmt: skip
        return x, self._zero_shift(x, num_channels), payload

    def recenter(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return self._generic.recenter(x, shift)
        return self._readable(x)[0]  # the kernels read x itself: the shift is 0

    def read_summary(self, payload: torch.Tensor) -> Summary | None:
        return host_summary(payload)  # the one device-to-host read of a training forward

    def forward_finish(
        self,
        payload: torch.Tensor,
        shift: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
    ) -> torch.Tensor:
        num_channels = shift.shape[0]
        norm = torch.empty(2 * num_channels + 1, dtype=torch.float64, device=payload.device)
        update = running_mean is not None and running_var is not None
        tracked = num_batches_tracked if update else None
        factor = momentum_argument(momentum, tracked is not None) if update else 0.0
        buffer_dtype = running_mean.dtype if update and running_mean is not None else torch.float32
        if update and running_var is not None and running_var.dtype != buffer_dtype:
            raise TypeError(
                f"SyncBatchNorm's running_mean and running_var must share a dtype, got {buffer_dtype} and "
                f"{running_var.dtype}"
            )
        # The kernels' shift is 0 (their sums need none): norm[:C] is the global mean itself.
        for buffer in (running_mean, running_var, tracked):
            if update and buffer is not None and not buffer.is_contiguous():
                raise ValueError("SyncBatchNorm's running statistics must be contiguous tensors")
        self._launch(
            payload, "normalize", kernel_name("stats_finalize", buffer_dtype), finalize_launch(num_channels),
            (
                _pointer(payload), np.int32(num_channels), _pointer(norm),
                _pointer(running_mean if update else None), _pointer(running_var if update else None),
                _pointer(tracked), np.float64(factor),
            ),
        )  # fmt: skip
        return norm

    def normalize(
        self,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        output = torch.empty_like(centered)
        if centered.numel() == 0:
            return output
        geom = geometry(tuple(centered.shape), centered.stride())
        assert geom is not None, "forward_moments returns a tensor the kernels can read"
        weight, bias = _contiguous(weight), _contiguous(bias)
        launch = self._plan(centered, geom, (output,), elementwise=True)
        if geom.layout == "nchw":
            args: tuple[Any, ...] = (
                _pointer(centered), _pointer(output), _pointer(norm), _pointer(weight), _pointer(bias),
                np.int32(geom.N), np.int32(geom.C), np.int64(geom.S), np.float64(eps), *_tile(launch),
            )  # fmt: skip
        else:
            args = (
                _pointer(centered), _pointer(output), _pointer(norm), _pointer(weight), _pointer(bias),
                np.int64(geom.M), np.int32(geom.C), np.float64(eps),
            )  # fmt: skip
        self._launch(centered, "normalize", kernel_name("normalize", centered.dtype, geom.layout), launch, args)
        return output

    def backward_reduce(
        self,
        grad_output: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        need_input_grad: bool,
        creates_graph: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first value is ``dy`` in ``c``'s layout and dtype: the input gradient's pass reads it again."""
        num_channels = centered.shape[1]
        cdtype = compute_dtype(centered.dtype)
        sums = torch.empty(2 * num_channels, dtype=cdtype, device=centered.device)
        if centered.numel() == 0:
            sums.zero_()
            sum_dy, sum_dy_xhat = sums[:num_channels], sums[num_channels:]
            return (
                (grad_output if need_input_grad else None),
                sum_dy,
                sum_dy_xhat,
                backward_payload(sum_dy, sum_dy_xhat, creates_graph),
            )
        grad_output = same_layout(grad_output, centered)
        geom = geometry(tuple(centered.shape), centered.stride())
        assert geom is not None
        launch = self._plan(centered, geom, (grad_output,), elementwise=False)
        partial = self._workspace(centered, workspace_numel(launch, num_channels))
        if geom.layout == "nchw":
            args: tuple[Any, ...] = (
                _pointer(centered), _pointer(grad_output), _pointer(norm), np.int32(geom.N), np.int32(geom.C),
                np.int64(geom.S), np.float64(eps), *_tile(launch), _pointer(partial),
            )  # fmt: skip
        else:
            args = (
                _pointer(centered), _pointer(grad_output), _pointer(norm), np.int64(geom.M), np.int32(geom.C),
                np.float64(eps), _pointer(partial),
            )  # fmt: skip
        self._launch(centered, "backward", kernel_name("backward_reduce", centered.dtype, geom.layout), launch, args)
        self._launch(
            centered, "backward", kernel_name("backward_merge", cdtype), per_channel_launch(num_channels),
            (_pointer(partial), np.int32(launch.splits), np.int32(num_channels), _pointer(norm), np.float64(eps),
             _pointer(sums)),
        )  # fmt: skip
        sum_dy, sum_dy_xhat = sums[:num_channels], sums[num_channels:]
        return (
            (grad_output if need_input_grad else None),
            sum_dy,
            sum_dy_xhat,
            backward_payload(sum_dy, sum_dy_xhat, creates_graph),
        )

    def scale_grad(
        self,
        grad_output: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """``dy`` in ``c``'s layout and dtype, as :meth:`backward_reduce` returns it (the kernel scales it)."""
        return same_layout(grad_output, centered)

    def backward_elemt(
        self,
        scaled_grad: torch.Tensor,
        centered: torch.Tensor,
        norm: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        global_sums: torch.Tensor,
    ) -> torch.Tensor:
        """``scaled_grad`` is ``dy`` as :meth:`backward_reduce` returned it."""
        grad_input = torch.empty_like(centered)
        if centered.numel() == 0:
            return grad_input
        geom = geometry(tuple(centered.shape), centered.stride())
        assert geom is not None
        weight, sums = _contiguous(weight), global_sums.contiguous()
        launch = self._plan(centered, geom, (scaled_grad, grad_input), elementwise=True)
        common = (_pointer(centered), _pointer(scaled_grad), _pointer(grad_input), _pointer(norm), _pointer(weight),
                  _pointer(sums))  # fmt: skip
        if geom.layout == "nchw":
            args: tuple[Any, ...] = (
                *common, np.int32(geom.N), np.int32(geom.C), np.int64(geom.S), np.float64(eps), *_tile(launch),
            )  # fmt: skip
        else:
            args = (*common, np.int64(geom.M), np.int32(geom.C), np.float64(eps))
        self._launch(centered, "backward", kernel_name("backward_elemt", centered.dtype, geom.layout), launch, args)
        return grad_input


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s dtype and strides (a copy only when they differ)."""
    if t.dtype == like.dtype and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
