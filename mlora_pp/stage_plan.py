"""One stage's view of a plan while it runs, made segment by segment (`mlora_pp.schedule.PlanStream`).

A whole plan lists every action of every remaining step of every job on every stage: for a long
run, millions of actions made before the first one runs, and held to the end. Here a rank pulls
the plan's next segment (about `pipeline.plan_window` injected micro-batches) when its stage
reaches the end of what it has, keeps its own stage's actions and where stage 0 forwards and steps
(a deferred step waits for that, see `StageWorker._due`), and forgets what its stage is past.
Every rank makes the same segments from the same numbers, so this costs no message. Pure: no torch.

Each stage runs exactly its list of the plan made whole, in order, and making a segment waits on
no other rank: the ranks exchange the same messages in the same order as they would with the
whole plan, so a plan made in segments cannot hang where the whole one would not. Making a segment
costs its rank the time to make it, once per `plan_window` injections.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from mlora_pp.schedule import (Action, JobSteps, MicroBatch, PlanStream, Schedule, Segment, cut_list,
                               remaining_steps, steps_after)

FORGET_EVERY = 4096
"""A stage drops the actions it has run once this many have piled up (a list's front is costly to trim)."""


class StagePlan:
    """The actions of stage `stage` of a plan, and the micro-batches they name, pulled from `stream`
    as they are reached; `jobs` is what the plan was made of (its order is the next plan's)."""

    def __init__(self, stream: PlanStream, stage: int, jobs: Sequence[JobSteps], forget_every: int = FORGET_EVERY
                 ) -> None:
        self.stream, self.stage, self.jobs, self.forget_every = stream, stage, list(jobs), forget_every
        self.policy, self.num_stages, self.paused = stream.policy, stream.num_stages, stream.paused
        self.max_in_flight, self.max_in_flight_tokens = stream.max_in_flight, stream.max_in_flight_tokens
        self.count = 0  # micro-batches made so far (the next one's id)
        self.complete = False  # the final segment is in
        self.segments = 0
        self.first: Segment | None = None
        """The first segment, as made (the whole plan when it is short: start-up reports and probes use it)."""
        self._own: list[Action] = []
        self._base = 0  # position of _own[0] in this stage's whole list
        self._micro: dict[int, MicroBatch] = {}
        self._floor = 0  # micro-batches below this id are forgotten
        self._injected: dict[str, int] = {}  # job -> its parts in micro-batches made so far
        self._f0: dict[int, int] = {}  # micro-batch -> position of its forward on stage 0
        self._s0: dict[tuple[str, int], int] = {}  # (job, step) -> position of its step on stage 0
        self._s0_order: deque[tuple[int, tuple[str, int]]] = deque()
        self._s0_last: dict[str, int] = {}  # job -> its last step made on stage 0
        self._len0 = 0  # stage 0's actions made so far
        self._pull()

    @staticmethod
    def of(schedule: Schedule, stage: int) -> "StagePlan":
        """A plan made already (one segment)."""
        return StagePlan(PlanStream.of(schedule), stage, remaining_steps(schedule, 0))

    # ------------------------------------------------------------------------------ pulling

    def _pull(self) -> bool:
        """Take the next segment; False once the plan is complete."""
        segment = self.stream.next_segment()
        if segment is None:
            return False
        self.segments += 1
        if self.first is None:
            self.first = segment
        self.complete = segment.final
        for mb in segment.micro_batches:
            self._micro[mb.id] = mb
            for part in mb.parts:
                self._injected[part.job] = self._injected.get(part.job, 0) + 1
        self.count += len(segment.micro_batches)
        self._own += segment.stages[self.stage]
        for action in segment.stages[0]:
            if action.kind == "F":
                self._f0[action.micro_batch] = self._len0
            elif action.kind == "S":
                key = (action.job, action.step)
                self._s0[key] = self._len0
                self._s0_order.append((self._len0, key))
                self._s0_last[action.job] = action.step
            self._len0 += 1
        return True

    def action(self, position: int) -> Action | None:
        """This stage's action at `position` of its whole list (None past its end)."""
        if position < self._base:  # a negative index would silently read the list's end
            raise IndexError(f"stage {self.stage}: action {position} is forgotten already (kept from {self._base})")
        while position - self._base >= len(self._own):
            if self.complete or not self._pull():
                return None
        return self._own[position - self._base]

    def exists(self, mb_id: int) -> bool:
        """Whether the plan has a micro-batch `mb_id` (made as needed to tell)."""
        while mb_id >= self.count and not self.complete:
            self._pull()
        return mb_id < self.count

    @property
    def end(self) -> int | None:
        """The plan's micro-batch count, once the final segment is in (None before)."""
        return self.count if self.complete else None

    def micro_batch(self, mb_id: int) -> MicroBatch:
        return self._micro[mb_id]

    def stepped_before(self, job: str, step: int, mb_id: int) -> bool:
        """Whether stage 0 takes `job`'s step `step` before it forwards micro-batch `mb_id`."""
        at = self._s0.get((job, step))
        if at is None:  # forgotten (long before) or not made yet (after every forward made so far)
            return step <= self._s0_last.get(job, -1)
        return at < self._f0[mb_id]

    # ----------------------------------------------------------------------------- forgetting

    def forget(self, position: int, floor: int) -> None:
        """This stage has run its actions below `position` and needs no micro-batch below `floor`
        (its oldest in flight, or its next forward)."""
        if position - self._base >= self.forget_every:
            del self._own[:position - self._base]
            self._base = position
        if floor <= self._floor:
            return
        for mb_id in range(self._floor, min(floor, self.count)):
            self._micro.pop(mb_id, None)
            self._f0.pop(mb_id, None)
        self._floor = floor
        oldest = self._f0.get(floor)
        while self._s0_order and oldest is not None and self._s0_order[0][0] < oldest:
            _, key = self._s0_order.popleft()
            self._s0.pop(key, None)

    # ----------------------------------------------------------------------------- changing

    def tail(self, position: int, cut: int) -> list[Action]:
        """What this stage still runs from `position` when the plan changes at micro-batch `cut`
        (`mlora_pp.schedule.cut_actions`): the segments are made until every stage is done with the
        micro-batches below `cut`."""
        while not self.complete and self.stream.settled() < cut:
            self._pull()
        own = self._own[position - self._base:]
        return cut_list(own, (self._micro[i] for i in range(max(cut, self._floor), self.count)), cut)

    def remaining(self, cut: int) -> list[JobSteps]:
        """Each job's parts at or after micro-batch `cut`, as `JobSteps`, in the plan's job order
        (`mlora_pp.schedule.remaining_steps`). Nothing is consumed: the plan may go on."""
        assert cut >= self._floor, f"micro-batch {cut} is forgotten already (stage {self.stage} is past {self._floor})"
        taken = dict(self._injected)
        for mb_id in range(cut, self.count):
            for part in self._micro[mb_id].parts:
                taken[part.job] -= 1
        out = []
        for job in self.jobs:
            left = steps_after(job, taken.get(job.name, 0))
            if left is not None:
                out.append(left)
        return out

    def first_schedule(self) -> Schedule:
        """The first segment as a `Schedule` (the whole plan when it has one segment; otherwise its
        start, for probes and start-up reports, and not a valid plan on its own)."""
        assert self.first is not None
        return Schedule(self.policy, self.first.micro_batches, self.first.stages, self.max_in_flight,
                        self.max_in_flight_tokens, self.paused)
