"""Reliability benchmark: does a job that ran correctly also end cleanly, every time, under every launcher?

    python bench/reliability.py --runs 50 --load 2 --output-dir bench/results   # what `make reliability` runs
    python bench/reliability.py --runs 2                                          # a smoke run, to a temp dir

A cluster job that trained correctly and then dies at exit is reported FAILED
by torchrun, mpiexec and Slurm, and a rank left running holds a node. This
runs two jobs many times under each launcher and counts how each run ended:

* ``exit_job``: ``bench/exit_job.py``: ``init_distributed(timeout=5)``,
  eight all-reduces, ``close()``, exit (``exit_job_no_close``: the same
  without ``close()``, which syncbn then does at interpreter exit);
* ``train_cnn``: ``examples/train_cnn.py`` (5 steps of a small CNN, DDP over
  gloo or gradients averaged over MPI, then the check that every rank holds
  the same state);

under ``python`` (one process), ``torchrun`` (4 workers,
``launch/torchrun_single_node.sh``), two torchrun agents meeting in a c10d
rendezvous (2 x 2 workers, ``launch/torchrun_multi_node.sh``), ``mpiexec``
with 4 ranks over gloo and over MPI (``launch/mpiexec.sh``), and ``srun`` with
4 tasks when a Slurm cluster answers (``--slurm``; ``make slurm-test`` shows
how to start the local one).

A run is **clean** when every launcher process exits with status 0, every
rank printed its success line (``OK`` / ``EQUAL``), nothing in the output
says the process aborted (``terminate called``, ``Fatal Python error``,
``SIGABRT``, exit code -6), and no process it started is alive 5 s after the
launcher exited (every process carries a tag in its environment, so even
re-parented ones are found). Otherwise it is an **abort**, a **failure**
(any other non-zero exit or a missing line) or a **leftover**; the first
failures' output is kept in the JSON.

A second part ends the commands that start ranks themselves, ``syncbn demo``
and ``syncbn bench`` (2 ranks each, in the middle of a long run), with
SIGTERM (what ``timeout`` and Slurm send), SIGINT (Ctrl-C), or SIGKILL of one
rank, ``--endings`` times each, and measures the seconds from the signal to
the command's exit and until every process it started (ranks, forkserver,
resource tracker) is gone; an ending is clean when both take at most 5 s.

The runs are interleaved (each round runs every launcher and job once), with
``--load`` CPU-bound processes running beside them for the whole benchmark,
as on a shared node. The jobs run with ``--python`` (default: the
interpreter that runs this script) and the ``mpiexec`` beside it, so another
environment's Python measures that environment's syncbn, an earlier commit's
for instance. Results go to
``--output-dir`` (default: a new temporary directory), as ``<name>.json`` and
``<name>.md`` (``--name``, default ``reliability``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from syncbn.cli._machine import describe
from syncbn.harness import free_port, launch_environ, rank_processes, tagged_processes, terminate_raises

ROOT = Path(__file__).resolve().parent.parent
# The interpreter that runs the jobs (--python): its environment's syncbn, torch and mpiexec are measured.
PYTHON = sys.executable
TAG = "SYNCBN_RELIABILITY_TAG"
WORLD_SIZE = 4
RUN_TIMEOUT = 240.0
LEFTOVER_WAIT = 5.0
KEEP_FAILURES = 10

JOBS: dict[str, tuple[str, list[str], re.Pattern[str]]] = {
    "exit_job": ("bench/exit_job.py", [], re.compile(r"^rank \d+/\d+: 8 all-reduces of 4 values: OK$", re.M)),
    "exit_job_no_close": (
        "bench/exit_job.py",
        ["--no-close"],
        re.compile(r"^rank \d+/\d+: 8 all-reduces of 4 values: OK$", re.M),
    ),
    "train_cnn": (
        "examples/train_cnn.py",
        [],
        re.compile(r"^rank \d+/\d+: running statistics and parameters EQUAL on every rank", re.M),
    ),
}
LAUNCHERS = ("python", "torchrun", "torchrun_2_nodes", "mpiexec_gloo", "mpiexec_mpi", "srun")
ABORT = re.compile(r"terminate called|Fatal Python error|SIGABRT|exitcode\s*:\s*-6|Aborted \(core dumped\)")


@dataclass
class Run:
    """One run of one job under one launcher."""

    launcher: str
    job: str
    round: int
    seconds: float
    returncodes: list[int]
    outcome: str  # clean, abort, failed, timeout, leftover
    success_lines: int
    leftovers: int
    output: str = field(default="", repr=False)


# --------------------------------------------------------------------------- processes


def _environ(tag: str, **extra: str) -> dict[str, str]:
    return launch_environ(PYTHON, **{TAG: tag}, **extra)


def _tagged(tag: str) -> list[int]:
    return tagged_processes(TAG, tag)


def _kill_tagged(tag: str) -> None:
    for pid in _tagged(tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _commands(launcher: str, script: str, args: list[str]) -> tuple[list[list[str]], dict[str, str], int]:
    """The command lines of one run (two for two torchrun agents), extra variables, and the world size."""
    if launcher == "python":
        return [[PYTHON, script, *args]], {}, 1
    if launcher == "torchrun":
        return [["launch/torchrun_single_node.sh", script, *args]], {"NPROC_PER_NODE": str(WORLD_SIZE)}, WORLD_SIZE
    if launcher == "torchrun_2_nodes":
        extra = {
            "NNODES": "2",
            "NPROC_PER_NODE": str(WORLD_SIZE // 2),
            "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
            "RDZV_ID": uuid.uuid4().hex[:8],
        }
        command = ["launch/torchrun_multi_node.sh", script, *args]
        return [command, command], extra, WORLD_SIZE
    if launcher in ("mpiexec_gloo", "mpiexec_mpi"):
        backend = launcher.removeprefix("mpiexec_")
        command = ["launch/mpiexec.sh", script, *args, "--backend", backend]
        return [command], {"NPROCS": str(WORLD_SIZE), "MPIEXEC": str(Path(PYTHON).parent / "mpiexec")}, WORLD_SIZE
    if launcher == "srun":
        command = ["srun", f"--ntasks={WORLD_SIZE}", "--overcommit", "--kill-on-bad-exit=1", PYTHON, script, *args]
        return [command], {}, WORLD_SIZE
    raise ValueError(f"unknown launcher {launcher!r}")


def run_once(launcher: str, job: str, round_: int) -> Run:
    """Run ``job`` under ``launcher`` once and judge how it ended."""
    script, args, success = JOBS[job]
    commands, extra, world_size = _commands(launcher, script, args)
    tag = uuid.uuid4().hex
    environ = _environ(tag, **extra)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    outputs: list[str] = []
    timed_out = False
    for process in processes:
        try:
            out, _ = process.communicate(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
        outputs.append(out)
    seconds = time.monotonic() - started
    deadline = time.monotonic() + LEFTOVER_WAIT
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_tagged(tag)
    output = "".join(outputs)
    returncodes = [process.returncode for process in processes]
    lines = len(success.findall(output))
    if timed_out:
        outcome = "timeout"
    elif ABORT.search(output) or any(code in (-6, 134) for code in returncodes):
        outcome = "abort"
    elif any(returncodes) or lines != world_size:
        outcome = "failed"
    elif left:
        outcome = "leftover"
    else:
        outcome = "clean"
    return Run(launcher, job, round_, round(seconds, 2), returncodes, outcome, lines, len(left), output)


COMMANDS: dict[str, list[str]] = {  # after the interpreter
    "syncbn_demo": ["-m", "syncbn", "demo", "--quick", "--world-sizes", "2", "--epochs", "1000"],
    "syncbn_bench": [
        *("-m", "syncbn", "bench", "--world-sizes", "2", "--shapes", "2x8x8x8"),
        *("--reps", "100000", "--warmup", "0", "--no-progress"),
    ],
}
ENDINGS = ("SIGTERM", "SIGINT", "rank_SIGKILL")
ENDING_LIMIT = 5.0


@dataclass
class Ending:
    """One command ended from outside while its ranks ran."""

    command: str
    ending: str
    round: int
    exit_seconds: float  # from the signal to the command's exit
    gone_seconds: float  # from the signal until no process it started is alive
    returncode: int | None
    outcome: str  # clean, slow, leftover, failed (the ranks did not start)
    output: str = ""  # the command's output, kept when the ending was not clean


# How long an ending may take before the command is asked for its threads' stacks (faulthandler) and killed.
ENDING_WAIT = 30.0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end_command_once(command: str, ending: str, round_: int, world_size: int = 2) -> Ending:
    """Start ``command``; once its ranks train, end it the way ``ending`` says; time how it goes."""
    tag = uuid.uuid4().hex
    # Run from a scratch folder: `python -m syncbn` would import the checkout of the working directory.
    with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory(prefix="syncbn-ending-") as scratch:
        process = subprocess.Popen(
            [PYTHON, *COMMANDS[command]],
            cwd=scratch,
            env=_environ(tag, PYTHONFAULTHANDLER="1"),  # SIGABRT then prints every thread's stack
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT as in a terminal: a benchmark started in the background (`nohup ... &`) has it ignored,
            # and a child would inherit that, so Python would never raise KeyboardInterrupt in it.
            preexec_fn=_default_sigint,
        )
        try:
            deadline = time.monotonic() + 120
            while len(ranks := rank_processes(process.pid)) < world_size and time.monotonic() < deadline:
                time.sleep(0.1)
            if len(ranks) < world_size:
                return Ending(command, ending, round_, float("nan"), float("nan"), process.poll(), "failed")
            time.sleep(1.0)  # training
            acted = time.monotonic()
            if ending == "rank_SIGKILL":
                os.kill(ranks[-1], signal.SIGKILL)
            else:
                os.kill(process.pid, getattr(signal, ending))
            try:
                process.wait(timeout=ENDING_WAIT)
            except subprocess.TimeoutExpired:  # stuck: where? (the stacks go to the log)
                os.kill(process.pid, signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            exited = time.monotonic() - acted
            while _tagged(tag) and time.monotonic() - acted < ENDING_WAIT:
                time.sleep(0.02)
            gone = time.monotonic() - acted
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            _kill_tagged(tag)
            process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    if exited > ENDING_LIMIT:
        outcome = "slow"
    elif gone > ENDING_LIMIT:
        outcome = "leftover"
    else:
        outcome = "clean"
    kept = output[-6000:] if outcome != "clean" else ""
    return Ending(command, ending, round_, round(exited, 3), round(gone, 3), process.returncode, outcome, kept)


def summarise_endings(endings: Sequence[Ending]) -> list[dict[str, Any]]:
    rows = []
    for command in COMMANDS:
        for ending in ENDINGS:
            mine = [e for e in endings if e.command == command and e.ending == ending]
            if not mine:
                continue
            exits = [e.exit_seconds for e in mine if e.outcome != "failed"] or [float("nan")]
            gones = [e.gone_seconds for e in mine if e.outcome != "failed"] or [float("nan")]
            rows.append(
                {
                    "command": command,
                    "ending": ending,
                    "runs": len(mine),
                    "clean": sum(e.outcome == "clean" for e in mine),
                    "exit_seconds_median": round(statistics.median(exits), 2),
                    "exit_seconds_max": round(max(exits), 2),
                    "gone_seconds_median": round(statistics.median(gones), 2),
                    "gone_seconds_max": round(max(gones), 2),
                    "returncodes": sorted({e.returncode for e in mine if e.returncode is not None}),
                }
            )
    return rows


@contextlib.contextmanager
def cpu_load(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` busy loops beside the runs (each dies with this process: PR_SET_PDEATHSIG)."""
    code = "import ctypes, signal\nctypes.CDLL(None).prctl(1, signal.SIGKILL)\nwhile True:\n    pass\n"
    loops = [subprocess.Popen([PYTHON, "-c", code]) for _ in range(count)]
    try:
        yield loops
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return states.returncode == 0 and any(s in states.stdout for s in ("idle", "mixed", "allocated"))


