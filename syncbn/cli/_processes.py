"""Ranks started by the ``syncbn`` commands on this machine."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any


def stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill, every process still alive (``multiprocessing.Process`` objects)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a store the ranks meet at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
