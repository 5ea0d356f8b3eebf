"""Ranks started by the ``syncbn`` commands on this machine."""

from __future__ import annotations

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