# --------------------------------------------------------------------------- report


def summarise(runs: Sequence[Run], launchers: Sequence[str], jobs: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for launcher in launchers:
        for job in jobs:
            mine = [run for run in runs if run.launcher == launcher and run.job == job]
            if not mine:
                continue
            counts = {outcome: sum(run.outcome == outcome for run in mine) for outcome in OUTCOMES}
            rows.append(
                {
                    "launcher": launcher,
                    "job": job,
                    "runs": len(mine),
                    **counts,
                    "median_seconds": round(statistics.median(run.seconds for run in mine), 2),
                }
            )
    return rows


OUTCOMES = ("clean", "abort", "failed", "timeout", "leftover")


def markdown(report: dict[str, Any]) -> str:
    parameters, machine = report["parameters"], report["machine"]
    load = f"{parameters['load']} CPU-bound process{'es' if parameters['load'] != 1 else ''}"
    lines = ["# Reliability: how runs end", ""]
    if parameters["runs"]:
        lines += [
            f"{parameters['runs']} rounds; each round runs every job once under every launcher (interleaved), "
            f"with {load} running beside them for the whole benchmark. A run is clean when every launcher process "
            "exits 0, every rank prints its success line, nothing aborted, and no process it started is alive 5 s "
            "after the launcher exits (`bench/reliability.py`).",
            "",
        ]
    else:
        lines += [f"The endings part of `bench/reliability.py` alone, with {load} running beside it.", ""]
    progress = report.get("progress", {})
    if progress and not progress["complete"]:
        lines += [
            f"**Incomplete**: {progress['rounds_done']} of {parameters['runs']} rounds and "
            f"{progress['endings_done']} of {parameters['endings']} ending rounds done when this was written.",
            "",
        ]
    if report["summary"]:
        lines += [
            "| launcher | job | runs | clean | abort | failed | timeout | leftover | median s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for row in report["summary"]:
        lines.append(
            f"| {row['launcher']} | {row['job']} | {row['runs']} | {row['clean']} | {row['abort']} | {row['failed']} | "
            f"{row['timeout']} | {row['leftover']} | {row['median_seconds']} |"
        )
    if report["summary"]:
        total = sum(row["runs"] for row in report["summary"])
        clean = sum(row["clean"] for row in report["summary"])
        lines += ["", f"In all: {clean} of {total} runs clean.", ""]
    if report["endings"]:
        lines += [
            "## Ending the commands from outside",
            "",
            "`syncbn demo` and `syncbn bench` with 2 ranks, ended 1 s into training by SIGTERM to the command, SIGINT "
            "to the command, or SIGKILL of one rank. Seconds from the signal to the command's exit, and until every "
            "process it started is gone (clean: both within 5 s):",
            "",
            "| command | ending | runs | clean | exit s, median / max | all gone s, median / max | exit codes |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in report["endings"]:
            lines.append(
                f"| {row['command']} | {row['ending']} | {row['runs']} | {row['clean']} | "
                f"{row['exit_seconds_median']} / {row['exit_seconds_max']} | "
                f"{row['gone_seconds_median']} / {row['gone_seconds_max']} | "
                f"{', '.join(map(str, row['returncodes']))} |"
            )
        lines.append("")
    lines += [
        f"syncbn (as the jobs import it): {report['syncbn']}.",
        "",
        "Regenerate with:",
        "",
        "```",
        parameters["command"],
        "```",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, {machine['platform']}; Python "
        f"{machine['python']}, torch {machine['torch']}; {machine['date']}; wall time {report['wall_s']:.0f} s.",
        "",
    ]
    if report["failures"]:
        lines += ["## First failures", ""]
        for failure in report["failures"]:
            lines += [
                f"- {failure['launcher']} / {failure['job']}, round {failure['round']}: {failure['outcome']}, exit "
                f"codes {failure['returncodes']}",
            ]
        lines.append("")
    return "\n".join(lines)


def _syncbn_source() -> str:
    """Where the jobs' interpreter imports syncbn from, and at which commit."""
    code = "import os, syncbn; print(os.path.dirname(os.path.realpath(syncbn.__file__)))"
    try:
        where = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        commit = subprocess.run(
            ["git", "-C", where, "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{where} at {commit}"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="rounds (default %(default)s)")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes beside the runs (default 0)")
    parser.add_argument(
        "--launchers",
        default="python,torchrun,torchrun_2_nodes,mpiexec_gloo,mpiexec_mpi",
        help=f"comma-separated, from {','.join(LAUNCHERS)} (default %(default)s)",
    )
    parser.add_argument("--slurm", action="store_true", help="add srun (needs a Slurm cluster that answers)")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated (default %(default)s)")
    parser.add_argument(
        "--endings", type=int, default=10, help="rounds of ending syncbn demo and bench from outside (default 10)"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write (default: a new temp dir)")
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter that runs the jobs (default: this one)"
    )
    parser.add_argument("--name", default="reliability", help="file name stem of the results (default %(default)s)")
    args = parser.parse_args(argv)
    global PYTHON
    PYTHON = args.python

    launchers = [name for name in args.launchers.split(",") if name]
    if args.slurm and "srun" not in launchers:
        launchers.append("srun")
    jobs = [name for name in args.jobs.split(",") if name]
    unknown = [name for name in launchers if name not in LAUNCHERS] + [name for name in jobs if name not in JOBS]
    if unknown or args.runs < 0 or args.endings < 0 or args.load < 0:
        parser.error(f"unknown launchers or jobs {unknown}, or a negative --runs, --endings or --load")
    if "srun" in launchers and not slurm_answers():
        parser.error("srun: no Slurm cluster answers (sinfo); HINT: bash slurm/ci/local-cluster.sh start")

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="syncbn-reliability-"))
    started = time.monotonic()
    runs: list[Run] = []
    endings: list[Ending] = []
    machine = describe()
    source = _syncbn_source()

    def write(rounds_done: int, endings_done: int) -> None:
        """Write what has been measured so far: a benchmark cut short still leaves its results."""
        failures = [{**asdict(run), "output": run.output[-3000:]} for run in runs if run.outcome != "clean"]
        report = {
            "parameters": {
                "runs": args.runs,
                "load": args.load,
                "launchers": launchers,
                "jobs": jobs,
                "world_size": WORLD_SIZE,
                "endings": args.endings,
                "command": " ".join(["python", "bench/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
            },
            "progress": {
                "rounds_done": rounds_done,
                "endings_done": endings_done,
                "complete": rounds_done == args.runs and endings_done == args.endings,
            },
            "syncbn": source,
            "machine": machine,
            "summary": summarise(runs, launchers, jobs),
            "runs": [{key: value for key, value in asdict(run).items() if key != "output"} for run in runs],
            "endings": summarise_endings(endings),
            "ending_runs": [asdict(ended) for ended in endings],
            "failures": failures[:KEEP_FAILURES],
            "wall_s": round(time.monotonic() - started, 1),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", markdown(report))):
            partial = output_dir / f".{args.name}{suffix}.partial"
            partial.write_text(text)
            partial.replace(output_dir / f"{args.name}{suffix}")

    with cpu_load(args.load):
        # The endings first: they are few and short, and a benchmark cut short still has them.
        for round_ in range(1, args.endings + 1):
            for command in COMMANDS:
                for ending in ENDINGS:
                    ended = end_command_once(command, ending, round_)
                    endings.append(ended)
                    print(
                        f"ending {round_}/{args.endings} {command:13} {ending:13} {ended.outcome:8} exit "
                        f"{ended.exit_seconds:.2f} s, all gone {ended.gone_seconds:.2f} s"
                    )
                    sys.stdout.flush()
            write(0, round_)
        for round_ in range(1, args.runs + 1):
            for launcher in launchers:
                for job in jobs:
                    run = run_once(launcher, job, round_)
                    runs.append(run)
                    print(f"round {round_}/{args.runs} {launcher:17} {job:18} {run.outcome:8} {run.seconds:6.1f} s")
                    sys.stdout.flush()
            write(round_, args.endings)
    write(args.runs, args.endings)
    print(markdown(json.loads((output_dir / f"{args.name}.json").read_text())))
    print(f"wrote {output_dir / f'{args.name}.json'}, {output_dir / f'{args.name}.md'}")
    return 0 if all(item.outcome == "clean" for item in [*runs, *endings]) else 1


if __name__ == "__main__":
    with terminate_raises():  # SIGTERM unwinds like Ctrl-C: the job running now and the busy loops are ended
        sys.exit(main())
