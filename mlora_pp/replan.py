"""A new plan mid-run: jobs submitted and cancelled while the pipeline runs (`mlora_pp.control`).

Every `PLAN_EVERY`-th micro-batch of a plan, and its end, is a decision point. Before that
micro-batch's forward (or after the plan's last action), rank 0 takes
the requests waiting in `OUTPUT_DIR/control`, checks them, and tells every rank what it accepted
(possibly nothing); the other ranks hear it before their own forward of that micro-batch. On a
change, every rank finishes the old plan's work below that micro-batch (`cut_actions`), then
applies the change the same way and builds the same next plan from the same numbers: the old
plan's remaining parts (`remaining_steps`; a step that straddles the point continues with the
gradients it has accumulated), minus cancelled jobs, plus the new jobs, admitted as at start-up.

A cancelled job drops its unfinished step and keeps the adapter of its last finished one (every
stage checkpoints it, so a restart keeps it too). A submitted job is tokenized on every rank
(its data file must be readable there, like the config's), gets its adapter and optimizer on every
stage, and is checkpointed like the others.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlora_pp.checkpoint import ManifestWriter, StageSaver, due, resume_fields
from mlora_pp.config import ConfigError, JobConfig, RunConfig, parse_config
from mlora_pp.control import PLAN_EVERY, Change, ControlDir, PlanChannel, config_mapping, validate_submission
from mlora_pp.data import DataError
from mlora_pp.job import AdapterJob, StepStats, load_job
from mlora_pp.memory import MemoryModel, admission_check
from mlora_pp.model import StageModel
from mlora_pp.schedule import CostModel, Schedule, admission, build_schedule, choose_streams, remaining_steps

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_state_bytes(config: Any, layers: int, rank: int, targets: list[str], float32: bool = True) -> int:
    """A job's gradients and AdamW moments on `layers` decoder layers, from the model's shapes (what
    `mlora_pp.memory.job_state_bytes` counts on a built stage, for a stage this rank does not hold)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, config.intermediate_size),
              "up_proj": (h, config.intermediate_size), "down_proj": (config.intermediate_size, h)}
    params = layers * sum(rank * sum(shapes[t]) for t in targets)
    return params * (12 if float32 else 14)


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
    fusion: CostModel | None = None
    """The per-action costs the fusion probe measured at start-up (`pipeline.streams: null`): each
    new plan's streams are chosen from them for its own jobs (`choose_streams`)."""
    channel: PlanChannel | None = None
    control: ControlDir | None = None  # rank 0
    manifests: ManifestWriter | None = None  # rank 0
    on_change: Callable[[str, dict], None] | None = None
    """Rank 0: (event, fields) for metrics and the progress table ("submitted", "cancelled", "rejected")."""
    job_order: list[str] = field(default_factory=list)
    """Job names by record index, shared with the step-record sender and inbox (extended alike)."""
    cancelled: dict[str, int] = field(default_factory=dict)
    schedules: list[Schedule] = field(default_factory=list)
    """Every plan this rank ran, in order."""
    _loaded: dict[str, AdapterJob] = field(default_factory=dict, repr=False)
    """Rank 0: submitted jobs tokenized while checking them, used again when they are added."""

    def points(self, schedule: Schedule) -> list[int]:
        if not self.schedules or self.schedules[-1] is not schedule:
            self.schedules.append(schedule)
        count = len(schedule.micro_batches)
        return list(range(PLAN_EVERY, count, PLAN_EVERY)) + [count]  # and the plan's end

    # ---------------------------------------------------------------------------------- deciding

    def decide(self, point: int) -> Change | None:
        if self.rank != 0:
            assert self.channel is not None
            return self.channel.await_decision(point)
        change = self._take_requests()
        if self.channel is not None:
            self.channel.announce(point, change)
        return change

    def _take_requests(self) -> Change | None:
        assert self.control is not None
        submit: list[dict] = []
        cancel: list[str] = []
        cfg = self.cfg
        for request in self.control.pending():
            try:
                if request.kind == "submit":
                    cfg = validate_submission(cfg, request.body.get("job"), str(request.path))
                    self._loaded[cfg.jobs[-1].name] = load_job(cfg.jobs[-1], self.tokenizer, cfg.seed)
                    submit.append(request.body["job"])
                elif request.kind == "cancel":
                    name = request.body.get("name")
                    self._check_cancel(name, cancel)
                    cancel.append(name)
                else:
                    raise ConfigError(f"{request.path}: not a submit or cancel request")
            except (ConfigError, DataError) as exc:
                self.control.finish(request, f"rejected: {exc}")
                if self.on_change is not None:
                    self.on_change("rejected", {"request": request.path.name, "reason": str(exc)})
                continue
            self.control.finish(request, "accepted")
        if not submit and not cancel:
            return None
        change = Change(tuple(submit), tuple(cancel))
        self.control.log_accepted(change, {n: self.jobs[n].steps_done for n in cancel if n in self.jobs})
        return change

    def _check_cancel(self, name: Any, cancelling: list[str]) -> None:
        job = self.jobs.get(name)
        if job is None:
            raise ConfigError(f"cancel: no job named {name!r} in this run")
        if name in self.cancelled or name in cancelling:
            raise ConfigError(f"cancel: {name!r} is already cancelled")
        if job.steps_done >= job.total_steps:
            raise ConfigError(f"cancel: {name!r} has already finished")

    # ---------------------------------------------------------------------------------- applying

    def apply(self, change: Change, schedule: Schedule, point: int) -> Schedule | None:
        """Apply `change` after the old plan's work below `point`; returns the next plan."""
        for name in change.cancel:
            self._cancel(name)
        new = [self._submit(raw) for raw in change.submit]
        if self.rank == 0 and self.control is not None and new:
            self.control.write_config(self.cfg)
        steps = [j for j in remaining_steps(schedule, point) if j.name not in self.cancelled]
        steps += [self.jobs[name].job_steps() for name in new]
        if not steps:
            return None
        streams = self.cfg.pipeline.streams
        if streams is None and self.fusion is not None:
            streams = choose_streams(steps, self.world, self.fusion, self.cfg.pipeline.hide_latency)
        fits = None
        if self.budget is not None and self.models is not None:
            fits = admission_check(self.models, steps, self.budget, self.in_flight, self.cfg.pipeline.schedule,
                                   self.cfg.pipeline.fuse, streams)
        priority = {c.name: c.priority for c in self.cfg.jobs}
        order = admission(steps, self.cfg.pipeline.admission, priority, fits)
        policy = self.cfg.pipeline.schedule
        return build_schedule(steps, self.world, policy, self.cfg.pipeline.fuse,
                              max_in_flight=self.in_flight if policy == "lora" else None, admission=order,
                              hide_latency=self.cfg.pipeline.hide_latency, streams=streams)

    def _cancel(self, name: str) -> None:
        job = self.jobs[name]
        if job.optimizer is not None:
            job.optimizer.zero_grad(set_to_none=True)  # the unfinished step's gradients
        job.stats = StepStats()
        self.cancelled[name] = job.steps_done
        saved = job.steps_done > 0 and not due(job.config, job.steps_done, job.total_steps)
        if saved:  # its last adapter, as a checkpoint every stage writes (a restart keeps it)
            self.saver.save(job)
        job.release_state()
        if self.manifests is not None:
            self.manifests.cancel(name, job.steps_done, saved)
        if self.on_change is not None:
            self.on_change("cancelled", {"job": name, "step": job.steps_done})

    def _submit(self, raw: dict) -> str:
        mapping = config_mapping(self.cfg)
        mapping["jobs"].append(raw)
        config: JobConfig = parse_config(mapping, "submitted job").jobs[-1]
        self.cfg.jobs.append(config)
        job = self._loaded.pop(config.name, None) or load_job(config, self.tokenizer, self.cfg.seed)
        self.stage.add_adapter(config.name, config.rank, config.alpha, config.dropout, list(config.target_modules),
                               seed=self.cfg.seed)
        job.make_optimizer(self.stage.adapter_parameters(config.name))
        self.jobs[config.name] = job
        self.job_order.append(config.name)
        if self.models is not None:
            float32 = self.cfg.model.dtype == "float32"
            self.models = [dataclasses.replace(m, job={**m.job, config.name: lora_state_bytes(
                self.stage.config, layers, config.rank, list(config.target_modules), float32)})
                for m, layers in zip(self.models, self.layers_per_stage)]
        if self.manifests is not None:
            self.manifests.add(job, resume_fields(self.cfg, config))
        if self.on_change is not None:
            self.on_change("submitted", {"job": config.name, "total_steps": job.total_steps,
                                         "priority": config.priority, "time_submitted": time.time()})
        return config.name
