"""A training run, put together: config -> jobs -> stages -> schedule -> workers -> PEFT adapters.

`train(cfg)` runs on every rank (one rank per pipeline stage; torchrun sets RANK and WORLD_SIZE).
Every rank reads the config and the data plan, so all ranks derive the same schedule without
talking; each builds only its own stage. Rank 0 shows progress, writes metrics and merges the
adapter slices of all stages into one PEFT directory per job. Tests call it in-process for one rank.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mlora_pp.config import RunConfig
from mlora_pp.data import DataError
from mlora_pp.job import AdapterJob, load_job
from mlora_pp.metrics import MetricsLog, ProgressBoard
from mlora_pp.model import StageModel, StageSpec, build_stage
from mlora_pp.peft_format import AdapterSpec, save_adapter
from mlora_pp.preflight import agree, check_inputs, load_tokenizer, source  # noqa: F401 (load_tokenizer re-exported)
from mlora_pp.records import RecordInbox, RecordSender
from mlora_pp.runtime import StageWorker, StepRecord, TraceEvent
from mlora_pp.schedule import Schedule, build_schedule
from mlora_pp.transport import PipelineError, StageTransport


@dataclass
class TrainResult:
    adapters: dict[str, Path]
    steps: dict[str, int]
    final_loss: dict[str, float]
    wall_s: float
    schedule: Schedule
    stage_stats: list[dict] = field(default_factory=list)


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


def prepare_jobs(cfg: RunConfig, tokenizer) -> dict[str, AdapterJob]:
    """Each job's examples and step plan; a data problem names the job's field and the data line."""
    jobs: dict[str, AdapterJob] = {}
    for i, job in enumerate(cfg.jobs):
        try:
            jobs[job.name] = load_job(job, tokenizer, cfg.seed)
        except DataError as exc:
            raise DataError(f"{source(cfg)}: jobs[{i}].data: {exc}") from exc
    return jobs


def attach_adapters(stage: StageModel, jobs: dict[str, AdapterJob], seed: int) -> None:
    for job in jobs.values():
        c = job.config
        stage.add_adapter(c.name, c.rank, c.alpha, c.dropout, list(c.target_modules), seed=seed)
        job.make_optimizer(stage.adapter_parameters(c.name))


def save_adapters(weights: dict[str, dict], cfg: RunConfig) -> dict[str, Path]:
    """Write each job's merged adapter (all stages' modules) in PEFT format."""
    out: dict[str, Path] = {}
    for job in cfg.jobs:
        spec = AdapterSpec(
            r=job.rank,
            lora_alpha=job.alpha,
            target_modules=list(job.target_modules),
            lora_dropout=job.dropout,
            base_model_name_or_path=str(cfg.model.path),
        )
        out[job.name] = cfg.output_dir / job.name
        save_adapter(out[job.name], spec, weights[job.name])
    return out


def _stage_summary(rank: int, trace: list[TraceEvent], wall_s: float) -> dict:
    busy = sum(e.end - e.start - e.wait for e in trace)
    return {"event": "stage", "rank": rank, "busy_s": busy, "wall_s": wall_s, "utilization": busy / max(wall_s, 1e-9)}


def write_trace(path: Path, traces: list[list[TraceEvent]]) -> None:
    """Chrome/Perfetto trace: one row per stage, one slice per action (waits shown separately)."""
    origin = min((e.start for t in traces for e in t), default=0.0)
    events = []
    for rank, trace in enumerate(traces):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"stage {rank}"}})
        for e in trace:
            start = e.start + e.wait
            events.append({"name": e.name, "cat": e.kind, "ph": "X", "pid": 0, "tid": rank,
                           "ts": (start - origin) * 1e6, "dur": (e.end - start) * 1e6})
            if e.wait > 0:
                events.append({"name": "wait", "cat": "wait", "ph": "X", "pid": 0, "tid": rank,
                               "ts": (e.start - origin) * 1e6, "dur": e.wait * 1e6})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, path)


def train(cfg: RunConfig, *, progress: bool | None = None) -> TrainResult:
    """Train every job of `cfg` on this rank's stage; rank 0 writes adapters, metrics and the trace."""
    env = DistEnv.from_environ()
    device = env.device()
    started_group = False
    if env.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.pipeline.timeout_s))
        started_group = True
    try:
        return _train(cfg, env, device, progress)
    finally:
        if started_group:
            dist.destroy_process_group()


