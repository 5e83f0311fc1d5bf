"""Show a run's `trace.json`: a per-stage timeline picture, or a text summary of busy and idle time.

``python -m mlora_pp.trace OUTPUT_DIR/trace.json --png timeline.png [--text]``

The trace is the Chrome/Perfetto file `write_trace` writes at the end of a run: one thread per
stage, one complete event per action (``F3 jobA:0.1+jobB:0.0``: forward of micro-batch 3 holding step 0
micro 1 of jobA fused with step 0 micro 0 of jobB; ``B3 ...`` its backward; ``S jobA:0`` jobA's
optimizer step) and a ``wait`` event for the part of an action spent blocked on a peer. A stage
keeps the events of its first and last `pipeline.trace_actions / 2` actions (`TraceRecorder`): a
long run's middle is left out, marked by an instant event, and the file's ``mlora_pp_stages``
entry holds each stage's totals over the whole run, which the summary uses.

The picture has one lane per stage and one box per action, coloured by job: a fused micro-batch is
split into horizontal stripes, one per job, in the order of its parts. Forwards are a light tint
of the job's colour, backwards its full colour, optimizer steps its colour hatched. Waits are grey
boxes of half the lane's height; idle time (no action at all) stays white. Drawing needs
matplotlib (``pip install 'mlora_pp[plot]'``); the text summary needs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

KINDS: tuple[str, ...] = ("F", "B", "S")
EXIT_BAD_INPUT = 2


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file."""


@dataclass(slots=True)
class TraceEvent:
    """One timed action of a stage (`time.perf_counter` seconds)."""

    name: str
    kind: str
    start: float
    end: float
    wait: float = 0.0
    """Seconds of [start, end) spent blocked on a peer rather than computing."""


DEFAULT_TRACE_ACTIONS = 20_000
"""Actions per stage whose events a run keeps by default: about 4 MB a stage, held and in the file."""


