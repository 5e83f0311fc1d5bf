"""A training run, put together: config -> jobs -> stages -> schedule -> workers -> PEFT adapters.

`train(cfg)` runs on every rank (one rank per pipeline stage; torchrun sets RANK and WORLD_SIZE).
Every rank reads the config and the data plan, so all ranks derive the same schedule without
talking; each builds only its own stage. Rank 0 shows progress, writes metrics and merges the
adapter slices of all stages into one PEFT directory per job. Tests call it in-process for one rank.

Each stage checkpoints its slice of every job (`mlora_pp.checkpoint`); rank 0 decides where each
job resumes (its newest complete checkpoint in output_dir, unless `fresh`) and tells the others,
and every rank then schedules only the steps still to do. A job that goes non-finite fails alone:
its output is its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlora_pp import stopping
from mlora_pp.checkpoint import (
    CheckpointError, ManifestWriter, PartWriter, ResumePlan, ResumePoint, StageSaver, check_space, check_writable,
    checkpoint_weights, clear_stale, newest_checkpoint, plan_resume, read_checkpoint, restore, step_dir,
    unseen_markers, write_file, write_share_marker,
)
from mlora_pp.config import ConfigError, RunConfig, human_bytes, parse_config, size_bytes
from mlora_pp.control import CONTROL, Accepted, ControlDir, PlanChannel, config_mapping
from mlora_pp.data import DataError
from mlora_pp.early_stop import EarlyStopping
from mlora_pp.grad_norm import GradNormChannel
from mlora_pp.data_cache import CLOCK_SKEW_S, DataCache, cache_dir, job_sources
from mlora_pp.job import AdapterJob, EvalDataError, load_job
from mlora_pp.joining import join_ranks
from mlora_pp.lora import warm_up_dropout
from mlora_pp.memory import (
    MemoryModel, MicroBound, SavedTensorMeter, admission_check, budget_bytes, cut_message, fit,
    predicted_peak, probe_micro_batches, process_peak_rss, static_bytes,
)
from mlora_pp.metrics import MetricsLog, ProgressBoard
from mlora_pp.model import StageModel, StageSpec, build_stage
from mlora_pp.partition import plan_stages, stage_specs
from mlora_pp.peft_format import AdapterSpec, save_adapter
from mlora_pp.preflight import (  # noqa: F401 (load_tokenizer re-exported)
    agree, check_inputs, check_output_dir, first_line, load_tokenizer, source,
)
from mlora_pp.profiling import (
    FusionProfile, ProfiledPlan, compare, describe, describe_fusion, fusion_cost, fusion_pair, measure, measure_fusion,
    profile_stages,
)
from mlora_pp.records import RecordInbox, RecordSender
from mlora_pp.replan import Replanner, pause_jobs
from mlora_pp.run_lock import RunLock
from mlora_pp.runtime import EvalRecord, StageWorker, StepRecord
from mlora_pp.schedule import PlanStream, Schedule, admission, choose_streams, min_streams
from mlora_pp.stage_plan import StagePlan
from mlora_pp.trace import TraceRecorder, write_trace
from mlora_pp.transport import PipelineError, StageTransport, settle_send_threads


@dataclass
class TrainResult:
    adapters: dict[str, Path]
    steps: dict[str, int]
    final_loss: dict[str, float]
    wall_s: float
    schedule: Schedule
    """The start-up plan's first segment (`StagePlan.first_schedule`: the whole plan unless it is
    longer than `pipeline.plan_window`)."""
    stage_stats: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Jobs that went non-finite: job -> reason (their adapter is their last good checkpoint)."""
    resumed: dict[str, int] = field(default_factory=dict)
    """Jobs resumed from a checkpoint: job -> its step."""
    cancelled: dict[str, int] = field(default_factory=dict)
    """Jobs cancelled (`launcher cancel`): job -> the steps it had finished."""
    stopped: dict[str, int] = field(default_factory=dict)
    """A graceful stop (SIGTERM) checkpointed these unfinished jobs: job -> their last finished step.
    Their adapters are not written; running the config again resumes them."""
    eval_loss: dict[str, dict[int, float]] = field(default_factory=dict)
    """Rank 0: job -> steps done -> held-out loss (jobs with `eval_data`)."""
    early_stopped: dict[str, int] = field(default_factory=dict)
    """Jobs stopped early (`early_stop_patience`): job -> steps done at the stop."""
    best: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Rank 0, jobs with `early_stop_patience`: job -> (step, held-out loss) of the adapter written."""
    stop_s: float | None = None
    """A graceful stop: seconds from its request (SIGTERM) to the end of training, checkpoints written."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: torchrun's variables, or a single rank without them."""

    rank: int
    world: int
    local_rank: int

    @staticmethod
    def from_environ() -> "DistEnv":
        return DistEnv(
            int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        )

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def prepare_jobs(cfg: RunConfig, tokenizer, cache: DataCache | None = None) -> dict[str, AdapterJob]:
    """Each job's examples and step plan; a data problem names the job's field and the data line.
    Jobs that read one file share its rows (through ``cache``, or one kept in memory for this call)."""
    cache = cache if cache is not None else DataCache(tokenizer, None)
    jobs: dict[str, AdapterJob] = {}
    for i, job in enumerate(cfg.jobs):
        try:
            jobs[job.name] = load_job(job, tokenizer, cfg.seed, cache=cache)
        except DataError as exc:
            field_name = "eval_data" if isinstance(exc, EvalDataError) else "data"
            raise DataError(f"{source(cfg)}: jobs[{i}].{field_name}: {exc}") from exc
    return jobs


