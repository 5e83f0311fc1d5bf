"""One adapter job at run time: its examples, its step plan, its optimizer and learning-rate schedule.

Everything a stage needs to run a job's micro-batches and steps, and nothing about other jobs:
adapters never share parameters, so each job has its own AdamW over its own LoRA matrices on
this stage, and one job's optimizer step never waits for another's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.autograd.graph import increment_version

from mlora_pp.config import JobConfig
from mlora_pp.data import (
    DataError, Example, StepPlan, StepPlans, cut_micro_batches, load_examples, load_template, plan_steps, row_lengths,
    row_loss_tokens,
)
from mlora_pp.data_cache import DataCache, Source
from mlora_pp.schedule import EvalPoint, JobSteps, MicroBatchPart
from mlora_pp.seeding import stable_seed
from mlora_pp.step_sizes import StepSizes
from mlora_pp.tokenized import TokenizedRows


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based).

    Linear warm-up reaches the full rate after `warmup_steps` steps; ``linear`` and ``cosine`` then
    decay to 0 at `total_steps`, along a line or half a cosine; ``constant`` stays flat. A pure
    function of the step, so resuming needs no scheduler state.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepStats:
    """What a job's current step has seen so far (summed over its micro-batches)."""

    loss_sum: float | torch.Tensor = 0.0
    loss_tokens: int = 0
    tokens: int = 0