class TraceRecorder:
    """A stage's timed actions: totals over the whole run, and the events of the first
    `limit - limit // 2` and the last `limit // 2` actions (the rest of a long run's middle is
    counted, not kept, so memory and the file stay bounded; a run of at most `limit` actions keeps
    all of them)."""

    def __init__(self, limit: int = DEFAULT_TRACE_ACTIONS):
        if limit < 0:
            raise ValueError(f"trace limit must be 0 or more, got {limit}")
        self.limit = limit
        self.head: list[TraceEvent] = []
        self.tail: deque[TraceEvent] = deque(maxlen=limit // 2)
        self.actions = 0
        self.busy_s = 0.0
        """Computing: the actions' time less their waits."""
        self.wait_s = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None

    @classmethod
    def of(cls, events: Sequence[TraceEvent], limit: int = DEFAULT_TRACE_ACTIONS) -> "TraceRecorder":
        recorder = cls(limit)
        for event in events:
            recorder.add(event)
        return recorder

    def add(self, event: TraceEvent) -> None:
        self.actions += 1
        self.busy_s += event.end - event.start - event.wait
        self.wait_s += event.wait
        if self.first_start is None or event.start < self.first_start:
            self.first_start = event.start
        if self.last_end is None or event.end > self.last_end:
            self.last_end = event.end
        if len(self.head) < self.limit - self.limit // 2:
            self.head.append(event)
        elif self.tail.maxlen:
            self.tail.append(event)

    @property
    def dropped(self) -> int:
        """Actions counted but not kept."""
        return self.actions - len(self.head) - len(self.tail)

    @property
    def events(self) -> list[TraceEvent]:
        return self.head + list(self.tail)

    def totals(self) -> dict:
        """What the file records of this stage beyond its kept events."""
        return {"actions": self.actions, "kept": self.actions - self.dropped, "busy_s": self.busy_s,
                "wait_s": self.wait_s, "first_start_s": self.first_start, "last_end_s": self.last_end}


def write_trace(path: Path, traces: Sequence[TraceRecorder | Sequence[TraceEvent]]) -> None:
    """Chrome/Perfetto trace of every stage's recorder (or plain event list): one row per stage, one
    slice per kept action, waits shown separately, an instant event where actions were left out,
    and each stage's totals under ``mlora_pp_stages``. Written atomically."""
    recorders = [t if isinstance(t, TraceRecorder) else TraceRecorder.of(t, limit=len(t)) for t in traces]
    origin = min((r.first_start for r in recorders if r.first_start is not None), default=0.0)
    events: list[dict] = []
    totals = []
    for rank, recorder in enumerate(recorders):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"stage {rank}"}})
        if recorder.dropped:  # where the left-out actions begin: after the last one kept before them
            at = recorder.head[-1].end if recorder.head else recorder.first_start
            events.append({"name": f"{recorder.dropped} actions not kept", "ph": "i", "s": "t", "pid": 0,
                           "tid": rank, "ts": ((at or 0.0) - origin) * 1e6})
        for e in recorder.events:
            start = e.start + e.wait
            events.append({"name": e.name, "cat": e.kind, "ph": "X", "pid": 0, "tid": rank,
                           "ts": (start - origin) * 1e6, "dur": (e.end - start) * 1e6})
            if e.wait > 0:
                events.append({"name": "wait", "cat": "wait", "ph": "X", "pid": 0, "tid": rank,
                               "ts": (e.start - origin) * 1e6, "dur": e.wait * 1e6})
        stage = recorder.totals()
        for key in ("first_start_s", "last_end_s"):
            stage[key] = None if stage[key] is None else stage[key] - origin
        totals.append(stage)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "mlora_pp_stages": totals}))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Slice:
    """One action's compute, or one wait, on one stage, in seconds from the trace's start."""

    stage: int
    kind: str
    """F, B, S or wait."""
    name: str
    start: float
    end: float

    @property
    def jobs(self) -> tuple[str, ...]:
        """The jobs of the action, in the order of its parts (none for a wait)."""
        if self.kind == "wait":
            return ()
        _, _, parts = self.name.partition(" ")
        return tuple(part.rsplit(":", 1)[0] for part in parts.split("+") if part)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class StageSummary:
    """Where one stage's time went over the run's span (first action anywhere to last anywhere)."""

    stage: int
    actions: int
    span_s: float
    busy_s: float
    """Computing (actions less their waits)."""
    wait_s: float
    """Inside an action, blocked on a peer."""
    not_kept: int = 0
    """Actions counted in these totals whose events the file leaves out (`TraceRecorder`)."""

    @property
    def idle_s(self) -> float:
        """No action running: before the first, between actions, after the last."""
        return max(self.span_s - self.busy_s - self.wait_s, 0.0)

    @property
    def busy(self) -> float:
        return self.busy_s / self.span_s if self.span_s > 0 else 0.0

    @property
    def bubble(self) -> float:
        """The share of the span not computing (waits and idle time)."""
        return 1.0 - self.busy


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: not JSON ({exc})") from None


def read_trace(path: str | Path, raw: Any = None) -> list[list[Slice]]:
    """Each stage's slices, ordered by start; raises `TraceError` naming the file. `raw`: the file's
    JSON, when read already."""
    path = Path(path)
    if raw is None:
        raw = _load(path)
    events = raw.get("traceEvents") if isinstance(raw, dict) else raw
    if not isinstance(events, list):
        raise TraceError(f"{path}: not a Chrome trace (no traceEvents list)")
    stages: dict[int, list[Slice]] = {}
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise TraceError(f"{path}: traceEvents[{i}] is not an object")
        if event.get("ph") == "M" and event.get("name") == "thread_name":
            stages.setdefault(int(event.get("tid", 0)), [])
            continue
        if event.get("ph") != "X":
            continue
        try:
            start, duration, stage = float(event["ts"]) * 1e-6, float(event["dur"]) * 1e-6, int(event["tid"])
            name = str(event["name"])
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{path}: traceEvents[{i}] lacks name, tid, ts or dur") from None
        kind = "wait" if name == "wait" else str(event.get("cat") or name[:1])
        stages.setdefault(stage, []).append(Slice(stage, kind, name, start, start + duration))
    if not stages:
        raise TraceError(f"{path}: no stage in the trace")
    return [sorted(stages.get(s, []), key=lambda x: (x.start, x.kind == "wait")) for s in range(max(stages) + 1)]