def head_share(jobs: Iterable[AdapterJob]) -> float:
    """Loss tokens per padded token over every job's training micro-batches (1 with none): the share
    of a micro-batch the last stage's head runs on (`mlora_pp.head_loss`), for `balance: auto`."""
    counts = [job.token_counts() for job in jobs]
    padded = sum(p for _, p in counts)
    return sum(loss for loss, _ in counts) / padded if padded else 1.0


def attach_adapters(stage: StageModel, jobs: dict[str, AdapterJob], seed: int) -> None:
    for job in jobs.values():
        c = job.config
        stage.add_adapter(c.name, c.rank, c.alpha, c.dropout, list(c.target_modules), seed=seed, rslora=c.rslora)
        job.make_optimizer(stage.adapter_parameters(c.name))


def save_adapters(weights: dict[str, dict], cfg: RunConfig, failed: dict[str, tuple[int, str]] | None = None,
                  cancelled: dict[str, int] | None = None, stopped: dict[str, int] | None = None,
                  best: dict[str, tuple[int, float]] | None = None,
                  early_stopped: dict[str, int] | None = None) -> dict[str, Path]:
    """Write each job's merged adapter (all stages' modules) in PEFT format; none for a job a graceful
    stop left unfinished (`stopped`: it resumes from its checkpoint).

    A failed job gets its last complete checkpoint's adapter instead (none if it failed before its
    first checkpoint) and a `failed.json` saying why; a stale `failed.json` of a good job is removed.
    A cancelled job keeps the adapter of its last finished step (none if it had none) and gets a
    `cancelled.json`. A job with early stopping (`best`: job -> (step, held-out loss)), stopped
    early or not, gets the adapter of its best evaluation's checkpoint and an `early_stopping.json`.
    """
    out: dict[str, Path] = {}
    failed = failed or {}
    cancelled = cancelled or {}
    best = best or {}
    early_stopped = early_stopped or {}
    for job in cfg.jobs:
        directory = cfg.output_dir / job.name
        if job.name in (stopped or {}):
            continue
        if job.name in cancelled and job.name not in failed and job.name not in early_stopped:
            note = {"job": job.name, "cancelled_after_steps": cancelled[job.name]}
            write_file(directory / "cancelled.json", (json.dumps(note, indent=2) + "\n").encode(), 0)
            if cancelled[job.name] == 0:
                continue
        else:
            (directory / "cancelled.json").unlink(missing_ok=True)
        if job.name in failed:
            good, reason = failed[job.name]
            found = newest_checkpoint(cfg.output_dir, job.name)
            note = {"job": job.name, "failed": reason, "good_steps": good,
                    "adapter_from": str(found[0].directory) if found else None}
            write_file(directory / "failed.json", (json.dumps(note, indent=2) + "\n").encode(), 0)
            if found is None:
                for name in ("adapter_model.safetensors", "adapter_config.json"):  # a stale earlier result
                    (directory / name).unlink(missing_ok=True)
                continue
            weights = {**weights, job.name: checkpoint_weights(found[0])}
        else:
            (directory / "failed.json").unlink(missing_ok=True)
        if job.name in best and job.name not in failed:
            step, loss = best[job.name]
            where = step_dir(cfg.output_dir, job.name, step)
            found = read_checkpoint(where, job.name)
            if found is None:
                raise CheckpointError(f"rank 0: the checkpoint of job {job.name!r} at step {step}, its best "
                                      f"evaluation, is missing or damaged ({where}): cannot write its adapter")
            note = {"job": job.name, "best_step": step, "best_eval_loss": None if math.isnan(loss) else loss,
                    "stopped_early_after_steps": early_stopped.get(job.name), "adapter_from": str(where)}
            write_file(directory / "early_stopping.json", (json.dumps(note, indent=2) + "\n").encode(), 0)
            weights = {**weights, job.name: checkpoint_weights(found[0])}
        else:
            (directory / "early_stopping.json").unlink(missing_ok=True)
        spec = AdapterSpec(
            r=job.rank,
            lora_alpha=job.alpha,
            use_rslora=job.rslora,
            target_modules=list(job.target_modules),
            lora_dropout=job.dropout,
            base_model_name_or_path=str(cfg.model.path),
        )
        out[job.name] = directory
        try:
            save_adapter(directory, spec, weights[job.name])
        except OSError as exc:
            raise CheckpointError(f"rank 0: cannot write the adapter of job {job.name!r} to {directory} "
                                  f"({exc.strerror or exc})") from None
    return out


def _stage_summary(rank: int, spec: StageSpec, trace: TraceRecorder, wall_s: float) -> dict:
    busy = trace.busy_s
    return {"event": "stage", "rank": rank, "first_layer": spec.first_layer, "last_layer": spec.last_layer,
            "busy_s": busy, "wait_s": trace.wait_s, "wall_s": wall_s, "utilization": busy / max(wall_s, 1e-9)}


@dataclass
class MemoryPlan:
    """The fitted memory models of every stage, the budget, and the plan admitted under it."""

    models: list[MemoryModel]
    budget: int | None
    in_flight: int
    plan: StagePlan
    streams: int | None = None
    """lora streams the run uses: `pipeline.streams`, or the ones `choose_streams` picked; None: the rule."""
    fusion: list[FusionProfile] = field(default_factory=list)
    """Each stage's fusion probe, when one ran."""
    hide_latency: bool = False
    """Whether the schedule hides latency (`pipeline.hide_latency`: true, or auto and it fits)."""

    def record(self, rank: int, measured: int, method: str, predicted: float, models: list[MemoryModel]) -> dict:
        """The `metrics.jsonl` event of one stage: the predicted peak (over every action the run ran,
        `Replanner.predicted_peak_bytes`) against the measured one, and the memory model in force at
        the end."""
        return {"event": "memory", "rank": rank, "budget_bytes": self.budget, "in_flight": self.in_flight,
                "hide_latency": self.hide_latency,
                "predicted_peak_bytes": int(predicted), "measured_peak_bytes": measured, "method": method,
                "model": models[rank].record()}


