"""Dry run of a schedule: replay every stage's action list against a cost model.

Event semantics (the runtime's, with asynchronous sends): each stage runs its list in order, one
action at a time. F(m) on s > 0 starts once stage s is free and the activation of F(m) on s-1 has
arrived; B(m) on s < S-1 once the gradient of B(m) on s+1 has arrived. Messages on a link (one per
direction per adjacent pair) are matched in order, like NCCL: the k-th forward on s+1 receives the
k-th forward sent by s, so a disagreement is reported as such rather than silently re-matched.
A message occupies its link for bytes / bandwidth (FIFO) and arrives `link_latency` after that;
sending does not block the sender. S takes `CostModel.step_seconds`.

If no stage can progress while actions remain, the schedule would hang on real ranks: `simulate`
raises `ScheduleError` naming every stuck stage, the action and what it waits for, plus `render`
of the schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from mlora_pp.schedule import Action, CostModel, Link, Schedule, ScheduleError, render

__all__ = ["CostModel", "TimedAction", "Timeline", "simulate", "render_timeline"]


class TimedAction(NamedTuple):
    action: Action
    start: float
    end: float


class Timeline(NamedTuple):
    stages: tuple[tuple[TimedAction, ...], ...]
    makespan: float
    busy: tuple[float, ...]  # seconds each stage computes
    max_in_flight: tuple[int, ...]  # most training micro-batches forwarded but not backwarded, per stage

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def idle(self) -> float:
        """Stage-seconds not spent computing, up to the makespan."""
        return self.num_stages * self.makespan - sum(self.busy)

    @property
    def bubble(self) -> float:
        """idle / (stages * makespan)."""
        total = self.num_stages * self.makespan
        return self.idle / total if total > 0 else 0.0


def simulate(schedule: Schedule, cost: CostModel | None = None,
             final_step_seconds: tuple[float, ...] | None = None) -> Timeline:
    """Start and end of every action when each stage runs its list in order (see module docstring).
    With `final_step_seconds` (per stage), a job's last S in the schedule takes that instead of
    `cost.step` (it writes the job's final checkpoint)."""
    cost = cost or CostModel()
    n = schedule.num_stages
    cost.check_stages(n)
    mbs = {mb.id: mb for mb in schedule.micro_batches}
    stages = schedule.stages
    pos = [0] * n
    free = [0.0] * n
    timed: list[list[TimedAction]] = [[] for _ in range(n)]
    fwd_links = [Link(cost) for _ in range(n - 1)]
    bwd_links = [Link(cost) for _ in range(n - 1)]
    fwd_sent: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # by sender s: (mb, arrival at s+1)
    bwd_sent: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # by sender s: (mb, arrival at s-1)
    fwd_got = [0] * n
    bwd_got = [0] * n
    forwarded: list[set[int]] = [set() for _ in range(n)]
    in_flight = [0] * n
    peak = [0] * n

    def where(s: int, action: Action) -> str:
        """Where an error is (built only when there is one: a plan has millions of actions)."""
        return f"stage {s}, action {pos[s]} ({action})"

    def tokens(s: int, action: Action) -> int:
        if action.micro_batch not in mbs:
            raise ScheduleError(f"{where(s, action)}: unknown micro-batch")
        return mbs[action.micro_batch].tokens

    def arrival(s: int, action: Action) -> float | None:
        """When the input of `action` on stage s is there; None while it has not been sent."""
        if action.kind == "F" and s > 0:
            sent, k, peer, what = fwd_sent[s - 1], fwd_got[s], s - 1, "forward"
        elif action.kind == "B" and s < n - 1:
            sent, k, peer, what = bwd_sent[s + 1], bwd_got[s], s + 1, "backward"
        else:
            if action.kind == "B" and action.micro_batch not in forwarded[s]:
                raise ScheduleError(f"{where(s, action)}: backward before its forward on this stage\n{render(schedule)}")
            return free[s]
        if k >= len(sent):
            return None
        mb, at = sent[k]
        if mb != action.micro_batch:
            raise ScheduleError(
                f"{where(s, action)}: receives stage {peer}'s {what} message #{k}, which carries micro-batch {mb}: "
                f"the {what} orders of stages {min(s, peer)} and {max(s, peer)} disagree (NCCL would hang "
                f"or mix up tensors)\n{render(schedule)}"
            )
        return at

    last_step: dict[str, int] = {}
    for action in stages[0] if n else ():
        if action.kind == "S":
            last_step[action.job] = max(last_step.get(action.job, -1), action.step)

    progressed = True
    while progressed:
        progressed = False
        for s in range(n):
            while pos[s] < len(stages[s]):
                action = stages[s][pos[s]]
                ready = arrival(s, action)
                if ready is None:
                    break
                start = max(free[s], ready)
                if action.kind == "F":
                    t = tokens(s, action)
                    end = start + cost.forward(s, t, mbs[action.micro_batch].job_count)
                    forwarded[s].add(action.micro_batch)
                    if not mbs[action.micro_batch].eval:  # an evaluation keeps nothing for a backward
                        in_flight[s] += 1
                        peak[s] = max(peak[s], in_flight[s])
                    if s > 0:
                        fwd_got[s] += 1
                    if s < n - 1:
                        fwd_sent[s].append((action.micro_batch, fwd_links[s].send(end, t)))
                elif action.kind == "B":
                    t = tokens(s, action)
                    end = start + cost.backward(s, t, mbs[action.micro_batch].job_count)
                    in_flight[s] -= 1
                    if s < n - 1:
                        bwd_got[s] += 1
                    if s > 0:
                        bwd_sent[s].append((action.micro_batch, bwd_links[s - 1].send(end, t)))
                elif action.kind == "S":
                    final = final_step_seconds is not None and action.step == last_step.get(action.job)
                    end = start + (final_step_seconds[s] if final else cost.step(s))
                else:
                    raise ScheduleError(f"{where(s, action)}: unknown action kind")
                timed[s].append(TimedAction(action, start, end))
                free[s] = end
                pos[s] += 1
                progressed = True
    stuck = [s for s in range(n) if pos[s] < len(stages[s])]
    if stuck:
        lines = []
        for s in stuck:
            action = stages[s][pos[s]]
            if action.kind == "F":
                peer, k, what = s - 1, fwd_got[s], "activation"
            else:
                peer, k, what = s + 1, bwd_got[s], "gradient"
            there = f"stage {peer} is at action {pos[peer]} ({stages[peer][pos[peer]]})" if pos[peer] < len(
                stages[peer]) else f"stage {peer} has finished"
            lines.append(
                f"stage {s} stuck at action {pos[s]} ({action}): waits for the {what} of {action} from stage "
                f"{peer} (its message #{k}); {there}"
            )
        raise ScheduleError("DEADLOCK: no stage can progress\n" + "\n".join(lines) + "\n" + render(schedule))
    makespan = max((ta[-1].end for ta in timed if ta), default=0.0)
    busy = tuple(math.fsum(t.end - t.start for t in ta) for ta in timed)
    return Timeline(tuple(tuple(t) for t in timed), makespan, busy, tuple(peak))


def render_timeline(timeline: Timeline, width: int = 160) -> str:
    """A text grid, one line per stage, one column per time quantum; '.' is idle.

    An action is drawn as its name (`F3`, `B12`, `S[a#0]`) when its span is wide enough, else as its
    kind letter repeated (lower case after the first column).
    """
    if timeline.makespan <= 0:
        return "\n".join(f"stage {s}: " for s in range(timeline.num_stages))
    durations = [t.end - t.start for ta in timeline.stages for t in ta if t.end > t.start]
    quantum = timeline.makespan / width
    if durations:  # as fine as the shortest action, when that fits in `width` columns
        quantum = max(quantum, min(durations) / 3)
    cols = max(1, math.ceil(timeline.makespan / quantum - 1e-9))
    lines = [f"time/col {quantum:.4g}s, makespan {timeline.makespan:.4g}s, bubble {timeline.bubble:.1%}"]
    for s, ta in enumerate(timeline.stages):
        row = ["."] * cols
        for t in ta:
            a = round(t.start / quantum)
            b = max(a + 1, round(t.end / quantum)) if t.end > t.start else a
            b = min(b, cols)
            label = str(t.action)
            cells = list(label.ljust(b - a, "-")) if len(label) <= b - a else [t.action.kind] + [
                t.action.kind.lower()] * (b - a - 1)
            row[a:b] = cells[: b - a]
        lines.append(f"stage {s}: " + "".join(row))
    return "\n".join(lines)
