"""The compiled CPU path: SyncBatchNorm's training call on CPU tensors as one C++ autograd node.

On a small layer, the Python implementation (:mod:`syncbn._functions` with
:class:`~syncbn.ops.cpu.CPUOps`) spends more time between its passes over the
data than in them: about 120 small Python, NumPy and torch operations a call.
``syncbn/csrc/cpu_function.cpp`` makes the same passes (the same aten calls)
and the same per-channel arithmetic in C++, and enters Python only for the
all-reduces and the checks after them (``SyncCall.forward_reduced``,
``backward_reduced``, ``double_backward_error``), so that every message and
every collective is the Python implementation's. Its payloads are element for
element the Python ones: ranks on either path sum them together.

It is built on first use with the C++ compiler (``$CXX``, else ``c++``, ``g++``)
against the installed torch, into ``SYNCBN_CACHE_DIR`` (see
:mod:`syncbn.settings`), once per source, torch and Python version (about
40 seconds on two cores; ``make install`` builds it ahead, as
``python -c "import syncbn._extension as e; e.main()"`` does; ``syncbn env``
says whether it is built). Processes building at once wait for one another on
a file lock that the kernel releases if the builder dies.

``SYNCBN_EXTENSION``: ``auto`` (the default) uses it for float32 and float64
CPU tensors whenever it builds, and says once when it cannot (the Python
implementation then runs, exactly as before); ``off`` never uses it; ``on``
raises when it cannot be built. Half-precision input, debug mode and
``SYNCBN_OPS=torch`` keep the Python implementation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from syncbn import settings

#: The C++ source of the compiled path.
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_function.cpp"
#: How long a build may take, and how long another process waits for one, in seconds.
BUILD_TIMEOUT = 600.0
_FLAGS = ("-O3", "-std=c++20", "-ffp-contract=off", "-fPIC", "-shared", "-pipe")


class ExtensionBuildError(RuntimeError):
    """The compiled CPU path could not be built (no compiler, a compiler error, or the cache not writable)."""


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def compiler() -> str | None:
    """The C++ compiler a build would use: ``$CXX``, else ``c++``, else ``g++`` on the PATH; None when there is none."""
    explicit = os.environ.get("CXX", "").strip()
    if explicit:
        return shutil.which(explicit) or explicit
    return shutil.which("c++") or shutil.which("g++")


def _tag() -> str:
    """What the library depends on: the source, torch's build, Python's ABI, the machine and the flags."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, torch.version.git_version, sys.implementation.cache_tag, sys.platform,
                 os.uname().machine, " ".join(_FLAGS)):  # fmt: skip
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """Where the library for this source, torch and Python is kept (it may not be built yet)."""
    tag = _tag()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return Path(settings.cache_dir()) / f"cpu-{tag}" / f"_syncbn_cpu_{tag}{suffix}"


def _command(output: Path, name: str, cxx: str) -> list[str]:
    include = _torch_dir() / "include"
    return [
        cxx, *_FLAGS, f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
        "-isystem", sysconfig.get_paths()["include"],
        str(SOURCE), "-o", str(output),
        f"-L{_torch_dir() / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python",
    ]  # fmt: skip


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The compiler gets SIGKILL if this process dies first (Linux), so that no build outlives a killed job."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _compile(output: Path, name: str) -> None:
    cxx = compiler()
    if cxx is None:
        raise ExtensionBuildError("no C++ compiler found (set CXX, or install g++)")
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    environment = {**os.environ, "TMPDIR": str(output.parent)}
    process = subprocess.Popen(
        _command(temporary, name, cxx), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=environment, start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )  # fmt: skip
    try:
        log, _ = process.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if process.poll() is None:  # an exception (Ctrl-C, the timeout): the compiler and its children go too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode != 0:
        temporary.unlink(missing_ok=True)
        tail = "\n".join(log.strip().splitlines()[-20:])
        said = f":\n{tail}" if tail else " and said nothing"
        raise ExtensionBuildError(f"{cxx} failed (exit status {process.returncode}){said}")
    os.replace(temporary, output)