def _plan_memory(cfg: RunConfig, env: DistEnv, stage: StageModel, jobs: dict[str, AdapterJob],
                 unbounded: Schedule, device: torch.device, cancelled: dict[str, int]) -> MemoryPlan:
    """Fit every stage's memory model on probes of the run's shapes, share them, and build the
    schedule that admits jobs by `pipeline.admission` within `pipeline.memory_budget` (every rank
    decides the same from the same numbers). With `pipeline.streams: null` and more lora jobs than
    `min_streams`, each stage also times two jobs' micro-batches apart and fused, and the streams
    are chosen from those costs (`choose_streams`). With `pipeline.hide_latency: auto`, the wider
    windows are taken when every job fits the budget at once with them."""
    probes = probe_micro_batches(unbounded)
    steps = [j.job_steps() for j in jobs.values() if j.name not in cancelled]
    live = [j for j in steps if j.steps]
    policy, fuse, stages = cfg.pipeline.schedule, cfg.pipeline.fuse, env.world
    hide = may_hide = False  # hide = the windows of pipeline.hide_latency; may_hide: true, or auto
    if policy == "lora" and stages > 1:
        hide, may_hide = cfg.pipeline.hide_latency is True, cfg.pipeline.hide_latency is not False
    # With streams left automatic and more jobs than the fewest streams that keep the pipeline
    # full, whether to fuse them depends on the per-action cost: every stage measures it.
    pair = None
    if (policy == "lora" and fuse and cfg.pipeline.streams is None and stages > 1
            and len(live) > min_streams(live, stages, may_hide)):
        pair = fusion_pair(unbounded)

    def measure_here() -> tuple:
        worker = StageWorker(stage, jobs, unbounded, stage_index=env.rank, device=device)
        return (fit(worker, env.rank, probes),
                budget_bytes(cfg.pipeline.memory_budget, device) if cfg.pipeline.memory_budget is not None else None,
                measure_fusion(worker, pair) if pair is not None else None)

    mine = agree(env.rank, env.world, measure_here)
    shared = [mine]
    if env.world > 1:
        shared = [None] * env.world
        try:
            dist.all_gather_object(shared, mine)
        except RuntimeError as exc:
            raise PipelineError(f"rank {env.rank}: lost a rank while exchanging memory models ({exc})") from None
    models = [m for m, _, _ in shared]
    budgets = [b for _, b, _ in shared if b is not None]
    budget = min(budgets) if budgets else None
    profiles = [p for _, _, p in shared if p is not None]
    streams = cfg.pipeline.streams
    if pair is not None and len(profiles) == stages:
        streams = choose_streams(live, stages, fusion_cost(profiles), may_hide)
    if may_hide and not hide and budget is not None:  # auto: only if it costs no job its place
        wide = 2 * stages - 1
        hide = admission_check(models, steps, budget, wide, policy, fuse, streams)(frozenset(j.name for j in live))
        if env.rank == 0:
            print(f"memory: hide_latency auto: {'on' if hide else 'off'} (every job with {wide} micro-batches "
                  f"in flight {'fits' if hide else 'does not fit'} the budget)", flush=True)
    if policy == "gpipe":  # every micro-batch of a step is forwarded before the first backward
        options = [max(int(j.micro_batches.counts.max(initial=0)) for j in live)]
    elif policy == "1f1b":
        options = [stages]
    elif hide:  # its windows are fixed: 2S-1, two fewer per stage
        options = [2 * stages - 1]
    else:  # lora: fewer micro-batches in flight (more bubble) before refusing a job
        options = list(range(stages, 0, -1))
    in_flight, fits = options[0], None
    if budget is not None:

        micro = MicroBound(steps, stages, policy, fuse, streams)  # the same for every bound tried

        def fitting(bound: int) -> bool:
            check = admission_check(models, steps, budget, bound, policy, fuse, streams, micro)
            return all(check(frozenset({j.name})) for j in live)

        chosen = next((bound for bound in options if fitting(bound)), None)
        cuts: list[str] = []  # said once the run is known to fit: a refused run was never cut to fit
        if chosen is None and policy != "gpipe":  # gpipe holds a whole step in flight however it is cut
            for name in [j.name for j in live]:  # smaller micro-batches for the jobs that do not fit alone
                while not admission_check(models, steps, budget, options[-1], policy, fuse, streams)(
                        frozenset({name})) and jobs[name].halve_micro_batches():
                    steps = [jobs[j.name].job_steps() for j in steps]
                    live = [j for j in steps if j.steps]
                rows = jobs[name].largest_micro_rows()
                if rows < cfg.job(name).micro_batch_size:
                    cuts.append(cut_message(name, rows, cfg.job(name).micro_batch_size))
            micro = MicroBound(steps, stages, policy, fuse, streams)
            chosen = next((bound for bound in options if fitting(bound)), None)
        if chosen is not None:
            in_flight = chosen
            fits = admission_check(models, steps, budget, chosen, policy, fuse, streams, micro)
            if env.rank == 0:
                for line in cuts:
                    print(line, flush=True)
        else:
            worst = max(live, key=lambda j: max(m.peak({j.name}, options[-1], *micro({j.name})) for m in models))
            tokens, length = micro({worst.name})
            need = max(models, key=lambda m: m.peak({worst.name}, options[-1], tokens, length))
            total = need.peak({worst.name}, options[-1], tokens, length)
            rows = jobs[worst.name].largest_micro_rows()
            cut = f", even at micro-batches of {rows} row(s)" if rows < cfg.job(worst.name).micro_batch_size else ""
            raise ConfigError(
                f"{source(cfg)}: pipeline.memory_budget: job {worst.name!r} alone needs about "
                f"{human_bytes(total)} on stage {need.stage}{cut} "
                f"(model and adapters {human_bytes(need.static)}, its gradients and optimizer state "
                f"{human_bytes(need.job[worst.name])}, activations of {options[-1]} micro-batch(es) of {tokens} "
                f"tokens {human_bytes(total - need.static - need.job[worst.name])}), more than the budget of "
                f"{human_bytes(budget)}")
        if in_flight < options[0] and env.rank == 0:
            print(f"memory: {in_flight} micro-batch(es) in flight instead of {options[0]} to fit the budget",
                  flush=True)
    if fits is not None:
        steps = pause_jobs(steps, jobs, cfg, fits, env.rank)
    priority = {c.name: c.priority for c in cfg.jobs}
    order = admission(steps, cfg.pipeline.admission, priority, fits)
    if fits is not None and len(order.holding) > 1 and not fits(order.holding) and env.rank == 0:
        print(f"memory: the resumed jobs {', '.join(sorted(order.holding))} are predicted over the budget together; "
              "they hold their optimizer state and none of them can be paused, so they run at once anyway",
              flush=True)
    stream = PlanStream(steps, stages, policy, fuse, max_in_flight=in_flight if policy == "lora" else None,
                        admission=order, hide_latency=hide, streams=streams, window=cfg.pipeline.plan_window)
    return MemoryPlan(models, budget, in_flight, StagePlan(stream, env.rank, steps), streams, profiles, hide)


