"""Schedules as data: which micro-batches exist and, per stage, the ordered actions to run.

Pure policy: no torch, no torch.distributed. The runtime executes these lists and the simulator
(`mlora_pp.sim`) replays them, so whatever is decided here is testable without processes.

A micro-batch holds rows of one or several jobs (`MicroBatchPart`s). Its actions on a stage are a
forward (`F`), a backward (`B`), and, once a job's last backward of a step is done on that stage,
that job's optimizer step (`S`). Communication is implied: on stage s, F(m) for s > 0 first
receives m's activation from s-1 and F(m) for s < S-1 sends its output to s+1; B(m) for s < S-1
first receives the gradient from s+1 and B(m) for s > 0 sends the input gradient to s-1. Messages
between two ranks are matched in issue order (NCCL), so every schedule built here has, for each
adjacent pair of stages, the same order of F ids and the same order of B ids (`validate` checks it).
Micro-batch ids are their index in `Schedule.micro_batches`, numbered in the order stage 0
forwards them; in every policy here the F order and the B order on every stage are ascending ids.

Evaluations (`EvalPoint`: a job's held-out rows after k steps) are micro-batches of evaluation
parts only, never fused with training rows: F on every stage and nothing else (no B, no S, no
activation kept, so they count against no in-flight bound). They enter the job's parts right
before its step k (`_parts`), so on every stage they run after the job's step k-1 update and
before its step k update, and see the weights of step k; the last one follows the last step.

Policies (with one stage every policy keeps the original lists: forward, backward, step in
micro-batch order; the lora micro-batches fuse one micro-batch of every live job per slot):

- ``gpipe``: jobs one after another, no fusion; per step of a job all forwards of its micro-batches,
  then all backwards, then the job's `S` on every stage (a flush every step).
- ``1f1b``: jobs one after another, no fusion; per step the standard one-forward-one-backward order
  (stage s warms up with min(S-1-s, N) forwards, alternates F/B, cools down with backwards), then `S`.
  At most S-s micro-batches are in flight on stage s.
- ``lora`` (ours): jobs are put in G streams (`group_jobs`): each job alone, unless there are more
  than S+1 jobs, then the fewest groups G >= S+1 that add at most 10% padding and differ at most
  10% in tokens (or the G that `choose_streams` predicts fastest from measured per-action costs);
  a stream's ready jobs are fused into one micro-batch at each injection. The order is generated
  by simulating a clock with the cost model: a stage that becomes free runs a backward whose
  gradient has arrived (in arrival order) before a forward; later stages forward in arrival
  order; stage 0 injects, while fewer than `max_in_flight` (default S) micro-batches
  are forwarded but not backwarded there (or, with `token_bound`, while the largest micro-batch
  still fits in `max_in_flight` times its tokens), the next micro-batch of a stream whose jobs
  have stepped on stage 0: a stream that has started a step first (a step is injected
  contiguously), else the least advanced (fraction of its tokens). A job's `S` on a stage follows
  the backward that completes its step there: no global flush, a job only ever waits for its own
  previous step. What is in flight on stage s was in flight on stage 0 when stage 0 injected, so
  the bound holds on every stage.

A run's plan is made as it runs (`PlanStream`, `mlora_pp.stage_plan`): the next `window` injections
of every stage's list at a time, and `build_schedule` is its segments joined (what tests,
benchmarks and the simulator use).

For the runtime: each stage runs its list in order; receives are posted in list order and match
the sender's sends one for one (ascending ids both ways); sends must not block the sender (isend
kept until complete, or a send thread): with blocking rendezvous sends two neighbours that send to
each other at once would hang. `sim.simulate` models exactly these semantics.

Bubble under unit costs (equal micro-batches; forward 1 and backward r >= 1 per stage; no
communication; free optimizer steps). bubble = idle / (S * makespan). A slot is one forward plus one
backward of one micro-batch on one stage (1 + r); with M micro-batches a stage computes M slots.

- gpipe, per step of N micro-batches: the last forward leaves stage S-1 after N+S-1 forward times,
  the last backward reaches stage 0 after N+S-1 backward times: makespan N+S-1 slots, busy N, so
  bubble (S-1)/(N+S-1), for any number of steps and jobs of equal N (`flush_bubble`).
- 1f1b: the same N+S-1 slots per step (warm-up and cool-down are the same fill and drain), so the
  same bubble; its gain is memory (S-s micro-batches in flight on stage s instead of N).
- lora, G equal streams (G = L unfused) of N micro-batches per step, K steps: after the fill,
  stage 0 runs one F and one B per slot (the 1F1B rhythm), and a micro-batch injected in slot j is
  backwarded on stage 0 in slot j+S-1. A stream injects its step contiguously, so its next step can
  start N+S-1 slots after this one started; meanwhile the other G-1 streams inject their steps
  (least advanced first: round-robin by step). One round (a step of every stream) therefore takes
  max(G*N, N+S-1) slots, and the last round G*N slots plus S-1 slots of drain:

      T = (K-1) * max(G*N, N+S-1) + G*N + S-1 slots,   bubble = 1 - G*N*K / T   (`lora_bubble`).

  When (G-1)*N >= S-1 (the other streams cover one stream's round trip) T = M + S - 1 with M =
  G*N*K: every stage idles exactly S-1 slots over the whole run (the one fill and the one drain),
  bubble = (S-1)/(M+S-1) -> 0. Otherwise every round idles N+S-1-G*N slots: the steady-state bubble
  (N+S-1-G*N)/(N+S-1) is mLoRA's LoRAPP formula max{(D-1+N-L*N)/(D+N-1), 0}; G = 1 is 1f1b's bubble.
  Fused streams of k equal jobs are the same count in slots k times longer. Checked against
  `sim.simulate` for S <= 5, G <= 6, N <= 6, K <= 3 and r in {1, 2, 3, 4}. Unequal micro-batches
  break the rhythm: that is why fused groups must balance tokens.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from mlora_pp.step_sizes import StepSizes

ActionKind = Literal["F", "B", "S"]
POLICIES = ("lora", "1f1b", "gpipe")
BALANCE = 0.1  # fused lora streams may differ this much in total padded tokens


@dataclass(frozen=True)
class EvalPoint:
    """A job's held-out evaluation after `after` optimizer steps: forward-only micro-batches that see
    the weights of that step on every stage (no backward, no optimizer step, no activation kept)."""

    after: int
    micro_batches: tuple[tuple[int, int], ...]
    """(rows, padded tokens) of each eval micro-batch, from `first_micro` on."""
    first_micro: int = 0
    """Index of the first listed micro-batch: a plan changed mid-evaluation continues it."""


@dataclass(frozen=True)
class JobSteps:
    """What the scheduler needs to know about one job: rows and tokens per micro-batch, per step."""

    name: str
    micro_batches: StepSizes
    """micro_batches[k][micro] = (rows, padded tokens) of step `first_step + k` (nested sequences
    are accepted and stored as `StepSizes`)."""
    first_step: int = 0
    """Absolute index of the first step listed: a resumed job schedules only its remaining steps, and
    its parts and `S` actions keep absolute step numbers (dropout keys and the learning rate use them)."""
    first_micro: int = 0
    """Index of the first listed micro-batch within the first step: a plan changed mid-run (`cut`)
    continues a step whose first micro-batches already ran (their gradients are accumulated)."""
    evals: tuple[EvalPoint, ...] = ()
    """Evaluations still to run, each before step `after` (or after the last step listed)."""
    paused: bool = False
    """Paused for a more urgent job or a budget (`mlora_pp.replan.pause_jobs`): under way, but its
    AdamW moments are in host memory and its unfinished step's gradients were dropped, so it holds
    nothing on the device until it starts again, and waits to be admitted like a job not under way."""

    def __post_init__(self) -> None:
        if not isinstance(self.micro_batches, StepSizes):
            object.__setattr__(self, "micro_batches", StepSizes.of(self.micro_batches))

    @property
    def steps(self) -> int:
        return len(self.micro_batches)

    @property
    def holds_state(self) -> bool:
        """Whether the job was under way before this plan (resumed, or continued across a change of
        plan) and not paused: its AdamW moments or its partial step's gradients exist on every stage
        already."""
        return (self.first_step > 0 or self.first_micro > 0) and not self.paused

    @cached_property
    def tokens(self) -> int:
        """Padded tokens of the training micro-batches (evaluations are forward-only and not counted)."""
        return int(self.micro_batches.tokens.sum())


ADMISSION = ("fifo", "priority", "shortest-first")


@dataclass(frozen=True)
class Admission:
    """Which jobs may run at once, and who gets the pipeline first.

    `order` lists every job, most urgent first. `fits(running)` says whether those jobs may hold
    their state on every stage at once (None: any set may); a job starts once it fits next to the
    running ones and every job before it in `order` has started (no overtaking, so none starves),
    and it frees its place after its last optimizer step on stage 0 (every other stage has done
    that step before). A job under way before the plan (`holding`) keeps its place: priority picks
    who starts next, and the plan never pre-empts a job that holds its gradients and optimizer
    state (`mlora_pp.replan.pause_jobs` pauses one before the plan is built; it then holds none).
    With `share` the running jobs share the pipeline evenly (the least advanced stream injects
    first: the fewest bubbles); without it the earlier job in `order` injects whenever it is ready
    and the others fill the gaps (earlier jobs finish sooner).
    """

    order: tuple[str, ...]
    fits: Callable[[frozenset[str]], bool] | None = None
    share: bool = True
    holding: frozenset[str] = frozenset()
    """Jobs that hold their state already (`JobSteps.holds_state`): they run from the plan's start
    whatever `fits` says. Queued, they would keep that memory while the budget check left it out."""

    @property
    def default(self) -> bool:
        """Every job at once, evenly shared: what a schedule without admission does."""
        return self.fits is None and self.share


def admission(jobs: Sequence[JobSteps], policy: str, priority: dict[str, int] | None = None,
              fits: Callable[[frozenset[str]], bool] | None = None) -> Admission:
    """The `Admission` of a policy: fifo (input order, shared evenly), priority (highest `priority`
    first) or shortest-first (fewest padded tokens left first); ties keep the input order."""
    index = {j.name: i for i, j in enumerate(jobs)}
    if policy == "fifo":
        key = lambda j: index[j.name]  # noqa: E731
    elif policy == "priority":
        key = lambda j: (-(priority or {}).get(j.name, 0), index[j.name])  # noqa: E731
    elif policy == "shortest-first":
        key = lambda j: (j.tokens, index[j.name])  # noqa: E731
    else:
        raise ScheduleError(f"unknown admission policy {policy!r} (one of {', '.join(ADMISSION)})")
    order = tuple(j.name for j in sorted(jobs, key=key))
    return Admission(order, fits, share=policy == "fifo", holding=frozenset(j.name for j in jobs if j.holds_state))


@dataclass(frozen=True)
class MicroBatchPart:
    """One job's rows inside a micro-batch."""

    job: str
    step: int
    micro: int  # index of these rows' micro-batch within the job's step
    last_in_step: bool
    rows: int
    tokens: int
    eval: bool = False
    """Held-out rows evaluated after `step` steps (`micro` indexes the eval set): forward only."""