def read_totals(path: str | Path, raw: Any = None) -> list[dict] | None:
    """Each stage's totals over the whole run (`TraceRecorder.totals`), or None for a file without
    them (written before 2026-12-07, or by another tool)."""
    raw = _load(Path(path)) if raw is None else raw
    totals = raw.get("mlora_pp_stages") if isinstance(raw, dict) else None
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(totals, list) or not all(
            isinstance(t, dict) and all(number(t.get(k)) for k in ("actions", "kept", "busy_s", "wait_s"))
            and 0 <= t["kept"] <= t["actions"]
            and all(t.get(k) is None or number(t.get(k)) for k in ("first_start_s", "last_end_s"))
            for t in totals):
        return None
    return totals


def summarise(stages: list[list[Slice]], totals: list[dict] | None = None) -> list[StageSummary]:
    """Busy, wait and idle time of every stage over the common span of the run: from the kept
    slices, or from `totals` (`read_totals`) where a stage left actions out."""
    all_slices = [s for stage in stages for s in stage]
    origin = min((s.start for s in all_slices), default=0.0)
    span = max((s.end for s in all_slices), default=0.0) - origin
    whole = totals is not None and len(totals) == len(stages) and any(t.get("kept", 0) < t.get("actions", 0)
                                                                        for t in totals)
    if whole:
        assert totals is not None
        starts = [t["first_start_s"] for t in totals if t.get("first_start_s") is not None]
        ends = [t["last_end_s"] for t in totals if t.get("last_end_s") is not None]
        span = max(ends, default=0.0) - min(starts, default=0.0)
    out = []
    for index, slices in enumerate(stages):
        if whole:
            t = totals[index]  # type: ignore[index]
            out.append(StageSummary(index, int(t["actions"]), span, float(t["busy_s"]), float(t["wait_s"]),
                                    int(t["actions"]) - int(t["kept"])))
            continue
        busy = sum(s.duration for s in slices if s.kind != "wait")
        wait = sum(s.duration for s in slices if s.kind == "wait")
        actions = sum(1 for s in slices if s.kind != "wait")
        out.append(StageSummary(index, actions, span, busy, wait))
    return out


def format_summary(summaries: list[StageSummary], title: str = "trace") -> str:
    """A small table: per stage, actions and the share of the span busy, waiting, idle, and the bubble."""
    span = summaries[0].span_s if summaries else 0.0
    lines = [f"{title}: {len(summaries)} stages, span {span:.3f} s",
             f"{'stage':>5} {'actions':>7} {'busy s':>8} {'busy':>6} {'wait':>6} {'idle':>6} {'bubble':>6}"]
    for s in summaries:
        wait, idle = (s.wait_s / s.span_s, s.idle_s / s.span_s) if s.span_s > 0 else (0.0, 0.0)
        lines.append(f"{s.stage:>5} {s.actions:>7} {s.busy_s:>8.3f} {s.busy:>6.1%} {wait:>6.1%} {idle:>6.1%} "
                     f"{s.bubble:>6.1%}")
    total_span = span * len(summaries)
    if total_span > 0:
        busy = sum(s.busy_s for s in summaries)
        lines.append(f"{'all':>5} {sum(s.actions for s in summaries):>7} {busy:>8.3f} {busy / total_span:>6.1%} "
                     f"{'':>6} {'':>6} {1 - busy / total_span:>6.1%}")
    left_out = sum(s.not_kept for s in summaries)
    if left_out:
        lines.append(f"(whole-run totals; the file keeps the first and last actions of each stage, "
                     f"{left_out} actions of the middle are left out of it and of --png)")
    return "\n".join(lines)


