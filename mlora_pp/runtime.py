"""Executes one stage's action list: forwards, backwards and per-job optimizer steps.

The schedule decides the order; the worker only runs it. A micro-batch's rows are laid out part
by part (each part is one job's rows), right-padded to the longest row, and carried to the
batched LoRA operator as `LoRASegment`s. The loss of each part is its summed token cross-entropy
divided by the number of loss tokens of that job's whole step, so gradient accumulation and
fusion give exactly the gradient of the step's token-mean loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mlora_pp.data import IGNORE_INDEX, collate
from mlora_pp.job import AdapterJob
from mlora_pp.lora import LoRABatch, LoRASegment
from mlora_pp.model import StageModel
from mlora_pp.schedule import Action, MicroBatch, Schedule


@dataclass
class StepRecord:
    """One finished optimizer step of one job."""

    job: str
    step: int  # 1-based count of steps done
    loss: float
    loss_tokens: int
    tokens: int
    lr: float


@dataclass
class TraceEvent:
    """One timed action, for the Chrome trace and utilisation."""

    name: str
    kind: str
    start: float
    end: float


@dataclass
class _InFlight:
    loss: torch.Tensor
    part_losses: list[tuple[str, torch.Tensor, int, int]]  # job, CE sum, loss tokens, tokens


@dataclass
class StageWorker:
    """Runs one stage's actions. With one stage the stage is both first and last."""

    stage: StageModel
    jobs: dict[str, AdapterJob]
    schedule: Schedule
    device: torch.device = torch.device("cpu")
    on_step: Callable[[StepRecord], None] | None = None
    trace: list[TraceEvent] = field(default_factory=list)
    _in_flight: dict[int, _InFlight] = field(default_factory=dict)

    def inputs(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, LoRABatch]:
        """Token ids and labels [rows, L] of a micro-batch, and its LoRA row layout."""
        rows = [ex for part in mb.parts for ex in self.jobs[part.job].rows(part.step, part.micro)]
        pad_id = self.stage.config.pad_token_id if self.stage.config.pad_token_id is not None else 0
        input_ids, labels = collate(rows, pad_id)
        segments, start = [], 0
        for part in mb.parts:
            job = self.jobs[part.job]
            keys = job.dropout_keys(part.step, part.micro)
            segments.append(LoRASegment(part.job, start, start + len(keys), keys))
            start += len(keys)
        batch = LoRABatch(tuple(segments), seq_len=input_ids.shape[1], training=True)
        return input_ids.to(self.device), labels.to(self.device), batch

    def forward(self, mb: MicroBatch) -> None:
        input_ids, labels, batch = self.inputs(mb)
        logits = self.stage(input_ids, batch)
        total = logits.new_zeros(())
        part_losses = []
        for segment, part in zip(batch.segments, mb.parts):
            job = self.jobs[part.job]
            plan = job.plans[part.step]
            rows = slice(segment.row_start, segment.row_end)
            part_logits = logits[rows, :-1]
            part_labels = labels[rows, 1:]
            ce = F.cross_entropy(
                part_logits.reshape(-1, part_logits.shape[-1]),
                part_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total = total + ce / plan.loss_tokens
            tokens = sum(len(ex.input_ids) for ex in job.rows(part.step, part.micro))
            loss_tokens = int((part_labels != IGNORE_INDEX).sum())
            part_losses.append((part.job, ce.detach(), loss_tokens, tokens))
        self._in_flight[mb.id] = _InFlight(total, part_losses)

    def backward(self, mb: MicroBatch) -> None:
        flight = self._in_flight.pop(mb.id)
        flight.loss.backward()
        for job_name, ce, loss_tokens, tokens in flight.part_losses:
            stats = self.jobs[job_name].stats
            stats.loss_sum += float(ce)
            stats.loss_tokens += loss_tokens
            stats.tokens += tokens

    def optimizer_step(self, job_name: str, step: int) -> None:
        job = self.jobs[job_name]
        assert job.steps_done == step, f"{job_name}: step {step} out of order (done {job.steps_done})"
        lr = job.optimizer_step()
        stats = job.stats
        record = StepRecord(
            job=job_name,
            step=job.steps_done,
            loss=stats.loss_sum / max(stats.loss_tokens, 1),
            loss_tokens=stats.loss_tokens,
            tokens=stats.tokens,
            lr=lr,
        )
        job.stats = type(stats)()
        if self.on_step is not None:
            self.on_step(record)

    def run_action(self, action: Action) -> None:
        start = time.perf_counter()
        if action.kind == "F":
            mb = self.schedule.micro_batches[action.micro_batch]
            self.forward(mb)
            name = f"F{mb.id} " + "+".join(f"{p.job}:{p.step}.{p.micro}" for p in mb.parts)
        elif action.kind == "B":
            mb = self.schedule.micro_batches[action.micro_batch]
            self.backward(mb)
            name = f"B{mb.id} " + "+".join(f"{p.job}:{p.step}.{p.micro}" for p in mb.parts)
        else:
            self.optimizer_step(action.job, action.step)
            name = f"S {action.job}:{action.step}"
        self.trace.append(TraceEvent(name, action.kind, start, time.perf_counter()))

    def run(self, stage_index: int = 0) -> None:
        for action in self.schedule.stages[stage_index]:
            self.run_action(action)