def build() -> Path:
    """Build the library unless it is built already; its path.

    Raises:
        ExtensionBuildError: no compiler, a compiler error, a cache directory
            that cannot be written, or another build that took longer than
            :data:`BUILD_TIMEOUT`.
    """
    path = library_path()
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(path.parent / "lock", "a")  # noqa: SIM115 - held until the build is in place
    except OSError as error:
        raise ExtensionBuildError(f"cannot write the build directory {path.parent}: {error}") from error
    with lock:
        deadline = time.monotonic() + BUILD_TIMEOUT
        while True:  # the kernel releases the lock of a builder that died
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise ExtensionBuildError(
                        f"waited {BUILD_TIMEOUT:.0f} s for another build in {path.parent}"
                    ) from error
                time.sleep(0.2)
        if not path.exists():
            _compile(path, path.name.split(".")[0])
    return path


def load(path: Path) -> ModuleType:
    """Import the built library at ``path``."""
    name = path.name.split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_choice: str | None = None  # None: SYNCBN_EXTENSION not read yet
_module: ModuleType | None = None  # the library, once loaded
_failure: ExtensionBuildError | None = None  # why it could not be, once tried
_warned = False


def get_choice() -> str:
    """The current choice: what :func:`set_choice` set, else ``SYNCBN_EXTENSION`` (``auto`` when unset)."""
    global _choice
    if _choice is None:
        _choice = settings.extension()
    return _choice


def set_choice(choice: str | None) -> None:
    """``auto``, ``off`` or ``on`` for the layers of this process; None goes back to ``SYNCBN_EXTENSION``.

    Raises:
        ValueError: for another value.
    """
    global _choice
    if choice is not None and choice not in settings.EXTENSION_CHOICES:
        raise ValueError(f"expected one of {', '.join(settings.EXTENSION_CHOICES)} (or None), got {choice!r}")
    _choice = choice


@contextlib.contextmanager
def using(choice: str | None) -> Iterator[None]:
    """Within the block, the layers use the compiled CPU path under ``choice`` (see :func:`set_choice`)."""
    previous = _choice
    set_choice(choice)
    try:
        yield
    finally:
        set_choice(previous)


def _library() -> ModuleType:
    """The library, built and loaded on the first call (once per process: a failure is kept too)."""
    global _module, _failure
    if _module is None:
        if _failure is not None:
            raise _failure
        try:
            _module = load(build())
        except (ExtensionBuildError, ImportError, OSError) as error:
            _failure = error if isinstance(error, ExtensionBuildError) else ExtensionBuildError(str(error))
            raise _failure from error
    return _module


def function() -> Callable[..., torch.Tensor] | None:
    """The compiled training call, or None when it is off or cannot be built (``auto`` then says so once).

    Raises:
        ExtensionBuildError: ``SYNCBN_EXTENSION=on`` and the library cannot be built or loaded.
    """
    global _warned
    choice = get_choice()
    if choice == "off":
        return None
    try:
        compiled: Callable[..., torch.Tensor] = _library().sync_batch_norm
    except ExtensionBuildError as error:
        if choice == "on":
            raise ExtensionBuildError(
                f"syncbn: the compiled CPU path cannot be used ({settings.EXTENSION}=on): {error}"
            ) from error
        if not _warned:
            _warned = True
            warnings.warn(
                f"syncbn: the compiled CPU path cannot be built, so SyncBatchNorm runs its Python implementation "
                f"on CPU tensors (exact, slower on small layers): {error}. HINT: install a C++ compiler, or set "
                f"{settings.EXTENSION}=off to silence this",
                stacklevel=4,
            )
        return None
    return compiled


def status() -> dict[str, Any]:
    """What ``syncbn env`` says about the compiled CPU path: the choice, the compiler, whether it is built, where."""
    path = library_path()
    return {
        "choice": get_choice(),
        "compiler": compiler(),
        "built": path.exists(),
        "path": str(path),
        "loaded": _module is not None,
        "failure": None if _failure is None else str(_failure),
    }


def main() -> int:
    """Build the library now and load it (``make install`` does), print where it is; 0, or 1 when it cannot be."""
    try:
        path = build()
        load(path)
    except (ExtensionBuildError, ImportError, OSError) as error:
        print(f"syncbn: the compiled CPU path cannot be built: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0