def train(cfg: RunConfig, *, progress: bool | None = None, fresh: bool = False) -> TrainResult:
    """Train every job of `cfg` on this rank's stage; rank 0 writes adapters, metrics and the trace.

    Jobs resume from their newest complete checkpoint in `cfg.output_dir`; `fresh` deletes those
    checkpoints and starts over."""
    env = DistEnv.from_environ()
    device = env.device()
    started_group = False
    if env.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            join_ranks(env.rank, env.world, backend, datetime.timedelta(seconds=cfg.pipeline.timeout_s))
        except RuntimeError as exc:  # the store's wait for the other ranks, or its address unreachable
            raise PipelineError(f"rank {env.rank}: could not join the other {env.world - 1} rank(s) within "
                                f"{cfg.pipeline.timeout_s:g}s ({first_line(exc)})") from None
        started_group = True
    lock = RunLock(cfg.output_dir)

    def lock_output_dir() -> None:  # rank 0 writes results; a second run on them is refused everywhere
        if env.rank == 0:
            check_output_dir(cfg)  # a writable directory, where the lock lives
            lock.acquire(source(cfg))

    try:
        agree(env.rank, env.world, lock_output_dir)
        return _train(cfg, env, device, progress, fresh)
    finally:
        lock.release()
        settle_send_threads()
        if started_group:
            dist.destroy_process_group()


def _accepted_changes(cfg: RunConfig, env: DistEnv, fresh: bool) -> Accepted:
    """Jobs submitted to an earlier run of this output_dir join `cfg.jobs` (as if in the file); jobs
    cancelled (or stopped early) there stay stopped: returned with their steps then. Rank 0 reads,
    all ranks apply."""
    def read() -> Accepted:
        control = ControlDir(cfg.output_dir)
        if env.rank != 0 or not control.root.is_dir():
            return Accepted()
        if fresh:
            (control.root / "accepted.jsonl").unlink(missing_ok=True)
            return Accepted()
        return control.accepted()

    found = agree(env.rank, env.world, read)  # a damaged log stops every rank with the same line
    if env.world > 1 and dist.is_initialized():
        box = [found]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as exc:
            raise PipelineError(f"rank {env.rank}: lost rank 0 while waiting for the submitted jobs ({exc})") from None
        found = box[0]
    if found.submitted:
        mapping = config_mapping(cfg)
        mapping["jobs"] += found.submitted
        cfg.jobs = parse_config(mapping, f"{source(cfg)} + {CONTROL}/accepted.jsonl").jobs
    for job in cfg.jobs:  # priorities given while an earlier run went on (`launcher priority`)
        job.priority = found.priority.get(job.name, job.priority)
    return found


def _earlier_evaluations(path: Path) -> dict[str, dict[int, float]]:
    """Held-out losses an earlier run of this output_dir logged: job -> step -> loss (the latest
    line per step). Unreadable lines are skipped, like `launcher status` does."""
    found: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return found
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (isinstance(record, dict) and record.get("event") == "eval" and isinstance(record.get("job"), str)
                and isinstance(record.get("step"), int) and isinstance(record.get("eval_loss"), (int, float))):
            found.setdefault(record["job"], {})[record["step"]] = float(record["eval_loss"])
    return found