@dataclass(frozen=True)
class MicroBatch:
    """Parts of one or more jobs that go through the stages together. Its derived sizes are cached:
    a plan reads them at every action of every stage (planning, validation, replay)."""

    id: int
    parts: tuple[MicroBatchPart, ...]

    @cached_property
    def eval(self) -> bool:
        """A forward-only evaluation micro-batch (its parts are all eval parts: they never mix)."""
        return bool(self.parts) and self.parts[0].eval

    @cached_property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @cached_property
    def jobs(self) -> tuple[str, ...]:
        return tuple(p.job for p in self.parts)

    @cached_property
    def job_count(self) -> int:
        """Distinct jobs (what a fused micro-batch's extra cost counts)."""
        return len(set(self.jobs))

    @cached_property
    def tokens(self) -> int:
        """Padded tokens as the runtime lays the rows out: every row padded to the longest part's rows."""
        longest = max((p.tokens / p.rows for p in self.parts if p.rows), default=0.0)
        return math.ceil(self.rows * longest)


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
    max_in_flight: int | None = None
    """At most this many micro-batches forwarded but not yet backwarded on any stage (None: unbounded)."""
    max_in_flight_tokens: int | None = None
    """At most this many padded tokens (`MicroBatch.tokens`) forwarded but not backwarded (None: unbounded)."""
    paused: frozenset[str] = frozenset()
    """Jobs under way that start this plan paused (`JobSteps.paused`): they hold no gradients or
    optimizer state on the device until they run again."""

    @property
    def num_stages(self) -> int:
        return len(self.stages)


class ScheduleError(ValueError):
    """A schedule that would compute something wrong or hang; the message says which action."""


@dataclass(frozen=True)
class CostModel:
    """Seconds of each action and message, for generating the lora order and for `sim.simulate`.

    F of a micro-batch on stage s takes `action_overhead[s] + forward_per_token[s] * tokens` (padded
    tokens), B `action_overhead[s] + backward_per_token[s] * tokens` (default: `backward_ratio`
    times the forward's per-token part), S `step_seconds[s]`; each may be one value for every stage.
    A micro-batch that fuses k jobs adds `fused_job_overhead[s] * (k - 1)` to its F and to its B
    (each job's adapters run their own small kernels in every projection).
    A message of `tokens * activation_bytes_per_token` bytes occupies its link (one per direction
    per adjacent pair, FIFO) for bytes / `link_bandwidth` and arrives `link_latency` later; sends
    are asynchronous, so communication overlaps compute.
    """

    forward_per_token: float | tuple[float, ...] = 1.0
    backward_ratio: float = 2.0
    step_seconds: float | tuple[float, ...] = 0.0
    action_overhead: float | tuple[float, ...] = 0.0
    link_latency: float = 0.0
    link_bandwidth: float = math.inf
    activation_bytes_per_token: float = 0.0
    backward_per_token: float | tuple[float, ...] | None = None
    fused_job_overhead: float | tuple[float, ...] = 0.0

    _PER_STAGE = ("forward_per_token", "backward_per_token", "step_seconds", "action_overhead",
                  "fused_job_overhead")

    def __post_init__(self) -> None:
        # per stage: (action_overhead, fused_job_overhead, forward per token, backward per token),
        # filled as stages are asked for (a plan asks at every action)
        object.__setattr__(self, "_by_stage", {})
        values: list[tuple[str, float]] = []
        for name in self._PER_STAGE:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(x) for x in value))
                values += [(name, v) for v in getattr(self, name)]
            elif value is not None:
                values.append((name, value))
        for name, value in values + [
            ("backward_ratio", self.backward_ratio),
            ("link_latency", self.link_latency),
            ("activation_bytes_per_token", self.activation_bytes_per_token),
        ]:
            if not value >= 0:
                raise ScheduleError(f"CostModel.{name}: must be >= 0, got {value!r}")
        if not self.link_bandwidth > 0:
            raise ScheduleError(f"CostModel.link_bandwidth: must be > 0 bytes/s, got {self.link_bandwidth!r}")

    def check_stages(self, num_stages: int) -> None:
        for name in self._PER_STAGE:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_stages:
                raise ScheduleError(f"CostModel.{name}: {len(value)} values for {num_stages} stages")

    @staticmethod
    def _at(value: float | tuple[float, ...], stage: int) -> float:
        return value[stage] if isinstance(value, tuple) else value

    def _per_token(self, stage: int) -> float:
        return self._at(self.forward_per_token, stage)

    def _stage(self, stage: int) -> tuple[float, float, float, float]:
        found = self._by_stage.get(stage)  # type: ignore[attr-defined]
        if found is None:
            backward = (self.backward_ratio * self._per_token(stage) if self.backward_per_token is None
                        else self._at(self.backward_per_token, stage))
            found = (self._at(self.action_overhead, stage), self._at(self.fused_job_overhead, stage),
                     self._per_token(stage), backward)
            self._by_stage[stage] = found  # type: ignore[attr-defined]
        return found

    def forward(self, stage: int, tokens: int, jobs: int = 1) -> float:
        overhead, per_job, per_token, _ = self._stage(stage)
        return overhead + per_job * max(jobs - 1, 0) + per_token * tokens

    def backward(self, stage: int, tokens: int, jobs: int = 1) -> float:
        overhead, per_job, _, per_token = self._stage(stage)
        return overhead + per_job * max(jobs - 1, 0) + per_token * tokens

    def step(self, stage: int) -> float:
        return self._at(self.step_seconds, stage)

    def wire(self, tokens: int) -> float:
        """Seconds a message occupies its link."""
        nbytes = tokens * self.activation_bytes_per_token
        return 0.0 if nbytes == 0 else nbytes / self.link_bandwidth


@dataclass
class Link:
    """One direction between two adjacent stages: messages leave and arrive in FIFO order."""

    cost: CostModel
    free_at: float = 0.0

    def send(self, ready: float, tokens: int) -> float:
        """A message ready to leave at `ready`; returns when it has arrived."""
        start = max(ready, self.free_at)
        self.free_at = start + self.cost.wire(tokens)
        return self.free_at + self.cost.link_latency


def _parts(job: JobSteps, evals: bool = True) -> list[MicroBatchPart]:
    """A job's micro-batches in training order; an evaluation after k steps comes right before
    step k's first micro-batch (or after the last step)."""
    return list(_iter_parts(job, evals))


def _iter_parts(job: JobSteps, evals: bool = True) -> Iterator[MicroBatchPart]:
    """`_parts`, made one at a time (a long job has millions: the generator holds only its next one)."""
    points = {p.after: p for p in job.evals} if evals else {}

    def evaluation(point: EvalPoint) -> Iterator[MicroBatchPart]:
        end = point.first_micro + len(point.micro_batches)
        for micro, (rows, tokens) in enumerate(point.micro_batches, start=point.first_micro):
            yield MicroBatchPart(job.name, point.after, micro, micro == end - 1, rows, tokens, eval=True)

    for step, micros in enumerate(job.micro_batches, start=job.first_step):
        if step in points:
            yield from evaluation(points.pop(step))
        offset = job.first_micro if step == job.first_step else 0
        for micro, (rows, tokens) in enumerate(micros, start=offset):
            yield MicroBatchPart(job.name, step, micro, micro == offset + len(micros) - 1, rows, tokens)
    for after in sorted(points):
        yield from evaluation(points[after])


