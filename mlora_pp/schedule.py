"""Schedules as data: which micro-batches exist and, per stage, the ordered actions to run.

Pure policy: no torch, no torch.distributed. The runtime executes these lists and the simulator
replays them, so whatever is decided here is testable without processes.

A micro-batch holds rows of one or several jobs (`MicroBatchPart`s). Its actions on a stage are a
forward (`F`), a backward (`B`), and, once a job's last backward of a step is done on that stage,
that job's optimizer step (`S`). Policies:

- ``lora``: jobs are interleaved; at each slot the next micro-batch of every active job is fused
  into one micro-batch (the batched LoRA operator runs them together), so a job never waits for
  another's optimizer step and the base GEMM runs once for all of them.
- ``gpipe`` / ``1f1b``: the standard single-job schedules, jobs trained one after another, no
  fusion: the baselines, run on the same runtime.

With one stage every policy is forward, backward, step in micro-batch order; the policies differ
in which micro-batches they form and in which order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

ActionKind = Literal["F", "B", "S"]


@dataclass(frozen=True)
class JobSteps:
    """What the scheduler needs to know about one job: rows and tokens per micro-batch, per step."""

    name: str
    micro_batches: tuple[tuple[tuple[int, int], ...], ...]
    """micro_batches[step][micro] = (rows, padded tokens)."""

    @property
    def steps(self) -> int:
        return len(self.micro_batches)


@dataclass(frozen=True)
class MicroBatchPart:
    """One job's rows inside a micro-batch."""

    job: str
    step: int
    micro: int  # index of these rows' micro-batch within the job's step
    last_in_step: bool
    rows: int
    tokens: int


@dataclass(frozen=True)
class MicroBatch:
    id: int
    parts: tuple[MicroBatchPart, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def jobs(self) -> tuple[str, ...]:
        return tuple(p.job for p in self.parts)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    micro_batch: int | None = None  # F and B
    job: str | None = None  # S
    step: int | None = None  # S

    def __str__(self) -> str:
        if self.kind == "S":
            return f"S[{self.job}#{self.step}]"
        return f"{self.kind}{self.micro_batch}"


@dataclass(frozen=True)
class Schedule:
    policy: str
    micro_batches: tuple[MicroBatch, ...]
    stages: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)


class ScheduleError(ValueError):
    """A schedule that would compute something wrong or hang; the message says which action."""


def _parts(job: JobSteps) -> list[MicroBatchPart]:
    """A job's micro-batches, in training order."""
    out: list[MicroBatchPart] = []
    for step, micros in enumerate(job.micro_batches):
        for micro, (rows, tokens) in enumerate(micros):
            out.append(MicroBatchPart(job.name, step, micro, micro == len(micros) - 1, rows, tokens))
    return out


def form_micro_batches(jobs: Sequence[JobSteps], policy: str, fuse: bool = True) -> list[MicroBatch]:
    """The micro-batches a policy runs, in the order they enter the pipeline."""
    streams = [_parts(job) for job in jobs]
    groups: list[tuple[MicroBatchPart, ...]] = []
    if policy == "lora":
        for slot in range(max((len(s) for s in streams), default=0)):
            live = [s[slot] for s in streams if slot < len(s)]
            if fuse:
                groups.append(tuple(live))
            else:
                groups.extend((p,) for p in live)
    elif policy in ("gpipe", "1f1b"):
        for stream in streams:
            groups.extend((p,) for p in stream)
    else:
        raise ScheduleError(f"unknown schedule policy {policy!r}")
    return [MicroBatch(i, parts) for i, parts in enumerate(groups)]


def _single_stage(micro_batches: Sequence[MicroBatch]) -> tuple[Action, ...]:
    actions: list[Action] = []
    for mb in micro_batches:
        actions.append(Action("F", mb.id))
        actions.append(Action("B", mb.id))
        for part in mb.parts:
            if part.last_in_step:
                actions.append(Action("S", job=part.job, step=part.step))
    return tuple(actions)


def build_schedule(jobs: Sequence[JobSteps], num_stages: int, policy: str = "lora", fuse: bool = True) -> Schedule:
    """Form the micro-batches and the per-stage action lists, then validate them."""
    if num_stages < 1:
        raise ScheduleError(f"need at least one stage, got {num_stages}")
    micro_batches = form_micro_batches(jobs, policy, fuse)
    if num_stages != 1:
        raise ScheduleError(f"{num_stages} stages: multi-stage schedules are not implemented yet")
    schedule = Schedule(policy, tuple(micro_batches), (_single_stage(micro_batches),))
    validate(schedule)
    return schedule


def validate(schedule: Schedule) -> None:
    """Check what every correct schedule must satisfy, on every stage.

    Each micro-batch is forwarded once and then backwarded once; a job's optimizer step for step k
    comes after all of that job's step-k backwards and before any forward of its step k+1.
    """
    by_id = {mb.id: mb for mb in schedule.micro_batches}
    for stage, actions in enumerate(schedule.stages):
        forwarded: set[int] = set()
        backwarded: set[int] = set()
        pending: dict[tuple[str, int], int] = {}
        for mb in schedule.micro_batches:
            for part in mb.parts:
                pending[(part.job, part.step)] = pending.get((part.job, part.step), 0) + 1
        stepped: dict[str, int] = {}
        for pos, action in enumerate(actions):
            where = f"stage {stage}, action {pos} ({action})"
            if action.kind == "F":
                if action.micro_batch not in by_id or action.micro_batch in forwarded:
                    raise ScheduleError(f"{where}: unknown or repeated forward")
                forwarded.add(action.micro_batch)
                for part in by_id[action.micro_batch].parts:
                    if stepped.get(part.job, -1) != part.step - 1:
                        raise ScheduleError(
                            f"{where}: forward of {part.job} step {part.step} before its step {part.step - 1} update"
                        )
            elif action.kind == "B":
                if action.micro_batch not in forwarded or action.micro_batch in backwarded:
                    raise ScheduleError(f"{where}: backward without forward, or repeated")
                backwarded.add(action.micro_batch)
                for part in by_id[action.micro_batch].parts:
                    pending[(part.job, part.step)] -= 1
            elif action.kind == "S":
                key = (action.job, action.step)
                if pending.get(key, -1) != 0:
                    raise ScheduleError(f"{where}: optimizer step before all its backwards")
                if stepped.get(action.job, -1) != action.step - 1:
                    raise ScheduleError(f"{where}: optimizer steps out of order")
                stepped[action.job] = action.step
                pending.pop(key)
            else:
                raise ScheduleError(f"{where}: unknown action kind")
        if forwarded != set(by_id) or backwarded != set(by_id):
            raise ScheduleError(f"stage {stage}: {len(set(by_id) - backwarded)} micro-batches never finish")
        if pending:
            raise ScheduleError(f"stage {stage}: optimizer steps missing for {sorted(pending)[:3]}")


def render(schedule: Schedule, width: int = 8) -> str:
    """A text grid, one line per stage, one column per action slot (for debugging and errors)."""
    lines = []
    for stage, actions in enumerate(schedule.stages):
        cells = [str(a).ljust(width)[:width] for a in actions]
        lines.append(f"stage {stage}: " + "".join(cells))
    return "\n".join(lines)
