"""A new plan mid-run: jobs submitted and cancelled while the pipeline runs (`mlora_pp.control`).

Every micro-batch of a plan from `DECISION_LEAD` on, and its end, is a decision point. Rank 0
decides for micro-batch q before it forwards micro-batch q - DECISION_LEAD (for the plan's end:
after its last action): a graceful stop and early stops at every point, and at every
`REQUESTS_EVERY`-th one and the end also the requests waiting in `OUTPUT_DIR/control`, which it
checks. It tells every rank what it decided (possibly nothing); the other ranks hear it before
their own forward of q - DECISION_LEAD. On a change, every rank runs the old plan on to micro-batch
q, finishes the old plan's work below q (`StagePlan.tail`), then applies the change the same way and
builds the same next plan from the same numbers: the old plan's remaining parts (`StagePlan.remaining`,
in the old plan's job order; a step that straddles the point continues with the gradients it has
accumulated), minus cancelled jobs, plus the new jobs, admitted as at start-up. A plan is made as
it runs (`mlora_pp.stage_plan`), so a change costs the next plan's first segment, not the whole
rest of the run. Rank 0 logs the change and answers its requests
once it is applied, so a run that dies before leaves them for the next run.

A cancelled job drops its unfinished step and keeps the adapter of its last finished one (every
stage checkpoints it, so a restart keeps it too). A submitted job is tokenized on every rank
(its data file must be readable there, like the config's), gets its adapter and optimizer on every
stage, and is checkpointed like the others. Under `pipeline.memory_budget` rank 0 checks that a
submitted job fits alone, cutting its micro-batches as at start-up (every rank then cuts them
alike), and rejects it if even 1-row micro-batches do not fit.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlora_pp import stopping
from mlora_pp.checkpoint import ManifestWriter, StageSaver, due, resume_fields
from mlora_pp.config import ConfigError, JobConfig, RunConfig, human_bytes, parse_config
from mlora_pp.control import (REQUESTS_EVERY, Change, ControlDir, PlanChannel, Request, config_mapping,
                              validate_submission)
from mlora_pp.data import DataError
from mlora_pp.early_stop import EarlyStopping
from mlora_pp.data_cache import DataCache
from mlora_pp.job import AdapterJob, StepStats, load_job
from mlora_pp.memory import (
    MemoryModel, PeakTracker, admission_check, cut_message, largest_micro, padded_rank, predicted_peak,
)
from mlora_pp.model import StageModel
from mlora_pp.schedule import Action, CostModel, JobSteps, MicroBatch, PlanStream, admission, choose_streams
from mlora_pp.stage_plan import StagePlan

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_state_bytes(config: Any, layers: int, rank: int, targets: list[str], float32: bool = True) -> int:
    """A job's gradients and AdamW moments on `layers` decoder layers, from the model's shapes (what
    `mlora_pp.memory.job_state_bytes` counts on a built stage, for a stage this rank does not hold)."""
    return lora_params(config, layers, rank, targets) * (12 if float32 else 14)


def lora_params(config: Any, layers: int, rank: int, targets: list[str]) -> int:
    """Entries of a job's LoRA A and B matrices on `layers` decoder layers (fp32 master weights)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, config.intermediate_size),
              "up_proj": (h, config.intermediate_size), "down_proj": (config.intermediate_size, h)}
    return layers * sum(rank * sum(shapes[t]) for t in targets)