def _share_resume_points(plan: ResumePlan | None, env: DistEnv) -> dict[str, ResumePoint]:
    """Rank 0's resume decision on every rank (so all ranks schedule the same remaining steps)."""
    if env.world == 1:
        assert plan is not None
        return plan.points
    box = [plan.points if plan is not None else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        raise PipelineError(f"rank {env.rank}: lost rank 0 while waiting for the resume points ({exc})") from None
    return box[0]


def _check_shared_output_dir(cfg: RunConfig, env: DistEnv, where: str) -> None:
    """Every rank writes its checkpoint parts and rank 0 their manifests, so all ranks must see one
    output_dir. Found out here, not at the first checkpoint's manifest or the end of the run: each
    rank leaves a marker and rank 0 looks for them (ConfigError on every rank if one is missing)."""
    if env.world == 1:
        return
    token = f"{socket.gethostname()} pid {os.getpid()}: {Path(cfg.output_dir).resolve()}"
    marker = write_share_marker(cfg, env.rank, token)
    try:
        tokens: list[Any] = [None] * env.world
        try:
            dist.all_gather_object(tokens, token)
        except RuntimeError as exc:
            raise PipelineError(f"rank {env.rank}: lost a rank while checking the output_dir ({exc})") from None

        def rank0_sees_every_marker() -> None:
            if env.rank != 0:
                return
            unseen = unseen_markers(cfg, tokens)
            if unseen:
                r = unseen[0]
                raise ConfigError(
                    f"{where}: output_dir: rank 0 does not see rank {r}'s files in {Path(cfg.output_dir).resolve()} "
                    f"(rank {r} is {tokens[r]}): every rank must see the same output_dir, on one machine or a "
                    "filesystem shared between the machines")

        agree(env.rank, env.world, rank0_sees_every_marker)
    finally:
        marker.unlink(missing_ok=True)


def _train(cfg: RunConfig, env: DistEnv, device: torch.device, progress: bool | None, fresh: bool) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model.path)
    where = source(cfg)
    accepted = _accepted_changes(cfg, env, fresh)  # jobs submitted mid-run join cfg.jobs here
    cancelled = accepted.cancelled

    started = time.time()

    def check() -> tuple[Any, DataCache]:
        checked = check_inputs(cfg, env.rank, env.world)
        check_writable(cfg, env.rank, where)  # every rank writes its own checkpoint parts
        cache = DataCache(checked.tokenizer, cache_dir(cfg.data_cache, cfg.output_dir), env.rank)
        cache.fill(job_sources(cfg.jobs), env.world)  # this rank's share of the files not tokenized yet
        return checked, cache

    def prepare() -> tuple[list[StageSpec], dict[str, AdapterJob], ResumePlan | None]:
        jobs = prepare_jobs(cfg, checked.tokenizer, cache)  # every file is tokenized by now (or bad)
        plan = plan_resume(cfg, fresh, where) if env.rank == 0 else None
        specs = checked.specs
        if cfg.pipeline.balance == "auto" and env.world > 1:  # the head's share of tokens is known now
            specs = plan_stages(checked.hf_config, env.world, "auto", head_share=head_share(jobs.values()))
        return specs, jobs, plan

    # Bad input anywhere (a config that no longer fits its checkpoints included) ends every rank with
    # the same line, before any weight is read.
    checked, cache = agree(env.rank, env.world, check)
    specs, jobs, plan = agree(env.rank, env.world, prepare)
    if cfg.data_cache_max_size is not None and env.local_rank == 0:  # one per machine: caches may be local
        # Every rank holds the leases of what it mapped by now. The spared span allows for a network
        # file system's clock, which sets the leases' times, running behind this machine's.
        cache.limit(size_bytes(cfg.data_cache_max_size), spare_used_since=started - CLOCK_SKEW_S)
    tokenizer = checked.tokenizer
    if env.rank == 0:
        assert plan is not None
        clear_stale(cfg, plan, fresh)  # before any rank can write a part
    points = _share_resume_points(plan, env)
    _check_shared_output_dir(cfg, env, where)
    for name, point in points.items():
        jobs[name].steps_done = jobs[name].resumed_step = point.step
    # The plan's first segment (the whole plan when it is short): what probes and profiles measure.
    unplanned = [j.job_steps() for j in jobs.values() if j.name not in cancelled]
    stage_plan = StagePlan(PlanStream(unplanned, env.world, cfg.pipeline.schedule, cfg.pipeline.fuse,
                                      hide_latency=cfg.pipeline.hide_latency is True, streams=cfg.pipeline.streams,
                                      window=cfg.pipeline.plan_window), env.rank, unplanned)
    schedule = stage_plan.first_schedule()
    profiled: ProfiledPlan | None = None
    if cfg.pipeline.balance == "profile" and schedule.micro_batches:  # nothing left to train: keep the estimate
        profiled = profile_stages(
            lambda: measure(model_dir, jobs, schedule, seed=cfg.seed, dtype=cfg.model.dtype,
                            quantize=cfg.model.quantize, lora_path=cfg.pipeline.lora_path,
                            recompute=cfg.pipeline.recompute, device=device),
            specs[-1].last_layer, schedule, env.rank, env.world)
        specs = stage_specs(profiled.counts)
        if env.rank == 0:
            print(describe(profiled), flush=True)

    stage = build_stage(model_dir, specs[env.rank], dtype=cfg.model.dtype, quantize=cfg.model.quantize,
                        lora_path=cfg.pipeline.lora_path, device=device)
    stage.recompute = cfg.pipeline.recompute
    attach_adapters(stage, jobs, cfg.seed)
    if any(c.dropout > 0 for c in cfg.jobs):
        warm_up_dropout(device, stage.dtype)  # compiling the dropout kernel is set-up, not a training step
    stage.warm_up_kernels()  # the layers' fused kernels likewise (on CUDA)

    def load_checkpoints() -> None:
        for name, point in points.items():
            restore(stage, jobs[name], point, where)
        check_space(cfg, stage, jobs, env.rank, where)

    agree(env.rank, env.world, load_checkpoints)
    memory: MemoryPlan | None = None
    if schedule.micro_batches:
        memory = _plan_memory(cfg, env, stage, jobs, schedule, device, cancelled)
        stage_plan = memory.plan
        schedule = stage_plan.first_schedule()
    elif cfg.pipeline.memory_budget is not None and env.rank == 0:
        # The memory model is fitted on probes of the start-up jobs' micro-batches: none is left.
        print("memory: every job of the config has finished, so there is nothing to measure the stages' "
              "memory on: jobs submitted to this run are admitted without checking pipeline.memory_budget",
              flush=True)

    is_rank0, last = env.rank == 0, env.world - 1
    control = records = plans = norms = None
    transport = None
    if env.world > 1:
        # Headers and the final merge (control), step records and clipped jobs' gradient norms (each on
        # its own group, so a posted receive of one can never match another) go over Gloo with CPU
        # tensors whatever the data backend.
        timeout = datetime.timedelta(seconds=cfg.pipeline.timeout_s)
        try:
            control = dist.new_group(backend="gloo", timeout=timeout)
            records = dist.new_group(backend="gloo", timeout=timeout)
            plans = dist.new_group(backend="gloo", timeout=timeout)
            norms = dist.new_group(backend="gloo", timeout=timeout)
        except RuntimeError as exc:
            raise PipelineError(f"rank {env.rank}: lost a rank while setting up the control groups ({exc})") from None
        transport = StageTransport(env.rank, cfg.pipeline.timeout_s, device, group=None, header_group=control)

    metrics = board = manifests = None
    early = EarlyStopping()  # rank 0: each job's best evaluation
    earlier: dict[str, dict[int, float]] = {}  # rank 0: held-out losses an earlier run logged
    final_loss: dict[str, float] = {}
    eval_loss: dict[str, dict[int, float]] = {}
    failed: dict[str, tuple[int, str]] = {}  # on rank 0: job -> (good steps, reason)
    start = time.perf_counter()
    if is_rank0:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        if points or accepted.early:
            earlier = _earlier_evaluations(cfg.output_dir / "metrics.jsonl")
        for name, job in jobs.items():
            if job.config.early_stop_patience is not None and name not in accepted.early:
                early.watch(name, job.config.early_stop_patience, job.eval_points)
                done = points[name].step if name in points else 0  # evaluations up to the checkpoint count
                for step, loss in sorted(earlier.get(name, {}).items()):
                    if step <= done:
                        early.observe(name, step, loss)
        metrics = MetricsLog(cfg.output_dir / "metrics.jsonl", append=bool(points))
        metrics.write({"event": "run", "jobs": {c.name: {"total_steps": jobs[c.name].total_steps,
                                                          "priority": c.priority} for c in cfg.jobs},
                       "admission": cfg.pipeline.admission, "stages": env.world, "schedule": cfg.pipeline.schedule,
                       "memory_budget_bytes": memory.budget if memory is not None else None,
                       "predicted_peak_bytes": ([int(predicted_peak(m, schedule, i, stage_plan.jobs)) for i, m in
                                                 enumerate(memory.models)] if memory is not None else None),
                       "streams": memory.streams if memory is not None else cfg.pipeline.streams,
                       "hide_latency": memory.hide_latency if memory is not None else cfg.pipeline.hide_latency is True,
                       "fusion_probe": [asdict(p) for p in memory.fusion] if memory is not None else [],
                       "wall_clock": time.time(), "time": 0.0})
        if memory is not None and memory.fusion:
            fused = memory.streams is not None
            print(f"fusion: each forward + backward costs {describe_fusion(memory.fusion)}; "
                  + (f"jobs fused into {memory.streams} streams" if fused else "jobs kept apart (fusing would not pay)"),
                  flush=True)
        for name, point in points.items():
            total = jobs[name].total_steps
            line = (f"already finished {point.step}/{total} steps ({point.directory}); --fresh starts over"
                    if point.step >= total else f"resuming after step {point.step}/{total} from {point.directory}")
            if name not in cancelled:  # a cancelled or early-stopped job says so below: it does not resume
                print(f"[{name}] {line}", flush=True)
            metrics.write({"event": "resumed", "job": name, "step": point.step, "checkpoint": str(point.directory)})
        board = ProgressBoard({name: j.total_steps for name, j in jobs.items()}, cfg.log_every, live=progress)
        for name, point in points.items():
            board.resume(name, point.step)
        for name, step in cancelled.items():  # by `launcher cancel` in an earlier run: it stays stopped
            if name in accepted.early:
                board.mark(name, f"stopped early at step {step} (adapter: step {accepted.early[name]})")
                metrics.write({"event": "early_stopped", "job": name, "step": step, "best_step": accepted.early[name],
                               "best_eval_loss": earlier.get(name, {}).get(accepted.early[name]), "time": 0.0})
            else:
                board.mark(name, f"cancelled at step {step}")
                metrics.write({"event": "cancelled", "job": name, "step": step, "time": 0.0})
        assert plan is not None
        manifests = ManifestWriter(cfg.output_dir, jobs, env.world, plan.fields, cfg.seed)
        for name, step in cancelled.items():
            manifests.stop_at(name, step, saved=False)
        manifests.keep = early.keep
        ControlDir(cfg.output_dir).write_config(cfg)

    def changed(event: str, fields: dict) -> None:
        """Rank 0: a job submitted, cancelled, paused, a request rejected or a new plan mid-run."""
        metrics.write({"event": event, **fields, "time": time.perf_counter() - start})
        if event == "submitted":
            board.add(fields["job"], fields["total_steps"])
        elif event == "paused":  # the replanner printed why
            board.mark(fields["job"], "paused", quiet=True)
        elif event == "priority":
            print(f"[{fields['job']}] priority {fields['priority']}", flush=True)
        elif event == "cancelled":
            board.mark(fields["job"], f"cancelled at step {fields['step']}")
        elif event == "plan":  # its predicted peaks, for `launcher status`
            pass
        elif event == "early_stopped":
            board.mark(fields["job"], f"stopped early at step {fields['step']} (adapter: step {fields['best_step']}, "
                                      f"held-out loss {fields['best_eval_loss']:.4f})")
        else:
            print(f"request {fields['request']} rejected: {fields['reason']}", flush=True)

    def fail(job: str, good_steps: int, reason: str) -> None:
        """Rank 0: a job went non-finite on some stage; it stops alone (first report wins)."""
        if job in failed:
            return
        failed[job] = (good_steps, reason)
        metrics.write({"event": "failed", "job": job, "step": good_steps + 1, "reason": reason,
                       "time": time.perf_counter() - start})
        board.mark(job, "failed")
        manifests.fail(job, good_steps)

    def deliver(record: StepRecord, stage: int = last) -> None:
        if record.failure is not None:
            fail(record.job, record.step - 1, f"{record.failure} at step {record.step} on stage {stage}")
            return
        if record.skipped or (record.job in failed and record.step > failed[record.job][0]):
            return  # a good step may be heard of after another stage failed the job's next one
        final_loss[record.job] = record.loss
        line = {"job": record.job, "step": record.step, "loss": record.loss, "tokens": record.tokens,
                "loss_tokens": record.loss_tokens, "lr": record.lr, "time": time.perf_counter() - start}
        if record.grad_norm is not None:  # max_grad_norm: the norm before clipping
            line["grad_norm"] = record.grad_norm
        metrics.write(line)
        board.update(record.job, record.step, record.loss, record.tokens, record.grad_norm)

    def evaluated(record: EvalRecord) -> None:
        """Rank 0: a job's held-out loss after `record.step` steps (not for a job that failed)."""
        if record.job in failed and record.step > failed[record.job][0]:
            return
        eval_loss.setdefault(record.job, {})[record.step] = record.loss
        metrics.write({"job": record.job, "event": "eval", "step": record.step, "eval_loss": record.loss,
                       "eval_loss_tokens": record.loss_tokens, "time": time.perf_counter() - start})
        board.evaluated(record.job, record.step, record.loss)
        if early.observe(record.job, record.step, record.loss):
            replanner.stop_early(record.job)

    heard: dict[tuple[str, int], dict[int, StepRecord]] = {}  # on rank 0: (job, step) -> stage -> record

    def release() -> None:
        """Settle every step that all stages have finished: a failure on any stage fails the job there,
        else the last stage's record (the loss) is delivered. Until then a step is held, so a loss is
        never logged for a step some stage failed, whichever stage's report comes first."""
        for key in [k for k, got in heard.items() if len(got) == env.world - 1 and jobs[k[0]].steps_done >= k[1]]:
            got = heard.pop(key)
            stage = next((k for k in sorted(got) if got[k].failure is not None), last)
            deliver(got[stage], stage)

    def hear(record: StepRecord | EvalRecord, stage: int) -> None:
        if isinstance(record, EvalRecord):
            evaluated(record)
            return
        heard.setdefault((record.job, record.step), {})[stage] = record
        release()

    job_order = list(jobs)  # record index -> job; submitted jobs are appended on every rank alike
    inbox = sender = None
    if env.world == 1:
        on_step, on_eval = deliver, evaluated
    elif env.rank > 0:
        on_step = sender = RecordSender(job_order, records, env.rank)
        on_eval = sender if env.rank == last else None
    else:
        on_step = on_eval = None
    if env.world > 1 and is_rank0:
        inbox = RecordInbox(job_order, list(range(1, env.world)), records, hear)

    def after_action() -> None:
        if inbox is not None:
            inbox.poll()
            release()
        manifests.poll()

    def admitted(job: str) -> None:
        metrics.write({"event": "admitted", "job": job, "time": time.perf_counter() - start})
        board.start(job)

    cpu = device.type != "cuda"
    parts = PartWriter(env.rank, cfg.pipeline.timeout_s)
    worker = StageWorker(stage, jobs, stage_plan, stage_index=env.rank, transport=transport, device=device,
                         trace=TraceRecorder(cfg.pipeline.trace_actions),
                         on_step=on_step, on_eval=on_eval, after_action=after_action if is_rank0 else None,
                         norms=(GradNormChannel(env.rank, env.world, cfg.pipeline.timeout_s, norms, job_order)
                                if env.world > 1 else None),
                         after_step=StageSaver(cfg.output_dir, stage, env.rank, cfg.seed, parts),
                         on_failed=fail if is_rank0 else None, on_start=admitted if is_rank0 else None,
                         meter=SavedTensorMeter(list(stage.parameters()) + list(stage.buffers())) if cpu else None,
                         static_bytes=static_bytes(stage) if cpu else 0)
    replanner = Replanner(
        cfg, env.rank, env.world, stage, jobs, tokenizer, worker.after_step,
        layers_per_stage=[spec.last_layer - spec.first_layer for spec in specs],
        models=memory.models if memory is not None else None, budget=memory.budget if memory is not None else None,
        in_flight=memory.in_flight if memory is not None else (schedule.max_in_flight or env.world),
        hide_latency=memory.hide_latency if memory is not None else cfg.pipeline.hide_latency is True,
        fusion=fusion_cost(memory.fusion) if memory is not None and len(memory.fusion) == env.world else None,
        channel=PlanChannel(env.rank, env.world, plans, cfg.pipeline.timeout_s) if env.world > 1 else None,
        control=ControlDir(cfg.output_dir) if is_rank0 else None, manifests=manifests,
        on_change=changed if is_rank0 else None, job_order=job_order, cancelled=dict(cancelled),
        early_stopping=early if is_rank0 else None, early_stopped={n: s for n, s in cancelled.items() if n in accepted.early},
        data_cache=cache)
    worker.replan = replanner
    for name in jobs:  # patience that ran out in an earlier run, before its stop took effect
        if is_rank0 and early.decided(name):
            replanner.stop_early(name)
    if not cpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        stopping.set_accepting(True)  # from here SIGTERM stops within a few micro-batches, jobs checkpointed
        try:
            worker.run()
        finally:
            stopping.set_accepting(False)
        parts.flush()  # every part is on disk before the gather: rank 0 then writes the last manifests
        if replanner.channel is not None and is_rank0:
            replanner.channel.flush()
        if sender is not None:
            sender.finish(cfg.pipeline.timeout_s)
        if inbox is not None:
            inbox.drain(cfg.pipeline.timeout_s, env.rank)
            release()
            assert not heard, f"steps not every stage reported, or rank 0 never did: {sorted(heard)}"
        wall = time.perf_counter() - start
        summary = _stage_summary(env.rank, stage.spec, worker.trace, wall)
        summary["bytes_sent"] = transport.bytes_sent if transport is not None else 0
        summary["plan_segments"] = worker.plan_segments
        if memory is not None:
            if cpu:
                measured, method = worker.peak_bytes, "tensor bytes held (weights, gradients, optimizer state, saved activations)"
            else:
                measured, method = torch.cuda.max_memory_allocated(device), "cuda allocator peak"
            predicted = replanner.predicted_peak_bytes
            if predicted is None:  # no plan ran (every job was done already)
                predicted = predicted_peak(memory.models[env.rank], schedule, env.rank, stage_plan.jobs)
            summary["memory"] = memory.record(env.rank, measured, method, predicted, replanner.models or memory.models)
            summary["memory"]["process_peak_rss_bytes"] = process_peak_rss()
        slices = {name: {p: (a.cpu(), b.cpu()) for p, (a, b) in stage.adapter_state(name).items()} for name in jobs}
        gathered = [(slices, worker.trace, summary, worker.failures)]
        if env.world > 1:
            everything = [None] * env.world if is_rank0 else None
            try:
                dist.gather_object(gathered[0], everything, dst=0, group=control)
            except RuntimeError as exc:
                raise PipelineError(f"rank {env.rank}: lost a rank while merging adapters on rank 0 ({exc})") from None
            gathered = everything if is_rank0 else []
        if is_rank0:
            for *_, failures in gathered:  # every failure was heard already; this is belt and braces
                for job, (good_steps, reason) in failures.items():
                    fail(job, good_steps, reason)
            manifests.drain(cfg.pipeline.timeout_s)  # every part was written before the gather
    except BaseException:
        # Stopped early (Ctrl-C, SIGTERM, a lost rank): this rank's queued parts go to disk, and rank 0
        # writes the manifest of every checkpoint whose parts are all there, so the next run resumes
        # from the newest step it can. Best effort: the error on its way out is what gets reported.
        with contextlib.suppress(Exception):
            parts.close()
            if manifests is not None:
                manifests.poll()
        raise
    finally:
        parts.close()
        if board is not None:
            board.close()
    steps = {n: failed[n][0] if n in failed else replanner.cancelled.get(n, j.steps_done) for n, j in jobs.items()}
    result = TrainResult({}, steps, final_loss, time.perf_counter() - start, schedule,
                         resumed={n: p.step for n, p in points.items()}, stopped=dict(replanner.stopped),
                         eval_loss=eval_loss)
    if is_rank0:
        merged = {name: {} for name in jobs}
        for slices, *_ in gathered:
            for name, weights in slices.items():
                merged[name].update(weights)
        best = {n: found for n in jobs if (found := early.best(n)) is not None}
        best.update({n: (step, earlier.get(n, {}).get(step, math.nan))  # stopped early in an earlier run
                     for n, step in accepted.early.items()})
        result.best = {n: b for n, b in best.items() if n not in failed and n not in replanner.stopped
                       and (n not in replanner.cancelled or n in replanner.early_stopped)}
        result.early_stopped = dict(replanner.early_stopped)
        result.adapters = save_adapters(merged, cfg, failed, replanner.cancelled, replanner.stopped,
                                        best=result.best, early_stopped=result.early_stopped)
        result.cancelled = dict(replanner.cancelled)
        result.failed = {n: reason for n, (_, reason) in failed.items()}
        result.stage_stats = [s for _, _, s, _ in gathered]
        for stats in result.stage_stats:
            memory_record = stats.pop("memory", None)
            metrics.write(stats)
            if memory_record is not None:
                metrics.write(memory_record)
                print(f"memory: stage {memory_record['rank']}: predicted peak "
                      f"{human_bytes(memory_record['predicted_peak_bytes'])}, measured "
                      f"{human_bytes(memory_record['measured_peak_bytes'])}"
                      + (f" (budget {human_bytes(memory.budget)})" if memory.budget else ""), flush=True)
        if profiled is not None:
            busy = [stats["busy_s"] for stats in result.stage_stats]
            metrics.write(profiled.record(busy))
            print(compare(profiled, busy), flush=True)
        asked = stopping.requested_at()
        if replanner.stopped and asked is not None:
            result.stop_s = time.monotonic() - asked
        for name, steps_done in replanner.stopped.items():  # no done line: the run did not finish
            metrics.write({"event": "stopped", "job": name, "step": steps_done, "time": time.perf_counter() - start,
                           "micro_batch": replanner.stopped_at, "stop_s": result.stop_s})
        if not replanner.stopped:
            metrics.write({"event": "done", "time": time.perf_counter() - start})
        metrics.close()
        write_trace(cfg.output_dir / "trace.json", [t for _, t, _, _ in gathered])
    return result