@dataclass
class AdapterJob:
    config: JobConfig
    examples: Sequence[Example]
    """Its training rows: `TokenizedRows` when read from data, any sequence of `Example`s in tests."""
    plans: Sequence[StepPlan]
    """Its steps: `StepPlans` (arrays) from `plan_steps`, any sequence of `StepPlan`s in tests."""
    seed: int
    optimizer: torch.optim.Optimizer | None = None
    steps_done: int = 0
    resumed_step: int | None = None
    """The step of the checkpoint this job resumed from: complete on disk, never written again."""
    stats: StepStats = field(default_factory=StepStats)
    failed: str | None = None
    """Why the job stopped (non-finite loss, gradients or weights); None while it is healthy."""
    failed_step: int | None = None
    """Steps done well before it failed: its last good state is the checkpoint at or before this."""
    eval_examples: Sequence[Example] = field(default_factory=list)
    """Held-out examples (`JobConfig.eval_data`); empty: the job is not evaluated."""
    eval_batches: tuple[tuple[int, ...], ...] = ()
    """`eval_examples` indices per evaluation micro-batch (longest first, cut like a training step)."""
    eval_sums: dict[int, list] = field(default_factory=dict)
    """Last stage: evaluation after k steps -> [summed cross-entropy so far, its loss tokens]."""
    offloaded: bool = False
    """Pre-empted (`offload_state`): its AdamW moments are in host memory until its next optimizer step."""
    _sizes: "_MicroSizes | None" = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def total_steps(self) -> int:
        return len(self.plans)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each training row."""
        return row_lengths(self.examples)

    @property
    def eval_lengths(self) -> list[int]:
        """Tokens of each held-out row."""
        return row_lengths(self.eval_examples)

    def part_source(self, part: MicroBatchPart) -> tuple[Sequence[Example], tuple[int, ...]]:
        """Where one part of a micro-batch reads its rows: (training or held-out rows, their indices)."""
        if part.eval:
            return self.eval_examples, self.eval_batches[part.micro]
        return self.examples, self.plans[part.step].micro_batches[part.micro]

    def part_lengths(self, part: MicroBatchPart) -> list[int]:
        """Tokens of each row of one part of a micro-batch."""
        lengths = self.eval_lengths if part.eval else self.lengths
        return [lengths[i] for i in self.part_source(part)[1]]

    @property
    def eval_points(self) -> list[int]:
        """Steps done at which the job is evaluated: every `eval_every` steps and after the last."""
        if not self.eval_examples:
            return []
        every = self.config.eval_every or self.total_steps
        return sorted(set(range(every, self.total_steps, every)) | {self.total_steps})

    def row_offset(self, step: int, micro: int) -> int:
        """Index, within its step, of the first row of micro-batch `micro`."""
        return sum(len(m) for m in self.plans[step].micro_batches[:micro])

    def dropout_keys(self, step: int, micro: int) -> tuple[int, ...]:
        """One key per row: (run seed, job, step, row within the step). Fusion and order never enter."""
        first = self.row_offset(step, micro)
        count = len(self.plans[step].micro_batches[micro])
        return tuple(stable_seed("dropout", self.seed, self.name, step, first + k) for k in range(count))

    def micro_sizes(self) -> "_MicroSizes":
        """Its training micro-batches' sizes as arrays, found once per step plan (and again when
        `halve_micro_batches` re-plans)."""
        if self._sizes is None or self._sizes.plans is not self.plans:
            self._sizes = _MicroSizes.of(self.plans, self.examples)
        return self._sizes

    def job_steps(self) -> JobSteps:
        """Rows and padded tokens of every micro-batch of the steps still to do, for the scheduler."""
        sizes = self.micro_sizes()
        first = int(sizes.per_step[: self.steps_done].sum())
        micro_batches = StepSizes(sizes.rows[first:], sizes.padded[first:], np.cumsum(sizes.per_step[self.steps_done :]))
        eval_lengths = self.eval_lengths
        evaluation = tuple((len(ids), len(ids) * max(eval_lengths[i] for i in ids)) for ids in self.eval_batches)
        evals = tuple(EvalPoint(k, evaluation) for k in self.eval_points if k > self.steps_done)
        return JobSteps(self.name, micro_batches, first_step=self.steps_done, evals=evals)

    def loss_share(self) -> float:
        """The largest share of loss tokens among the padded tokens of any of its training
        micro-batches: it bounds what the last stage's head keeps per token of its rows
        (`MemoryModel.loss_share`)."""
        return self.micro_sizes().loss_share

    def token_counts(self) -> tuple[int, int]:
        """(loss tokens, padded tokens) of all its training micro-batches: what the head and what the
        decoder layers run on."""
        loss = int(self.plans.loss_tokens.sum()) if isinstance(self.plans, StepPlans) else sum(
            plan.loss_tokens for plan in self.plans)
        return loss, int(self.micro_sizes().padded.sum())

    def halve_micro_batches(self) -> bool:
        """Re-plan with micro-batches of half the rows (or half the token budget); False when they are
        one row already. The steps keep their rows, and a row's dropout key is its place in the step,
        so only the summation order changes."""
        rows = self.largest_micro_rows()
        if rows <= 1:
            return False
        c = self.config
        tokens = c.micro_batch_tokens
        self.plans = plan_steps(self.examples, batch_size=c.batch_size, micro_batch_size=max(1, rows // 2),
                                epochs=c.epochs, max_steps=c.max_steps, seed=self.seed, job=c.name,
                                micro_batch_tokens=max(1, tokens // 2) if tokens is not None else None)
        if self.eval_examples:
            self.eval_batches = eval_batches(self.eval_examples, max(1, rows // 2),
                                             max(1, tokens // 2) if tokens is not None else None)
        return True

    def largest_micro_rows(self) -> int:
        """Rows of the job's largest micro-batch."""
        return int(self.micro_sizes().rows.max())

    def data_position(self) -> tuple[int, int]:
        """(epoch, rows of that epoch's shuffled order consumed) after `steps_done` steps, for humans:
        the order itself is a pure function of (seed, job, epoch), so resuming needs only the step."""
        if self.steps_done == 0:
            return 0, 0
        epoch = self.plans[self.steps_done - 1].epoch
        if isinstance(self.plans, StepPlans):  # steps are in epoch order: rows since the epoch's first step
            first = int(np.searchsorted(self.plans.epochs, epoch))
            return epoch, self.plans.rows_before(self.steps_done) - self.plans.rows_before(first)
        return epoch, sum(p.rows for p in self.plans[: self.steps_done] if p.epoch == epoch)

    def make_optimizer(self, params: list[torch.nn.Parameter]) -> None:
        """AdamW over this job's LoRA parameters on this stage (fp32 master weights).

        On CUDA the fused implementation: one kernel for all of the job's matrices instead of a
        dozen launches per matrix (measured at 15 ms per step for a 16-layer stage otherwise).
        """
        params = list(params)
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=self.config.weight_decay,
            fused=fused or None,
        )

    def current_lr(self) -> float:
        factor = lr_factor(self.steps_done, self.total_steps, self.config.lr_schedule, self.config.warmup_steps)
        return self.config.lr * factor

    def optimizer_step(self, grad_norm: float | None = None) -> float:
        """Apply the accumulated gradients of the current step; returns the learning rate used.

        With `max_grad_norm`, `grad_norm` is the job's total gradient norm over every stage, and the
        gradients are first scaled as `torch.nn.utils.clip_grad_norm_` scales them.
        """
        assert self.optimizer is not None, "make_optimizer first"
        if self.config.max_grad_norm is not None:
            assert grad_norm is not None, f"{self.name}: max_grad_norm needs the total gradient norm"
            coef = min(self.config.max_grad_norm / (grad_norm + 1e-6), 1.0)
            grads = [p.grad for p in self._params() if p.grad is not None]
            if coef < 1.0 and grads:
                torch._foreach_mul_(grads, coef)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.offloaded:
            self._move_moments(to_host=False)
        self.optimizer.step()
        # The fused kernel updates the weights without bumping their version counters; the batched
        # LoRA operator refreshes its stacked copies of the weights by those counters, so bump them here.
        increment_version([p for g in self.optimizer.param_groups for p in g["params"]])
        # Zeroed, not freed: the next step adds into them in one batched add (the grouped path), and
        # the memory model counts a job's gradients from its first backward to its last step anyway.
        self.optimizer.zero_grad(set_to_none=False)
        self.steps_done += 1
        return lr

    def skip_step(self) -> None:
        """Drop the current step's gradients without an update (a failed job keeps its place in the
        schedule, so that every stage still exchanges the same messages, but learns nothing more)."""
        assert self.optimizer is not None, "make_optimizer first"
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def offload_state(self) -> None:
        """Pre-emption: drop the unfinished step's gradients and statistics (the step runs again from
        its start, with the same rows and dropout keys) and move the AdamW moments to host memory,
        so that the device keeps only this job's weights. The next optimizer step moves them back,
        bit for bit."""
        if self.optimizer is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.stats = StepStats()
        self._move_moments(to_host=True)

    def _move_moments(self, to_host: bool) -> None:
        """The AdamW moments to host memory or back to their parameters' device; sets `offloaded`."""
        assert self.optimizer is not None
        for param, state in self.optimizer.state.items():
            device = torch.device("cpu") if to_host else param.device
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != device:
                    state[key] = value.to(device, non_blocking=not to_host)
        self.offloaded = to_host

    def release_state(self) -> None:
        """Free the gradients and AdamW moments after the job's last step on this stage (its weights
        stay for the final merge): a finished job's place goes to a waiting one."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()

    def gradient_square_sum(self) -> float:
        """Sum of the squares of this job's gradients on this stage (one device sync): the stages'
        sums add up to the square of the job's total gradient norm."""
        grads = [p.grad.detach() for p in self._params() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.stack(torch._foreach_norm(grads, 2)).double().square().sum())

    def gradients_finite(self) -> bool:
        """Whether every gradient of this job on this stage is finite (one device sync)."""
        return _all_finite([p.grad for p in self._params() if p.grad is not None])

    def poison_gradients(self) -> None:
        """Make this job's gradients on this stage NaN (fault injection: `mlora_pp.faults`)."""
        for p in self._params():
            if p.grad is not None:
                p.grad.fill_(float("nan"))

    def weights_finite(self) -> bool:
        """Whether every LoRA weight of this job on this stage is finite (one device sync)."""
        return _all_finite(self._params())

    def _params(self) -> list[torch.Tensor]:
        assert self.optimizer is not None, "make_optimizer first"
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class _MicroSizes:
    """A step plan's micro-batches in arrays: a run's start reads every one of every job (a job of
    50,000 records over 3 epochs has 75,000 of 2 rows), which loops over rows in Python could not
    do quickly."""

    plans: Sequence[StepPlan]
    """The plans these are of (compared by identity)."""
    per_step: np.ndarray
    """Micro-batches of each step."""
    rows: np.ndarray
    """Rows of each micro-batch, in plan order."""
    padded: np.ndarray
    """Rows x longest row of each micro-batch: its padded tokens."""
    loss_share: float
    """The largest share of loss tokens among any micro-batch's padded tokens (`AdapterJob.loss_share`;
    kept instead of each micro-batch's loss tokens, 8 bytes a micro-batch)."""

    @staticmethod
    def of(plans: Sequence[StepPlan], examples: Sequence[Example]) -> "_MicroSizes":
        if isinstance(plans, StepPlans):
            per_step = np.diff(plans.step_ends, prepend=0)
            rows = np.diff(plans.micro_ends, prepend=0)
            flat = plans.rows
        else:
            per_step = np.fromiter((len(p.micro_batches) for p in plans), dtype=np.int64, count=len(plans))
            micros = [m for p in plans for m in p.micro_batches]
            rows = np.fromiter((len(m) for m in micros), dtype=np.int64, count=len(micros))
            flat = np.fromiter(itertools.chain.from_iterable(micros), dtype=np.int64, count=int(rows.sum()))
        if not len(rows):
            return _MicroSizes(plans, per_step, rows, rows.copy(), 0.0)
        starts = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(rows[:-1], out=starts[1:])
        if isinstance(examples, TokenizedRows):
            lengths, loss = examples.lengths[flat], examples.loss_tokens[flat]
        else:
            lengths = np.asarray(row_lengths(examples), dtype=np.int64)[flat]
            loss = np.asarray(row_loss_tokens(examples), dtype=np.int64)[flat]
        padded = rows * np.maximum.reduceat(lengths, starts)
        share = float(np.max(np.add.reduceat(loss, starts) / padded, initial=0.0))
        return _MicroSizes(plans, per_step, rows, padded, share)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (max-norms: no overflow for finite values)."""
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach() for t in tensors], math.inf)
    return bool(torch.stack(norms).isfinite().all())


def eval_batches(examples: Sequence[Example], micro_batch_size: int, micro_batch_tokens: int | None
                 ) -> tuple[tuple[int, ...], ...]:
    """Held-out examples cut into micro-batches like a training step's rows: longest first."""
    lengths = row_lengths(examples)
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    return cut_micro_batches(order, lengths, micro_batch_size, micro_batch_tokens)


