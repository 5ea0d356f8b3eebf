"""Slurm: tasks started by ``srun`` (one process per task)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping

from syncbn.environments.base import ClusterEnvironment, LaunchError

#: Ports derived from the job id fall in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): above the well-known
#: and registered services most clusters run, below Linux's default ephemeral range (32768-60999).
_PORT_BASE = 12000
_PORT_SPAN = 20000


class SlurmEnvironment(ClusterEnvironment):
    """A task of a Slurm job step (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``.

    The rendezvous is on the first host of the step's node list (where task 0
    runs), on a port derived from the job id so that every task computes the
    same one without talking; ``MASTER_ADDR`` and ``MASTER_PORT`` override
    them.

    Only processes inside a job step are Slurm tasks: the batch script itself
    (``sbatch``) also sees ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``,
    but it is one process, and ``srun`` is what starts the tasks.
    """

    name = "slurm"

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return bool(environ.get("SLURM_PROCID")) and bool(environ.get("SLURM_STEP_ID")) and not _is_batch_step(environ)

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self._rank = self._int("SLURM_PROCID")
        self._world_size = self._int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        self._local_rank = self._int("SLURM_LOCALID")
        self._num_nodes = self._int("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
        self._job_id = self._int("SLURM_JOB_ID", "SLURM_JOBID")
        self._nodelist = (
            self._get("SLURM_STEP_NODELIST") or self._get("SLURM_NODELIST") or self._get("SLURM_JOB_NODELIST")
        )

    @property
    def num_nodes(self) -> int:
        """Nodes the step runs on."""
        return self._num_nodes

    @property
    def job_id(self) -> int:
        return self._job_id

    @property
    def main_address(self) -> str | None:
        override = super().main_address
        if override is not None:
            return override
        if self._nodelist is None:
            raise LaunchError(
                "slurm: SLURM_NODELIST is not set, so the rendezvous host is unknown; "
                "HINT: set MASTER_ADDR to the host of task 0"
            )
        return first_host(self._nodelist)

    @property
    def main_port(self) -> int | None:
        override = super().main_port
        return override if override is not None else port_from_job_id(self._job_id)

    def validate(self) -> None:
        super().validate()
        if self._local_rank >= self._world_size:
            raise LaunchError(f"slurm: SLURM_LOCALID={self._local_rank} is outside SLURM_NTASKS={self._world_size}")


def _is_batch_step(environ: Mapping[str, str]) -> bool:
    # The batch script runs as the step called "batch" (older Slurm: a large sentinel number).
    return environ.get("SLURM_STEP_ID") in ("batch", "4294967294", "-2")


def port_from_job_id(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every task, different for consecutive jobs."""
    return _PORT_BASE + job_id % _PORT_SPAN


# One node-list item: "node", "node[01-03,7]", "rack[1-2]-gpu[1-4]".
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(nodelist: str) -> Iterator[str]:
    """Split at the commas that are not inside brackets."""
    depth = 0
    start = 0
    for index, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            yield nodelist[start:index]
            start = index + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in Slurm node list {nodelist!r}")
    yield nodelist[start:]


def _expand_range(text: str, nodelist: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``: zero padding kept, as Slurm does."""
    values: list[str] = []
    for part in text.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in Slurm node list {nodelist!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in Slurm node list {nodelist!r}")
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def iter_hosts(nodelist: str) -> Iterator[str]:
    """The host names of a Slurm node list, in order, without building the whole list."""
    if not nodelist.strip():
        raise ValueError("empty Slurm node list")
    for item in _split_top_level(nodelist.strip()):
        if not item:
            raise ValueError(f"empty item in Slurm node list {nodelist!r}")
        pieces = _BRACKET.split(item)  # literal, range, literal, range, ..., literal
        if "[" in pieces[-1] or "]" in pieces[-1] or any("[" in p or "]" in p for p in pieces[::2]):
            raise ValueError(f"unbalanced brackets in Slurm node list {nodelist!r}")
        literals = pieces[::2]
        ranges = [_expand_range(text, nodelist) for text in pieces[1::2]]
        for choice in itertools.product(*ranges):
            yield "".join(itertools.chain.from_iterable(itertools.zip_longest(literals, choice, fillvalue="")))


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list: ``"node[01-03,7]"`` -> ``["node01", "node02", "node03", "node7"]``.

    Items are separated by commas outside brackets (``"gpu-a[1-2],gpu-b3"``);
    an item may hold several bracket groups (``"rack[1-2]-n[1-2]"``, expanded
    with the last group varying fastest). Zero padding is kept.

    Raises:
        ValueError: for a malformed node list.
    """
    return list(iter_hosts(nodelist))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (where task 0 of a block-distributed step runs)."""
    try:
        return next(iter_hosts(nodelist))
    except ValueError as error:
        raise LaunchError(f"slurm: {error}") from None
