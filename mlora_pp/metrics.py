"""What a run reports: a JSONL metrics file and a live per-job progress table.

`metrics.jsonl` gets one object per optimizer step of each job (job, step, loss, tokens, lr, time),
and one per evaluation of a job with held-out data (event "eval", step, eval_loss).
The progress board is a rich live table, one row per job (step/total, loss, tokens/s, ETA), when
stdout is a terminal, and plain log lines otherwise (CI logs, pipes, files).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    """Append-only JSONL; each record is flushed so a crash loses at most the line being written."""

    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class JobProgress:
    name: str
    total_steps: int
    step: int = 0
    loss: float | None = None
    tokens: int = 0
    started: float = 0.0
    state: str = "queued"
    """queued (not started: admission holds it back), running, paused, done, or how it ended."""
    resumed_at: int = 0
    """Steps already done by an earlier run (a resumed job): not counted in this run's speed."""
    eval_loss: float | None = None
    """The latest held-out loss (jobs with `eval_data`)."""
    grad_norm: float | None = None
    """The last step's gradient norm before clipping (jobs with `max_grad_norm`)."""
    ended: float | None = None
    """When it stopped training (done, failed, cancelled, ...): its speed is over its training time."""

    def tokens_per_s(self, now: float) -> float:
        end = now if self.ended is None else self.ended
        return self.tokens / max(end - self.started, 1e-9)

    def eta_s(self, now: float) -> float | None:
        if self.step <= self.resumed_at or self.step >= self.total_steps:
            return None
        return (now - self.started) / (self.step - self.resumed_at) * (self.total_steps - self.step)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


_ORDER = {"running": 0, "paused": 0, "queued": 1}
"""Rows of a table too tall for the terminal: jobs under way first, then queued ones, then the rest."""


def _states(jobs: list[JobProgress]) -> str:
    """How many of `jobs` are in each state: "3 running, 29 queued, 1 done, 1 failed"."""
    counts: dict[str, int] = {}
    for job in jobs:
        state = job.state.split(" ")[0]  # "cancelled at step 3" counts as cancelled
        counts[state] = counts.get(state, 0) + 1
    first = ("running", "paused", "queued", "done")
    order = [state for state in first if state in counts] + sorted(state for state in counts if state not in first)
    return ", ".join(f"{counts[state]} {state}" for state in order)


