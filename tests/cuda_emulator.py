"""syncbn's CUDA kernels run on the CPU: a stand-in for CuPy that compiles them with g++ and emulates a launch.

:func:`emulated` makes the layers on CPU tensors run a :class:`~syncbn.ops.cuda.CupyOps`
whose CuPy is this module: ``RawModule`` compiles a family's source (exactly
what NVRTC gets, ``common.cuh`` pasted in; each ``__shared__`` array rewritten
as a static that every block fills with NaN first) as C++ with
``tests/cuda_emulator.h`` in front, and ``get_function(name)(grid, block,
args)`` runs every block of the grid, each CUDA thread a fibre (see the
header for what is modelled and what is not). Device pointers are the CPU
tensors' own (``data_ptr()``), so the whole CUDA implementation runs on CPU
tensors: its layouts, launch plans, workspaces, argument lists and the
kernels' arithmetic, against the same float64 oracle as every other
implementation. What it cannot tell is whether the kernels are right on a
device: races between blocks, the device's rounding, speed.

Every launch is checked: its arguments against the kernel's parameters
(count, and for each a pointer, an integer or a float of the right size), its
block against the kernel's ``__launch_bounds__`` and the device's limits, its
16-byte loads against the tensors' alignment; a block that deadlocks, or a
warp shuffle that reads a lane that has returned, raises :class:`EmulatorError`
instead of hanging. The compiled libraries are kept in this user's cache,
keyed by the source, the header, the flags and the compiler.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
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
from tests.needs import unavailable

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
_ERRORS = {
    1: "wrong number of arguments",
    2: "an argument of the wrong kind or size",
    3: "a block deadlocked",
    4: "a grid or block beyond the device's limits",
    5: "a warp shuffle read a lane that has returned or does not exist",
    6: "no memory for a thread's stack",
}
_SHARED = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)\s*\[([^\]]+)\]\s*;")
_LOCK = threading.Lock()  # the emulator's machine is one global: one launch at a time


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
        unavailable("g++ is not installed: CI runs the CUDA kernels in the emulator with it")
    return cxx


@functools.lru_cache(maxsize=1)
def _cache_dir() -> Path:
    """This user's cache of compiled kernels (``$XDG_CACHE_HOME/syncbn/cuda-emulator``), private to them;
    where there is none to write (no home, say), a private temporary one for this process."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "syncbn" / "cuda-emulator"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        private = tempfile.mkdtemp(prefix="syncbn-cuda-emulator-")  # mode 0700
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        return Path(private)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise EmulatorError(f"{path} must belong to this user and be writable by no one else")
    return path


@functools.lru_cache(maxsize=1)
def _compiler_identity() -> str:
    done = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.stdout else compiler()


def _emulated_source(code: str) -> str:
    """``code`` with each ``__shared__`` array a static that every block poisons before use."""
    text = _SHARED.sub(
        lambda m: (
            f"static {m[1]} {m[2]}[{m[3]}]; static long {m[2]}_block_ = -1; "
            f"::syncbn_emulator::shared_region({m[2]}, sizeof({m[2]}), {m[2]}_block_);"
        ),
        code,
    )
    if "__shared__" in text.replace("// `__shared__", ""):
        raise EmulatorError("a __shared__ declaration the emulator cannot rewrite (one array per declaration)")
    return text


class _Signature(NamedTuple):
    params: tuple[str, ...]  # parameter names, in order
    max_threads: int  # __launch_bounds__, else the device's 1024


def _signatures(code: str) -> dict[str, _Signature]:
    """The kernels' parameter names and launch bounds, by name prefix (``syncbn_moments_nchw``), read from
    the ``extern "C"`` definitions in the families' macros."""
    text = code.replace("\\\n", " ")
    constants = {name: int(value) for name, value in re.findall(r"constexpr int (\w+) = (\d+);", text)}
    signatures = {}
    for bounds, prefix, params in re.findall(
        r'extern "C" __global__ void (?:__launch_bounds__\(([^)]*)\) )?(\w+?)_##\w+\(([^)]*)\)', text
    ):
        names = tuple(re.findall(r"(\w+)\s*(?:,|$)", params.strip()))
        limit = eval(bounds, {"__builtins__": {}}, constants) if bounds else 1024  # e.g. 32 * ROWS
        signatures[prefix] = _Signature(names, int(limit))
    return signatures


#: Elements of a 16-byte vector load, by the kernel names' dtype suffix.
_VECTOR = {"f32": 4, "f64": 2, "f16": 8, "bf16": 8}


