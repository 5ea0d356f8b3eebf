"""Rank functions for tests/test_harness.py (a module of their own: spawned ranks import it)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from syncbn.harness import LocalRanks, RankChannel


def square(rank: int, world_size: int, channel: RankChannel, base: int) -> int:
    channel.send("progress", rank)
    return (base + rank) ** 2


def one_rank_fails(rank: int, world_size: int, channel: RankChannel, how: str) -> None:
    """Rank 1 fails in the way ``how`` says; the others wait (as they would in a collective)."""
    if rank == 1 and how == "quiet":
        os._exit(0)  # before a word: a rank that ends its program early
    channel.send("pid", os.getpid())
    if rank == 1:
        if how == "raise":
            raise ValueError("rank 1 gives up")
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(3600)


def echo(rank: int, world_size: int, channel: RankChannel) -> None:
    while (message := channel.receive()) is not None:
        channel.send("echo", (rank, message))


def parent_main(start_method: str) -> None:
    """A parent that starts 3 sleeping ranks, prints their pids and waits: the test then signals it."""
    with LocalRanks(one_rank_fails, 3, args=("none",), start_method=start_method, preload=[__name__]) as ranks:
        pids: dict[int, Any] = {}
        while len(pids) < 3:
            _, rank, pid = ranks.receive(time.monotonic() + 120)
            pids[rank] = pid
        print("ranks", " ".join(str(pids[rank]) for rank in range(3)), flush=True)
        ranks.wait(time.monotonic() + 3600)


if __name__ == "__main__":
    # A process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python keeps it ignored: restore the default handler
    # so that the SIGINT tests see what an interactive Ctrl-C would do.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent_main(sys.argv[1])
