"""syncbn's CUDA kernels run on the CPU: a stand-in for CuPy that compiles them with g++ and emulates a launch.

:func:`emulated_cupy_ops` gives a :class:`~syncbn.ops.cuda.CupyOps` whose CuPy is
this module: ``RawModule`` compiles a family's source (exactly what NVRTC gets,
``common.cuh`` pasted in) as C++ with ``tests/cuda_emulator.h`` in front, and
``get_function(name)(grid, block, args)`` runs every block of the grid, each
CUDA thread a fibre (see the header for what is modelled and what is not).
Device pointers are the CPU tensors' own (``data_ptr()``), so the whole CUDA
implementation runs on CPU tensors: its layouts, launch plans, workspaces,
argument lists and the kernels' arithmetic, against the same float64 oracle
as every other implementation. What it cannot tell is whether the kernels are
right on a device: races between blocks, the device's rounding, speed.

Every launch checks its arguments against the kernel's parameters (count, and
for each a pointer, an integer or a float of the right size), and a block
that deadlocks on a barrier raises instead of hanging.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import syncbn
from syncbn.ops import cuda
from tests import cases

HEADER = Path(__file__).resolve().parent / "cuda_emulator.h"
CXX_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-DSYNCBN_EMULATOR", "-w")
#: What the kernels' arguments are: (kind, size in bytes), as the C++ side checks them.
_KINDS: dict[type, tuple[bytes, Any]] = {
    np.uint64: (b"p", ctypes.c_uint64),
    np.int64: (b"i", ctypes.c_int64),
    np.int32: (b"i", ctypes.c_int32),
    np.float64: (b"f", ctypes.c_double),
    np.float32: (b"f", ctypes.c_float),
}
_ERRORS = {1: "wrong number of arguments", 2: "an argument of the wrong kind or size", 3: "a block deadlocked"}


class Launched(NamedTuple):
    """One emulated launch, as the launcher made it."""

    name: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[Any, ...]


#: Every launch since :func:`emulated` was entered.
LAUNCHES: list[Launched] = []


class EmulatorError(RuntimeError):
    """A launch the emulator refused: arguments that do not match the kernel, or a deadlock."""


def compiler() -> str:
    """g++ (CI has it; without it the emulated tests skip, or fail in CI)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if os.environ.get("CI"):
            pytest.fail("g++ is not installed: CI runs the CUDA kernels in the emulator with it")
        pytest.skip("g++ is not installed")
    return cxx


def _cache_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"syncbn-cuda-emulator-{os.getuid()}"
    path.mkdir(exist_ok=True)
    return path