class ProgressBoard:
    """Per-job progress: a rich live table on a terminal, plain lines elsewhere.

    The table shows at most `max_rows` jobs (default: what the terminal's height holds), those under
    way first, and counts the rest in its last row and caption. Its refresh thread renders it twice
    a second and holds the GIL while it does, about 0.4 ms a row: a row for each of 500 jobs would
    take 0.2 s a draw, 0.4 s of every second, from the training loop on rank 0."""

    def __init__(self, jobs: dict[str, int], log_every: int = 1, stream: TextIO | None = None, live: bool | None = None,
                 max_rows: int | None = None):
        self.stream = stream or sys.stdout
        self.started = now = time.perf_counter()
        self.jobs = {name: JobProgress(name, total, started=now) for name, total in jobs.items()}
        self.log_every = log_every
        self.live = self.stream.isatty() if live is None else live
        self.max_rows = max_rows
        self._live = None
        if self.live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream)
            if self.max_rows is None:  # the title, header, rules, caption and a line to spare
                self.max_rows = max(5, console.size.height - 8)
            self._live = Live(self._table(), console=console, refresh_per_second=2, transient=False)
            self._live.start()

    def _table(self):
        from rich.table import Table

        now = time.perf_counter()
        jobs = list(self.jobs.values())
        speed = sum(job.tokens for job in jobs) / max(now - self.started, 1e-9)
        caption = f"{len(jobs)} jobs: {_states(jobs)}; {speed:.0f} tokens/s in all"
        table = Table(title="mlora_pp training", caption=caption, expand=False)
        evaluated = any(job.eval_loss is not None for job in jobs)
        clipped = any(job.grad_norm is not None for job in jobs)
        columns = (("job", "step", "loss") + (("grad norm",) if clipped else ()) + (("eval loss",) if evaluated else ())
                   + ("tokens/s", "ETA", "state"))
        for column in columns:
            table.add_column(column, justify="left" if column in ("job", "state") else "right")
        shown = jobs
        if self.max_rows is not None and len(jobs) > self.max_rows:
            keep = max(1, self.max_rows - 1)  # the last row counts the others
            shown = sorted(jobs, key=lambda job: _ORDER.get(job.state, 2))[:keep]  # stable: config order within
        for job in shown:
            table.add_row(
                job.name,
                f"{job.step}/{job.total_steps}",
                "-" if job.loss is None else f"{job.loss:.4f}",
                *(("-" if job.grad_norm is None else f"{job.grad_norm:.4f}",) if clipped else ()),
                *(("-" if job.eval_loss is None else f"{job.eval_loss:.4f}",) if evaluated else ()),
                f"{job.tokens_per_s(now):.0f}",
                _fmt_eta(job.eta_s(now)),
                job.state,
            )
        if len(shown) < len(jobs):
            names = {job.name for job in shown}
            table.add_row(f"+{len(jobs) - len(shown)} more", *[""] * (len(columns) - 2),
                          _states([job for job in jobs if job.name not in names]))
        return table

    def start(self, job: str) -> None:
        """`job` was admitted: its first micro-batch entered the pipeline (its speed counts from now)."""
        progress = self.jobs[job]
        if progress.state == "queued":
            progress.state, progress.started = "running", time.perf_counter()
            if self._live is not None:
                self._live.update(self._table())

    def update(self, job: str, step: int, loss: float, tokens: int, grad_norm: float | None = None) -> None:
        """Record that `job` finished optimizer step `step` (1-based count) with `loss` (and, with
        `max_grad_norm`, its gradient norm before clipping)."""
        progress = self.jobs[job]
        progress.step, progress.loss, progress.grad_norm = step, loss, grad_norm
        progress.tokens += tokens
        if step >= progress.total_steps:
            progress.state, progress.ended = "done", time.perf_counter()
        elif progress.state in ("paused", "queued"):
            progress.state = "running"
        if self._live is not None:
            self._live.update(self._table())
        elif step % self.log_every == 0 or step >= progress.total_steps:
            now = time.perf_counter()
            print(
                f"[{job}] step {step}/{progress.total_steps} loss {loss:.4f} "
                + ("" if grad_norm is None else f"grad_norm {grad_norm:.4f} ")
                + f"tokens/s {progress.tokens_per_s(now):.0f} eta {_fmt_eta(progress.eta_s(now))}",
                file=self.stream,
                flush=True,
            )

    def evaluated(self, job: str, step: int, loss: float) -> None:
        """`job`'s held-out loss after `step` steps."""
        self.jobs[job].eval_loss = loss
        if self._live is not None:
            self._live.update(self._table())
        else:
            print(f"[{job}] eval after step {step}/{self.jobs[job].total_steps}: loss {loss:.4f}",
                  file=self.stream, flush=True)

    def add(self, job: str, total_steps: int) -> None:
        """A job submitted while the run goes on."""
        self.jobs[job] = JobProgress(job, total_steps, started=time.perf_counter())
        if self._live is not None:
            self._live.update(self._table())
        else:
            print(f"[{job}] submitted ({total_steps} steps)", file=self.stream, flush=True)

    def resume(self, job: str, step: int) -> None:
        """`job` resumes after `step` steps done by an earlier run."""
        progress = self.jobs[job]
        progress.step = progress.resumed_at = step
        progress.state = "done" if step >= progress.total_steps else "queued"
        if self._live is not None:
            self._live.update(self._table())

    def mark(self, job: str, state: str, quiet: bool = False) -> None:
        """`job`'s state column; printed as a line without the live table, unless `quiet`."""
        progress = self.jobs[job]
        progress.state = state
        if state in ("running", "paused", "queued"):
            progress.ended = None
        elif progress.ended is None:
            progress.ended = time.perf_counter()
        if self._live is not None:
            self._live.update(self._table())
        elif not quiet:
            print(f"[{job}] {state}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None