def pause_jobs(steps: list[JobSteps], jobs: dict[str, AdapterJob], cfg: RunConfig,
               fits: Callable[[frozenset[str]], bool], rank: int,
               on_change: Callable[[str, dict], None] | None = None) -> list[JobSteps]:
    """Under a budget, pause jobs under way where holding their state would break it or keep a more
    urgent job waiting (`AdapterJob.offload_state`: the step each had begun is dropped, its AdamW
    moments go to host memory), before the plan is built:

    - jobs under way that do not fit together (resumed under a lowered budget): the last ones in
      admission order, until the rest fit;
    - with `admission: priority` and `pipeline.preempt`: where the most urgent job not under way
      cannot start next to them, less urgent ones, least urgent first (the later-listed first among
      equals), until it can; none where pausing every less urgent one would not make room.

    A paused job waits to be admitted like a job not under way. Its dropped step runs again from
    its start, with the same rows and dropout keys, so it ends with the adapter it would have had.
    Every rank decides alike from the same numbers, so this costs no message; rank 0 says so.
    """
    priority = {c.name: c.priority for c in cfg.jobs}
    order = admission(steps, cfg.pipeline.admission, priority, fits).order
    place = {name: i for i, name in enumerate(order)}
    pausable = [j for j in steps if j.holds_state and j.steps > 0 and jobs[j.name].failed is None
                and j.first_step == jobs[j.name].steps_done]
    holding = {j.name for j in steps if j.holds_state}
    why: dict[str, str] = {}
    for j in sorted(pausable, key=lambda j: -place[j.name]):
        if fits(frozenset(holding)):
            break
        holding.discard(j.name)
        why[j.name] = "because the jobs under way do not fit pipeline.memory_budget together"
    waiting = [j for j in steps if j.name not in holding and j.steps > 0]
    if cfg.pipeline.admission == "priority" and cfg.pipeline.preempt and waiting:
        urgent = min(waiting, key=lambda j: place[j.name])
        if not fits(frozenset(holding | {urgent.name})):
            kept, chosen = set(holding), []
            for j in sorted((j for j in pausable if j.name in holding and priority[j.name] < priority[urgent.name]),
                            key=lambda j: -place[j.name]):
                kept.discard(j.name)
                chosen.append(j.name)
                if fits(frozenset(kept | {urgent.name})):
                    holding = kept
                    why.update({name: f"for the more urgent job {urgent.name!r} (priority {priority[urgent.name]} "
                                      f"over {priority[name]})" for name in chosen})
                    break
    out = []
    for j in steps:
        if j.name not in why:
            out.append(j)
            continue
        job = jobs[j.name]
        job.offload_state()
        out.append(dataclasses.replace(job.job_steps(), evals=j.evals, paused=True))
        if rank == 0:
            print(f"memory: job {j.name!r} is paused {why[j.name]}; it goes on from the start of step "
                  f"{job.steps_done + 1} once it fits pipeline.memory_budget again", flush=True)
        if on_change is not None:
            on_change("paused", {"job": j.name, "step": job.steps_done, "why": why[j.name]})
    return out


