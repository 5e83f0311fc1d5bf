"""External baselines for `benchmarks.run`, trained from the same run config as our launcher.

``python -m benchmarks.baselines METHOD CONFIG.yaml --out DIR`` (under torchrun for 2 ranks) reads
the config with our own loaders, so the jobs, their tokenized rows, their step plans (which rows in
which micro-batch), LoRA rank/alpha/dropout/targets, AdamW settings, learning-rate schedule and step
counts are exactly those of our runtime. The model is transformers' `LlamaForCausalLM` (or Mistral,
Qwen2) loaded from the same directory, with `peft.get_peft_model` adding LoRA. Jobs run one after
another; each gets a fresh model and optimizer, and that set-up is outside the timed window.

Methods:
- ``torch-1f1b``: `torch.distributed.pipelining.Schedule1F1B`, one stage per rank, the layers split
  as our launcher splits them; n_microbatches = the step's micro-batches. Its stages need one
  shape for every micro-batch of a step, so a step is padded to its longest row (ours pads each
  micro-batch to its own); one stage/schedule pair is built per padded length and reused.
- ``fsdp2``: `fully_shard` on every decoder block, then on the root (torchtune's LoRA layout):
  frozen base and LoRA weights sharded across ranks, data parallel: rank r takes micro-batches
  r, r+W, ... of every step; gradients are reduce-scattered after every backward, as in torchtune's
  recipe (no skipped sync on accumulation steps); FSDP2's defaults otherwise (reshard after forward).
- ``peft``: one process, plain peft training, no distribution.

The loss of a micro-batch is its summed token cross-entropy over the loss tokens of the whole step
(our definition), so every method computes the same gradients. Each rank writes
``DIR/result-rank<R>.json``: its timed window (``wall_s``), busy time where measurable, the bytes
it sent to other ranks, per optimizer step the tokens (non-padding), loss and time it saw, and
the timed pieces `benchmarks.calibration` fits its costs to: ``F``/``B`` per pipeline chunk
(torch-1f1b), ``FB`` per micro-batch (fsdp2 and peft: forward and backward, FSDP2's collectives
included) with their padded tokens, and ``S`` per optimizer step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlora_pp.config import JobConfig, RunConfig, load_config
from mlora_pp.data import IGNORE_INDEX, collate_sources
from mlora_pp.job import AdapterJob, lr_factor
from mlora_pp.model import DTYPES, StageSpec
from mlora_pp.preflight import check_inputs
from mlora_pp.training import DistEnv, prepare_jobs

METHODS: tuple[str, ...] = ("torch-1f1b", "fsdp2", "peft")


@dataclass
class StepLog:
    """One optimizer step of one job as this rank saw it (tokens and loss: its own rows only)."""

    job: str
    step: int
    tokens: int
    loss: float | None
    time: float


@dataclass
class RankReport:
    rank: int
    method: str
    wall_s: float = 0.0
    busy_s: float | None = None
    bytes_sent: int = 0
    bytes_note: str = ""
    steps: list[StepLog] = field(default_factory=list)
    timings: list[tuple[str, int, float]] = field(default_factory=list)
    """(kind, padded tokens, seconds) of each timed piece: F, B (a pipeline chunk), FB (a micro-batch), S."""

    def timed(self, kind: str, tokens: int, started: float) -> None:
        self.timings.append((kind, tokens, time.perf_counter() - started))


class TrainClock:
    """Seconds of training only: each job's set-up (model load, sharding) is left out."""

    def __init__(self) -> None:
        self.done = 0.0
        self._since: float | None = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        assert self._since is not None
        self.done += time.perf_counter() - self._since
        self._since = None

    def now(self) -> float:
        return self.done + (time.perf_counter() - self._since if self._since is not None else 0.0)