class EvalDataError(DataError):
    """A problem with `JobConfig.eval_data` (reported against that field, not `data`)."""


def load_job(config: JobConfig, tokenizer, seed: int, base_dir: Path | None = None,
             cache: DataCache | None = None) -> AdapterJob:
    """Read and tokenize a job's data (and held-out data) and plan all its steps; with a `DataCache`
    (which holds the tokenizer), rows come from it and jobs that read the same file share them."""
    template = load_template(config.template, base_dir)

    def rows(path: str | Path):
        if cache is None:
            return load_examples(Path(path), template, tokenizer, config.max_seq_len)
        return cache.rows(Source(Path(path), template, config.max_seq_len))

    examples = rows(config.data)
    plans = plan_steps(
        examples,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        epochs=config.epochs,
        max_steps=config.max_steps,
        seed=seed,
        job=config.name,
        micro_batch_tokens=config.micro_batch_tokens,
    )
    job = AdapterJob(config=config, examples=examples, plans=plans, seed=seed)
    if config.eval_data is not None:
        try:
            job.eval_examples = rows(config.eval_data)
        except DataError as exc:
            raise EvalDataError(str(exc)) from exc
        job.eval_batches = eval_batches(job.eval_examples, config.micro_batch_size, config.micro_batch_tokens)
    return job