def _train(cfg: RunConfig, env: DistEnv, device: torch.device, progress: bool | None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model.path)

    def prepare() -> tuple[list[StageSpec], dict[str, AdapterJob], Schedule]:
        checked = check_inputs(cfg, env.rank, env.world)
        jobs = prepare_jobs(cfg, checked.tokenizer)
        schedule = build_schedule([j.job_steps() for j in jobs.values()], env.world, cfg.pipeline.schedule,
                                  cfg.pipeline.fuse)
        return checked.specs, jobs, schedule

    # Bad input anywhere ends every rank with the same line, before any weight is read.
    specs, jobs, schedule = agree(env.rank, env.world, prepare)

    stage = build_stage(model_dir, specs[env.rank], dtype=cfg.model.dtype, quantize=cfg.model.quantize,
                        lora_path=cfg.pipeline.lora_path, device=device)
    stage.recompute = cfg.pipeline.recompute
    attach_adapters(stage, jobs, cfg.seed)

    is_rank0, last = env.rank == 0, env.world - 1
    control = records = None
    transport = None
    if env.world > 1:
        # Headers and the final merge (control), and step records (their own group, so a posted record
        # receive can never match a header) go over Gloo with CPU tensors whatever the data backend.
        timeout = datetime.timedelta(seconds=cfg.pipeline.timeout_s)
        control = dist.new_group(backend="gloo", timeout=timeout)
        records = dist.new_group(backend="gloo", timeout=timeout)
        transport = StageTransport(env.rank, cfg.pipeline.timeout_s, device, group=None, header_group=control)

    metrics = board = None
    final_loss: dict[str, float] = {}
    start = time.perf_counter()
    if is_rank0:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(cfg.output_dir / "metrics.jsonl")
        board = ProgressBoard({name: j.total_steps for name, j in jobs.items()}, cfg.log_every, live=progress)

    def deliver(record: StepRecord) -> None:
        final_loss[record.job] = record.loss
        metrics.write({"job": record.job, "step": record.step, "loss": record.loss, "tokens": record.tokens,
                       "loss_tokens": record.loss_tokens, "lr": record.lr, "time": time.perf_counter() - start})
        board.update(record.job, record.step, record.loss, record.tokens)

    job_index = {name: i for i, name in enumerate(jobs)}
    inbox = sender = None
    if env.world == 1:
        on_step = deliver
    elif env.rank == last:
        on_step = sender = RecordSender(job_index, records, env.rank)
    else:
        on_step = None
    if env.world > 1 and is_rank0:
        inbox = RecordInbox({n: j.total_steps for n, j in jobs.items()}, last, records, deliver)

    worker = StageWorker(stage, jobs, schedule, stage_index=env.rank, transport=transport, device=device,
                         on_step=on_step, after_action=inbox.poll if inbox else None)
    try:
        worker.run()
        if sender is not None:
            sender.flush(cfg.pipeline.timeout_s, env.rank)
        if inbox is not None:
            inbox.drain(cfg.pipeline.timeout_s, env.rank)
        wall = time.perf_counter() - start
        summary = _stage_summary(env.rank, worker.trace, wall)
        slices = {name: {p: (a.cpu(), b.cpu()) for p, (a, b) in stage.adapter_state(name).items()} for name in jobs}
        gathered = [(slices, worker.trace, summary)]
        if env.world > 1:
            everything = [None] * env.world if is_rank0 else None
            try:
                dist.gather_object(gathered[0], everything, dst=0, group=control)
            except RuntimeError as exc:
                raise PipelineError(f"rank {env.rank}: lost a rank while merging adapters on rank 0 ({exc})") from None
            gathered = everything if is_rank0 else []
    finally:
        if board is not None:
            board.close()
    result = TrainResult({}, {n: j.steps_done for n, j in jobs.items()}, final_loss, time.perf_counter() - start, schedule)
    if is_rank0:
        merged = {name: {} for name in jobs}
        for slices, _, _ in gathered:
            for name, weights in slices.items():
                merged[name].update(weights)
        result.adapters = save_adapters(merged, cfg)
        result.stage_stats = [s for _, _, s in gathered]
        for stats in result.stage_stats:
            metrics.write(stats)
        metrics.close()
        write_trace(cfg.output_dir / "trace.json", [t for _, t, _ in gathered])
    return result