def peft_model(cfg: RunConfig, job: JobConfig) -> nn.Module:
    """transformers' model from the config's directory with peft LoRA for `job` (only LoRA trainable)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(cfg.model.path), dtype=DTYPES[cfg.model.dtype],
                                                 attn_implementation="sdpa")
    lora = LoraConfig(r=job.rank, lora_alpha=job.alpha, lora_dropout=job.dropout, use_rslora=job.rslora,
                      target_modules=list(job.target_modules), bias="none")
    model = get_peft_model(model, lora)
    model.train()
    return model


def make_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW as ours: betas (0.9, 0.999), eps 1e-8, the job's weight decay, over the trainable weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=job.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=job.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, job: AdapterJob, step: int) -> None:
    c = job.config
    for group in optimizer.param_groups:
        group["lr"] = c.lr * lr_factor(step, job.total_steps, c.lr_schedule, c.warmup_steps)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions that carry loss."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _tokens(job, rows: Sequence[int]) -> int:
    lengths = job.lengths
    return sum(lengths[i] for i in rows)


# ---------------------------------------------------------------------------------------- peft


def train_peft(cfg: RunConfig, jobs: dict[str, AdapterJob], tokenizer, report: RankReport) -> None:
    """One process, one job after another, each step's micro-batches accumulated."""
    clock = TrainClock()
    for job in jobs.values():
        model = peft_model(cfg, job.config)
        optimizer = make_optimizer(model, job.config)
        clock.resume()
        train_steps(model, optimizer, job, tokenizer, report, clock)
        clock.pause()
        del model, optimizer
    report.wall_s = report.busy_s = clock.done


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, job: AdapterJob, tokenizer, report: RankReport,
                clock: TrainClock, rank: int = 0, world: int = 1) -> None:
    """Every step of `job`, data parallel over `world` ranks: this rank takes micro-batches rank,
    rank + world, ... of each step, and its loss is scaled by `world` (FSDP2 averages gradients
    over ranks; ours sums the step)."""
    for step, plan in enumerate(job.plans):
        set_lr(optimizer, job, step)
        loss, tokens = 0.0, 0
        for micro in range(rank, len(plan.micro_batches), world):
            rows = job.plans[step].micro_batches[micro]
            ids, labels = collate_sources([(job.examples, rows)], pad_id(tokenizer))
            started = time.perf_counter()
            part = token_loss_sum(model(input_ids=ids).logits, labels) / plan.loss_tokens
            (part * world).backward()
            report.timed("FB", ids.numel(), started)
            loss += float(part.detach())
            tokens += _tokens(job, rows)
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.timed("S", 0, started)
        report.steps.append(StepLog(job.name, step + 1, tokens, loss, clock.now()))


# ---------------------------------------------------------------------------------------- fsdp2


@dataclass
class CollectiveBytes:
    """Bytes this rank sends in the collectives FSDP2 issues, as a ring algorithm sends them:
    all-gather W-1 times its shard, reduce-scatter W-1 times its output shard, all-reduce
    2(W-1)/W of the tensor. Counted by wrapping `torch.distributed`'s functions."""

    world: int
    sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def install(self) -> None:
        w = self.world

        def wrap(name: str, nbytes: Callable[..., int]) -> None:
            original = getattr(dist, name)

            def counted(*args, **kwargs):
                self.sent += nbytes(*args, **kwargs)
                self.calls[name] = self.calls.get(name, 0) + 1
                return original(*args, **kwargs)

            setattr(dist, name, counted)

        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        wrap("all_gather_single", lambda output, input, *a, **k: (w - 1) * size(input))
        wrap("all_gather_into_tensor", lambda output, input, *a, **k: (w - 1) * size(input))
        wrap("reduce_scatter_single", lambda output, input, *a, **k: (w - 1) * size(output))
        wrap("reduce_scatter_tensor", lambda output, input, *a, **k: (w - 1) * size(output))
        wrap("all_reduce", lambda tensor, *a, **k: 2 * (w - 1) * size(tensor) // w)


def train_fsdp2(cfg: RunConfig, jobs: dict[str, AdapterJob], tokenizer, env: DistEnv, report: RankReport) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    counter = CollectiveBytes(env.world)
    counter.install()
    mesh = init_device_mesh("cpu", (env.world,))
    clock = TrainClock()
    for job in jobs.values():
        for step, plan in enumerate(job.plans):
            if len(plan.micro_batches) % env.world:
                raise SystemExit(f"fsdp2: job {job.name} step {step} has {len(plan.micro_batches)} micro-batches, "
                                 f"not a multiple of {env.world} ranks")
        model = peft_model(cfg, job.config)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model, job.config)
        dist.barrier()
        clock.resume()
        train_steps(model, optimizer, job, tokenizer, report, clock, env.rank, env.world)
        clock.pause()
        del model, optimizer
    report.wall_s = clock.done
    report.bytes_sent = counter.sent
    report.bytes_note = f"ring volume of FSDP2's collectives {counter.calls}"


# ---------------------------------------------------------------------------------------- pipelining


class PipelinePart(nn.Module):
    """One pipeline stage of a (peft-wrapped) causal LM: embedding? + layers[a:b] + norm/lm_head?."""

    def __init__(self, causal_lm: nn.Module, spec: StageSpec):
        super().__init__()
        base = causal_lm.model
        self.embed = base.embed_tokens if spec.has_embedding else None
        self.layers = nn.ModuleList(base.layers[spec.first_layer:spec.last_layer])
        self.norm = base.norm if spec.has_head else None
        self.lm_head = causal_lm.lm_head if spec.has_head else None
        self.rotary = base.rotary_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x) if self.embed is not None else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.rotary(hidden, positions)
        for layer in self.layers:  # no mask: SDPA's causal path, as in our StageModel
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        if self.lm_head is not None:
            hidden = self.lm_head(self.norm(hidden)).float()
        return hidden


