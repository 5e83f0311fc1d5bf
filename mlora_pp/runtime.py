"""Executes one stage's action list: forwards, backwards and per-job optimizer steps.

The schedule decides the order; the worker only runs it. On a stage that is not the first, a
forward first receives its input activation from the previous rank; on one that is not the last,
it sends its output on, and the backward receives the output's gradient from the next rank and
sends the input's gradient back. Only the last stage computes losses. A micro-batch's rows are laid out part
by part (each part is one job's rows), right-padded to the longest row, and carried to the
batched LoRA operator as `LoRASegment`s. The loss of each part is its summed token cross-entropy
divided by the number of loss tokens of that job's whole step, so gradient accumulation and
fusion give exactly the gradient of the step's token-mean loss. An evaluation micro-batch (held-out
rows) is forwarded without a graph or dropout; the last stage sums its cross-entropy per job and
reports the token-mean loss of the whole held-out set once its last micro-batch is in.

A job whose loss, gradients or updated weights become non-finite fails alone: its update is
skipped, it is reported once (`StepRecord.failure`, `on_failed`), and from then on its steps are
skipped too (`StepRecord.skipped`) while its forwards and backwards still run, so every stage keeps
exchanging the same messages. Rows of different jobs never mix (the batched LoRA operator works
per segment and each part's loss is its own sum), so a NaN stays in the failed job's rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from mlora_pp.control import DECISION_LEAD
from mlora_pp.data import collate_sources
from mlora_pp.faults import Fault
from mlora_pp.grad_norm import GradNorm, GradNormChannel
from mlora_pp.head_loss import LossTokens
from mlora_pp.job import AdapterJob
from mlora_pp.lora import LoRABatch, LoRASegment, host_to_device
from mlora_pp.memory import Measurement, RecomputeMeter, SavedTensorMeter, live_job_bytes
from mlora_pp.memory import static_bytes as count_static_bytes
from mlora_pp.model import StageModel
from mlora_pp.schedule import Action, MicroBatch, Schedule
from mlora_pp.stage_plan import StagePlan
from mlora_pp.trace import TraceEvent, TraceRecorder
from mlora_pp.transport import ACTIVATION, GRADIENT, StageTransport


@dataclass
class StepRecord:
    """One finished optimizer step of one job."""

    job: str
    step: int  # 1-based count of steps done
    loss: float
    loss_tokens: int
    tokens: int
    lr: float
    failure: str | None = None
    """Set on the step that failed the job: one of `FAILURES` (the update was skipped)."""
    skipped: bool = False
    """The job had failed at an earlier step: nothing was updated."""
    grad_norm: float | None = None
    """With `max_grad_norm`: the job's total gradient norm before clipping, over every stage."""


FAILURES: tuple[str, ...] = ("non-finite loss", "non-finite gradients", "non-finite weights")


@dataclass
class EvalRecord:
    """One finished evaluation of one job on its held-out rows (the last stage knows the loss)."""

    job: str
    step: int  # optimizer steps done when evaluated
    loss: float  # token-mean cross-entropy over every held-out loss token
    loss_tokens: int


@dataclass
class _InFlight:
    output: torch.Tensor  # loss (last stage) or output activation
    input: torch.Tensor | None  # received activation (requires grad) on non-first stages
    part_losses: list[tuple[str, torch.Tensor, int, int]]  # job, CE sum, loss tokens, tokens


