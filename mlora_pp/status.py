"""The status of a run, running or finished, read from its `OUTPUT_DIR/metrics.jsonl`.

``python -m launcher status OUTPUT_DIR`` shows every job's state, step/total, last loss, last
gradient norm (jobs with `max_grad_norm`), latest held-out loss (jobs with `eval_data`), tokens/s
and ETA, and its priority under `admission: priority`; under the table, each stage's predicted
(and, once the run is done, measured) peak memory. ``--watch SECONDS`` refreshes it in place
until the run is done, ``--json`` prints it for scripts. The file is append-only and a resumed
run appends to it: the latest ``run`` line starts the
current run, whose records alone give the speeds, while steps and losses carry over. Unknown events
and unreadable lines (a line cut short by a crash) are skipped. A run without its ``done`` line is
"running" while its rank 0 holds the output_dir's lock (`mlora_pp.run_lock`) and "stopped" once no
process does (killed, interrupted, a lost rank): running its config again resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlora_pp.config import human_bytes
from mlora_pp.run_lock import LOCK_NAME
from mlora_pp.run_lock import holder as lock_holder

METRICS_FILE = "metrics.jsonl"
READ_CHUNK = 1 << 23
"""Bytes of metrics.jsonl read at a time (a long run's file is hundreds of MB)."""
EXIT_OK = 0
EXIT_BAD_INPUT = 2


class StatusError(Exception):
    """The directory holds no metrics.jsonl (missing, or not a run directory)."""


@dataclass
class JobStatus:
    """One job: `state` is queued, running, done, failed, cancelled or "stopped early"; None where not known."""

    name: str
    state: str = "queued"
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    reason: str | None = None
    eval_loss: float | None = None
    """The latest held-out loss (jobs with `eval_data`), after `eval_step` steps."""
    eval_step: int | None = None
    grad_norm: float | None = None
    """The last step's gradient norm before clipping (jobs with `max_grad_norm`)."""
    priority: int | None = None
    """Its priority (the config's, or the latest `launcher priority`); shown under `admission: priority`."""


@dataclass
class StageMemory:
    """One stage's memory: the current plan's predicted peak (from the run line, then each `plan`
    line: a change of plan), and once the run is done the predicted peak over every plan it went
    through and the measured one (its `memory` line); bytes."""

    stage: int
    predicted_bytes: int | None = None
    measured_bytes: int | None = None


@dataclass
class RunStatus:
    """A run: `state` is "finished" (a done line after the latest run line), "running", or "stopped"
    (no done line, and no process holds the output_dir's lock: the run ended without finishing)."""

    output_dir: str
    state: str = "running"
    jobs: list[JobStatus] = field(default_factory=list)
    finished_s: float | None = None
    """The current run's length, from its done line."""
    last_record_s: float | None = None
    """Time of the current run's latest record, seconds since the run started."""
    last_record_ago_s: float | None = None
    """Seconds between the latest record and reading the file (None when unknown)."""
    runs: int = 0
    """How many runs (a fresh start and each resume) the file holds; 0 for a file without run lines."""
    admission: str | None = None
    stages: int | None = None
    memory_budget_bytes: int | None = None
    memory: list[StageMemory] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def over(self) -> bool:
        """Nothing more will be written: finished, or stopped."""
        return self.state in ("finished", "stopped")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Steps:
    """A job's step records in the current run, as `_speed` needs them: a long run has millions, and
    a list of them held a gigabyte."""

    count: int = 0
    tokens: int = 0
    first_time: float = 0.0
    first_tokens: int = 0
    last_time: float = 0.0

    def add(self, t: float, tokens: int) -> None:
        if not self.count:
            self.first_time, self.first_tokens = t, tokens
        self.count += 1
        self.tokens += tokens
        self.last_time = t


@dataclass
class _Job:
    """Parsing state of one job: `step`/`loss` carry over runs, the rest is the current run's."""

    name: str
    total: int | None = None
    step: int = 0
    loss: float | None = None
    loss_step: int | None = None
    """The step whose record gave `loss` (and `grad_norm`)."""
    admitted: float | None = None
    steps: _Steps = field(default_factory=_Steps)
    """This run's step records, summed."""
    ended: str | None = None  # "failed" / "cancelled" in this run
    reason: str | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    grad_norm: float | None = None
    paused: bool = False  # pre-empted for a more urgent job, until its next step
    priority: int | None = None

    def new_run(self) -> None:
        self.admitted, self.steps, self.ended, self.reason, self.paused = None, _Steps(), None, None, False


def _record(raw: bytes) -> dict[str, Any] | None:
    """A line's JSON object; None for a line that does not parse (cut short by a crash) or is not one."""
    try:
        record = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return record if isinstance(record, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _speed(job: _Job) -> tuple[float | None, float | None]:
    """(tokens/s, seconds per step) over the current run's step records.

    From the admitted time when there is one; otherwise from the first step record, whose own
    tokens and step then fall before the measured interval and are left out."""
    steps = job.steps
    if not steps.count:
        return None, None
    if job.admitted is not None:
        start, counted, tokens = job.admitted, steps.count, steps.tokens
    else:
        start, counted, tokens = steps.first_time, steps.count - 1, steps.tokens - steps.first_tokens
    span = steps.last_time - start
    if not counted or span <= 0:
        return None, None
    return tokens / span, span / counted


def read_status(output_dir: Path, now: float | None = None) -> RunStatus:
    """Parse `output_dir/metrics.jsonl` into a RunStatus; `now` (time.time()) dates the last record.

    Raises StatusError when the directory or its metrics.jsonl is missing."""
    return StatusReader(output_dir).read(now)


class StatusReader:
    """A run's status from its metrics.jsonl, read as the file grows: each `read` parses only the
    lines added since the one before (`--watch` reads a long run's file every few seconds, and
    it has millions of lines). A line not finished yet waits for the next read; a line that does
    not parse is skipped. A file that shrank or was replaced (a fresh run) is read again from its
    start."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self._file_id: tuple[int, int] | None = None
        self._jobs: dict[str, _Job] = {}
        self._run_jobs: list[str] | None = None  # the latest run line's jobs, in its order
        self._status = RunStatus(output_dir=str(self.output_dir))
        self._wall_clock: float | None = None
        self._run_times = False  # the current run has a timed record (a "resumed" line after one starts a new run)
        self._done = False  # the current run has its done line
        self._done_at: float | None = None

    def read(self, now: float | None = None) -> RunStatus:
        """The status with every line written so far; `now` (time.time()) dates the last record."""
        if not self.path.is_file():
            raise StatusError(f"{self.output_dir}: no {METRICS_FILE} (not a run directory?)")
        now = time.time() if now is None else now
        with self.path.open("rb") as f:
            stat = os.fstat(f.fileno())
            if (stat.st_dev, stat.st_ino) != self._file_id or stat.st_size < self._offset:
                self._reset()
                self._file_id = (stat.st_dev, stat.st_ino)
            f.seek(self._offset)
            tail = b""
            while chunk := f.read(READ_CHUNK):
                data = tail + chunk
                end = data.rfind(b"\n") + 1
                for raw in data[:end].splitlines():
                    self._feed_line(raw)
                self._offset += end
                tail = data[end:]
        if tail and _record(tail) is not None:  # a last line without its newline, whole
            self._feed_line(tail)
            self._offset += len(tail)
        # else what follows the last newline is a line still being written: read next time
        return self._result(now)

    def _feed_line(self, raw: bytes) -> None:
        record = _record(raw)
        if record is not None:
            self._feed(record)

    def _job(self, name: str) -> _Job:
        if name not in self._jobs:
            self._jobs[name] = _Job(name)
        return self._jobs[name]

    def _new_run(self) -> None:
        for j in self._jobs.values():
            j.new_run()
        self._run_times, self._done, self._done_at, self._wall_clock = False, False, None, None
        self._status.last_record_s = None

    def _feed(self, record: dict[str, Any]) -> None:
        status, job = self._status, self._job
        event = record.get("event")
        name = record.get("job")
        t = _number(record.get("time"))
        if event == "run":
            self._new_run()
            status.runs += 1
            self._wall_clock = _number(record.get("wall_clock"))
            status.admission = record.get("admission") if isinstance(record.get("admission"), str) else None
            stages = record.get("stages")
            status.stages = stages if isinstance(stages, int) else None
            budget = record.get("memory_budget_bytes")
            status.memory_budget_bytes = budget if isinstance(budget, int) else None
            peaks = record.get("predicted_peak_bytes")
            status.memory = [StageMemory(i, p if isinstance(p, int) else None)
                             for i, p in enumerate(peaks if isinstance(peaks, list) else [])]
            declared = record.get("jobs") if isinstance(record.get("jobs"), dict) else {}
            self._run_jobs = [str(n) for n in declared]
            for n, info in declared.items():
                total = info.get("total_steps") if isinstance(info, dict) else None
                job(str(n)).total = total if isinstance(total, int) else None
                job(str(n)).step = 0  # a resumed line then sets its resume point; else it starts over
                priority = info.get("priority") if isinstance(info, dict) else None
                job(str(n)).priority = priority if isinstance(priority, int) else None
        elif event == "resumed" and isinstance(name, str):
            if self._run_times and status.runs == 0:
                self._new_run()  # an old file without run lines: a resume starts a new run
            step = record.get("step")
            if isinstance(step, int):
                job(name).step = step  # a later step's loss, logged by a run that stopped, is not shown
        elif event == "submitted" and isinstance(name, str):  # a job added while the run goes on
            total, priority = record.get("total_steps"), record.get("priority")
            job(name).total = total if isinstance(total, int) else None
            job(name).priority = priority if isinstance(priority, int) else None
            if self._run_jobs is not None and name not in self._run_jobs:
                self._run_jobs.append(name)
        elif event == "admitted" and isinstance(name, str):
            if t is not None:
                job(name).admitted = t
        elif event in ("failed", "cancelled", "early_stopped") and isinstance(name, str):
            j = job(name)
            j.ended = "stopped early" if event == "early_stopped" else event
            reason = record.get("reason")
            j.reason = reason if isinstance(reason, str) else None
            if event != "failed" and isinstance(record.get("step"), int):  # steps done (failed: the bad step)
                j.step = record["step"]
        elif event == "paused" and isinstance(name, str):
            job(name).paused = True
        elif event == "priority" and isinstance(name, str) and isinstance(record.get("priority"), int):
            job(name).priority = record["priority"]
        elif event == "done":
            self._done, self._done_at = True, t if t is not None else status.last_record_s
        elif event == "plan" and isinstance(record.get("predicted_peak_bytes"), list):  # a change of plan
            status.memory = [StageMemory(i, p if isinstance(p, int) else None)
                             for i, p in enumerate(record["predicted_peak_bytes"])]
        elif event == "memory" and isinstance(record.get("rank"), int) and record["rank"] >= 0:
            rank = record["rank"]
            status.memory += [StageMemory(i) for i in range(len(status.memory), rank + 1)]
            for key, attr in (("predicted_peak_bytes", "predicted_bytes"), ("measured_peak_bytes", "measured_bytes")):
                if isinstance(record.get(key), int):
                    setattr(status.memory[rank], attr, record[key])
        elif event == "eval" and isinstance(name, str) and _number(record.get("eval_loss")) is not None:
            j = job(name)
            j.eval_loss = _number(record.get("eval_loss"))
            step = record.get("step")
            j.eval_step = step if isinstance(step, int) else None
        elif event is None and isinstance(name, str) and isinstance(record.get("step"), int):
            j = job(name)
            j.step, j.paused = record["step"], False
            loss = _number(record.get("loss"))
            j.loss, j.loss_step = loss if loss is not None else j.loss, j.step
            j.grad_norm = _number(record.get("grad_norm"))
            if t is not None:
                tokens = record.get("tokens")
                j.steps.add(t, tokens if isinstance(tokens, int) else 0)
        # every other event (stage, balance, anything newer) only dates the run
        if t is not None:
            self._run_times = True
            status.last_record_s = t if status.last_record_s is None else max(status.last_record_s, t)

    def _result(self, now: float) -> RunStatus:
        status = dataclasses.replace(self._status, memory=[dataclasses.replace(m) for m in self._status.memory])
        if self._done:
            status.state, status.finished_s = "finished", self._done_at
        else:
            if status.last_record_s is not None and self._wall_clock is not None:
                status.last_record_ago_s = max(0.0, now - (self._wall_clock + status.last_record_s))
            elif status.last_record_s is not None:
                status.last_record_ago_s = max(0.0, now - self.path.stat().st_mtime)  # no wall clock: the file's age
            if (self.output_dir / LOCK_NAME).exists() and lock_holder(self.output_dir) is None:  # runs that lock, only
                status.state = "stopped"

        run_jobs, jobs = self._run_jobs, self._jobs
        names = list(run_jobs or [])
        current = set(names)
        # Jobs heard of in the current run but missing from its run line; all jobs when there is none.
        names += [n for n, j in jobs.items() if n not in current and (run_jobs is None or j.steps.count or j.ended
                                                                       or j.admitted is not None)]
        status.jobs = [_job_status(jobs[n], status.finished, status.state == "stopped") for n in names]
        return status


def _job_status(job: _Job, run_finished: bool, run_stopped: bool = False) -> JobStatus:
    tokens_per_s, per_step = _speed(job)
    if job.ended is not None:
        state = job.ended
    elif job.total is not None and job.step >= job.total:
        state = "done"
    elif job.paused:
        state = "paused"
    elif job.admitted is not None or job.steps.count:
        state = "running"
    else:
        state = "queued"
    if run_finished and state in ("running", "queued") and job.total is None:
        state = "done"  # a run that ended normally finished every job it did not fail or cancel
    if run_stopped and state in ("running", "queued"):
        state = "stopped"
    eta = None
    if state == "running" and job.total is not None and per_step is not None:
        eta = per_step * max(job.total - job.step, 0)
    current = job.loss_step in (None, job.step)  # not a later step's, from a run that stopped before a resume
    return JobStatus(job.name, state, job.step, job.total, job.loss if current else None, tokens_per_s, eta,
                     job.reason, job.eval_loss, job.eval_step, job.grad_norm if current else None, job.priority)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def headline(status: RunStatus) -> str:
    """The run state line: "finished in X s", "running (last record N s ago)" or "stopped ..."."""
    if status.finished:
        return "finished" if status.finished_s is None else f"finished in {status.finished_s:.1f} s"
    if status.state == "stopped":
        ago = "" if status.last_record_ago_s is None else f", last record {status.last_record_ago_s:.0f} s ago"
        return f"stopped without finishing{ago}: run its config again to resume"
    if status.last_record_ago_s is None:
        return "running (no records yet)"
    return f"running (last record {status.last_record_ago_s:.0f} s ago)"


def render(status: RunStatus):
    """A rich Table: the run state line as its title, one row per job (the live board's columns)."""
    from rich.table import Table

    table = Table(title=f"{status.output_dir}: {headline(status)}", expand=False)
    evaluated = any(job.eval_loss is not None for job in status.jobs)
    clipped = any(job.grad_norm is not None for job in status.jobs)
    ranked = status.admission == "priority"
    for column in (("job",) + (("priority",) if ranked else ()) + ("step", "loss") + (("grad norm",) if clipped else ())
                   + (("eval loss (step)",) if evaluated else ()) + ("tokens/s", "ETA", "state")):
        table.add_column(column, justify="left" if column in ("job", "state") else "right")
    for job in status.jobs:
        table.add_row(
            job.name,
            *(("-" if job.priority is None else str(job.priority),) if ranked else ()),
            f"{job.step}/{job.total_steps}" if job.total_steps is not None else str(job.step),
            "-" if job.loss is None else f"{job.loss:.4f}",
            *(("-" if job.grad_norm is None else f"{job.grad_norm:.4f}",) if clipped else ()),
            *(("-" if job.eval_loss is None else f"{job.eval_loss:.4f} ({job.eval_step})",) if evaluated else ()),
            "-" if job.tokens_per_s is None else f"{job.tokens_per_s:.0f}",
            _duration(job.eta_s),
            job.state,
        )
    lines = [f"{job.name}: {job.reason}" for job in status.jobs if job.reason]
    if status.memory:
        lines.append(memory_line(status))
    if lines:
        table.caption = "\n".join(lines)
    return table


def memory_line(status: RunStatus) -> str:
    """"memory: stage 0 predicted 23.3 MiB, measured 23.3 MiB; stage 1 ... (budget 1.0 GiB)"."""
    parts = []
    for m in status.memory:
        part = f"stage {m.stage} predicted " + ("-" if m.predicted_bytes is None else human_bytes(m.predicted_bytes))
        if m.measured_bytes is not None:
            part += f", measured {human_bytes(m.measured_bytes)}"
        parts.append(part)
    budget = "" if status.memory_budget_bytes is None else f" (budget {human_bytes(status.memory_budget_bytes)})"
    return "memory: " + "; ".join(parts) + budget


def main(argv: list[str]) -> int:
    """``python -m launcher status OUTPUT_DIR [--watch SECONDS | --json]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m launcher status",
                                     description="Show the jobs of a run (running or finished).")
    parser.add_argument("output_dir", type=Path, help="the run's output_dir (holds metrics.jsonl)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--watch", type=float, metavar="SECONDS",
                      help="refresh every SECONDS until the run has finished or stopped (Ctrl-C stops)")
    mode.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch needs a positive number of seconds")
    try:
        reader = StatusReader(args.output_dir)
        status = reader.read()
        if args.json:
            print(json.dumps(status.to_json(), indent=2))
            return EXIT_OK
        from rich.console import Console

        console = Console()
        if args.watch is None:
            console.print(render(status))
            return EXIT_OK
        return _watch(reader, status, args.watch, console)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _watch(reader: StatusReader, status: RunStatus, every: float, console) -> int:
    from rich.live import Live

    try:
        with Live(render(status), console=console, auto_refresh=False) as live:
            while not status.over:
                time.sleep(every)
                status = reader.read()
                live.update(render(status), refresh=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK
