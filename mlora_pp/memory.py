"""Memory per stage: a model fitted at start-up, the budget, and admission by predicted peak.

A stage's memory at any moment is what it holds for good (frozen weights, buffers, every job's
LoRA weights: `static`), the state of each running job (its gradients and AdamW moments: `job`,
from its first backward to its last optimizer step, freed after that), and the activations that
autograd keeps for each micro-batch forwarded but not yet backwarded. mLoRA's form for those is
b1·T + b2·T·L per micro-batch (T padded tokens, L its padded length: the T·L term is attention
scores kept per row, which fused SDPA kernels never store, so it fits near zero there). So

    peak(stage) = static + sum(job[j] for running j)
                  + in_flight * (b1·T + b2·T·L + r·L + T·max(c[j] + h·s[j]) + T·sum(i[g] for inputs g read))

with T, L of the largest micro-batch the running jobs can form and `in_flight` the schedule's
bound. `static` and `job` are counted from the tensors themselves (parameters, and 3 copies of
each job's LoRA matrices: gradient, exp_avg, exp_avg_sq). c[j] (`lora_per_token`) is what job j's
LoRA keeps per token of its rows, x·Aᵀ at every module it targets (rank x the compute dtype's
bytes): it depends on whose rows a micro-batch holds, so it is counted, not fitted, and a
micro-batch of known parts costs b1·T + b2·T·L + r·L + sum(rows[j]·L·(c[j] + h·s[j])) + T·i. h
(`loss_token_bytes`, last stage only, measured) is what the head keeps per loss token and s[j]
(`loss_share`) job j's largest share of loss tokens in a micro-batch's padded tokens. The operator
also keeps each projection input that some adapter of the micro-batch reads (for A's gradient;
the frozen GEMM keeps none): i[g] for each input g of the parts' jobs (`INPUT_OF`, counted from
the model's widths), and in admission for each input of the running jobs; 0 for an input the base
keeps anyway (`inputs_kept_by_base`, measured). r (`per_length`) is the rotary tables, kept once
per micro-batch. b1 and b2 are fitted by least squares (non-negative) to a few probe
micro-batches of the run's own shapes, measured on this stage less their LoRA, inputs, tables
and loss tokens, then scaled up until no probe is above them. The first stage's probes keep
every layer's activations from the first layer's attention input (`whole_graph`), so the model
bounds micro-batches whose graph starts later. On the grouped path (CUDA) x·Aᵀ is charged per
micro-batch and module instead of c (`grouped_per_token`). With `pipeline.recompute` a layer
keeps its input only: c, i and the grouped terms are 0; but a backward recomputes one layer at a
time, which keeps what that layer keeps without recompute until the layer's backward is done:
`recomputed`, a model of one layer fitted to what the probes' backwards recompute, charged once,
for the micro-batch being backwarded (twice what a micro-batch keeps on the tests' model).

Measured, for comparison: on CUDA the allocator's peak over the run
(`torch.cuda.max_memory_allocated`); on CPU, which keeps no allocator statistics, the peak of
the bytes the stage's tensors hold (weights, gradients, optimizer state and the storages autograd
saves for backward, counted by a saved-tensor hook, and what custom autograd Functions keep on
their context), sampled after every action: the same terms
the model predicts, counted rather than predicted, without the allocator's transient workspace;
under recompute, also what each layer's recompute saves again (`RecomputeMeter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from mlora_pp.config import budget_spec
from mlora_pp.head_loss import LossTokens
from mlora_pp.quantize import release_freed_memory
from mlora_pp.schedule import Action, JobSteps, MicroBatch, Schedule, group_jobs, micro_extent

PROBES = 4
"""Probe micro-batches per stage (distinct shapes of the run, smallest to largest)."""

INPUT_OF: dict[str, str] = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "o_proj",
                            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down_proj"}
"""The input each target reads: projections that share one share the tensor the operator keeps."""


def input_groups(targets: Iterable[str]) -> tuple[str, ...]:
    """The inputs a job's LoRA keeps whole, for every row of a micro-batch it is part of."""
    return tuple(sorted({INPUT_OF[t] for t in targets}))


def input_token_bytes(config: Any, layers: int, dtype_bytes: int) -> dict[str, float]:
    """Bytes per token of each input on `layers` decoder layers: the frozen base GEMM keeps none of
    them (its weight needs no gradient), the LoRA operator keeps the whole micro-batch's for A's
    gradient once some adapter of the micro-batch targets a projection that reads it."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    widths = {"attention": config.hidden_size, "o_proj": heads * head_dim, "mlp": config.hidden_size,
              "down_proj": config.intermediate_size}
    return {group: float(layers * width * dtype_bytes) for group, width in widths.items()}


@dataclass(frozen=True)
class MemoryModel:
    """One stage's predicted memory (see the module docstring); bytes."""

    stage: int
    static: int
    per_token: float  # b1
    per_token_length: float  # b2
    job: dict[str, int] = field(default_factory=dict)
    samples: tuple[tuple[int, int, int, int], ...] = ()
    """The probes it was fitted to: (padded tokens, padded length, bytes measured with their LoRA's,
    inputs', tables' and head's, loss tokens)."""
    lora_per_token: dict[str, float] = field(default_factory=dict)
    """Bytes each job's LoRA keeps per token of its rows (c[j] in the module docstring)."""
    input_per_token: dict[str, float] = field(default_factory=dict)
    """Bytes per token of each projection input (`INPUT_OF`) that LoRA keeps for a micro-batch."""
    per_length: float = 0.0
    """Bytes per position of a micro-batch's padded length, once per micro-batch: the rotary
    tables (cos and sin, [L, head_dim]) that every layer's attention keeps, shared by its rows."""
    kept_by_base: tuple[str, ...] = ()
    """Inputs the frozen base keeps for its own backward whatever the jobs (the attention kernel
    keeps its output, o_proj's input; bitsandbytes' int8 matmul keeps its input): measured at
    start-up; LoRA adds nothing for them, so `input_per_token` has them at 0."""
    loss_token_bytes: float = 0.0
    """Bytes the last stage's head keeps per loss token (h; 0 on other stages): the gradient of the
    hidden state, which the loss computes in its forward, the final norm's input, the positions."""
    loss_share: dict[str, float] = field(default_factory=dict)
    """Each job's largest share of loss tokens among a micro-batch's padded tokens
    (`AdapterJob.loss_share`; 1 for a job not listed): a part costs h x share per padded token."""
    grouped: tuple[str, ...] = ()
    """Targets whose modules run the grouped path (CUDA by default): there x·Aᵀ is kept for every
    row of a micro-batch from the first to the last row of a job adapting the module, at the
    module's largest rank padded to 8, whoever's rows they are. Such targets are charged per
    micro-batch (`grouped_per_token`), not in `lora_per_token`."""
    grouped_per_token: dict[str, float] = field(default_factory=dict)
    """Per grouped target with adapters: bytes per token of a micro-batch in which some job adapts
    it (every row counted: an upper bound)."""
    job_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The projections each job adapts (the inputs they read: `INPUT_OF`)."""
    recomputed: MemoryModel | None = None
    """Under `pipeline.recompute`: what one layer's recompute keeps while a micro-batch's backward
    runs through it (a model of one layer without recompute: no static, job, table or head bytes),
    on top of what the micro-batch kept from its forward. Charged once per stage, for the
    micro-batch being backwarded: each layer's recomputed tensors are freed before the next is
    recomputed. About twice what a micro-batch keeps under recompute on the tests' model."""

    def __post_init__(self) -> None:
        if isinstance(self.recomputed, dict):  # read back from a record
            object.__setattr__(self, "recomputed", MemoryModel(**self.recomputed))

    def grouped_lora(self, jobs: Iterable[str]) -> float:
        """Bytes per token the grouped path keeps for a micro-batch holding rows of `jobs`."""
        targets = {t for j in jobs for t in self.job_targets.get(j, ())}
        return sum(self.grouped_per_token.get(t, 0.0) for t in targets)

    def head_per_token(self, job: str) -> float:
        """Bytes the head keeps per padded token of `job`'s rows, at most (see `loss_share`)."""
        return self.loss_token_bytes * self.loss_share.get(job, 1.0)

    def kept_inputs(self, jobs: Iterable[str]) -> float:
        """Bytes per token of the inputs kept for a micro-batch holding rows of `jobs`."""
        groups = {g for j in jobs for g in input_groups(self.job_targets.get(j, ()))}
        return sum(self.input_per_token.get(g, 0.0) for g in groups)

    def activation(self, tokens: int, length: int) -> float:
        """Bytes autograd keeps for one micro-batch of `tokens` padded tokens, `length` long, less
        what its jobs' LoRA keeps (see `micro_bytes`)."""
        return self.per_token * tokens + self.per_token_length * tokens * length + self.per_length * length

    def transient(self, mb: MicroBatch) -> float:
        """Bytes the backward of `mb` adds at its peak: a recomputed layer's (see `recomputed`)."""
        return self.recomputed.micro_bytes(mb) if self.recomputed is not None else 0.0

    def micro_bytes(self, mb: MicroBatch) -> float:
        """Bytes autograd keeps for micro-batch `mb`, its parts' LoRA included."""
        tokens, length = micro_shape(mb)
        per_micro_batch = self.kept_inputs(mb.jobs) + self.grouped_lora(mb.jobs)
        return self.activation(tokens, length) + tokens * per_micro_batch + sum(
            p.rows * length * (self.lora_per_token.get(p.job, 0.0) + self.head_per_token(p.job)) for p in mb.parts)

    def peak(self, running: Iterable[str], in_flight: int, tokens: int, length: int) -> float:
        """The stage's peak with `running` under way and `in_flight` micro-batches of at most `tokens`
        tokens, `length` long, each row of any running job (the costliest LoRA and loss share bound
        every row); under recompute, with one such micro-batch's recomputed layer on top."""
        running = list(running)
        recomputed = self.recomputed
        transient = recomputed.largest_micro_bytes(running, tokens, length) if recomputed is not None else 0.0
        return (self.static + sum(self.job[j] for j in running) + transient
                + in_flight * self.largest_micro_bytes(running, tokens, length))

    def largest_micro_bytes(self, running: list[str], tokens: int, length: int) -> float:
        """`micro_bytes` bound for a micro-batch of `tokens`, `length` long, of `running` jobs' rows."""
        lora = max((self.lora_per_token.get(j, 0.0) + self.head_per_token(j) for j in running), default=0.0)
        per_token = lora + self.kept_inputs(running) + self.grouped_lora(running)
        return self.activation(tokens, length) + tokens * per_token

    def record(self) -> dict:
        return asdict(self)


def fit_activation(samples: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
    """Non-negative least squares of bytes = b1·T + b2·T·L over (T, L, bytes) samples."""
    xs = [(float(t), float(t) * l, float(b)) for t, l, b in samples]
    s11 = sum(a * a for a, _, _ in xs)
    s12 = sum(a * c for a, c, _ in xs)
    s22 = sum(c * c for _, c, _ in xs)
    y1 = sum(a * y for a, _, y in xs)
    y2 = sum(c * y for _, c, y in xs)
    det = s11 * s22 - s12 * s12
    if det > 1e-9 * s11 * s22:
        b1, b2 = (y1 * s22 - y2 * s12) / det, (y2 * s11 - y1 * s12) / det
        if b1 >= 0 and b2 >= 0:
            return b1, b2
    # one term alone: the better of the two (lengths that never vary leave only b1)
    options = [(y1 / s11 if s11 else 0.0, 0.0), (0.0, y2 / s22 if s22 else 0.0)]

    def residual(b: tuple[float, float]) -> float:
        return sum((y - b[0] * a - b[1] * c) ** 2 for a, c, y in xs)

    b1, b2 = min(options, key=residual)
    return max(b1, 0.0), max(b2, 0.0)


def bound_above(samples: Sequence[tuple[int, int, int]], b1: float, b2: float) -> tuple[float, float]:
    """(b1, b2) scaled up just enough that no (T, L, bytes) sample is above b1·T + b2·T·L.

    A least-squares fit under-predicts about half its samples (by 5% on a probe of the tests' tiny
    model), and a budget is a cap: admitting by an under-prediction lets a run pass its budget."""
    worst = max((b / (b1 * t + b2 * t * l) for t, l, b in samples if b1 * t + b2 * t * l > 0), default=1.0)
    return (b1 * worst, b2 * worst) if worst > 1.0 else (b1, b2)


def micro_shape(mb: MicroBatch) -> tuple[int, int]:
    """(padded tokens, padded length) of a micro-batch as the runtime lays it out."""
    longest = max((p.tokens / p.rows for p in mb.parts if p.rows), default=0.0)
    length = int(round(longest))
    return mb.rows * length, length


def largest_micro(jobs: Sequence[JobSteps], running: Iterable[str], num_stages: int, policy: str, fuse: bool,
                  streams: int | None = None) -> tuple[int, int]:
    """(tokens, length) bounding every micro-batch the `running` jobs can form: per lora stream,
    the running members' largest rows summed, padded to their longest row; else one job's largest.
    The two are maxima over the streams apart (`MicroBound.__call__`)."""
    return MicroBound(jobs, num_stages, policy, fuse, streams)(running)


class MicroBound:
    """`largest_micro` of `jobs` for any set of running jobs. The streams and each job's largest rows
    and longest row are found once, reading every micro-batch of the run: an admission check asks
    at every job's start and end, and a long run has millions of micro-batches."""

    def __init__(self, jobs: Sequence[JobSteps], num_stages: int, policy: str, fuse: bool,
                 streams: int | None = None) -> None:
        groups = group_jobs(jobs, num_stages, fuse, streams) if policy == "lora" and fuse else [[j] for j in jobs if j.steps]
        self.groups = [[(j.name, *micro_extent(j)) for j in group] for group in groups]
        """Per stream, each job's (name, largest rows, longest row)."""

    def __call__(self, running: Iterable[str]) -> tuple[int, int]:
        """The largest tokens of any stream's micro-batch and, apart, the longest row of any: a
        micro-batch's activation grows with both (tokens x length for eager attention), and the
        stream with the most tokens need not have the longest rows."""
        running = set(running)
        tokens, longest = 0, 0
        for group in self.groups:
            members = [(rows, length) for name, rows, length in group if name in running]
            if members:
                length = max(n for _, n in members)
                tokens, longest = max(tokens, sum(r for r, _ in members) * length), max(longest, length)
        return tokens, longest


def admission_check(models: Sequence[MemoryModel], jobs: Sequence[JobSteps], budget: float, in_flight: int,
                    policy: str, fuse: bool, streams: int | None = None, micro: MicroBound | None = None
                    ) -> Callable[[frozenset[str]], bool]:
    """Whether a set of running jobs keeps every stage's predicted peak within `budget` (pure).
    `micro`: the jobs' `MicroBound` where the caller has it (it reads every micro-batch of the run)."""
    bound = MicroBound(jobs, len(models), policy, fuse, streams) if micro is None else micro

    def fits(running: frozenset[str]) -> bool:
        tokens, length = bound(running)
        return all(m.peak(running, in_flight, tokens, length) <= budget for m in models)

    return fits


def cut_message(job: str, rows: int, configured: int) -> str:
    """What rank 0 prints when a job's micro-batches were cut to fit the budget."""
    return (f"memory: job {job!r} runs micro-batches of at most {rows} row{'s' * (rows > 1)} instead of "
            f"{configured} to fit the budget")


def predicted_peak(model: MemoryModel, schedule: Schedule, stage: int, jobs: Sequence[JobSteps] | None = None
                   ) -> float:
    """The model's peak over this stage's actions, in order: running jobs (first forward to last
    optimizer step here; from the start for a job under way before the plan, whose state exists
    already, unless it was paused for the plan: `Schedule.paused`) and the micro-batches in flight
    after each action. With `jobs` (what the plan was made of), `schedule` may be the start of a
    plan made as it runs (`StagePlan.first_schedule`): a job's last step is its last in `jobs`."""
    if jobs is not None:
        tracker = PeakTracker.for_plan(model, jobs)
    else:
        under_way: set[str] = set()
        last: dict[str, int] = {}
        for mb in schedule.micro_batches:
            for p in mb.parts:
                if p.eval:  # an evaluation holds no gradient, optimizer state or saved activation
                    continue
                if p.job not in last and (p.step > 0 or p.micro > 0) and p.job not in schedule.paused:  # absolute steps
                    under_way.add(p.job)
                last[p.job] = max(last.get(p.job, -1), p.step)
        tracker = PeakTracker(model, under_way, last)
    by_id = {mb.id: mb for mb in schedule.micro_batches}
    for action in schedule.stages[stage]:
        tracker.ran(action, by_id[action.micro_batch] if action.kind != "S" else None)
    return tracker.peak


class PeakTracker:
    """`predicted_peak`, action by action as a stage runs them: `under_way` jobs hold their state
    from the start, the others from their first forward here to their `last` step's update here."""

    def __init__(self, model: MemoryModel, under_way: set[str], last: dict[str, int]) -> None:
        self.model, self.last = model, last
        self.running = set(under_way)
        self.in_flight: dict[int, float] = {}
        self.peak = float(model.static)

    @staticmethod
    def for_plan(model: MemoryModel, jobs: Sequence[JobSteps]) -> "PeakTracker":
        """A tracker for a plan made of `jobs` (`JobSteps.holds_state`: under way and not paused)."""
        return PeakTracker(model, {j.name for j in jobs if j.steps and j.holds_state},
                           {j.name: j.first_step + j.steps - 1 for j in jobs if j.steps})

    def ran(self, action: Action, mb: MicroBatch | None) -> None:
        """`action` ran (`mb`: its micro-batch; None for an optimizer step)."""
        model = self.model
        if action.kind == "F":
            assert mb is not None
            if mb.eval:
                return
            self.running.update(mb.jobs)
            self.in_flight[mb.id] = model.micro_bytes(mb)
        elif action.kind == "B":  # at its peak the backward holds the micro-batch and a recomputed layer
            assert mb is not None
            self.peak = max(self.peak, self._held() + model.transient(mb))
            self.in_flight.pop(mb.id)
        self.peak = max(self.peak, self._held())
        if action.kind == "S" and action.step == self.last.get(action.job):
            self.running.discard(action.job)

    def _held(self) -> float:
        return self.model.static + sum(self.model.job[j] for j in self.running) + sum(self.in_flight.values())


# ------------------------------------------------------------------------------------------ measuring


def probe_micro_batches(schedule: Schedule, count: int = PROBES) -> list[MicroBatch]:
    """Up to `count` micro-batches of the run's distinct shapes, spread from smallest to largest."""
    shapes: dict[tuple[int, int], MicroBatch] = {}
    for mb in schedule.micro_batches:
        if not mb.eval:  # an evaluation keeps no activations: nothing to measure
            shapes.setdefault(micro_shape(mb), mb)
    ordered = [shapes[k] for k in sorted(shapes)]
    if len(ordered) <= count:
        return ordered
    picks = sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]


def probe(worker, micro_batches: Sequence[MicroBatch]) -> list[tuple[int, int, int, int, int]]:
    """(padded tokens, length, bytes, loss tokens on the last stage else 0, bytes of the backward's
    recomputed layer) of each probe micro-batch's forward + backward on this stage. Bytes: the
    allocator's peak above the start on CUDA, the storages autograd saved on CPU; under
    `recompute`, what the forward left allocated (CUDA) and, apart, the most the backward or the
    forward added to it (a recomputed layer and its workspace; on CPU what a layer's recompute
    re-saves: `RecomputeMeter`). Input activations of later stages are random (only their shape
    matters); gradients are cleared. On the first stage the graph starts at the first layer's
    attention input (`whole_graph`)."""
    stage, device = worker.stage, worker.device
    cuda = device.type == "cuda"
    recompute = getattr(stage, "recompute", False)
    meter = SavedTensorMeter(list(stage.parameters()) + list(stage.buffers()))
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG as training expects it
    samples = []
    for mb in micro_batches:
        input_ids, x, where, batch = worker.probe_inputs(mb, generator)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with whole_graph(stage):  # through the backward too: recompute re-runs the layers' forwards there
            with meter.measure() as held:
                out, total, _ = worker._compute(mb, x, where, batch)
                held.add_graph(out if total is None else total)
            recomputed = RecomputeMeter(meter.exclude, held)
            if cuda and recompute:
                torch.cuda.synchronize(device)
                kept = torch.cuda.memory_allocated(device)
                forward_extra = torch.cuda.max_memory_allocated(device) - kept
                torch.cuda.reset_peak_memory_stats(device)
            stage.recompute_observer = recomputed.layer
            try:
                worker.probe_backward(out, total, generator)
            finally:
                stage.recompute_observer = None
        if cuda:
            torch.cuda.synchronize(device)
            if recompute:
                measured = kept - base
                transient = max(forward_extra, torch.cuda.max_memory_allocated(device) - kept)
            else:
                measured, transient = torch.cuda.max_memory_allocated(device) - base, 0
        else:
            measured, transient = held.bytes, recomputed.most
        losses = sum(where.counts) if where is not None else 0
        samples.append((input_ids.numel(), input_ids.shape[1], int(measured), losses, int(transient)))
        del out, total, x
    for name in worker.jobs:
        for param in stage.adapter_parameters(name):
            param.grad = None
    return samples