@dataclass
class StageWorker:
    """Runs one stage's actions. With one stage the stage is both first and last."""

    stage: StageModel
    jobs: dict[str, AdapterJob]
    plan: StagePlan
    """The plan this stage runs (a `Schedule` given here becomes a one-segment plan)."""
    stage_index: int = 0
    transport: StageTransport | None = None
    device: torch.device = torch.device("cpu")
    on_step: Callable[[StepRecord], None] | None = None
    after_action: Callable[[], None] | None = None
    after_step: Callable[[AdapterJob], bool] | None = None
    """Called after each good optimizer step (the checkpoint saver); False means the updated weights
    are not finite (it checks them before saving), which fails the job."""
    on_failed: Callable[[str, int, str], None] | None = None
    """(job, good steps done, reason) when this stage fails a job."""
    replan: Any = None
    """`mlora_pp.replan.Replanner`: decision points, rank 0's decisions, the next plan (None: one plan)."""
    on_start: Callable[[str], None] | None = None
    """(job) at the job's first forward on this stage."""
    on_eval: Callable[[EvalRecord], None] | None = None
    """On the last stage: a job's evaluation finished (every held-out micro-batch forwarded)."""
    meter: SavedTensorMeter | None = None
    """Counts the bytes autograd keeps per micro-batch (CPU memory accounting; None: not counted)."""
    norms: GradNormChannel | None = None
    """Gradient norms across stages, for jobs with `max_grad_norm` (None: one stage, or not set up)."""
    static_bytes: int = 0
    peak_bytes: int = 0
    """With `meter`: the most bytes this stage's tensors held after any action, or under recompute
    while a backward held a recomputed layer (see mlora_pp.memory)."""
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Jobs this stage failed: job -> (good steps done, reason)."""
    trace: TraceRecorder = field(default_factory=TraceRecorder)
    """Timed actions: the run's totals, and the first and last ones for trace.json."""
    _in_flight: dict[int, _InFlight] = field(default_factory=dict)
    _held: dict[int, Measurement] = field(default_factory=dict)
    _job_bytes: dict[str, int] = field(default_factory=dict)
    _started: set[str] = field(default_factory=set)
    _deferred: dict[str, int] = field(default_factory=dict)
    """Stages > 0: clipped jobs whose step waits for its total gradient norm from rank 0 (job -> step)."""
    plan_segments: int = 0
    """Segments of plans this stage has run to their end or to a change (`StagePlan.segments`)."""
    _last_forward: int = -1
    """The id of this stage's latest forward in the current plan."""

    def __post_init__(self) -> None:
        if isinstance(self.plan, Schedule):
            self.plan = StagePlan.of(self.plan, self.stage_index)

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def inputs(self, mb: MicroBatch) -> tuple[torch.Tensor, LossTokens | None, LoRABatch]:
        """Token ids [rows, L] of a micro-batch, where its loss is (last stage only; None elsewhere),
        and its LoRA row layout. A training part's loss tokens weigh 1 / its job's step loss tokens."""
        pad_id = self.stage.config.pad_token_id if self.stage.config.pad_token_id is not None else 0
        input_ids, labels = collate_sources([self.jobs[part.job].part_source(part) for part in mb.parts], pad_id)
        segments, start = [], 0
        for part in mb.parts:
            job = self.jobs[part.job]
            # an evaluation runs without dropout: its keys are never used
            keys = (0,) * part.rows if part.eval else job.dropout_keys(part.step, part.micro)
            segments.append(LoRASegment(part.job, start, start + len(keys), keys))
            start += len(keys)
        batch = LoRABatch(tuple(segments), seq_len=input_ids.shape[1], training=not mb.eval)
        where = None
        if self.is_last:
            weights = [1.0 if part.eval else 1.0 / max(self.jobs[part.job].plans[part.step].loss_tokens, 1)
                       for part in mb.parts]
            where = LossTokens.find(labels, [(s.row_start, s.row_end) for s in segments], weights, self.device)
        return host_to_device(input_ids, self.device), where, batch

    def probe_inputs(self, mb: MicroBatch, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, LossTokens | None, LoRABatch]:
        """For start-up probes outside the schedule: token ids, this stage's input (random
        activations on later stages: only their shape matters), loss tokens and LoRA layout of `mb`.
        Adjacent parts of one job form one segment, as one micro-batch of that job's rows would."""
        input_ids, where, batch = self.inputs(mb)
        segments: list[LoRASegment] = []
        for seg in batch.segments:
            if segments and segments[-1].adapter == seg.adapter:
                last = segments.pop()
                seg = LoRASegment(seg.adapter, last.row_start, seg.row_end, last.dropout_keys + seg.dropout_keys)
            segments.append(seg)
        batch = replace(batch, segments=tuple(segments))
        x = input_ids
        if not self.is_first:
            x = torch.randn(self.activation_shape(mb), generator=generator, device=self.device,
                            dtype=self.stage.dtype).requires_grad_(True)
        return input_ids, x, where, batch

    def probe_backward(self, out: torch.Tensor, total: torch.Tensor | None, generator: torch.Generator) -> None:
        """The backward of a probe's `_compute`: from the loss on the last stage, else from a random
        output gradient. Adapter gradients accumulate; the probe clears them."""
        if self.is_last:
            assert total is not None
            total.backward()
        else:
            out.backward(torch.randn(out.shape, generator=generator, device=self.device, dtype=out.dtype))

    def activation_shape(self, mb: MicroBatch) -> tuple[int, int, int]:
        """[rows, padded length, hidden] of the activations of `mb`: known on every rank from the data plan."""
        lengths = [n for part in mb.parts for n in self.jobs[part.job].part_lengths(part)]
        return (len(lengths), max(lengths), self.stage.config.hidden_size)

    def _due(self, mb: MicroBatch) -> list[str]:
        """Deferred steps to apply before forwarding `mb`: those rank 0 took before it forwarded `mb`.

        Rank 0 sent their totals then, and `mb`'s activation comes after them, so waiting for them here
        never waits longer than for `mb` itself. It applies a step within a few slots of this stage's
        own, so a job's gradients and AdamW state do not outlive its last step by long (the memory
        model frees them there), and always before the job's own next forward.
        """
        if not self._deferred:
            return []
        return [job for job, step in self._deferred.items()
                if self.plan.stepped_before(job, step, mb.id) or any(part.job == job for part in mb.parts)]

    def forward(self, mb: MicroBatch) -> None:
        for job in self._due(mb):  # before the job's own next forward at the latest: its weights must be updated
            self.apply_deferred(job)
        input_ids, where, batch = self.inputs(mb)
        if mb.eval:
            self.evaluate(mb, input_ids, where, batch)
            return
        received = None
        if self.is_first:
            x = input_ids
        else:
            assert self.transport is not None
            shape = self.activation_shape(mb)
            received = self.transport.recv(self.stage_index - 1, ACTIVATION, mb.id, shape, self.stage.dtype)
            x = received.requires_grad_(True)
        for part in mb.parts:
            if part.job not in self._started:
                self._started.add(part.job)
                if self.on_start is not None:
                    self.on_start(part.job)
        if self.meter is None:
            out, total, part_losses = self._compute(mb, x, where, batch)
        else:
            with self.meter.measure() as held:
                out, total, part_losses = self._compute(mb, x, where, batch)
                held.add_graph(out if total is None else total)
            self._held[mb.id] = held
        if not self.is_last:
            assert self.transport is not None
            self.transport.send(out, self.stage_index + 1, ACTIVATION, mb.id)
        self._in_flight[mb.id] = _InFlight(total if self.is_last else out, received, part_losses)

    def evaluate(self, mb: MicroBatch, input_ids: torch.Tensor, where: LossTokens | None, batch: LoRABatch) -> None:
        """The forward of an evaluation micro-batch: no graph, nothing kept for a backward. The last
        stage adds each part's summed cross-entropy to its evaluation and reports the evaluation
        once its last micro-batch is in (a single device sync per evaluation)."""
        x = input_ids
        if not self.is_first:
            assert self.transport is not None
            x = self.transport.recv(self.stage_index - 1, ACTIVATION, mb.id, self.activation_shape(mb), self.stage.dtype)
        with torch.no_grad():
            out = self.stage(x, batch, head=False)
            if self.is_last:
                assert where is not None
                _, sums = self.stage.head_loss(out, where)
        if not self.is_last:
            assert self.transport is not None
            self.transport.send(out, self.stage_index + 1, ACTIVATION, mb.id)
            return
        for i, part in enumerate(mb.parts):
            job = self.jobs[part.job]
            evaluation = job.eval_sums.setdefault(part.step, [sums.new_zeros((), dtype=torch.float64), 0])
            evaluation[0] = evaluation[0] + sums[i].double()
            evaluation[1] += where.counts[i]
            if part.last_in_step:
                total, loss_tokens = job.eval_sums.pop(part.step)
                if self.on_eval is not None:
                    self.on_eval(EvalRecord(part.job, part.step, float(total) / max(loss_tokens, 1), loss_tokens))

    def _compute(
        self, mb: MicroBatch, x: torch.Tensor, where: LossTokens | None, batch: LoRABatch
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[str, torch.Tensor, int, int]]]:
        """The stage's forward; on the last stage also the loss to backpropagate (each part's summed
        cross-entropy over its job's step loss tokens) and each part's (job, summed cross-entropy,
        loss tokens, tokens)."""
        if not self.is_last:
            return self.stage(x, batch), None, []
        assert where is not None
        hidden = self.stage(x, batch, head=False)
        total, sums = self.stage.head_loss(hidden, where)
        part_losses = []
        for i, part in enumerate(mb.parts):
            tokens = sum(self.jobs[part.job].part_lengths(part))
            part_losses.append((part.job, sums[i], where.counts[i], tokens))
        return hidden, total, part_losses

    def live_bytes(self) -> int:
        """With `meter`: the bytes this stage's tensors hold now (weights, job state, saved activations)."""
        return self.static_bytes + sum(h.bytes for h in self._held.values()) + sum(self._job_bytes.values())

    def backward(self, mb: MicroBatch) -> None:
        flight = self._in_flight.pop(mb.id)
        output = flight.output
        recomputed = None
        if self.meter is not None and self.stage.recompute and mb.id in self._held:
            level = self.live_bytes()  # the micro-batch's own bytes still count while its backward runs
            recomputed = RecomputeMeter(self.meter.exclude, self._held[mb.id])
            self.stage.recompute_observer = recomputed.layer
        self._held.pop(mb.id, None)
        try:
            if self.is_last:
                output.backward()
            else:
                assert self.transport is not None
                grad = self.transport.recv(self.stage_index + 1, GRADIENT, mb.id, tuple(output.shape), output.dtype)
                torch.autograd.backward(output, grad)
        finally:
            self.stage.recompute_observer = None
        if recomputed is not None:
            self.peak_bytes = max(self.peak_bytes, level + recomputed.most)
        if not self.is_first:
            assert self.transport is not None and flight.input is not None and flight.input.grad is not None
            self.transport.send(flight.input.grad, self.stage_index - 1, GRADIENT, mb.id)
        for job_name, ce, loss_tokens, tokens in flight.part_losses:
            stats = self.jobs[job_name].stats
            stats.loss_sum = stats.loss_sum + ce  # stays on the device until the job's step
            stats.loss_tokens += loss_tokens
            stats.tokens += tokens

    def optimizer_step(self, job_name: str, step: int) -> None:
        """The job's step `step` on this stage. A job with `max_grad_norm` on several stages needs its
        total gradient norm (`mlora_pp.grad_norm`): rank 0 gathers it and steps; a later stage sends
        its part and steps once the total is back (`apply_deferred`)."""
        job = self.jobs[job_name]
        assert job.steps_done == step, f"{job_name}: step {step} out of order (done {job.steps_done})"
        if job.config.max_grad_norm is None:
            self._step(job, step, None)
            return
        square_sum = job.gradient_square_sum()
        if self.num_stages == 1:
            self._step(job, step, GradNorm(square_sum ** 0.5))
            return
        assert self.norms is not None, "max_grad_norm on several stages needs a GradNormChannel"
        if self.is_first:
            self._step(job, step, self.norms.total(job_name, step, square_sum))
        else:
            self.norms.send_part(job_name, step, square_sum)
            self._deferred[job_name] = step

    def apply_deferred(self, job_name: str | None = None) -> None:
        """Take the total gradient norm of a deferred step (every one's, without a job) and step."""
        for name in [job_name] if job_name is not None else list(self._deferred):
            step = self._deferred.pop(name)
            assert self.norms is not None
            self._step(self.jobs[name], step, self.norms.receive_total(name, step))
            if self.meter is not None:
                self._job_bytes[name] = live_job_bytes([self.jobs[name]])

    def _step(self, job: AdapterJob, step: int, total: GradNorm | None) -> None:
        """The update itself, or its skip when the job fails here (`total`: with `max_grad_norm`)."""
        job_name = job.name
        stats = job.stats
        job.stats = type(stats)()
        loss = float(stats.loss_sum) / max(stats.loss_tokens, 1) if self.is_last else 0.0
        failure, skipped, elsewhere = None, job.failed is not None, False
        if not skipped:
            if not math.isfinite(loss):
                failure = FAILURES[0]
            elif total is not None:  # the total says whether this stage's part is finite: no second sync
                if not math.isfinite(total.norm):
                    if total.origin in (-1, self.stage_index):  # this stage's part (or one stage's only)
                        failure = FAILURES[1]
                    else:  # the first non-finite part is another stage's: the job fails here too, it reports
                        elsewhere = True
            elif not job.gradients_finite():
                failure = FAILURES[1]
        if skipped or elsewhere or failure is not None:
            lr = job.current_lr()
            job.skip_step()
        else:
            lr = job.optimizer_step(None if total is None else total.norm)
            if self.after_step is not None and not self.after_step(job):
                failure = FAILURES[2]  # applied but never saved: the last good state is an earlier checkpoint
        if failure is not None:
            self._fail(job, step, failure)
        if elsewhere:
            assert total is not None
            job.failed, job.failed_step = f"{FAILURES[1]} at step {step + 1} on stage {total.origin}", step
        if self.on_step is not None:  # the loss is known on the last stage only
            self.on_step(StepRecord(job=job_name, step=job.steps_done, loss=loss, loss_tokens=stats.loss_tokens,
                                    tokens=stats.tokens, lr=lr, failure=failure, skipped=skipped or elsewhere,
                                    grad_norm=None if total is None else total.norm))
        if job.steps_done == job.total_steps:
            job.release_state()

    def _fail(self, job: AdapterJob, good_steps: int, failure: str) -> None:
        job.failed, job.failed_step = f"{failure} at step {good_steps + 1} on stage {self.stage_index}", good_steps
        self.failures[job.name] = (good_steps, job.failed)
        if self.on_failed is not None:
            self.on_failed(job.name, good_steps, job.failed)

    def run_action(self, action: Action) -> None:
        waited = self.transport.waited_s if self.transport is not None else 0.0
        start = time.perf_counter()
        if action.kind == "F":
            mb = self.plan.micro_batch(action.micro_batch)
            self.forward(mb)
            self._last_forward = mb.id
            name = f"{'E' if mb.eval else 'F'}{mb.id} " + "+".join(f"{p.job}:{p.step}.{p.micro}" for p in mb.parts)
        elif action.kind == "B":
            mb = self.plan.micro_batch(action.micro_batch)
            self.backward(mb)
            name = f"B{mb.id} " + "+".join(f"{p.job}:{p.step}.{p.micro}" for p in mb.parts)
        else:
            mb = None
            self.optimizer_step(action.job, action.step)
            name = f"S {action.job}:{action.step}"
        wait = (self.transport.waited_s - waited) if self.transport is not None else 0.0
        self.trace.add(TraceEvent(name, action.kind, start, time.perf_counter(), wait))
        if self.meter is not None:
            # a job's gradients and optimizer state change only in its backwards and steps: recount those
            touched = ([action.job] if action.kind == "S" else
                       mb.jobs if mb is not None and action.kind == "B" else ())
            for name in touched:
                self._job_bytes[name] = live_job_bytes([self.jobs[name]])
            self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        if self.replan is not None:
            self.replan.ran(action, mb)
        if self.after_action is not None:
            self.after_action()

    def run(self) -> None:
        """Run this stage's actions; with `replan`, switch plans where rank 0 decides to (every rank
        at the same micro-batch: the old plan's work below it is finished, then the new plan runs)."""
        fault = Fault.from_environ()
        count = 0  # actions run so far, over every plan (fault injection indexes them)
        while True:
            if self.replan is not None:
                self.replan.begin(self.plan)
            self._last_forward = -1
            count, cut = self._execute(self.plan.action, fault, count, decide=self.replan is not None)
            if cut is None:
                self.plan_segments += self.plan.segments
                self.apply_deferred()
                break
            position, point, change = cut
            tail = self.plan.tail(position, point)
            self.plan_segments += self.plan.segments
            count, _ = self._execute(lambda i: tail[i] if i < len(tail) else None, fault, count, decide=False)
            self.apply_deferred()  # the old plan's steps are all done before the next plan starts
            following = self.replan.apply(change, self.plan, point)
            if self.meter is not None:  # cancelled jobs freed their state, submitted ones added weights
                self._job_bytes = {name: live_job_bytes([job]) for name, job in self.jobs.items()}
                self.static_bytes = count_static_bytes(self.stage)
                self.meter.exclude_storages(list(self.stage.parameters()) + list(self.stage.buffers()))
            if following is None:  # every job left was cancelled
                break
            self.plan = following
        if self.norms is not None:
            self.norms.flush()
        if self.transport is not None:
            self.transport.flush()

    def _execute(self, actions: Callable[[int], Action | None], fault: Fault | None, count: int, decide: bool
                 ) -> tuple[int, tuple[int, int, Any] | None]:
        """Run `actions(0)`, `actions(1)`, ... until None. With `decide` (running the plan itself),
        before forwarding micro-batch p ask `replan` for every decision point (every micro-batch id
        from DECISION_LEAD on) up to p + DECISION_LEAD, and for the plan's end after its last
        action; a change decided for point q stops the run here at the forward of q, returning
        (position, q, change). Every stage forwards the micro-batches in id order. Receives are
        posted DECISION_LEAD ahead, and only below the first point not decided to go on, so none
        can match a message of a new plan."""
        expected: list[tuple[int, int, str]] = []  # (peer, tag, action kind) of each kind of receive
        if self.transport is not None:
            if not self.is_first:
                expected.append((self.stage_index - 1, ACTIVATION, "F"))
            if not self.is_last:
                expected.append((self.stage_index + 1, GRADIENT, "B"))
        done = [0] * len(expected)  # receives consumed
        posted = [0] * len(expected)
        scan = [0] * len(expected)  # where to look for the next receive to post

        def prefetch(k: int, limit: int | None) -> None:
            assert self.transport is not None
            peer, tag, kind = expected[k]
            while posted[k] < done[k] + DECISION_LEAD:
                action = actions(scan[k])
                while action is not None and action.kind != kind:
                    scan[k] += 1
                    action = actions(scan[k])
                if action is None or (limit is not None and action.micro_batch >= limit):
                    return
                mb = self.plan.micro_batch(action.micro_batch)
                self.transport.post(peer, tag, mb.id, self.activation_shape(mb), self.stage.dtype)
                posted[k] += 1
                scan[k] += 1

        point = DECISION_LEAD  # the next decision point
        decided: tuple[int, Any] | None = None  # (point, change): where this plan stops
        index = 0
        while (action := actions(index)) is not None:
            if action.kind == "F":
                if decided is not None and action.micro_batch == decided[0]:
                    return count, (index, decided[0], decided[1])
                while (decide and decided is None and point <= action.micro_batch + DECISION_LEAD
                       and self.plan.exists(point)):
                    change = self.replan.decide(point)
                    if change:
                        decided = (point, change)
                    point += 1
            if fault is not None and fault.maybe_fire(self.stage_index, count):
                assert action.kind == "S", f"fault 'nan' is for optimizer steps, not {action}"
                self.jobs[action.job].poison_gradients()
            limit = None if not decide else decided[0] if decided is not None else point
            for k in range(len(expected)):
                prefetch(k, limit)
            self.run_action(action)
            count += 1
            index += 1
            for k, (_, _, kind) in enumerate(expected):
                if action.kind == kind:
                    done[k] += 1
            if decide:
                self.plan.forget(index, min(self._in_flight, default=self._last_forward + 1))
        assert decided is None, f"stage {self.stage_index} never forwarded micro-batch {decided[0]}"
        if decide:  # the plan's end (its micro-batch count) is a decision point too
            end = self.plan.end
            assert end is not None and point >= end, f"stage {self.stage_index}: points below {end} undecided"
            change = self.replan.decide(end)
            if change:
                return count, (index, end, change)
        return count, None