@dataclass
class Replanner:
    """Decision points, rank 0's decisions, and the next plan; the same on every rank."""

    cfg: RunConfig
    rank: int
    world: int
    stage: StageModel
    jobs: dict[str, AdapterJob]
    tokenizer: Any
    saver: StageSaver
    layers_per_stage: list[int]
    models: list[MemoryModel] | None
    budget: int | None
    in_flight: int
    hide_latency: bool = False
    """Whether the run's plans hide latency (start-up decided it: `pipeline.hide_latency`)."""
    fusion: CostModel | None = None
    """The per-action costs the fusion probe measured at start-up (`pipeline.streams: null`): each
    new plan's streams are chosen from them for its own jobs (`choose_streams`)."""
    channel: PlanChannel | None = None
    control: ControlDir | None = None  # rank 0
    manifests: ManifestWriter | None = None  # rank 0
    on_change: Callable[[str, dict], None] | None = None
    """Rank 0: (event, fields) for metrics and the progress table ("submitted", "cancelled", "rejected",
    "plan": a new plan's predicted peak per stage, ...)."""
    job_order: list[str] = field(default_factory=list)
    """Job names by record index, shared with the step-record sender and inbox (extended alike)."""
    cancelled: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, int] = field(default_factory=dict)
    """Jobs a graceful stop checkpointed: job -> its last finished step."""
    stopped_at: int | None = None
    """The micro-batch of the plan where a graceful stop took effect (its decision point)."""
    early_stopping: EarlyStopping | None = None
    """Rank 0: the jobs' best evaluations (`mlora_pp.early_stop`)."""
    early_stopped: dict[str, int] = field(default_factory=dict)
    """Jobs stopped early (also in `cancelled`): job -> its steps done at the stop."""
    data_cache: DataCache | None = None
    """Where submitted jobs get their rows (rank 0 tokenizes one while checking it; the others read it)."""
    _early_due: list[str] = field(default_factory=list, repr=False)
    """Rank 0: jobs whose patience ran out, stopped at the next decision point."""
    current: StagePlan | None = None
    """The plan this rank runs now (earlier ones are not kept)."""
    plans: int = 0
    """Plans this rank has run, this one included."""
    tracker: PeakTracker | None = None
    """With memory models: this rank's predicted bytes over the actions of the current plan run so
    far, with the models in force when it began (a submitted job's weights count from its plan on)."""
    _earlier_peak: float | None = None
    _loaded: dict[str, AdapterJob] = field(default_factory=dict, repr=False)
    """Rank 0: submitted jobs tokenized while checking them, used again when they are added."""
    _taken: list[Request] = field(default_factory=list, repr=False)
    """Rank 0: the requests of the change decided and not applied yet (answered once it is)."""

    def begin(self, plan: StagePlan) -> None:
        """`plan` starts on this rank (rank 0 reports a new plan's predicted peaks, over its first
        segment: the whole plan unless it is longer than `pipeline.plan_window`)."""
        self.current = plan
        self.plans += 1
        if self.models is None:
            return
        self._earlier_peak = self.predicted_peak_bytes
        self.tracker = PeakTracker.for_plan(self.models[self.rank], plan.jobs)
        if self.on_change is not None and self.plans > 1:
            first = plan.first_schedule()
            self.on_change("plan", {"predicted_peak_bytes": [int(predicted_peak(m, first, i, plan.jobs))
                                                             for i, m in enumerate(self.models)]})

    def ran(self, action: Action, mb: MicroBatch | None) -> None:
        """This stage ran `action` of the current plan (`mb`: its micro-batch, None for a step)."""
        if self.tracker is not None:
            self.tracker.ran(action, mb)

    @property
    def predicted_peak_bytes(self) -> float | None:
        """With memory models: the highest predicted bytes of this rank's stage over the actions of
        every plan run so far (None before any)."""
        if self.tracker is None:
            return None
        return max(self.tracker.peak, self._earlier_peak or 0.0)

    # ---------------------------------------------------------------------------------- deciding

    def decide(self, point: int) -> Change | None:
        """The decision for micro-batch `point` of the current plan: rank 0 takes it and sends it,
        the others receive it. None: the plan goes on."""
        assert self.current is not None
        end = self.current.end
        if self.rank != 0:
            assert self.channel is not None
            return self.channel.await_decision(point, more=end is None or point < end)
        if stopping.requested():
            change: Change | None = Change(stop=True)
        elif point % REQUESTS_EVERY == 0 or point == end:
            change = self._take_requests(point)
        else:
            change = None
        if change is None or not change.stop:
            change = self._early_stops(change)
        if self.channel is not None:
            self.channel.announce(point, change)
        return change

    def stop_early(self, name: str) -> None:
        """Rank 0: `name`'s patience ran out; it stops at the next decision point."""
        self._early_due.append(name)

    def _early_stops(self, change: Change | None) -> Change | None:
        """Add the jobs due to stop early (not cancelled, failed or finished already) to `change`."""
        cancelling = set(change.cancel) if change else set()
        early = tuple(n for n in dict.fromkeys(self._early_due) if n not in self.cancelled and n not in cancelling
                      and self.jobs[n].failed is None and self.jobs[n].steps_done < self.jobs[n].total_steps)
        self._early_due.clear()
        if not early:
            return change
        ours = Change(cancel=early, early=early)
        if not change:
            return ours
        return dataclasses.replace(change, cancel=change.cancel + early, early=early)

    def _take_requests(self, point: int) -> Change | None:
        assert self.control is not None
        submit: list[dict] = []
        cancel: list[str] = []
        priority: list[tuple[str, int]] = []
        cfg, models = self.cfg, self.models
        accepted: list[str] = []  # submissions taken at this point, in order
        for request in self.control.pending():
            try:
                if request.kind == "submit":
                    checked = validate_submission(cfg, request.body.get("job"), str(request.path))
                    job = load_job(checked.jobs[-1], self.tokenizer, checked.seed, cache=self.data_cache)
                    with_job = self._models_with(checked.jobs[-1], models, job.loss_share())
                    cut = self._fit_alone(job, with_job)
                    self._others_still_fit(job.name, with_job, cancel, [self._loaded[n] for n in accepted], point)
                    if cut:
                        print(cut_message(job.name, job.largest_micro_rows(), job.config.micro_batch_size), flush=True)
                    cfg, models, self._loaded[job.name] = checked, with_job, job
                    accepted.append(job.name)
                    submit.append(request.body["job"])
                elif request.kind == "cancel":
                    name = request.body.get("name")
                    self._check_cancel(name, cancel)
                    cancel.append(name)
                elif request.kind == "priority":
                    name, value = request.body.get("name"), request.body.get("priority")
                    self._check_priority(name, value, cancel, accepted)
                    priority.append((name, value))
                else:
                    raise ConfigError(f"{request.path}: not a submit, cancel or priority request")
            except (ConfigError, DataError) as exc:
                self.control.finish(request, f"rejected: {exc}")
                if self.on_change is not None:
                    self.on_change("rejected", {"request": request.path.name, "reason": str(exc)})
                continue
            self._taken.append(request)
        if not submit and not cancel and not priority:
            return None
        return Change(tuple(submit), tuple(cancel), priority=tuple(priority))

    def _models_with(self, config: JobConfig, models: list[MemoryModel] | None,
                     loss_share: float) -> list[MemoryModel] | None:
        """`models` with a submitted job (from the model's shapes): its LoRA weights held for good,
        like every start-up job's, and its gradients and AdamW state while it runs; `loss_share`:
        its `AdapterJob.loss_share`. On grouped-path targets its rank can raise the module's padded
        largest rank, which every micro-batch adapting that module then keeps."""
        if models is None:
            return None
        float32 = self.cfg.model.dtype == "float32"
        targets = list(config.target_modules)
        compute = 4 if float32 else 2  # bytes of the compute dtype, which x·Aᵀ is kept in

        def with_activations(m: MemoryModel, layers: int, kept: bool) -> MemoryModel:
            """What the job's rows keep on `layers` layers: x·Aᵀ unless a recomputed stage keeps
            nothing past each layer's input (`kept` False)."""
            grouped = [t for t in targets if t in m.grouped]  # x·Aᵀ at the module's padded largest rank
            padded = float(layers * padded_rank(config.rank) * compute)
            loop = len(targets) - len(grouped) if kept else 0
            return dataclasses.replace(
                m, lora_per_token={**m.lora_per_token, config.name: float(layers * loop * config.rank * compute)},
                grouped_per_token={**m.grouped_per_token, **{t: max(m.grouped_per_token.get(t, 0.0), padded)
                                                              for t in grouped}},
                job_targets={**m.job_targets, config.name: tuple(sorted(targets))},
                loss_share={**m.loss_share, config.name: loss_share})

        def with_job(m: MemoryModel, layers: int) -> MemoryModel:
            m = with_activations(m, layers, not self.stage.recompute)
            return dataclasses.replace(
                m, static=m.static + 4 * lora_params(self.stage.config, layers, config.rank, targets),
                job={**m.job, config.name: lora_state_bytes(self.stage.config, layers, config.rank, targets, float32)},
                recomputed=None if m.recomputed is None else with_activations(m.recomputed, 1, True))

        return [with_job(m, layers) for m, layers in zip(models, self.layers_per_stage)]

    def _others_still_fit(self, name: str, models: list[MemoryModel] | None, cancelling: list[str],
                          submitted: list[AdapterJob], point: int) -> None:
        """Under a budget, next to a new job's weights: every unfinished job, and those `submitted`
        at this point before it, must still fit alone (a running job's micro-batches are not cut
        mid-run); ConfigError if not. With `pipeline.preempt: false` the jobs under way must also
        still fit together (they hold their state, so the next plan runs them all from its start);
        otherwise the next plan pauses the last of them in admission order until they do
        (`pause_jobs`)."""
        if self.budget is None or models is None:
            return
        policy, fuse, streams = self.cfg.pipeline.schedule, self.cfg.pipeline.fuse, self.cfg.pipeline.streams
        assert self.current is not None
        steps = [self._still_paused(j) for j in self.current.remaining(point)
                 if j.name not in self.cancelled and j.name not in cancelling]
        steps += [j.job_steps() for j in submitted]
        fits = admission_check(models, steps, self.budget, self.in_flight, policy, fuse, streams)
        for j in steps:
            if not fits(frozenset({j.name})):
                raise ConfigError(f"memory: next to job {name!r}'s LoRA weights, job {j.name!r} would no longer "
                                  f"fit pipeline.memory_budget ({human_bytes(self.budget)}) on its own")
        under_way = frozenset(j.name for j in steps if j.holds_state)
        if len(under_way) > 1 and not fits(under_way) and not self.cfg.pipeline.preempt:
            raise ConfigError(f"memory: next to job {name!r}'s LoRA weights, the jobs under way "
                              f"({', '.join(sorted(under_way))}) would no longer fit pipeline.memory_budget "
                              f"({human_bytes(self.budget)}) together; they hold their gradients and optimizer "
                              "state until they finish (pipeline.preempt: false)")

    def _fit_alone(self, job: AdapterJob, models: list[MemoryModel] | None) -> bool:
        """Under a budget: halve `job`'s micro-batches until it fits alone at the run's in-flight
        count, as start-up does (True if they were cut); ConfigError (a rejection) when 1-row
        micro-batches do not fit."""
        if self.budget is None or models is None:
            return False
        policy, fuse, streams = self.cfg.pipeline.schedule, self.cfg.pipeline.fuse, self.cfg.pipeline.streams
        while True:
            steps = [job.job_steps()]
            if admission_check(models, steps, self.budget, self.in_flight, policy, fuse, streams)(frozenset({job.name})):
                break
            if not job.halve_micro_batches():
                tokens, length = largest_micro(steps, {job.name}, self.world, policy, fuse, streams)
                need = max(models, key=lambda m: m.peak({job.name}, self.in_flight, tokens, length))
                raise ConfigError(
                    f"memory: job {job.name!r} alone needs about "
                    f"{human_bytes(need.peak({job.name}, self.in_flight, tokens, length))} on stage {need.stage} "
                    f"even with 1-row micro-batches, more than pipeline.memory_budget ({human_bytes(self.budget)})")
        return job.largest_micro_rows() < job.config.micro_batch_size

    def _check_priority(self, name: Any, value: Any, cancelling: list[str], submitting: list[str]) -> None:
        if not isinstance(name, str):
            raise ConfigError(f"priority: 'name' must be a job's name; got {name!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"priority: must be an integer; got {value!r}")
        job = self.jobs.get(name)
        if job is None and name not in submitting:
            raise ConfigError(f"priority: no job named {name!r} in this run")
        if name in self.cancelled or name in cancelling:
            raise ConfigError(f"priority: {name!r} is cancelled")
        if job is not None and job.steps_done >= job.total_steps:
            raise ConfigError(f"priority: {name!r} has already finished")

    def _check_cancel(self, name: Any, cancelling: list[str]) -> None:
        if not isinstance(name, str):
            raise ConfigError(f"cancel: 'name' must be a job's name; got {name!r}")
        job = self.jobs.get(name)
        if job is None:
            raise ConfigError(f"cancel: no job named {name!r} in this run")
        if name in self.cancelled or name in cancelling:
            raise ConfigError(f"cancel: {name!r} is already cancelled")
        if job.steps_done >= job.total_steps:
            raise ConfigError(f"cancel: {name!r} has already finished")

    # ---------------------------------------------------------------------------------- applying

    def apply(self, change: Change, plan: StagePlan, point: int) -> StagePlan | None:
        """Apply `change` after the old plan's work below `point`; returns the next plan (None: the
        run's training ends here)."""
        if change.stop:
            self.stopped_at = point
            self._stop()
            return None
        for name in change.cancel:
            self._cancel(name, early=name in change.early)
        new = [self._submit(raw) for raw in change.submit]
        for name, value in change.priority:
            self.cfg.job(name).priority = value
            if self.on_change is not None:
                self.on_change("priority", {"job": name, "priority": value})
        if self.rank == 0 and self.control is not None and (new or change.priority):
            self.control.write_config(self.cfg)
        self._record(change)
        steps = [self._still_paused(j) for j in plan.remaining(point) if j.name not in self.cancelled]
        steps += [self.jobs[name].job_steps() for name in new]
        if not steps:
            return None
        streams = self.cfg.pipeline.streams
        if streams is None and self.fusion is not None:
            streams = choose_streams(steps, self.world, self.fusion, self.hide_latency)
        fits = None
        if self.budget is not None and self.models is not None:
            fits = admission_check(self.models, steps, self.budget, self.in_flight, self.cfg.pipeline.schedule,
                                   self.cfg.pipeline.fuse, streams)
            steps = pause_jobs(steps, self.jobs, self.cfg, fits, self.rank, self.on_change)
        priority = {c.name: c.priority for c in self.cfg.jobs}
        order = admission(steps, self.cfg.pipeline.admission, priority, fits)
        policy = self.cfg.pipeline.schedule
        stream = PlanStream(steps, self.world, policy, self.cfg.pipeline.fuse,
                            max_in_flight=self.in_flight if policy == "lora" else None, admission=order,
                            hide_latency=self.hide_latency, streams=streams, window=self.cfg.pipeline.plan_window)
        return StagePlan(stream, self.rank, steps)

    def _still_paused(self, steps: JobSteps) -> JobSteps:
        """A job paused by an earlier plan stays paused until it runs again: its remaining steps
        start at a step's beginning, and it has not finished a step since (its moments are still in
        host memory)."""
        if self.jobs[steps.name].offloaded and steps.first_micro == 0:
            return dataclasses.replace(steps, paused=True)
        return steps

    def _record(self, change: Change) -> None:
        """Rank 0: log an applied change for a restart (each cancelled job with its steps at the cut,
        each job stopped early with its best evaluation's step), then answer its requests."""
        if self.control is None:
            return
        best = {}
        if change.early:
            assert self.early_stopping is not None
            best = {n: found[0] for n in change.early if (found := self.early_stopping.best(n)) is not None}
        self.control.log_accepted(change, {n: self.cancelled[n] for n in change.cancel}, best)
        for request in self._taken:
            self.control.finish(request, "accepted")
        self._taken.clear()

    def _stop(self) -> None:
        """A graceful stop: checkpoint every unfinished job at its last finished step (its weights and
        AdamW state change only at its optimizer steps, so they are that step's, and every stage has
        done the same steps below the point), unless a checkpoint of that step exists already."""
        for name, job in self.jobs.items():
            if name in self.cancelled or job.steps_done >= job.total_steps or job.failed is not None:
                continue
            saved = self._needs_checkpoint(job)
            if saved:
                self.saver.save(job)
            if self.manifests is not None:
                self.manifests.stop_at(name, job.steps_done, saved)
            self.stopped[name] = job.steps_done

    @staticmethod
    def _needs_checkpoint(job: AdapterJob) -> bool:
        """Whether no checkpoint of the job's last finished step is written or being written. The one
        it resumed from is complete: writing it again in place (a resume on other stages writes other
        parts) would leave the job no valid checkpoint until the new manifest is in."""
        return (job.steps_done > 0 and job.steps_done != job.resumed_step
                and not due(job.config, job.steps_done, job.total_steps))

    def _cancel(self, name: str, early: bool = False) -> None:
        """Stop `name` after its last finished step (cancelled, or stopped `early`)."""
        job = self.jobs[name]
        if job.optimizer is not None:
            job.optimizer.zero_grad(set_to_none=True)  # the unfinished step's gradients
        job.stats = StepStats()
        self.cancelled[name] = job.steps_done
        saved = self._needs_checkpoint(job)
        if saved:  # its last adapter, as a checkpoint every stage writes (a restart keeps it)
            self.saver.save(job)
        job.release_state()
        if self.manifests is not None:
            self.manifests.stop_at(name, job.steps_done, saved)
        if early:
            self.early_stopped[name] = job.steps_done
        if self.on_change is not None and early:
            best = self.early_stopping.best(name) if self.early_stopping is not None else None
            self.on_change("early_stopped", {"job": name, "step": job.steps_done,
                                             "best_step": best[0] if best else None,
                                             "best_eval_loss": best[1] if best else None})
        elif self.on_change is not None:
            self.on_change("cancelled", {"job": name, "step": job.steps_done})

    def _submit(self, raw: dict) -> str:
        mapping = config_mapping(self.cfg)
        mapping["jobs"].append(raw)
        config: JobConfig = parse_config(mapping, "submitted job").jobs[-1]
        self.cfg.jobs.append(config)
        job = self._loaded.pop(config.name, None) or load_job(config, self.tokenizer, self.cfg.seed,
                                                             cache=self.data_cache)
        self.stage.add_adapter(config.name, config.rank, config.alpha, config.dropout, list(config.target_modules),
                               seed=self.cfg.seed, rslora=config.rslora)
        job.make_optimizer(self.stage.adapter_parameters(config.name))
        self.jobs[config.name] = job
        self.job_order.append(config.name)
        if self.models is not None:
            self.models = self._models_with(config, self.models, job.loss_share())
            self._fit_alone(job, self.models)  # rank 0 cut it already while checking it; the others alike
        if self.manifests is not None:
            self.manifests.add(job, resume_fields(self.cfg, config))
        if self.on_change is not None:
            self.on_change("submitted", {"job": config.name, "total_steps": job.total_steps,
                                         "priority": config.priority, "time_submitted": time.time()})
        return config.name