def tint(rgba: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The light, opaque version of a colour that forwards use (backwards use the colour itself)."""
    return (*(c + (1.0 - c) * 0.55 for c in rgba[:3]), 1.0)


def _job_colours(stages: list[list[Slice]]) -> dict[str, Any]:
    """A colour per job, in order of first appearance (tab10, then tab20 beyond ten jobs)."""
    from matplotlib import colormaps  # noqa: PLC0415 - optional dependency

    jobs: list[str] = []
    for slices in stages:
        for s in slices:
            jobs += [j for j in s.jobs if j not in jobs]
    cmap = colormaps["tab10" if len(jobs) <= 10 else "tab20"]
    return {job: cmap(i % cmap.N) for i, job in enumerate(jobs)}


def draw(stages: list[list[Slice]], png: str | Path, title: str = "") -> Any:
    """Draw the timeline to `png` and return the matplotlib Figure. Needs matplotlib."""
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import to_rgba  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    colours = _job_colours(stages)
    origin = min((s.start for slices in stages for s in slices), default=0.0)
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.9 * len(stages)))
    lane = 0.8
    # One broken_barh per (stage, kind, job, stripe): thousands of actions stay one call each.
    groups: dict[tuple[int, str, str, int, int], list[tuple[float, float]]] = {}
    for index, slices in enumerate(stages):
        for s in slices:
            key_jobs = s.jobs or ("",)
            for k, job in enumerate(key_jobs):
                groups.setdefault((index, s.kind, job, k, len(key_jobs)), []).append((s.start - origin, s.duration))
    for (index, kind, job, k, n), boxes in groups.items():
        top = index - lane / 2  # stage 0 on top: the y axis is inverted below
        if kind == "wait":
            ax.broken_barh(boxes, (index - lane / 4, lane / 2), facecolors="#9e9e9e", linewidth=0)
            continue
        colour = to_rgba(colours.get(job, "#444444"))
        face = tint(colour) if kind == "F" else colour
        ax.broken_barh(boxes, (top + k * lane / n, lane / n), facecolors=face, linewidth=0,
                       hatch="////" if kind == "S" else None, edgecolor="black" if kind == "S" else None)
    ax.set_yticks(range(len(stages)), [f"stage {i}" for i in range(len(stages))])
    ax.set_ylim(len(stages) - 0.5, -0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds from the first action")
    ax.set_facecolor("white")  # no grid: idle time is plain white
    handles = [Patch(facecolor=c, label=job) for job, c in colours.items()]
    grey = to_rgba("#607d8b")
    handles += [Patch(facecolor=tint(grey), label="forward"), Patch(facecolor=grey, label="backward"),
                Patch(facecolor=grey, hatch="////", edgecolor="black", label="optimizer step"),
                Patch(facecolor="#9e9e9e", label="wait (blocked on a peer)"),
                Patch(facecolor="white", edgecolor="#bdbdbd", label="idle")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    summaries = summarise(stages)
    busy = ", ".join(f"stage {s.stage} {s.busy:.0%}" for s in summaries)
    ax.set_title(f"{title}  busy: {busy}" if title else f"busy: {busy}", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlora_pp.trace", description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="OUTPUT_DIR/trace.json of a run")
    parser.add_argument("--png", help="draw the per-stage timeline to this PNG file (needs matplotlib)")
    parser.add_argument("--text", action="store_true", help="print per-stage busy, wait, idle and bubble shares "
                        "(the default without --png)")
    args = parser.parse_args(argv)
    try:
        raw = _load(Path(args.trace))
        stages = read_trace(args.trace, raw)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.text or not args.png:
        print(format_summary(summarise(stages, read_totals(args.trace, raw)), title=args.trace))
    if args.png:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            print("error: --png needs matplotlib, which is not installed: pip install 'mlora_pp[plot]' "
                  "(or matplotlib>=3.8); --text works without it", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            draw(stages, args.png, title=Path(args.trace).name)
        except OSError as exc:
            print(f"error: cannot write {args.png} ({exc.strerror or exc})", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