class Module:
    """``cupy.RawModule`` on the CPU: the source compiled by g++ into a shared library, kept by its hash."""

    def __init__(self, code: str, options: tuple[str, ...] = (), names: tuple[str, ...] | None = None) -> None:
        # The entry points: a syncbn family's from the launchers' table (its names come out of macros).
        if names is None:
            names = tuple(name for family, name in cuda.KERNELS if cuda.source(family) == code)
        if not names:
            raise EmulatorError("name the entry points of a source that is not one of syncbn's kernel families")
        trampolines = "\n".join(
            f'extern "C" int emulate_{name}(const unsigned* grid, const unsigned* block, void** argv, '
            f"const char* kinds, const long* sizes, int count) {{ return ::syncbn_emulator::launch(&{name}, grid, "
            f"block, argv, kinds, sizes, count); }}"
            for name in names
        )
        text = code + "\n" + trampolines + "\n"
        digest = hashlib.sha256((text + HEADER.read_text() + " ".join(CXX_FLAGS)).encode()).hexdigest()[:16]
        library = _cache_dir() / f"kernels-{digest}.so"
        if not library.exists():
            source = _cache_dir() / f"kernels-{digest}.cpp"
            source.write_text(text)
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            done = subprocess.run(
                [compiler(), *CXX_FLAGS, "-include", str(HEADER), "-o", str(partial), str(source)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if done.returncode != 0:
                raise EmulatorError(f"g++ could not compile the kernels for the emulator:\n{done.stderr[-4000:]}")
            partial.replace(library)  # atomic: parallel sessions never load a half-written library
        self._library = ctypes.CDLL(str(library))

    def get_function(self, name: str) -> Any:
        entry = getattr(self._library, f"emulate_{name}")
        entry.restype = ctypes.c_int

        def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
            kinds, values = b"", []
            for arg in args:
                kind, ctype = _KINDS[type(arg)]
                kinds += kind
                values.append(ctype(arg.item()))
            argv = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
            sizes = (ctypes.c_long * max(len(values), 1))(*[ctypes.sizeof(v) for v in values])
            dims = [(ctypes.c_uint * 3)(*d) for d in (grid, block)]
            LAUNCHES.append(Launched(name, tuple(grid), tuple(block), tuple(args)))
            code = entry(dims[0], dims[1], argv, kinds, sizes, len(values))
            if code:
                raise EmulatorError(f"{name} {grid} x {block}: {_ERRORS.get(code, code)}")

        return launch


class _Device:
    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _ExternalStream(_Device):
    def __init__(self, pointer: int, device: int) -> None:
        super().__init__(device)


#: The stand-in for CuPy that CupyOps imports.
CUPY = types.SimpleNamespace(
    cuda=types.SimpleNamespace(Device=_Device, ExternalStream=_ExternalStream), RawModule=Module
)


class _Torch(types.ModuleType):
    """torch as ``syncbn.ops.cuda`` sees it in the emulator: the real module, but for the CUDA runtime's
    queries (one device with ``sm_count`` multiprocessors, stream 0, never capturing). Only that module
    sees them: torch itself (inductor, say) keeps the real ``torch.cuda``."""

    def __init__(self, sm_count: int) -> None:
        super().__init__("torch")
        properties = types.SimpleNamespace(multi_processor_count=sm_count)
        self.cuda = types.SimpleNamespace(
            get_device_properties=lambda index: properties,
            current_stream=lambda index=None: types.SimpleNamespace(cuda_stream=0),
            current_device=lambda: 0,
            is_current_stream_capturing=lambda: False,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def patch_cuda_runtime(monkeypatch: pytest.MonkeyPatch, sm_count: int) -> None:
    """CuPy and the CUDA runtime's queries that CupyOps makes, answered by the emulator."""
    monkeypatch.setattr(cuda, "import_cupy", lambda: CUPY)
    monkeypatch.setattr(cuda, "torch", _Torch(sm_count))


def build() -> None:
    """Compile every family (once per source: the libraries are kept in the temporary directory)."""
    compiler()
    for family in cuda.FAMILIES:
        Module(cuda.source(family))


@contextlib.contextmanager
def emulated(sm_count: int = 132, poison: bool = True) -> Iterator[cuda.CupyOps]:
    """Within the block, SyncBatchNorm layers on CPU tensors run CupyOps, its kernels in the emulator.

    ``sm_count`` is the multiprocessors the launch planner is told of (1: few blocks, each with much
    work; 132, an H100: many splits per channel); ``poison`` fills every new tensor with NaN.
    """
    compiler()
    LAUNCHES.clear()
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_cuda_runtime(monkeypatch, sm_count)
        implementation = cuda.CupyOps()
        monkeypatch.setattr(syncbn.ops, "for_device", lambda device_type: implementation)
        if poison:
            cases.poison_allocations(monkeypatch)
        monkeypatch.setattr(cases, "emulating_cuda", True)
        yield implementation


def check_against_oracle(group: Any, seed: int, sm_count: int = 132, **kwargs: Any) -> None:
    """:func:`tests.cases.check_against_oracle` with the CUDA kernels in the emulator (a rank's test body)."""
    with emulated(sm_count):
        cases.check_against_oracle(group, seed, ops="cupy", **kwargs)


def run_emulated(body: str, sm_count: int = 132, **kwargs: Any) -> Any:
    """``tests.cases.<body>(**kwargs)`` with the CUDA kernels in the emulator (a rank's test body)."""
    with emulated(sm_count):
        return getattr(cases, body)(**kwargs)
