"""A group of real processes joined by torch.distributed gloo, kept alive across tests.

Starting a process with torch takes seconds, so each world is started once
and given one test body at a time. Every call has a hard timeout: a rank
that does not answer in time fails the test and the world is torn down and
started afresh, so a hang can never stall the suite.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

START_TIMEOUT = 120.0
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        results.put((rank, True, "ready"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        module_name, function_name, kwargs = task
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            results.put((rank, True, function(**kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class GlooWorld:
    """``world_size`` spawned processes in one gloo group; ``run`` executes a function on all of them."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._context = mp.get_context("spawn")
        self._processes: list[Any] = []
        self._start()

    def _start(self) -> None:
        port = _free_port()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        self._results = self._context.Queue()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._processes = [
            self._context.Process(
                target=_worker, args=(rank, self.world_size, port, self._tasks[rank], self._results), daemon=True
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()
        self._collect(START_TIMEOUT, "start", restart=False)

    def _collect(self, timeout: float, what: str, restart: bool = True) -> list[Any]:
        answers: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            deadline_left = deadline - time.monotonic()
            try:
                rank, ok, value = self._results.get(timeout=max(deadline_left, 0.01))
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(answers))
                self._recover(restart)
                raise TimeoutError(
                    f"{what}: ranks {missing} of {self.world_size} did not answer within {timeout:.0f} s (hang)"
                ) from None
            answers[rank] = (ok, value)
        failures = {rank: value for rank, (ok, value) in answers.items() if not ok}
        if failures:
            self._recover(restart)
            report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items()))
            raise AssertionError(f"{what} failed on ranks {sorted(failures)}:\n{report}")
        return [answers[rank][1] for rank in range(self.world_size)]

    def run(self, function: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Call ``function(**kwargs)`` on every rank; return the per-rank results."""
        for tasks in self._tasks:
            tasks.put((function.__module__, function.__name__, kwargs))
        return self._collect(timeout, function.__name__)

    def close(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for process in self._processes:
            process.join(timeout=10)
        self._kill()

    def _kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)

    def _recover(self, restart: bool) -> None:
        if restart:
            self.restart()
        else:
            self._kill()

    def restart(self) -> None:
        """Tear down after a failure (a rank may be stuck in a collective) and start a fresh world."""
        self._kill()
        self._start()