def form_micro_batches(jobs: Sequence[JobSteps], policy: str, fuse: bool = True) -> list[MicroBatch]:
    """The micro-batches a policy runs on ONE stage, in the order they enter the pipeline.

    (With several stages the lora micro-batches are formed while generating the order: see
    `build_schedule`.)
    """
    if policy not in POLICIES:
        raise ScheduleError(f"unknown schedule policy {policy!r}")
    parts = [group for groups in _groups(jobs, policy, fuse) for group in groups]
    return [MicroBatch(i, group) for i, group in enumerate(parts)]


def _groups(jobs: Sequence[JobSteps], policy: str, fuse: bool) -> Iterator[list[tuple[MicroBatchPart, ...]]]:
    """The parts of the micro-batches `form_micro_batches` forms, in its order, a group at a time:
    for gpipe and 1f1b a job's step (or evaluation), whose actions are made together; for lora one
    slot (one micro-batch of every live job: fused, or each alone)."""
    if policy == "lora":
        for slot in itertools.zip_longest(*(_iter_parts(job) for job in jobs)):
            live = [p for p in slot if p is not None]
            if fuse:  # evaluation rows run without a gradient: never in a training micro-batch
                yield [g for g in (tuple(p for p in live if p.eval), tuple(p for p in live if not p.eval)) if g]
            else:
                yield [(p,) for p in live]
        return
    for job in jobs:
        group: list[tuple[MicroBatchPart, ...]] = []
        for part in _iter_parts(job):
            if group and (group[-1][0].step, group[-1][0].eval) != (part.step, part.eval):
                yield group
                group = []
            group.append((part,))
        if group:
            yield group


class _Sizes:
    """A job's training micro-batches as arrays, to weigh groupings of jobs in C, not Python: a
    long run has millions of micro-batches, and `group_jobs` weighs dozens of groupings."""

    __slots__ = ("rows", "per_row", "tokens", "total_rows")

    def __init__(self, job: JobSteps) -> None:
        sizes = job.micro_batches
        self.rows = sizes.rows
        """rows of each micro-batch."""
        self.per_row = np.divide(sizes.tokens, self.rows, out=np.zeros(len(self.rows)), where=self.rows > 0)
        """padded tokens per row (0.0 for an empty micro-batch): a double, as Python's `t / r`."""
        self.tokens = job.tokens
        """`JobSteps.tokens`."""
        self.total_rows = int(self.rows.sum())


def micro_extent(job: JobSteps) -> tuple[int, int]:
    """(most rows, longest padded row) of any of `job`'s training micro-batches; (0, 0) without any."""
    z = _Sizes(job)
    if not len(z.rows):
        return 0, 0
    return int(z.rows.max()), int(np.ceil(z.per_row).max())


def _fused_arrays(sizes: Sequence[_Sizes]) -> tuple[np.ndarray, np.ndarray]:
    """(padded tokens, jobs) of each micro-batch of jobs fused slot by slot, as `MicroBatch.tokens`
    counts them: the slot's rows padded to its longest row."""
    length = max((len(z.rows) for z in sizes), default=0)
    rows = np.zeros(length, dtype=np.int64)
    longest = np.zeros(length)
    jobs = np.zeros(length, dtype=np.int64)
    for z in sizes:
        n = len(z.rows)
        rows[:n] += z.rows
        np.maximum(longest[:n], z.per_row, out=longest[:n])
        jobs[:n] += 1
    return np.ceil(rows * longest).astype(np.int64), jobs


_Live = list[tuple[int, _Sizes]]
"""The jobs to group, each as (its index in the jobs given, its sizes)."""


@dataclass(frozen=True)
class _Fused:
    """A group of jobs fused slot by slot, as weighing it needs: its micro-batches' padded tokens
    (`_fused_arrays`), their count, the jobs beyond the first summed over them, and the largest by
    (padded tokens, jobs)."""

    tokens: int
    count: int
    extra_jobs: int
    largest: tuple[int, int]


