"""A training run, put together: config -> jobs -> stage -> schedule -> worker -> PEFT adapters.

`train(cfg)` is what the launcher calls on each rank, and what tests call in-process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mlora_pp.config import RunConfig
from mlora_pp.job import AdapterJob, load_job
from mlora_pp.metrics import MetricsLog, ProgressBoard
from mlora_pp.model import StageModel, build_stage, read_model_config
from mlora_pp.peft_format import AdapterSpec, save_adapter
from mlora_pp.runtime import StageWorker, StepRecord
from mlora_pp.schedule import Schedule, build_schedule


@dataclass
class TrainResult:
    adapters: dict[str, Path]
    steps: dict[str, int]
    final_loss: dict[str, float]
    wall_s: float
    schedule: Schedule


def load_tokenizer(model_dir: Path):
    """The model directory's own tokenizer, offline."""
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


def prepare_jobs(cfg: RunConfig, tokenizer) -> dict[str, AdapterJob]:
    return {job.name: load_job(job, tokenizer, cfg.seed) for job in cfg.jobs}


def check_jobs_fit_model(cfg: RunConfig, model_dir: Path) -> None:
    """Refuse adapters the model cannot hold, before any weights are read."""
    from mlora_pp.config import ConfigError

    hf = read_model_config(model_dir)
    width = min(hf.hidden_size, hf.intermediate_size)
    limit = getattr(hf, "max_position_embeddings", None)
    for i, job in enumerate(cfg.jobs):
        if job.rank > width:
            raise ConfigError(f"{cfg.source}: jobs[{i}].rank: {job.rank} is larger than the layer width {width}")
        if limit is not None and job.max_seq_len > limit:
            raise ConfigError(
                f"{cfg.source}: jobs[{i}].max_seq_len: {job.max_seq_len} exceeds the model's "
                f"max_position_embeddings {limit}"
            )


def attach_adapters(stage: StageModel, jobs: dict[str, AdapterJob], seed: int) -> None:
    for job in jobs.values():
        c = job.config
        stage.add_adapter(c.name, c.rank, c.alpha, c.dropout, list(c.target_modules), seed=seed)
        job.make_optimizer(stage.adapter_parameters(c.name))


def save_adapters(stage: StageModel, cfg: RunConfig) -> dict[str, Path]:
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
        save_adapter(out[job.name], spec, stage.adapter_state(job.name))
    return out


def train(cfg: RunConfig, *, progress: bool | None = None) -> TrainResult:
    """Train every job of `cfg` on one rank and write adapters + metrics under `cfg.output_dir`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise NotImplementedError(f"WORLD_SIZE={world}: the multi-stage pipeline is not implemented yet")
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model.path)
    check_jobs_fit_model(cfg, model_dir)
    tokenizer = load_tokenizer(model_dir)
    jobs = prepare_jobs(cfg, tokenizer)
    schedule = build_schedule([j.job_steps() for j in jobs.values()], 1, cfg.pipeline.schedule, cfg.pipeline.fuse)

    stage = build_stage(model_dir, dtype=cfg.model.dtype, quantize=cfg.model.quantize, lora_path=cfg.pipeline.lora_path)
    attach_adapters(stage, jobs, cfg.seed)

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(cfg.output_dir / "metrics.jsonl")
    board = ProgressBoard({name: j.total_steps for name, j in jobs.items()}, cfg.log_every, live=progress)
    final_loss: dict[str, float] = {}
    start = time.perf_counter()

    def on_step(record: StepRecord) -> None:
        final_loss[record.job] = record.loss
        metrics.write(
            {
                "job": record.job,
                "step": record.step,
                "loss": record.loss,
                "tokens": record.tokens,
                "loss_tokens": record.loss_tokens,
                "lr": record.lr,
                "time": time.perf_counter() - start,
            }
        )
        board.update(record.job, record.step, record.loss, record.tokens)

    worker = StageWorker(stage, jobs, schedule, on_step=on_step)
    try:
        worker.run(0)
    finally:
        board.close()
        metrics.close()
    adapters = save_adapters(stage, cfg)
    return TrainResult(
        adapters=adapters,
        steps={name: j.steps_done for name, j in jobs.items()},
        final_loss=final_loss,
        wall_s=time.perf_counter() - start,
        schedule=schedule,
    )