class Module:
    """``cupy.RawModule`` on the CPU: the source compiled by g++ into a shared library, kept by its hash."""

    def __init__(self, code: str, options: tuple[str, ...] = (), names: tuple[str, ...] | None = None) -> None:
        # The entry points: a syncbn family's from the launchers' table (its names come out of macros).
        if names is None:
            family = next((f for f in cuda.FAMILIES if cuda.source(f) == code), None)
            names = tuple(name for f, name in cuda.KERNELS if f == family)
        if not names:
            raise EmulatorError("name the entry points of a source that is not one of syncbn's kernel families")
        trampolines = "\n".join(
            f'extern "C" int emulate_{name}(const unsigned* grid, const unsigned* block, void** argv, '
            f"const char* kinds, const long* sizes, int count) {{ return ::syncbn_emulator::launch(&{name}, grid, "
            f"block, argv, kinds, sizes, count); }}"
            for name in names
        )
        text = _emulated_source(code) + "\n" + trampolines + "\n"
        key = "\0".join((text, HEADER.read_text(), " ".join(CXX_FLAGS), _compiler_identity()))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        library = _cache_dir() / f"kernels-{digest}.so"
        if not library.exists():
            # Files of this process only, until the checked library replaces the kept one in one step: ranks
            # compiling at once never read or load another's half-written file.
            source = library.with_suffix(f".{os.getpid()}.cpp")
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            try:
                source.write_text(text)
                done = subprocess.run(
                    [compiler(), *CXX_FLAGS, "-include", str(HEADER), "-o", str(partial), str(source)],
                    capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if done.returncode != 0:
                    raise EmulatorError(f"g++ could not compile the kernels for the emulator:\n{done.stderr[-4000:]}")
                built = ctypes.CDLL(str(partial))
                missing = [name for name in names if not hasattr(built, f"emulate_{name}")]
                if missing:
                    raise EmulatorError(f"the compiled kernels lack {missing}")
                partial.replace(library)
            finally:
                source.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
        self._library = ctypes.CDLL(str(library))
        self._signatures = _signatures(code)

    def _signature(self, name: str) -> _Signature | None:
        prefix, _, suffix = name.rpartition("_")
        return self._signatures.get(prefix) if suffix in _VECTOR else None

    def get_function(self, name: str) -> Any:
        entry = getattr(self._library, f"emulate_{name}")
        entry.restype = ctypes.c_int
        signature = self._signature(name)

        def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
            kinds, values = b"", []
            for arg in args:
                kind, ctype = _KINDS[type(arg)]
                kinds += kind
                values.append(ctype(arg.item()))
            argv = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
            sizes = (ctypes.c_long * max(len(values), 1))(*[ctypes.sizeof(v) for v in values])
            dims = [(ctypes.c_uint * 3)(*d) for d in (grid, block)]
            if signature is not None:
                _check_launch(name, signature, block, args)
            LAUNCHES.append(Launched(name, tuple(grid), tuple(block), tuple(args)))
            with _LOCK:
                code = entry(dims[0], dims[1], argv, kinds, sizes, len(values))
            if code:
                raise EmulatorError(f"{name} {grid} x {block}: {_ERRORS.get(code, code)}")

        return launch


def _check_launch(name: str, signature: _Signature, block: tuple[int, ...], args: tuple[Any, ...]) -> None:
    """What the device would refuse or fault on, that the emulator cannot see by itself: a block larger than
    the kernel's launch bounds, and 16-byte loads from a tensor that is not 16-byte aligned (a segfault here)."""
    if math.prod(block) > signature.max_threads:
        raise EmulatorError(f"{name}: a block of {math.prod(block)} threads, over its launch bounds")
    params = dict(zip(signature.params, args, strict=True)) if len(args) == len(signature.params) else {}
    if params.get("vec"):
        width = _VECTOR[name.rpartition("_")[2]]
        tensors = [params[p] for p in ("x", "y", "dy", "dx") if p in params]
        if any(int(pointer) % 16 for pointer in tensors) or int(params["S"]) % width:
            raise EmulatorError(f"{name}: 16-byte loads from a tensor that is not 16-byte aligned, or rows of "
                                f"{int(params['S'])} elements that are not whole vectors of {width}")  # fmt: skip


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


class _Stream(_Device):
    @classmethod
    def from_external(cls, obj: Any) -> _Stream:
        """As CuPy 14 reads the CUDA stream protocol: a ``(version, pointer)`` pair."""
        _version, _pointer = obj.__cuda_stream__()
        return cls(-1)


class _TorchStream:
    cuda_stream = 0

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.cuda_stream)


#: The stand-in for CuPy (14) that CupyOps imports.
CUPY = types.SimpleNamespace(
    cuda=types.SimpleNamespace(Device=_Device, ExternalStream=_ExternalStream, Stream=_Stream), RawModule=Module
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
            current_stream=lambda index=None: _TorchStream(),
            current_device=lambda: 0,
            is_current_stream_capturing=lambda: False,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def patch_cuda_runtime(monkeypatch: pytest.MonkeyPatch, sm_count: int) -> None:
    """CuPy and the CUDA runtime's queries that CupyOps makes, answered by the emulator."""
    monkeypatch.setattr(cuda, "import_cupy", lambda: CUPY)
    monkeypatch.setattr(cuda, "torch", _Torch(sm_count))


@functools.lru_cache(maxsize=1)
def build() -> None:
    """Compile every family once per process (the libraries are kept in the user's cache, by source)."""
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
            workspace = implementation._workspace  # kept from call to call: poisoned again at each one

            def poisoned_workspace(t: torch.Tensor, numel: int) -> torch.Tensor:
                return workspace(t, numel).fill_(math.nan)

            monkeypatch.setattr(implementation, "_workspace", poisoned_workspace)
        monkeypatch.setattr(cases, "emulating_cuda", True)
        yield implementation


def check_against_oracle(group: Any, seed: int, sm_count: int = 132, **kwargs: Any) -> None:
    """:func:`tests.cases.check_against_oracle` with the CUDA kernels in the emulator (a rank's test body)."""
    run_emulated("check_against_oracle", sm_count, group=group, seed=seed, ops="cupy", **kwargs)


def run_emulated(body: str, sm_count: int = 132, **kwargs: Any) -> Any:
    """``tests.cases.<body>(**kwargs)`` with the CUDA kernels in the emulator (a rank's test body)."""
    with emulated(sm_count):
        result = getattr(cases, body)(**kwargs)
        assert LAUNCHES, "no kernel ran"
        return result