class _Weigher:
    """Weighs groups of jobs, each set of jobs once: `group_jobs` and `choose_streams` try dozens of
    packings, each reading every micro-batch of every job, and groups recur among them (every job
    alone, for one: 128 jobs made 48,000 groups of which 9,500 differed)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, ...], _Fused] = {}
        self._tokens: dict[tuple[int, ...], int] = {}

    def tokens(self, group: _Live) -> int:
        """`_Fused.tokens` alone (what a packing's balance needs)."""
        key = tuple(sorted(i for i, _ in group))
        found = self._tokens.get(key)
        if found is None:
            found = self._tokens[key] = int(_fused_arrays([z for _, z in group])[0].sum())
        return found

    def fused(self, group: _Live) -> _Fused:
        key = tuple(sorted(i for i, _ in group))
        found = self._memo.get(key)
        if found is None:
            tokens, jobs = _fused_arrays([z for _, z in group])
            if len(tokens):
                most = int(tokens.max())
                largest = (most, int(jobs[tokens == most].max()))
            else:
                largest = (0, 0)
            found = self._memo[key] = _Fused(int(tokens.sum()), len(tokens), int(np.maximum(jobs - 1, 0).sum()),
                                             largest)
        return found


def _pack_lpt(live: _Live, count: int) -> list[_Live]:
    """Largest total tokens first into the lightest group."""
    lightest = [(0, k) for k in range(count)]  # (load, group): a heap, least loaded (then first) on top
    members: list[_Live] = [[] for _ in range(count)]
    for i, z in sorted(live, key=lambda iz: (-iz[1].tokens, iz[0])):
        load, g = lightest[0]
        heapq.heapreplace(lightest, (load + z.tokens, g))
        members[g].append((i, z))
    return members


def _pack_by_length(live: _Live, count: int) -> list[_Live]:
    """Jobs sorted by mean row length, cut into `count` runs of about equal tokens (little padding)."""
    order = sorted(live, key=lambda iz: (iz[1].tokens / max(1, iz[1].total_rows), iz[0]))
    total = sum(z.tokens for _, z in order)
    members: list[_Live] = [[] for _ in range(count)]
    done, g = 0, 0
    for pos, (i, z) in enumerate(order):
        left = len(order) - pos
        # next group once this one reached its share, or when the rest are needed one per group
        if members[g] and g < count - 1 and (done + z.tokens / 2 > total * (g + 1) / count or left <= count - 1 - g):
            g += 1
        members[g].append((i, z))
        done += z.tokens
    return members


def _packing(live: _Live, count: int, weigh: _Weigher, bound: float | None = None
             ) -> tuple[list[_Live], tuple[int, float]] | None:
    """The better of the two packings of `live` into `count` groups (fewer padded tokens), with its
    (padded tokens, largest over smallest group load). With `bound`, a packing stops being weighed
    once its padded tokens must exceed it (a group's are never fewer than its jobs' own), and None
    when both do: the caller only wants packings within it, and the better one never exceeds it
    while the other does not."""
    options = []
    for k, members in enumerate((_pack_lpt(live, count), _pack_by_length(live, count))):
        groups = [m for m in members if m]
        left = sum(z.tokens for _, z in live)  # the unweighed groups' own tokens: a floor on their padded ones
        loads: list[int] = []
        for m in groups:
            left -= sum(z.tokens for _, z in m)
            loads.append(weigh.tokens(m))
            if bound is not None and sum(loads) + left > bound:
                break
        else:
            options.append(((sum(loads), max(loads) / max(1, min(loads))), k, members))
    if not options:
        return None
    padded, _, members = min(options, key=lambda o: (o[0][0], o[1]))
    return members, padded


def _balanced(padded: int, spread: float, raw: int) -> bool:
    return padded <= (1 + BALANCE) * raw and spread <= 1 + BALANCE


def group_jobs(
    jobs: Sequence[JobSteps], num_stages: int, fuse: bool = True, streams: int | None = None
) -> list[list[JobSteps]]:
    """The lora streams: which jobs share (fused) micro-batches.

    One stage needs no independent streams: one group (every live job in each micro-batch). With
    S >= 2 stages, a stream with N micro-batches per step waits S-1 slots for its last backward
    before its next step may start, so the pipeline stays full when G streams satisfy
    (G-1)*N >= S-1 (`lora_bubble`); G >= S does it even for N = 1, and one more stream absorbs jobs
    of unequal length. So jobs are fused only when there are more than S+1 of them, into the fewest
    groups G >= S+1 that cost what the jobs cost apart, within `BALANCE`: the groups' padded tokens
    (rows of a fused micro-batch are padded to its longest row) exceed the jobs' own by at most
    that fraction, and the groups' loads differ by at most that fraction (the streams' micro-batches
    must cost about the same, or the pipeline's rhythm breaks: a 2:1 mix of fused sizes costs more
    than fusion saves). Two packings are tried for each G: largest first into the lightest group,
    and runs of jobs of similar row length. When no G qualifies each job is its own stream.
    `streams` forces G (the packing with fewer padded tokens). Fusion never lowers the bubble in a
    token-linear cost model; it pays in per-micro-batch costs (kernel launches, small GEMMs,
    messages: `CostModel.action_overhead`) and costs activation memory (a fused micro-batch holds
    every member's activations). Groups keep the jobs' input order.
    """
    if streams is not None and streams < 1:
        raise ScheduleError(f"streams: need at least 1, got {streams}")
    live = [(i, _Sizes(j)) for i, j in enumerate(jobs) if j.steps]
    return [[jobs[i] for i, _ in m] for m in _group(live, num_stages, fuse, streams, _Weigher())]


def _group(live: _Live, num_stages: int, fuse: bool, streams: int | None, weigh: _Weigher) -> list[_Live]:
    """`group_jobs` of the `live` jobs, each group in input order, the groups by their first job."""
    if not live:
        return []
    raw = sum(z.tokens for _, z in live)
    if not fuse:
        members = [[iz] for iz in live]
    elif num_stages == 1 and streams is None:
        members = [live]
    elif streams is not None:
        forced = _packing(live, min(streams, len(live)), weigh)
        assert forced is not None
        members = forced[0]
    else:
        members = [[iz] for iz in live]
        for g in range(num_stages + 1, len(live)):
            found = _packing(live, g, weigh, bound=(1 + BALANCE) * raw)
            if found is not None and _balanced(*found[1], raw):
                members = found[0]
                break
    groups = [sorted(m, key=lambda iz: iz[0]) for m in members if m]
    groups.sort(key=lambda m: m[0][0])
    return groups


FUSION_MARGIN = 0.01
"""`choose_streams` departs from `group_jobs`'s rule only for a predicted gain above this fraction,
so that a probe's noise does not flip between two groupings of about the same cost."""


def min_streams(jobs: Sequence[JobSteps], num_stages: int, hide_latency: bool = False) -> int:
    """The fewest lora streams that keep S stages busy with a slot to spare: 1 + ceil(W / N), W the
    micro-batches a stream's round trip spans on stage 0 (the in-flight window: S, or 2S-1 with
    `hide_latency`), N the fewest micro-batches in any step of `jobs`. With (G-1)*N >= W the other
    streams cover a stream's round trip (`lora_bubble`), and the extra slot absorbs what the unit
    model leaves out (optimizer steps, messages, jobs of unequal length)."""
    window = 2 * num_stages - 1 if hide_latency and num_stages > 1 else num_stages
    counts = [c[c > 0] for c in (j.micro_batches.counts for j in jobs)]
    n = min((int(c.min()) for c in counts if len(c)), default=1)
    return 1 + -(-window // n)


def grouping_seconds(groups: Sequence[Sequence[JobSteps]], num_stages: int, cost: CostModel) -> float:
    """Predicted busy time of the slowest stage for these lora streams: every fused micro-batch's
    forward and backward, plus S-1 of the largest for the fill and the drain. Fusing k jobs saves
    the per-action overhead of k-1 micro-batches (less what each extra job adds, `fused_job_overhead`)
    and lengthens the fill and drain k times."""
    weigh, at = _Weigher(), itertools.count()
    return _grouping_seconds([weigh.fused([(next(at), _Sizes(j)) for j in g]) for g in groups if g], num_stages, cost)


def _grouping_seconds(fused: Sequence[_Fused], num_stages: int, cost: CostModel) -> float:
    """`grouping_seconds` of the groups weighed: each stage's sum over the micro-batches in closed
    form (a forward or backward is linear in tokens and jobs), not a Python call per micro-batch."""
    count = sum(f.count for f in fused)
    if not count:
        return 0.0
    tokens = sum(f.tokens for f in fused)
    extra_jobs = sum(f.extra_jobs for f in fused)
    largest = max(f.largest for f in fused if f.count)

    def slot(s: int, tokens: int, jobs: int) -> float:
        return cost.forward(s, tokens, jobs) + cost.backward(s, tokens, jobs)

    def busy(s: int) -> float:
        overhead, per_job, forward, backward = cost._stage(s)
        return 2 * (count * overhead + per_job * extra_jobs) + (forward + backward) * tokens

    return max(busy(s) + (num_stages - 1) * slot(s, *largest) for s in range(num_stages))


def choose_streams(jobs: Sequence[JobSteps], num_stages: int, cost: CostModel, hide_latency: bool = False
                   ) -> int | None:
    """lora streams for `pipeline.streams: null` on hardware whose per-action cost was measured:
    of every balanced packing into G >= `min_streams` groups (each job alone included), the one
    `grouping_seconds` predicts fastest, if it beats `group_jobs`'s rule by `FUSION_MARGIN`; else
    None (keep the rule). Without a per-action cost in `cost` fusion cannot pay: None."""
    if num_stages < 2 or not any(cost.action_overhead if isinstance(cost.action_overhead, tuple)
                                 else (cost.action_overhead,)):
        return None
    live = [(i, _Sizes(j)) for i, j in enumerate(jobs) if j.steps]
    if not live:
        return None
    raw = sum(z.tokens for _, z in live)
    weigh = _Weigher()

    def seconds(members: list[_Live]) -> float:
        return _grouping_seconds([weigh.fused(m) for m in members if m], num_stages, cost)

    rule = seconds(_group(live, num_stages, True, None, weigh))
    best: tuple[float, int] | None = None
    for g in range(min_streams([jobs[i] for i, _ in live], num_stages, hide_latency), len(live) + 1):
        if g < len(live):
            found = _packing(live, g, weigh, bound=(1 + BALANCE) * raw)
            if found is None or not _balanced(*found[1], raw):
                continue
            members = found[0]
        else:
            members = [[iz] for iz in live]
        predicted = seconds(members)
        if best is None or predicted < best[0]:
            best = (predicted, g)
    if best is None or best[0] >= (1 - FUSION_MARGIN) * rule:
        return None
    return best[1]


# ---------------------------------------------------------------------------------------------
# Per-stage orders.


def _single_stage(micro_batches: Sequence[MicroBatch]) -> tuple[Action, ...]:
    actions: list[Action] = []
    for mb in micro_batches:
        actions.append(Action("F", mb.id))
        if mb.eval:
            continue
        actions.append(Action("B", mb.id))
        for part in mb.parts:
            if part.last_in_step:
                actions.append(Action("S", job=part.job, step=part.step))
    return tuple(actions)


def _gpipe_step(group: Sequence[MicroBatch]) -> tuple[Action, ...]:
    """One stage's gpipe actions for a job's step: every forward, then every backward, then `S`
    (an evaluation: its forwards)."""
    actions = [Action("F", mb.id) for mb in group]
    if group[0].eval:
        return tuple(actions)
    part = group[-1].parts[0]
    return tuple(actions + [Action("B", mb.id) for mb in group] + [Action("S", job=part.job, step=part.step)])


def _one_f_one_b_step(group: Sequence[MicroBatch], stage: int, num_stages: int) -> tuple[Action, ...]:
    """One stage's 1f1b actions for a job's step: min(S-1-s, N) forwards, then one forward and one
    backward at a time, then the remaining backwards and `S` (an evaluation: its forwards)."""
    if group[0].eval:
        return tuple(Action("F", mb.id) for mb in group)
    n = len(group)
    warm = min(num_stages - 1 - stage, n)
    actions = [Action("F", mb.id) for mb in group[:warm]]
    for i in range(n - warm):
        actions.append(Action("F", group[warm + i].id))
        actions.append(Action("B", group[i].id))
    actions += [Action("B", mb.id) for mb in group[n - warm:]]
    part = group[-1].parts[0]
    actions.append(Action("S", job=part.job, step=part.step))
    return tuple(actions)


class _Parts:
    """One job's parts not injected yet, made as the generator reaches them."""

    __slots__ = ("head", "_rest")

    def __init__(self, parts: Iterator[MicroBatchPart]) -> None:
        self._rest = parts
        self.head: MicroBatchPart | None = next(parts, None)

    def __bool__(self) -> bool:
        return self.head is not None

    def popleft(self) -> MicroBatchPart:
        part = self.head
        assert part is not None
        self.head = next(self._rest, None)
        return part

    def rest(self) -> list[MicroBatchPart]:
        """Every part left, taken (a plan cut short hands them to the next one)."""
        out = []
        while self.head is not None:
            out.append(self.popleft())
        return out


@dataclass
class _Stream:
    """One lora stream: a group of jobs whose ready next parts are fused at each injection."""

    jobs: list[JobSteps]
    parts: list[_Parts]  # per job, its remaining parts in training order
    total: int
    largest: int
    """Padded tokens of the largest micro-batch this stream can inject (any mix of its jobs' parts)."""
    injected: int = 0

    @staticmethod
    def of(group: Sequence[JobSteps]) -> "_Stream":
        sizes = [(np.concatenate([j.micro_batches.rows] + [np.array([r for r, _ in p.micro_batches], np.int64)
                                                           for p in j.evals]),
                  np.concatenate([j.micro_batches.tokens] + [np.array([t for _, t in p.micro_batches], np.int64)
                                                             for p in j.evals])) for j in group]
        if len(group) == 1:
            largest = int(sizes[0][1].max(initial=0))
        else:
            rows = sum(int(r.max(initial=0)) for r, _ in sizes)
            length = max((float(np.divide(t, r, out=np.zeros(len(r)), where=r > 0).max(initial=0.0))
                          for r, t in sizes), default=0.0)
            largest = math.ceil(rows * length)
        return _Stream(list(group), [_Parts(_iter_parts(j)) for j in group],
                       total=max(1, sum(j.tokens for j in group)), largest=largest)

    @property
    def done(self) -> bool:
        return not any(self.parts)

    @property
    def mid_step(self) -> bool:
        """Some job of the stream has injected part of a step, not all of it."""
        return any(q.head is not None and q.head.micro > 0 for q in self.parts)


@dataclass
class _Clock:
    """The lora generator's state: a clock-driven run of the pipeline that records what each stage does.

    It runs in steps (`run(until)`), each handing over what it generated (`take`): actions come out
    in the order of their simulated start, so every stretch is the next part of every stage's list,
    and it keeps only the micro-batches still in flight and each job's next part."""

    num_stages: int
    cost: CostModel
    bound: int | None  # micro-batches in flight per stage
    token_bound: int | None  # padded tokens in flight per stage
    streams: list[_Stream]
    admission: Admission | None = None

    def __post_init__(self) -> None:
        n = self.num_stages
        self.actions: list[list[Action]] = [[] for _ in range(n)]
        self.count = 0  # micro-batches injected so far (the next one's id)
        self.live: dict[int, MicroBatch] = {}  # injected, not yet done on every stage
        self.fresh: list[MicroBatch] = []  # injected since the last `take`
        self.free = [0.0] * n
        self.fwd_q: list[deque[tuple[float, int]]] = [deque() for _ in range(n)]  # activations arrived/arriving
        self.bwd_q: list[deque[tuple[float, int]]] = [deque() for _ in range(n)]  # gradients arrived/arriving
        self.fwd_links = [Link(self.cost) for _ in range(n - 1)]
        self.bwd_links = [Link(self.cost) for _ in range(n - 1)]
        self.in_flight = [0] * n
        self.in_flight_tokens = [0] * n
        self.largest = max((st.largest for st in self.streams), default=0)
        self.by_name = {j.name: j for st in self.streams for j in st.jobs}
        self.pending: list[dict[tuple[str, int], int]] = [{} for _ in range(n)]  # backwards left of steps begun
        # job -> (steps done on stage 0, when); a resumed job starts mid-plan
        self.stepped: dict[str, tuple[int, float]] = {j.name: (j.first_step, 0.0) for st in self.streams for j in st.jobs}
        self.last_step = {j.name: j.first_step + j.steps - 1 for st in self.streams for j in st.jobs if j.steps}
        order = self.admission.order if self.admission is not None else tuple(self.last_step)
        self.urgency = {name: k for k, name in enumerate(order)}
        self.queue = deque(name for name in order if name in self.last_step)
        self.running: set[str] = set()
        # Jobs done training: their remaining evaluations still run (they hold no gradients or optimizer
        # state, so admission no longer counts them).
        self.finished = {j.name for st in self.streams for j in st.jobs if not j.steps and j.evals}
        self._candidates: list[tuple[float, str] | None] | None = None
        self._stream_of = {j.name: i for i, st in enumerate(self.streams) for j in st.jobs}
        # each stream's `_stream_ready`, None where it may have changed: it changes only when the
        # stream injects, one of its jobs steps on stage 0, or the jobs admitted change
        self._ready: list[float | None] = [None] * len(self.streams)

    def admit(self, now: float) -> None:
        """Start the jobs that hold their state already, then queued jobs, in order, while the next
        one fits next to the running ones."""
        fits = self.admission.fits if self.admission is not None else None
        holding = self.admission.holding if self.admission is not None else frozenset()
        for name in [n for n in self.queue if n in holding]:
            self.queue.remove(name)
            self.running.add(name)
            done, _ = self.stepped.get(name, (0, 0.0))
            self.stepped[name] = (done, now)
        while self.queue and (fits is None or fits(frozenset(self.running | {self.queue[0]}))):
            name = self.queue.popleft()
            self.running.add(name)
            done, _ = self.stepped.get(name, (0, 0.0))
            self.stepped[name] = (done, now)
        if self.queue and not self.running:
            raise ScheduleError(f"job {self.queue[0]!r} does not fit on its own (admission refuses it alone)")
        self._ready = [None] * len(self.streams)

    def _part_ready(self, part: MicroBatchPart) -> float:
        if part.job not in self.running and not (part.eval and part.job in self.finished):
            return math.inf
        done, when = self.stepped.get(part.job, (0, 0.0))
        return when if done == part.step else math.inf

    def _stream_ready(self, stream: _Stream) -> float:
        return min((self._part_ready(q.head) for q in stream.parts if q.head is not None), default=math.inf)

    def _ready_at(self, i: int) -> float:
        """`_stream_ready` of stream `i`, kept until it may change."""
        ready = self._ready[i]
        if ready is None:
            ready = self._ready[i] = self._stream_ready(self.streams[i])
        return ready

    def _candidate(self, s: int) -> tuple[float, str] | None:
        b_at = self.bwd_q[s][0][0] if self.bwd_q[s] else math.inf
        f_at = math.inf
        # Only stage 0 is bounded: what is in flight on stage s was in flight on stage 0 when it
        # injected, so every later stage stays within the same bounds.
        if s > 0 or self._may_inject():
            if s == 0:
                f_at = min(map(self._ready_at, range(len(self.streams))), default=math.inf)
            elif self.fwd_q[s]:
                f_at = self.fwd_q[s][0][0]
        first = min(b_at, f_at)
        if first == math.inf:
            return None
        start = max(self.free[s], first)
        return start, ("B" if b_at <= start else "F")

    def _may_inject(self) -> bool:
        if self.bound is not None and self.in_flight[0] >= self.bound:
            return False
        # room for the largest micro-batch, whichever gets injected
        return self.token_bound is None or self.in_flight_tokens[0] + self.largest <= self.token_bound

    def _inject(self, start: float) -> MicroBatch:
        ready = [st for i, st in enumerate(self.streams) if self._ready_at(i) <= start]
        # finish injecting a step once started (streams then reach their step boundaries staggered,
        # and each one's round trip is covered by the others' steps); else the least advanced stream
        if self.admission is None or self.admission.share:
            stream = min(ready, key=lambda st: (not st.mid_step, st.injected / st.total))
        else:  # the most urgent ready job's stream
            stream = min(ready, key=lambda st: (not st.mid_step, min(
                self.urgency[q.head.job] for q in st.parts
                if q.head is not None and self._part_ready(q.head) <= start)))
        ready_queues = [q for q in stream.parts if q.head is not None and self._part_ready(q.head) <= start]
        # evaluation rows run without a gradient: never fused with training rows, and they go first
        evaluations = [q for q in ready_queues if q.head is not None and q.head.eval]
        parts = tuple(q.popleft() for q in (evaluations or ready_queues))
        self._ready[self._stream_of[parts[0].job]] = None
        mb = MicroBatch(self.count, parts)
        self.count += 1
        stream.injected += sum(p.tokens for p in parts if not p.eval)
        self.live[mb.id] = mb
        self.fresh.append(mb)
        return mb

    def run(self, until: int | None = None) -> bool:
        """Generate, in order of simulated start, until stage 0 would inject micro-batch `until`
        (None: to the end); True once every stage's list is complete. Starts never go backwards (an
        action only enqueues work that starts after it), so what one call generates follows, on
        every stage, what the calls before it did."""
        n = self.num_stages
        if self._candidates is None:
            self.admit(0.0)
            self._candidates = [self._candidate(s) for s in range(n)]
        # A stage's candidate depends on its own queues and clock, and stage 0's also on what is in
        # flight and which jobs have stepped, all of which only stage 0 changes; an action on stage s
        # fills the queues of s - 1 and s + 1. So only those three candidates are recomputed.
        candidates = self._candidates
        while True:
            best: tuple[float, int, str] | None = None
            for s, cand in enumerate(candidates):
                # earliest start first; on a tie the later stage (drain before fill)
                if cand is not None and (best is None or cand[0] <= best[0]):
                    best = (cand[0], s, cand[1])
            if best is None:
                break
            start, s, kind = best
            if kind == "F" and s == 0 and until is not None and self.count >= until:
                return False
            if kind == "F":
                mb = self._inject(start) if s == 0 else self.live[self.fwd_q[s].popleft()[1]]
                end = start + self.cost.forward(s, mb.tokens, mb.job_count)
                self.actions[s].append(Action("F", mb.id))
                if not mb.eval:  # an evaluation keeps no activation for a backward
                    self.in_flight[s] += 1
                    self.in_flight_tokens[s] += mb.tokens
                if s < n - 1:
                    self.fwd_q[s + 1].append((self.fwd_links[s].send(end, mb.tokens), mb.id))
                elif not mb.eval:
                    self.bwd_q[s].append((end, mb.id))
                else:  # an evaluation is done once the last stage has forwarded it
                    del self.live[mb.id]
            else:
                mb = self.live[self.bwd_q[s].popleft()[1]]
                end = start + self.cost.backward(s, mb.tokens, mb.job_count)
                self.actions[s].append(Action("B", mb.id))
                self.in_flight[s] -= 1
                self.in_flight_tokens[s] -= mb.tokens
                if s > 0:
                    self.bwd_q[s - 1].append((self.bwd_links[s - 1].send(end, mb.tokens), mb.id))
                else:  # stage 0's backward is a training micro-batch's last action
                    del self.live[mb.id]
                for part in mb.parts:
                    key = (part.job, part.step)
                    left = self.pending[s].pop(key, None)
                    if left is None:
                        job = self.by_name[part.job]
                        left = job.micro_batches.micros_in(part.step - job.first_step)
                    if left > 1:
                        self.pending[s][key] = left - 1
                    else:
                        self.actions[s].append(Action("S", job=part.job, step=part.step))
                        end += self.cost.step(s)
                        if s == 0:
                            self.stepped[part.job] = (part.step + 1, end)
                            self._ready[self._stream_of[part.job]] = None
                            if part.step == self.last_step[part.job]:  # finished on every stage
                                self.running.discard(part.job)
                                self.finished.add(part.job)
                                self.admit(end)
            self.free[s] = end
            for t in range(max(0, s - 1), min(n, s + 2)):
                candidates[t] = self._candidate(t)
        if any(not st.done for st in self.streams):  # pragma: no cover - the generator never stalls
            raise ScheduleError("lora generator stalled with micro-batches left\n" + render(
                Schedule("lora", tuple(self.fresh), tuple(tuple(a) for a in self.actions))))
        return True

    def take(self) -> tuple[tuple[MicroBatch, ...], tuple[tuple[Action, ...], ...]]:
        """The micro-batches injected and every stage's actions generated since the last call."""
        fresh, actions = tuple(self.fresh), tuple(tuple(a) for a in self.actions)
        self.fresh = []
        self.actions = [[] for _ in range(self.num_stages)]
        return fresh, actions

    def unplanned(self) -> list[MicroBatchPart]:
        """Every part not injected yet, taken (stream by stream, job by job, in training order)."""
        return [part for st in self.streams for q in st.parts for part in q.rest()]


class _Counted:
    """One stage's list by counts, made as its inputs arrive (`feed`): forward the next micro-batch
    while fewer than `window` are in flight, its jobs have stepped here, and the stage before (its
    list: `upstream`) forwards it before it backwards the micro-batch this stage would otherwise
    backward; else backward the oldest. A job's `S` follows its step's last backward. Independent
    of timing, so a message's latency shifts this stage's work without reordering it. The upstream
    rule keeps the lists deadlock-free: the stage before backwards that micro-batch only after this
    stage does. Evaluation micro-batches are forwarded only and do not count against the window.

    Where a choice needs what is not made yet (the next micro-batch, or neither of the two upstream
    actions), it waits for the next `feed`; an upstream action not made yet comes after every one
    made, so one of the two suffices."""

    def __init__(self, window: int, jobs: dict[str, JobSteps]) -> None:
        self.window, self.jobs = window, jobs
        self.micro: dict[int, MicroBatch] = {}  # made, not yet done here
        self.count = 0  # micro-batches made
        self.training: deque[int] = deque()  # training micro-batches made, not yet backwarded here
        self.where: dict[tuple[str, int], int] = {}  # position of F and B actions in the upstream list
        self.upstream = 0  # upstream actions seen
        self.pending: dict[tuple[str, int], int] = {}  # backwards left of steps begun here
        self.stepped: dict[str, int] = {}
        self.f = 0  # next forward
        self.in_flight = 0

    @property
    def settled(self) -> int:
        """Every micro-batch below this id is done here in what is made so far."""
        return min(self.f, self.training[0] if self.training else self.f)

    def feed(self, micro_batches: Sequence[MicroBatch], upstream: Sequence[Action], complete: bool) -> list[Action]:
        """The next micro-batches and upstream actions made (`complete`: the last of them); returns
        this stage's next actions."""
        for mb in micro_batches:
            self.micro[mb.id] = mb
            for p in mb.parts:
                self.stepped.setdefault(p.job, p.step - 1)
            if not mb.eval:
                self.training.append(mb.id)
        self.count += len(micro_batches)
        for action in upstream:
            if action.kind != "S":
                self.where[(action.kind, action.micro_batch)] = self.upstream
            self.upstream += 1
        out: list[Action] = []
        while True:
            forward = self._may_forward(complete)
            if forward is None:
                return out
            if forward:
                mb = self.micro[self.f]
                out.append(Action("F", self.f))
                self.where.pop(("F", self.f), None)
                if mb.eval:
                    del self.micro[self.f]
                else:
                    self.in_flight += 1
                self.f += 1
                continue
            if self.in_flight == 0:
                if complete and self.f >= self.count:
                    return out
                raise ScheduleError(f"counted order stuck before forward {self.f}")  # pragma: no cover
            mb_id = self.training.popleft()
            self.where.pop(("B", mb_id), None)
            self.in_flight -= 1
            out.append(Action("B", mb_id))
            for p in self.micro.pop(mb_id).parts:
                key = (p.job, p.step)
                left = self.pending.pop(key, None)
                if left is None:
                    job = self.jobs[p.job]
                    left = job.micro_batches.micros_in(p.step - job.first_step)
                if left > 1:
                    self.pending[key] = left - 1
                else:
                    out.append(Action("S", job=p.job, step=p.step))
                    self.stepped[p.job] = p.step

    def _may_forward(self, complete: bool) -> bool | None:
        """Whether the next action is the forward of `f` (None: not known until more is made)."""
        if self.f >= self.count:
            return False if complete else None
        mb = self.micro[self.f]
        if not (mb.eval or self.in_flight < self.window):
            return False
        if not all(self.stepped[p.job] == p.step - 1 for p in mb.parts):
            return False
        if self.in_flight == 0:
            return True
        at_f, at_b = self.where.get(("F", self.f)), self.where.get(("B", self.training[0]))
        if at_f is not None and at_b is not None:
            return at_f < at_b
        if at_f is not None or at_b is not None:  # the one not made yet comes after it
            return at_f is not None
        return None


def _lora_clock(
    jobs: Sequence[JobSteps],
    num_stages: int,
    fuse: bool,
    cost: CostModel,
    bound: int,
    token_bound: bool,
    streams: int | None,
    admission: Admission | None = None,
) -> tuple[_Clock, int]:
    """The lora generator for `jobs`, not run yet, and its token bound (`bound` times the largest
    micro-batch)."""
    groups = group_jobs(jobs, num_stages, fuse, streams)
    groups += [[j] for j in jobs if not j.steps and j.evals]  # only an evaluation left (a plan cut in it)
    stream_objs = [_Stream.of(group) for group in groups]
    largest = max((st.largest for st in stream_objs), default=0)
    if token_bound:
        return _Clock(num_stages, cost, None, bound * largest, stream_objs, admission), bound * largest
    return _Clock(num_stages, cost, bound, None, stream_objs, admission), bound * largest


def build_schedule(
    jobs: Sequence[JobSteps],
    num_stages: int,
    policy: str = "lora",
    fuse: bool = True,
    cost: CostModel | None = None,
    max_in_flight: int | None = None,
    streams: int | None = None,
    token_bound: bool = False,
    admission: Admission | None = None,
    hide_latency: bool = False,
) -> Schedule:
    """Form the micro-batches and the per-stage action lists, then validate them.

    `cost` shapes the lora order (defaults to `CostModel()`: time proportional to padded tokens).
    lora bounds activation memory on every stage: at most `max_in_flight` micro-batches (default
    `num_stages`) forwarded but not backwarded. With `token_bound`, at most `max_in_flight` times
    the padded tokens of the largest micro-batch instead (recorded in
    `Schedule.max_in_flight_tokens`, no count bound): the same worst case, but small micro-batches
    may then fill the pipeline when sizes differ. `streams` overrides the number of lora streams
    (see `group_jobs`). `admission` decides which jobs run at once and who goes first (see
    `Admission`); gpipe and 1f1b run one job at a time, in its order.

    `hide_latency` (lora, several stages): 2S-1 micro-batches in flight on stage 0 (default bound),
    two fewer on each next stage, every stage after the first ordered by counts (`_Counted`). With
    one fewer per stage, as by default, a steady one-forward-one-backward rhythm cannot absorb the
    messages: each slot stretches by a round trip of two messages between neighbours (a period
    argument: stage s's backward must start one forward after its forward ends, modulo the slot,
    and the two hops shift that by 2 x latency at every stage). Two fewer per stage leaves a slot of
    slack at each; the price is about twice the activation memory.
    """
    return PlanStream(jobs, num_stages, policy, fuse, cost, max_in_flight, streams, token_bound, admission,
                      hide_latency).whole()


@dataclass(frozen=True)
class Segment:
    """The next stretch of a plan made as it runs (`PlanStream`): the micro-batches injected in it
    (ids consecutive, after the previous segment's) and every stage's next actions. A stage runs
    its lists of every segment one after another, as one list."""

    micro_batches: tuple[MicroBatch, ...]
    stages: tuple[tuple[Action, ...], ...]
    final: bool
    """The plan's last segment: every stage's list ends here."""


class PlanStream:
    """A plan made while it runs: `build_schedule`'s plan, handed out in `Segment`s of about
    `window` injected micro-batches each (None: one segment, the whole plan).

    A whole plan lists every action of every remaining step of every job, so it costs time and
    memory in proportion to the run. The lora generator runs a simulated clock, and what it
    generates comes out in order of simulated start: a segment is the next stretch of every
    part. With `hide_latency` the later stages' lists are ordered by counts (`_Counted`) as far as
    the stage before's list is made, and wait for the next segment where they cannot tell. gpipe,
    1f1b and a plan on one stage without admission come a job's step (or a slot) at a time, in
    segments of at least `window` micro-batches. The checks on the arguments are made here,
    before any segment.
    """

    def __init__(
        self,
        jobs: Sequence[JobSteps],
        num_stages: int,
        policy: str = "lora",
        fuse: bool = True,
        cost: CostModel | None = None,
        max_in_flight: int | None = None,
        streams: int | None = None,
        token_bound: bool = False,
        admission: Admission | None = None,
        hide_latency: bool = False,
        window: int | None = None,
    ) -> None:
        if num_stages < 1:
            raise ScheduleError(f"need at least one stage, got {num_stages}")
        if policy not in POLICIES:
            raise ScheduleError(f"unknown schedule policy {policy!r}")
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ScheduleError(f"job names must be unique, got {names}")
        cost = cost or CostModel()
        cost.check_stages(num_stages)
        spread = 2 if hide_latency and policy == "lora" and num_stages > 1 else 1
        bound = (spread * num_stages - (spread - 1)) if max_in_flight is None else max_in_flight
        if bound < 1:
            raise ScheduleError(f"max_in_flight: need at least 1, got {max_in_flight}")
        if admission is not None:
            if sorted(admission.order) != sorted(names):
                raise ScheduleError(f"admission order {list(admission.order)} does not list the jobs {names}")
            if policy != "lora":
                rank = {name: k for k, name in enumerate(admission.order)}
                # one job at a time: those holding their state go first, or they would hold it while others run
                jobs = sorted(jobs, key=lambda j: (j.name not in admission.holding, rank[j.name]))
                for j in jobs:
                    if j.steps and admission.fits is not None and not admission.fits(frozenset({j.name})):
                        raise ScheduleError(f"job {j.name!r} does not fit on its own (admission refuses it alone)")
        if window is not None and window < 1:
            raise ScheduleError(f"window: need at least 1 micro-batch, got {window}")
        custom = admission is not None and not admission.default
        self.policy, self.num_stages, self.window = policy, num_stages, window
        self.paused = frozenset(j.name for j in jobs if j.paused)
        self.max_in_flight: int | None = None
        self.max_in_flight_tokens: int | None = None
        self._clock: _Clock | None = None
        self._counted: list[_Counted] = []  # hide_latency: stages 1.. ordered by counts
        self._whole: Schedule | None = None
        self._given = 0  # segments handed out
        self.done = False
        self._source: Iterator[list[tuple[MicroBatchPart, ...]]] | None = None
        self._ahead: list[tuple[MicroBatchPart, ...]] | None = None  # the source's next group
        self._count = 0
        if num_stages == 1 and not (policy == "lora" and (custom or streams is not None)):
            # one stage needs no streams: each slot fuses every live job (unless streams are asked for)
            self._source = _groups(jobs, policy, fuse)
        elif policy == "lora":
            self._clock, tokens = _lora_clock(jobs, num_stages, fuse, cost, bound, token_bound, streams,
                                              admission if custom else None)
            self.max_in_flight, self.max_in_flight_tokens = (None, tokens) if token_bound else (bound, None)
            if spread > 1:  # stages after the first by counts: two fewer in flight on each
                by_name = {j.name: j for j in jobs}
                self._counted = [_Counted(max(1, bound - spread * s), by_name) for s in range(1, num_stages)]
        else:
            self._source = _groups(jobs, policy, fuse)
            self.max_in_flight = num_stages if policy == "1f1b" else None
        if self._source is not None:
            self._ahead = next(self._source, None)

    @staticmethod
    def of(schedule: Schedule) -> "PlanStream":
        """A plan made already, as a stream of one segment."""
        stream = PlanStream([], schedule.num_stages, schedule.policy)
        stream.max_in_flight, stream.max_in_flight_tokens = schedule.max_in_flight, schedule.max_in_flight_tokens
        stream.paused, stream._whole, stream._clock, stream._source = schedule.paused, schedule, None, None
        return stream

    def _schedule(self, micro_batches: tuple[MicroBatch, ...], stages: tuple[tuple[Action, ...], ...]) -> Schedule:
        return Schedule(self.policy, micro_batches, stages, max_in_flight=self.max_in_flight,
                        max_in_flight_tokens=self.max_in_flight_tokens, paused=self.paused)

    def next_segment(self) -> Segment | None:
        """The plan's next segment (None after the final one)."""
        if self.done:
            return None
        self._given += 1
        if self._whole is not None:
            self.done = True
            return Segment(self._whole.micro_batches, self._whole.stages, final=True)
        if self._source is not None:
            return self._next_groups()
        assert self._clock is not None
        until = None if self.window is None else self._clock.count + self.window
        self.done = self._clock.run(until)
        micro_batches, stages = self._clock.take()
        if self._counted:
            lists = [stages[0]]
            for counted in self._counted:
                lists.append(tuple(counted.feed(micro_batches, lists[-1], self.done)))
            stages = tuple(lists)
        return Segment(micro_batches, stages, final=self.done)

    def _next_groups(self) -> Segment:
        """gpipe, 1f1b and one stage: whole groups (a job's step, a slot) up to `window` micro-batches."""
        micro_batches: list[MicroBatch] = []
        stages: list[list[Action]] = [[] for _ in range(self.num_stages)]
        while self._ahead is not None and (self.window is None or len(micro_batches) < self.window):
            group = [MicroBatch(self._count + i, parts) for i, parts in enumerate(self._ahead)]
            self._count += len(group)
            micro_batches += group
            for s in range(self.num_stages):
                if self.num_stages == 1:
                    stages[s] += _single_stage(group)
                elif self.policy == "gpipe":
                    stages[s] += _gpipe_step(group)
                else:
                    stages[s] += _one_f_one_b_step(group, s, self.num_stages)
            self._ahead = next(self._source, None)  # type: ignore[arg-type]
        self.done = self._ahead is None
        return Segment(tuple(micro_batches), tuple(tuple(a) for a in stages), final=self.done)

    def settled(self) -> int:
        """Every micro-batch below this id is done on every stage in the segments made so far."""
        if self._whole is not None:
            return len(self._whole.micro_batches)
        if self._source is not None:  # a group's actions are made whole on every stage
            return self._count
        assert self._clock is not None
        return min([min(self._clock.live, default=self._clock.count)] + [c.settled for c in self._counted])

    def whole(self) -> Schedule:
        """Every segment, from the first, as one validated `Schedule`."""
        if self._given:
            raise ScheduleError("whole(): segments of this plan were handed out already")
        micro_batches: list[MicroBatch] = []
        stages: list[list[Action]] = [[] for _ in range(self.num_stages)]
        while (segment := self.next_segment()) is not None:
            micro_batches += segment.micro_batches
            for s, actions in enumerate(segment.stages):
                stages[s] += actions
        schedule = self._schedule(tuple(micro_batches), tuple(tuple(a) for a in stages))
        validate(schedule)
        return schedule


def cut_actions(schedule: Schedule, stage: int, position: int, cut: int) -> list[Action]:
    """What stage `stage` still runs of `schedule` when the plan changes at micro-batch `cut`
    (stage 0 has forwarded exactly the micro-batches below `cut`), from action `position` on:
    the forwards and backwards of micro-batches below `cut`, and the optimizer steps of the steps
    that lie wholly below it. Order is kept, and dropping actions only removes waits, so the cut
    lists of all stages run without deadlock (the original ones do)."""
    return cut_list(schedule.stages[stage][position:], schedule.micro_batches, cut)


def cut_list(actions: Sequence[Action], micro_batches: Iterable[MicroBatch], cut: int) -> list[Action]:
    """`cut_actions` on one stage's `actions`; `micro_batches` must hold every one at or after `cut`
    (a step with a part in none of them lies below it)."""
    below: dict[tuple[str, int], bool] = {}
    for mb in micro_batches:
        for part in mb.parts:
            if part.eval:
                continue
            key = (part.job, part.step)
            below[key] = below.get(key, True) and mb.id < cut
    return [a for a in actions
            if (a.kind == "S" and below.get((a.job, a.step), True)) or (a.kind != "S" and a.micro_batch < cut)]


def remaining_steps(schedule: Schedule, cut: int) -> list[JobSteps]:
    """Each job's parts at or after micro-batch `cut`, as `JobSteps` for the next plan (a step or an
    evaluation that straddles the cut continues there with `first_micro`); jobs in order of first
    appearance."""
    parts: dict[str, list[MicroBatchPart]] = {}
    for mb in schedule.micro_batches[cut:]:
        for part in mb.parts:
            parts.setdefault(part.job, []).append(part)
    return [steps_of(name, found) for name, found in parts.items()]


def steps_of(name: str, found: Iterable[MicroBatchPart]) -> JobSteps:
    """A job's `JobSteps` made of the parts it has left (`found`, in any order; at least one)."""
    found = list(found)
    training = sorted((p for p in found if not p.eval), key=lambda p: (p.step, p.micro))
    steps: list[list[tuple[int, int]]] = []
    for i, part in enumerate(training):
        if i == 0 or part.step != training[i - 1].step:
            steps.append([])
        steps[-1].append((part.rows, part.tokens))
    evals: dict[int, list[MicroBatchPart]] = {}
    for part in sorted((p for p in found if p.eval), key=lambda p: (p.step, p.micro)):
        evals.setdefault(part.step, []).append(part)
    points = tuple(EvalPoint(after, tuple((p.rows, p.tokens) for p in got), first_micro=got[0].micro)
                   for after, got in evals.items())
    first = training[0] if training else None
    return JobSteps(name, tuple(tuple(s) for s in steps), first_step=first.step if first else min(evals),
                    first_micro=first.micro if first else 0, evals=points)


def parts_after(job: JobSteps, count: int) -> Iterator[MicroBatchPart]:
    """`job`'s parts in training order after its first `count` (those a plan has injected)."""
    return itertools.islice(_iter_parts(job), count, None)


def steps_after(job: JobSteps, count: int) -> JobSteps | None:
    """`steps_of(job.name, parts_after(job, count))` (None where no part is left), made from the
    job's sizes without making a part: a change of plan late in a long run would otherwise make
    every part the old plan injected, a microsecond each."""
    sizes = job.micro_batches
    listed = range(job.first_step, job.first_step + len(sizes))
    inside = sorted((p for p in job.evals if p.after in listed), key=lambda p: p.after)  # before its step
    after = sorted((p for p in job.evals if p.after not in listed), key=lambda p: p.after)  # after every step

    def result(first: int, training: int, cut: EvalPoint | None, rest: list[EvalPoint]) -> JobSteps:
        """Steps from index `first` on, less the `training` micro-batches of them already injected."""
        left = sizes[first:].without_first(training)
        evals = sorted(([cut] if cut is not None else []) + [p for p in rest if p.micro_batches],
                       key=lambda p: p.after)
        if not left:
            return JobSteps(job.name, left, first_step=min(p.after for p in evals), evals=tuple(evals))
        step = first + int(np.searchsorted(sizes[first:].ends, training, side="right"))
        offset = (job.first_micro if step == 0 else 0) + training - (sizes.start(step) - sizes.start(first))
        return JobSteps(job.name, left, first_step=job.first_step + step, first_micro=offset, evals=tuple(evals))

    def rest_of(point: EvalPoint, skip: int) -> EvalPoint:
        return EvalPoint(point.after, point.micro_batches[skip:], first_micro=point.first_micro + skip)

    evaluated = 0  # evaluation micro-batches before the point looked at
    for i, point in enumerate(inside):
        k = point.after - job.first_step
        before = sizes.start(k) + evaluated
        if count < before:  # the cut is in training before this evaluation
            break
        if count < before + len(point.micro_batches):  # the cut is in this evaluation
            return result(k, 0, rest_of(point, count - before), inside[i + 1 :] + after)
        evaluated += len(point.micro_batches)
    else:
        i = len(inside)
    trained = count - evaluated
    if trained < sizes.micro_count:  # the cut is in a step
        return result(0, trained, None, inside[i:] + after)
    done = sizes.micro_count + evaluated
    for j, point in enumerate(after):  # evaluations after the last step
        if count < done + len(point.micro_batches):
            return result(len(sizes), 0, rest_of(point, count - done), after[j + 1 :])
        done += len(point.micro_batches)
    return None


def flush_bubble(num_stages: int, micros_per_step: int) -> float:
    """Bubble of gpipe and of 1f1b under unit costs (r >= 1): (S-1) / (N+S-1), every step alike."""
    return (num_stages - 1) / (micros_per_step + num_stages - 1)


def lora_slots(num_stages: int, streams: int, micros_per_step: int, steps: int) -> int:
    """Makespan of the lora generator in slots (one forward + one backward of one micro-batch).

    For G equal streams of N micro-batches per step and K steps each, unit costs with r >= 1:
    T = (K-1) * max(G*N, N+S-1) + G*N + S-1 (see the module docstring).
    """
    g, n, s = streams, micros_per_step, num_stages
    return (steps - 1) * max(g * n, n + s - 1) + g * n + s - 1


def lora_bubble(num_stages: int, streams: int, micros_per_step: int, steps: int) -> float:
    """Bubble of the lora generator under unit costs: 1 - G*N*K / `lora_slots` (module docstring)."""
    busy = streams * micros_per_step * steps
    return 1 - busy / lora_slots(num_stages, streams, micros_per_step, steps)


def _where(stage: int, pos: int, action: Action) -> str:
    """An action's place, for errors (built only when there is one: a plan has millions of actions)."""
    return f"stage {stage}, action {pos} ({action})"


def validate(schedule: Schedule) -> None:
    """Check what every correct schedule must satisfy, on every stage and between stages.

    Each micro-batch is forwarded once and then backwarded once (an evaluation micro-batch, whose
    parts are all evaluations, only forwarded, after its job's step k-1 and before its step k);
    a job's optimizer step for step k
    comes after all of that job's step-k backwards and before any forward of its step k+1; at most
    `schedule.max_in_flight` micro-batches are forwarded but not backwarded at any point. Adjacent
    stages forward the same ids in the same order and backward the same ids in the same order (the
    messages between them are matched in order). Finally the stages are replayed against each
    other (`sim.simulate`), which catches a cycle of waits (a deadlock) that the orders alone allow.
    """
    by_id = {mb.id: mb for mb in schedule.micro_batches}
    if [mb.id for mb in schedule.micro_batches] != list(range(len(schedule.micro_batches))):
        raise ScheduleError("micro-batch ids must be 0..M-1 in order (the runtime indexes by id)")
    bound, token_bound = schedule.max_in_flight, schedule.max_in_flight_tokens
    first: dict[str, int] = {}  # each job's first scheduled step (not 0 for a resumed job)
    for mb in schedule.micro_batches:
        if len({p.eval for p in mb.parts}) > 1:
            raise ScheduleError(f"micro-batch {mb.id} mixes evaluation and training rows")
        for part in mb.parts:
            first[part.job] = min(first.get(part.job, part.step), part.step)
    training = {mb.id for mb in schedule.micro_batches if not mb.eval}
    for stage, actions in enumerate(schedule.stages):
        forwarded: set[int] = set()
        backwarded: set[int] = set()
        pending: dict[tuple[str, int], int] = {}
        for mb in schedule.micro_batches:
            for part in mb.parts:
                if not part.eval:
                    pending[(part.job, part.step)] = pending.get((part.job, part.step), 0) + 1
        stepped: dict[str, int] = {job: step - 1 for job, step in first.items()}
        live = live_tokens = 0  # training micro-batches (and their tokens) forwarded, not backwarded
        for pos, action in enumerate(actions):
            if action.kind == "F":
                if action.micro_batch not in by_id or action.micro_batch in forwarded:
                    raise ScheduleError(f"{_where(stage, pos, action)}: unknown or repeated forward")
                forwarded.add(action.micro_batch)
                if action.micro_batch in training:
                    live += 1
                    if bound is not None and live > bound:
                        raise ScheduleError(f"{_where(stage, pos, action)}: more than {bound} micro-batches in flight")
                    live_tokens += by_id[action.micro_batch].tokens
                if token_bound is not None and live_tokens > token_bound:
                    raise ScheduleError(f"{_where(stage, pos, action)}: more than {token_bound} tokens in flight")
                for part in by_id[action.micro_batch].parts:
                    if stepped.get(part.job, -1) != part.step - 1:
                        raise ScheduleError(
                            f"{_where(stage, pos, action)}: forward of {part.job} step {part.step} before its step {part.step - 1} update"
                        )
            elif action.kind == "B":
                if action.micro_batch not in forwarded or action.micro_batch in backwarded:
                    raise ScheduleError(f"{_where(stage, pos, action)}: backward without forward, or repeated")
                if action.micro_batch not in training:
                    raise ScheduleError(f"{_where(stage, pos, action)}: backward of an evaluation micro-batch")
                backwarded.add(action.micro_batch)
                live -= 1
                live_tokens -= by_id[action.micro_batch].tokens
                for part in by_id[action.micro_batch].parts:
                    pending[(part.job, part.step)] -= 1
            elif action.kind == "S":
                key = (action.job, action.step)
                if pending.get(key, -1) != 0:
                    raise ScheduleError(f"{_where(stage, pos, action)}: optimizer step before all its backwards")
                if stepped.get(action.job, -1) != action.step - 1:
                    raise ScheduleError(f"{_where(stage, pos, action)}: optimizer steps out of order")
                stepped[action.job] = action.step
                pending.pop(key)
            else:
                raise ScheduleError(f"{_where(stage, pos, action)}: unknown action kind")
        if forwarded != set(by_id) or backwarded != training:
            unfinished = (set(by_id) - forwarded) | (training - backwarded)
            raise ScheduleError(f"stage {stage}: {len(unfinished)} micro-batches never finish")
        if pending:
            raise ScheduleError(f"stage {stage}: optimizer steps missing for {sorted(pending)[:3]}")
    for stage in range(schedule.num_stages - 1):
        for kind, sender, receiver in (("F", stage, stage + 1), ("B", stage + 1, stage)):
            sent = [a.micro_batch for a in schedule.stages[sender] if a.kind == kind]
            got = [a.micro_batch for a in schedule.stages[receiver] if a.kind == kind]
            if sent == got:  # the common case, compared in one go; else find the first difference
                continue
            received = [(i, a) for i, a in enumerate(schedule.stages[receiver]) if a.kind == kind]
            for k, (a_id, (pos, b)) in enumerate(zip(sent, received)):
                if a_id != b.micro_batch:
                    a = Action(kind, a_id)
                    what = "forward" if kind == "F" else "backward"
                    raise ScheduleError(
                        f"stage {receiver}, action {pos} ({b}): its {what} #{k} receives stage {sender}'s "
                        f"{what} #{k}, which is {a}: the {what} orders of stages {min(sender, receiver)} "
                        f"and {max(sender, receiver)} disagree (messages are matched in order)"
                    )
    if schedule.num_stages > 1:
        from mlora_pp.sim import simulate  # the replay lives with the simulator

        simulate(schedule)


def render(schedule: Schedule, width: int = 8) -> str:
    """A text grid, one line per stage, one column per action slot (for debugging and errors)."""
    lines = []
    for stage, actions in enumerate(schedule.stages):
        cells = [str(a).ljust(width)[:width] for a in actions]
        lines.append(f"stage {stage}: " + "".join(cells))
    return "\n".join(lines)