@dataclass
class _BusyTimer:
    """Seconds spent inside a stage's forward/backward chunks (compute; the waits are outside them),
    each chunk also logged to `report.timings` with its padded tokens."""

    report: RankReport
    busy: float = 0.0

    def wrap(self, obj: object, name: str, kind: str, tokens: int) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
                self.report.timed(kind, tokens, start)

        setattr(obj, name, timed)


def _log_setup(schedule: object, report: RankReport, tokens: int) -> None:
    """Log torch's lazy set-up of a schedule's stage as an "I" piece (with the padded tokens of one
    micro-batch, which shape inference runs through the stage): on its first step it warms up
    P2P and infers shapes by running the stage, before any chunk. Torch calls `_initialize_stage`
    (a private hook, checked here) on every step; only the call that does the work is logged."""
    original = getattr(schedule, "_initialize_stage", None)
    if original is None:
        raise SystemExit("torch-1f1b: this torch's Schedule1F1B has no _initialize_stage to time")

    def timed(*args, **kwargs):
        if getattr(schedule, "_stage_forward_initialized", False):
            return original(*args, **kwargs)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            report.timed("I", tokens, start)

    schedule._initialize_stage = timed  # type: ignore[attr-defined]


def train_torch_1f1b(cfg: RunConfig, jobs: dict[str, AdapterJob], tokenizer, specs: list[StageSpec],
                     env: DistEnv, report: RankReport) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    spec = specs[env.rank]
    first, last = env.rank == 0, env.rank == env.world - 1
    clock, timer = TrainClock(), _BusyTimer(report)
    hidden = None
    for job in jobs.values():
        model = peft_model(cfg, job.config)
        hidden = model.config.hidden_size
        part = PipelinePart(model.base_model.model, spec)
        del model  # the other stages' layers go with it
        optimizer = make_optimizer(part, job.config)
        denominator = [1]

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return token_loss_sum(logits, labels) / denominator[0]

        runners: dict[tuple[int, int], object] = {}

        def runner(length: int, micros: int, rows: int):
            """The stage/schedule pair for steps padded to `length` (shapes are fixed per stage)."""
            if (length, micros) not in runners:
                stage = PipelineStage(part, env.rank, env.world, torch.device("cpu"))
                timer.wrap(stage, "forward_one_chunk", "F", rows // micros * length)
                timer.wrap(stage, "backward_one_chunk", "B", rows // micros * length)
                schedule = Schedule1F1B(stage, n_microbatches=micros, loss_fn=loss_fn, scale_grads=False)
                _log_setup(schedule, report, rows // micros * length)
                runners[(length, micros)] = schedule
            return runners[(length, micros)]

        dist.barrier()
        clock.resume()
        for step, plan in enumerate(job.plans):
            set_lr(optimizer, job, step)
            sizes = {len(mb) for mb in plan.micro_batches}
            if len(sizes) != 1:
                raise SystemExit(f"torch-1f1b: job {job.name} step {step}: micro-batches of unequal rows {sizes}")
            rows = [i for micro in plan.micro_batches for i in micro]
            ids, labels = collate_sources([(job.examples, rows)], pad_id(tokenizer))
            denominator[0] = plan.loss_tokens
            schedule = runner(ids.shape[1], len(plan.micro_batches), ids.shape[0])
            losses: list[torch.Tensor] = []
            if first:
                schedule.step(ids, return_outputs=False)
            elif last:
                schedule.step(target=labels, losses=losses, return_outputs=False)
            else:
                schedule.step(return_outputs=False)
            start = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timer.busy += time.perf_counter() - start
            report.timed("S", 0, start)
            activation = ids.shape[0] * ids.shape[1] * hidden * DTYPES[cfg.model.dtype].itemsize  # [rows, L, d]
            report.bytes_sent += activation * (int(not last) + int(not first))
            if last:
                report.steps.append(StepLog(job.name, step + 1, _tokens(job, rows), float(sum(x.detach() for x in losses)), clock.now()))
        clock.pause()
        del part, optimizer, runners
    report.wall_s, report.busy_s = clock.done, timer.busy
    report.bytes_note = "activations forward and their gradients backward, from their shapes"


# ---------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory for result-rank<R>.json")
    args = parser.parse_args(argv)
    env = DistEnv.from_environ()
    cfg = load_config(args.config)
    torch.manual_seed(cfg.seed)
    if env.world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.pipeline.timeout_s))
    try:
        checked = check_inputs(cfg, env.rank, env.world)
        jobs = prepare_jobs(cfg, checked.tokenizer)
        report = RankReport(env.rank, args.method)
        if args.method == "peft":
            if env.world != 1:
                raise SystemExit("peft runs in one process (no torchrun)")
            train_peft(cfg, jobs, checked.tokenizer, report)
        elif args.method == "fsdp2":
            train_fsdp2(cfg, jobs, checked.tokenizer, env, report)
        else:
            train_torch_1f1b(cfg, jobs, checked.tokenizer, checked.specs, env, report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"result-rank{env.rank}.json").write_text(json.dumps(asdict(report)) + "\n")
    finally:
        if env.world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
