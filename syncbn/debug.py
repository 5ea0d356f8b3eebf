"""Debug mode: before each collective, the ranks check that they are making the same call.

The usual SyncBatchNorm bugs do not crash: a rank that skips a layer (a
conditional branch), calls the layers in another order, or feeds another
channel count leaves the others waiting, or silently mixes the statistics of
two different layers. In debug mode every all-reduce of
:class:`~syncbn.SyncBatchNorm` is preceded by a small one that compares, per
rank:

* the layer (its name, as :func:`~syncbn.name_layers` or
  :func:`~syncbn.convert_sync_batchnorm` set it),
* the channel count and the input dtype,
* the direction (forward or backward) and the layer's call number,
* whether the rank will run backward through the call,
* whether its input was valid and its statistics finite.

When they differ, every rank raises :class:`~syncbn.faults.RankMismatchError`
at once, naming the layer and which ranks hold what. The check is one
all-reduce of ``world_size x 8`` float64 values.

Turn it on with the environment variable ``SYNCBN_DEBUG=1`` (read at import),
:func:`set_debug`, or per layer with ``SyncBatchNorm(..., debug=True)``.
Off (the default), the layers do not compute, allocate or communicate
anything for it: the cost is one attribute test per call.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from syncbn import settings
from syncbn.faults import RankMismatchError

if TYPE_CHECKING:
    from syncbn.comm.base import Communicator

__all__ = ["ENV_VARIABLE", "is_debug", "set_debug"]

ENV_VARIABLE = settings.DEBUG
_enabled = settings.debug()

FORWARD, BACKWARD = 0, 1
# Problems a rank reports in the check.
OK, INVALID_INPUT, NOT_FINITE = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Fingerprint fields: layer key, channels, dtype code, direction, call number, runs backward, problem, spare.
_FIELDS = 8
# Layer keys (CRC-32 of the name) to names: every rank names the same model, so it can name the others' layers.
_NAMES: dict[int, str] = {}


def set_debug(enabled: bool) -> None:
    """Turn debug mode on or off for the layers that do not set ``debug=`` themselves."""
    global _enabled
    _enabled = bool(enabled)


def is_debug() -> bool:
    """Whether debug mode is on for layers with ``debug=None`` (``SYNCBN_DEBUG``, or :func:`set_debug`)."""
    return _enabled


def layer_key(name: str) -> int:
    """The number that stands for a layer name in the check (remembered, to name other ranks' layers)."""
    key = zlib.crc32(name.encode()) or 1
    _NAMES[key] = name
    return key


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def fingerprint(
    key: int, channels: int, dtype: torch.dtype, direction: int, call: int, runs_backward: bool, problem: int
) -> np.ndarray:
    return np.array(
        (key, channels, dtype_code(dtype), direction, call, float(runs_backward), problem, 0.0), dtype=np.float64
    )


def _describe(row: Iterable[float]) -> str:
    key, channels, dtype, direction, call, runs_backward, problem, _ = (int(v) for v in row)
    layer = repr(_NAMES[key]) if key in _NAMES else ("an unnamed layer" if key == 0 else f"layer #{key:08x}")
    if problem == INVALID_INPUT:
        return f"{layer}: invalid input (its own error says which)"
    dtype_name = str(_DTYPES[dtype - 1]).removeprefix("torch.") if dtype else "unsupported dtype"
    what = f"{layer} ({channels} channels, {dtype_name}, {'backward' if direction else 'forward'} of call {call}"
    if direction == FORWARD:
        what += ", will run backward" if runs_backward else ", will not run backward"
    what += ")"
    if problem == NOT_FINITE:
        what += " with NaN or Inf in its input"
    return what


def check(communicator: Communicator, mine: np.ndarray, where: str) -> None:
    """Compare this rank's fingerprint with every other rank's; on any difference raise on every rank.

    Args:
        communicator: the layer's group.
        mine: this rank's :func:`fingerprint`.
        where: the layer, for the message.

    Raises:
        RankMismatchError: on every rank, when the fingerprints differ or a rank reports a problem.
    """
    world_size, rank = communicator.world_size, communicator.rank
    table = torch.zeros(world_size * _FIELDS, dtype=torch.float64)
    table.numpy().reshape(world_size, _FIELDS)[rank] = mine
    if world_size > 1:
        communicator.all_reduce(table)
    rows = table.numpy().reshape(world_size, _FIELDS)
    if (rows == rows[0]).all() and not rows[:, 6].any():
        return
    groups: dict[str, list[int]] = {}
    for other, row in enumerate(rows):
        groups.setdefault(_describe(row), []).append(other)
    lines = [
        f"  rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}" for text, ranks in groups.items()
    ]
    same_call = bool((rows[:, :6] == rows[0, :6]).all())
    headline = (
        "a rank's input is not usable (NaN or Inf poison every rank's statistics)"
        if same_call
        else "the ranks are not making the same call, so the collective would hang or mix statistics"
    )
    raise RankMismatchError(
        f"SyncBatchNorm {where}: debug check on rank {rank} of {world_size}: {headline}:\n"
        + "\n".join(lines)
        + "\nHINT: every rank must "
        "run the same SyncBatchNorm layers in the same order, with the same channels and dtype, and all or none "
        "of them must run backward (same torch.no_grad() and requires_grad); a conditional branch that skips a "
        "layer on some ranks is the usual cause"
    )