@contextlib.contextmanager
def whole_graph(stage: torch.nn.Module) -> Iterator[None]:
    """While probing the first stage, the first layer's attention input requires grad, so autograd
    keeps every layer's activations from there, as for jobs that adapt q, k or v (nothing before
    those projections ever needs a gradient). In training the graph starts at the first projection a
    micro-batch's jobs adapt, and a micro-batch whose jobs adapt only later ones keeps less on the
    first layer (up to a layer's activations, for jobs on down_proj alone): probes of such jobs
    would under-predict a micro-batch of jobs that adapt q_proj. So the model bounds every
    micro-batch from above, and exactly where some job adapts q, k or v."""
    if getattr(stage, "embed_tokens", None) is None or not len(stage.layers_range()):
        yield
        return
    norm = stage.layers[str(stage.layers_range()[0])].input_layernorm
    handle = norm.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def inputs_kept_by_base(stage: torch.nn.Module, x: torch.Tensor, saved_only: bool = False) -> tuple[str, ...]:
    """The projection inputs (`INPUT_OF`) that the frozen base keeps for its own backward whatever
    the adapters: the attention kernel keeps its output, which is o_proj's input; bitsandbytes' int8
    matmul keeps its input. Measured by a forward of `x` (this stage's input) with no adapter, in
    which every projection's input is looked up among the storages autograd keeps.

    `saved_only`: those a layer's recompute keeps, for the recomputed layer's model. A recompute
    keeps only what autograd saves; int8's input is a context attribute, which stays on the
    forward's graph with the forward's input, so the recomputed input is LoRA's to keep."""
    inputs: dict[str, list[torch.Tensor]] = {}  # held, so that no later tensor takes a storage's address

    def record(group: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            inputs.setdefault(group, []).append(args[0])
        return hook

    handles = [module.register_forward_pre_hook(record(INPUT_OF[path.rsplit(".", 1)[-1]]))
               for path, module in stage.lora_modules().items()]
    kept = Measurement(set())
    recompute = getattr(stage, "recompute", False)
    stage.recompute = False  # what a layer keeps, as its recompute keeps it in backward
    try:
        with whole_graph(stage), torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
            out = stage(x, None, head=False)
            if out.grad_fn is not None and not saved_only:
                kept.add_graph(out)
    finally:
        stage.recompute = recompute
        for handle in handles:
            handle.remove()
    return tuple(sorted(g for g, xs in inputs.items()
                        if all(x.untyped_storage().data_ptr() in kept.storages for x in xs)))


def fit(worker, stage_index: int, micro_batches: Sequence[MicroBatch]) -> MemoryModel:
    """This stage's `MemoryModel`: counted static, job, LoRA, input and rotary-table bytes,
    activations fitted to probes less those; under recompute, also the recomputed layer's model."""
    samples = probe(worker, micro_batches)
    stage = worker.stage
    size = torch.empty((), dtype=stage.dtype).element_size()
    modules = stage.lora_modules()
    targets = {name: tuple(sorted({path.rsplit(".", 1)[-1] for path, m in modules.items() if name in m.adapters()}))
               for name in worker.jobs}
    layers = len(stage.layers_range())
    grouped = grouped_targets(stage)
    lora = {name: lora_token_bytes(stage, name, grouped) for name in worker.jobs}
    grouped_bytes = grouped_token_bytes(stage, grouped)
    generator = torch.Generator(worker.device).manual_seed(0)
    recompute = getattr(stage, "recompute", False)
    kept = (inputs_kept_by_base(stage, worker.probe_inputs(micro_batches[0], generator)[1], saved_only=recompute)
            if micro_batches else ())
    inputs = {g: 0.0 if g in kept else b for g, b in input_token_bytes(stage.config, layers, size).items()}
    per_length = rotary_position_bytes(stage.config, size) if layers else 0.0
    head = head_token_bytes(stage)
    recomputed = None
    if recompute:  # a layer keeps its input only: LoRA keeps nothing past it
        per_layer = {name: c / max(layers, 1) for name, c in lora.items()}
        layer = MemoryModel(stage_index, 0, 0.0, 0.0, lora_per_token=per_layer,
                            input_per_token={g: b / max(layers, 1) for g, b in inputs.items()}, kept_by_base=kept,
                            grouped=grouped,
                            grouped_per_token={t: b / max(layers, 1) for t, b in grouped_bytes.items()},
                            job_targets=targets)
        layer_samples = [(t, l, transient, 0) for t, l, _, _, transient in samples]
        recomputed = fitted(layer, layer_samples, micro_batches)
        lora, grouped, grouped_bytes, kept = dict.fromkeys(worker.jobs, 0.0), (), {}, ()
        inputs = dict.fromkeys(inputs, 0.0)
    job = {name: job_state_bytes(stage.adapter_parameters(name), stage.dtype) for name in worker.jobs}
    if worker.device.type == "cuda":  # all the allocator holds between micro-batches (caches included)
        torch.cuda.synchronize(worker.device)
        static = torch.cuda.memory_allocated(worker.device)
    else:
        static = static_bytes(stage)
    shares = {name: worker.jobs[name].loss_share() for name in worker.jobs}
    counted = MemoryModel(stage_index, static, 0.0, 0.0, job, (), lora, inputs, per_length, kept, head, shares, grouped,
                          grouped_bytes, targets, recomputed)
    if worker.device.type == "cpu":  # the probes' activations, freed, stay in glibc's heap otherwise
        release_freed_memory()
    return fitted(counted, [sample[:4] for sample in samples], micro_batches)


def fitted(counted: MemoryModel, samples: Sequence[tuple[int, int, int, int]],
           micro_batches: Sequence[MicroBatch]) -> MemoryModel:
    """`counted` with b1 and b2 fitted to the probes' (tokens, length, bytes, loss tokens), each
    less what `counted` counts for its micro-batch, and scaled up until no probe is above them."""
    base = []
    for (tokens, length, measured, losses), mb in zip(samples, micro_batches):
        held = (sum(p.rows * length * counted.lora_per_token.get(p.job, 0.0) for p in mb.parts)
                + length * counted.per_length + losses * counted.loss_token_bytes
                + tokens * (counted.kept_inputs(mb.jobs) + counted.grouped_lora(mb.jobs)))
        base.append((tokens, length, max(0, int(measured - held))))
    b1, b2 = bound_above(base, *fit_activation(base))
    return dataclasses.replace(counted, per_token=b1, per_token_length=b2, samples=tuple(samples))


def head_token_bytes(stage: torch.nn.Module, positions: int = 64) -> float:
    """Bytes the last stage's head (`StageModel.head_loss`) keeps per loss token for backward,
    measured on `positions` loss tokens of random hidden states; 0 on a stage without the head.
    Loss tokens are a share of a micro-batch's tokens that depends on each job's data (a `plain`
    template puts loss on every token), so the per-token fit cannot see them."""
    if getattr(stage, "lm_head", None) is None:
        return 0.0
    device = stage.lm_head.weight.device
    hidden = torch.randn(1, positions + 1, stage.config.hidden_size, dtype=stage.dtype, device=device,
                         requires_grad=True)
    where = LossTokens.find(torch.zeros(1, positions + 1, dtype=torch.long), [(0, 1)], [1.0], device)
    meter = SavedTensorMeter(list(stage.parameters()) + list(stage.buffers()) + [hidden])
    with meter.measure() as held:
        total, _ = stage.head_loss(hidden, where)
        held.add_graph(total)
    return held.bytes / positions


def rotary_position_bytes(config: Any, dtype_bytes: int) -> float:
    """Bytes per position of the rotary tables a micro-batch keeps once for all its layers and rows:
    cos and sin, [L, head_dim] each, in the compute dtype."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return float(2 * head_dim * dtype_bytes)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (meta, some subclasses)
            continue
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def static_bytes(stage: torch.nn.Module) -> int:
    return tensor_bytes(list(stage.parameters()) + list(stage.buffers()))


def grouped_targets(stage: torch.nn.Module) -> tuple[str, ...]:
    """The targets whose modules run the grouped path for this stage's compute dtype and device."""
    out = set()
    for path, module in stage.lora_modules().items():
        probe_x = torch.empty(0, dtype=stage.dtype, device=module._device())
        with warnings.catch_warnings():  # an explicit "grouped" that cannot run warns once, when it runs
            warnings.simplefilter("ignore")
            if module.resolve_path(probe_x) == "grouped":
                out.add(path.rsplit(".", 1)[-1])
    return tuple(sorted(out))


def grouped_token_bytes(stage: torch.nn.Module, grouped: Iterable[str]) -> dict[str, float]:
    """Per grouped target with adapters: x·Aᵀ per token at the modules' largest rank, padded to a
    multiple of 8, on every layer of the stage, in the compute dtype."""
    size = torch.empty((), dtype=stage.dtype).element_size()
    grouped = set(grouped)
    out: dict[str, float] = {}
    for path, module in stage.lora_modules().items():
        target = path.rsplit(".", 1)[-1]
        names = module.adapters()
        if target in grouped and names:
            out[target] = out.get(target, 0.0) + padded_rank(max(module.lora_A[n].shape[0] for n in names)) * size
    return out


def padded_rank(rank: int) -> int:
    """A rank as the grouped path stacks it: rounded up to a multiple of 8 (grouped_mm alignment)."""
    return -(-rank // 8) * 8


def lora_token_bytes(stage: torch.nn.Module, name: str, grouped: Iterable[str]) -> float:
    """Bytes job `name`'s LoRA keeps per token of its rows on this stage's loop-path modules: x·Aᵀ,
    rank entries in the compute dtype, at every such module it targets (the operator saves it for
    B's gradient; x itself is counted with the inputs). Grouped-path modules are charged per
    micro-batch instead (`grouped_token_bytes`); `grouped`: `grouped_targets(stage)`."""
    size = torch.empty((), dtype=stage.dtype).element_size()
    grouped = set(grouped)
    total = 0
    for path, module in stage.lora_modules().items():
        if name in module.adapters() and path.rsplit(".", 1)[-1] not in grouped:
            total += module.lora_A[name].shape[0] * size
    return float(total)


def job_state_bytes(params: Sequence[torch.nn.Parameter], compute_dtype: torch.dtype) -> int:
    """A running job's gradients and AdamW moments on this stage, plus the operator's cast of its
    weights when it computes in another dtype."""
    total = 0
    for p in params:
        total += 3 * p.numel() * p.element_size()
        if p.dtype != compute_dtype:
            total += p.numel() * torch.empty((), dtype=compute_dtype).element_size()
    return total


class Measurement:
    """The distinct storages a forward keeps for backward, and their bytes (see `SavedTensorMeter`).

    Storages are told apart by address, which a storage freed since may have passed on: `holds`
    asks whether the one counted is still alive. `kept`: count nothing that it still holds."""

    def __init__(self, exclude: set[int], kept: Measurement | None = None):
        self.bytes = 0
        self.storages: dict[int, StorageWeakRef] = {}
        self._exclude = exclude
        self._kept = kept

    def add(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (meta, some subclasses)
            return
        ptr = storage.data_ptr()
        if ptr in self.storages or ptr in self._exclude or (self._kept is not None and self._kept.holds(ptr)):
            return
        self.storages[ptr] = StorageWeakRef(storage)
        self.bytes += storage.nbytes()

    def holds(self, ptr: int) -> bool:
        """Whether a storage counted here is at address `ptr` and still alive."""
        ref = self.storages.get(ptr)
        return ref is not None and not ref.expired()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A saved-tensor pack hook that counts `t`. It keeps `t` detached, as `save_on_cpu` keeps
        a copy: a saved output kept as itself would hold its own node, a reference cycle through
        autograd that only a backward breaks. The forwards measured without one at start-up
        (`inputs_kept_by_base`, `head_token_bytes`) leaked their graphs for the rest of the run:
        1.1 GB in `benchmarks.recompute_memory`, and on CUDA as much device memory."""
        self.add(t)
        return t.detach()

    def add_graph(self, root: torch.Tensor) -> None:
        """Also count what custom autograd Functions in `root`'s graph keep as attributes of their
        context rather than through `save_for_backward` (bitsandbytes' int8 matmul keeps its input
        so), which saved-tensor hooks never see."""
        for t in context_tensors(root.grad_fn):
            self.add(t)


def context_tensors(root: Any) -> Iterator[torch.Tensor]:
    """Tensors held as attributes (or in tuples and lists that are attributes) of the custom
    Function contexts in the autograd graph below `root` (a grad_fn; None: none)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():  # only Python Functions' nodes have one
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, (tuple, list)):
                yield from (v for v in value if isinstance(v, torch.Tensor))
        stack.extend(next_node for next_node, _ in node.next_functions)


class SavedTensorMeter:
    """Counts the new storages autograd keeps for backward inside `measure()` (weights excluded):
    what saved-tensor hooks see, and with `Measurement.add_graph` what custom Functions keep."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude: set[int] = set()
        self.exclude_storages(exclude)

    def exclude_storages(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count none of these tensors' storages from now on, instead of those given before (the
        stage's weights: give them again after jobs are added mid-run, or their LoRA weights, saved
        for backward, would count as activations)."""
        self.exclude = {t.untyped_storage().data_ptr() for t in tensors}

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        held = Measurement(self.exclude)
        with torch.autograd.graph.saved_tensors_hooks(held.pack, lambda t: t):
            yield held


class RecomputeMeter:
    """The most bytes one layer's recompute keeps during a backward under `pipeline.recompute`
    (`StageModel.recompute_observer`): the storages `torch.utils.checkpoint` re-saves for the
    layer's backward, less the weights (`exclude`) and what the micro-batch's forward counted and
    still holds (`kept`: the layer's input). A layer's recomputed tensors are freed by its backward
    before the layer below it is recomputed, so the most over the layers is what a backward adds
    at its peak.

    Saved-tensor hooks of our own would take the recompute's saves from checkpoint; this wraps
    checkpoint's hooks instead (the top of autograd's hook stack, as torch's AOT autograd reads it)."""

    def __init__(self, exclude: set[int], kept: Measurement | None = None):
        self.exclude = exclude
        self.kept = kept
        self.most = 0

    @contextlib.contextmanager
    def layer(self) -> Iterator[None]:
        read_top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: may go
        top = read_top(True) if read_top is not None else None
        if top is None:  # not inside checkpoint's recompute (or no way to tell): nothing counted
            yield
            return
        pack, unpack = top
        held = Measurement(self.exclude, self.kept)

        def counting(t: torch.Tensor) -> Any:
            held.add(t)
            return pack(t)

        torch._C._autograd._push_saved_tensors_default_hooks(counting, unpack)
        try:
            yield
        finally:
            torch._C._autograd._pop_saved_tensors_default_hooks()
            self.most = max(self.most, held.bytes)


def live_job_bytes(jobs: Iterable) -> int:
    """Gradients and optimizer state the jobs hold right now on this stage's device (counted; a
    pre-empted job's moments are in host memory, which on CPU is the same memory, but they are
    counted as the device a GPU run would free)."""
    tensors: list[torch.Tensor] = []
    for job in jobs:
        if job.optimizer is None:
            continue
        for group in job.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    tensors.append(p.grad)
                state = job.optimizer.state.get(p)
                if state and not getattr(job, "offloaded", False):
                    tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return tensor_bytes(tensors)


def process_peak_rss() -> int:
    """The process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_capacity(device: torch.device) -> int:
    """What a fractional budget is a fraction of: the GPU's memory, or on CPU the process's limit
    (the lowest of physical memory, the cgroup's memory.max and RLIMIT_AS)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    try:
        text = open("/sys/fs/cgroup/memory.max").read().strip()
        if text != "max":
            limits.append(int(text))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits)




def budget_bytes(value: float | str, device: torch.device) -> int:
    kind, amount = budget_spec(value)
    return int(amount) if kind == "bytes" else int(amount * device_capacity(device))
