"""`pipeline.balance: profile`: time the model's parts on this machine, then split layers by them.

At start-up every rank builds a one-layer copy of the model (embedding, decoder layer 0, norm,
lm_head; every decoder layer has the same shapes, so layer 0 stands for all of them), attaches
every job's adapter, and times on it the run's median micro-batch (real rows, real LoRA segments
and dropout): the embedding's forward, one decoder layer's forward + backward, the head's forward
+ backward (norm, lm_head and the cross-entropy), and one AdamW step of each job over one layer's
LoRA matrices. One warm-up, then the median of a few repeats. The one-layer copy is freed before
the rank builds its real stage.

Ranks exchange their measurements, so every rank runs the same pure split (`plan_from_profiles`)
on the same numbers and gets the same stages. Ranks on the same machine (host and device kind)
pool their measurements (median), since their differences are noise; across machines, stage s's
layers are costed with its own machine's numbers, so a slower machine gets fewer layers, and the
embedding is costed on rank 0's machine and the head on the last rank's. The parts are timed in
interleaved rounds, so a disturbance from outside slows them alike and their ratio holds. Costs
are scaled from the profiled micro-batch to the whole run by padded tokens (plus one AdamW step
per layer for every job step), which gives a predicted busy time per stage to compare with the
measured one.
"""

from __future__ import annotations

import gc
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from mlora_pp.job import AdapterJob
from mlora_pp.memory import micro_shape
from mlora_pp.model import StageModel, StageSpec, build_stage
from mlora_pp.partition import split_layers, stage_costs
from mlora_pp.preflight import agree
from mlora_pp.runtime import StageWorker
from mlora_pp.schedule import CostModel, MicroBatch, MicroBatchPart, Schedule
from mlora_pp.transport import PipelineError

REPEATS = 5
"""Timed repeats of each part (after one warm-up); the median is kept."""


@dataclass(frozen=True)
class LayerProfile:
    """One rank's measured seconds on the profiled micro-batch."""

    embed_s: float
    """Embedding lookup (forward only: the embedding is frozen and its input is token ids)."""
    layer_s: float
    """One decoder layer with every job's LoRA, forward + backward (recomputed forward included)."""
    head_s: float
    """Norm + lm_head + cross-entropy, forward + backward."""
    step_s: float
    """One job's AdamW step over one layer's LoRA matrices (mean over the jobs)."""
    tokens: int
    """Padded tokens of the profiled micro-batch."""
    rows: int
    repeats: int = REPEATS
    wall_s: float = 0.0
    """What measuring took on this rank, reading the one-layer model included."""
    machine: str = ""
    """`machine_name`: profiles of ranks on the same machine are pooled."""


@dataclass(frozen=True)
class ProfiledPlan:
    """The split chosen from every rank's profile, and what it predicts."""

    counts: list[int]
    """Decoder layers per stage."""
    predicted_s: list[float]
    """Predicted busy seconds of each stage over the whole run."""
    profiles: list[LayerProfile]
    """Rank r's own measurement (stage r's layers are costed with its machine's pooled numbers)."""

    def record(self, busy_s: list[float]) -> dict:
        """The `metrics.jsonl` event: the split, predicted and measured busy seconds per stage."""
        return {"event": "balance", "balance": "profile", "layers": self.counts, "predicted_s": self.predicted_s,
                "busy_s": busy_s, "profiles": [asdict(p) for p in self.profiles]}


def plan_from_profiles(num_layers: int, profiles: list[LayerProfile], run_tokens: int, job_steps: int) -> ProfiledPlan:
    """The split minimising the slowest stage's predicted busy time; one profile per stage.

    Pure: every rank calls it with the same gathered profiles and gets the same plan. A stage's
    predicted time is, for the whole run (`run_tokens` padded tokens, `job_steps` optimizer steps
    summed over the jobs), its layers' forward + backward scaled by tokens plus one AdamW step per
    layer per job step, with the embedding on the first stage and the head and loss on the last.
    """
    costs = pooled(profiles)
    scale = [run_tokens / max(p.tokens, 1) for p in costs]
    layer = [scale[s] * p.layer_s + job_steps * p.step_s for s, p in enumerate(costs)]
    embed = scale[0] * costs[0].embed_s
    head = scale[-1] * costs[-1].head_s
    counts = split_layers(num_layers, layer, embed=embed, head=head)
    return ProfiledPlan(counts, stage_costs(counts, layer, embed=embed, head=head), list(profiles))


def pooled(profiles: list[LayerProfile]) -> list[LayerProfile]:
    """Each rank's profile replaced by the median, part by part, over the ranks of its machine.

    Ranks on one machine run on the same hardware, so what tells their measurements apart is noise
    (another process taking a core from one rank while it measured); pooled, they cost their layers
    alike and only the measured ratios of layer, head and embedding decide the split there.
    """
    groups: dict[str, list[LayerProfile]] = {}
    for p in profiles:
        groups.setdefault(p.machine, []).append(p)

    def pool(group: list[LayerProfile]) -> LayerProfile:
        return replace(group[0], **{part: statistics.median(getattr(p, part) for p in group)
                                    for part in ("embed_s", "layer_s", "head_s", "step_s")})

    merged = {machine: pool(group) for machine, group in groups.items()}
    return [merged[p.machine] for p in profiles]


def representative(schedule: Schedule) -> MicroBatch:
    """The micro-batch of median padded tokens (ties: the lowest id)."""
    ordered = sorted((mb for mb in schedule.micro_batches if not mb.eval), key=lambda mb: (mb.tokens, mb.id))
    return ordered[len(ordered) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(parts: dict[str, Callable[[], None]], device: torch.device, repeats: int
                         ) -> dict[str, float]:
    """Median seconds of each part, timed in rounds (one call of each per round, after one warm-up
    round), so that a disturbance from outside the run slows every part alike, not one of them."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(repeats + 1):
        for name, fn in parts.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_name(device: torch.device) -> str:
    """Host and device kind: ranks with the same name run on the same hardware."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{socket.gethostname()} {kind}"


@contextmanager
def _layers_only(stage: StageModel) -> Iterator[StageModel]:
    """`stage` run as a middle stage (hidden states in and out); its embedding and head stay loaded."""
    embed, head = stage.embed_tokens, stage.lm_head
    stage.embed_tokens = stage.lm_head = None
    try:
        yield stage
    finally:
        stage.embed_tokens, stage.lm_head = embed, head


def measure(model_dir: str | Path, jobs: dict[str, AdapterJob], schedule: Schedule, *, seed: int,
            dtype: str = "float32", quantize: str = "none", lora_path: str = "auto", recompute: bool = False,
            device: torch.device = torch.device("cpu"), repeats: int = REPEATS) -> LayerProfile:
    """Time embedding, one decoder layer, head + loss and the AdamW step on this machine."""
    started = time.perf_counter()
    stage = build_stage(model_dir, StageSpec(0, 1, True, True), dtype=dtype, quantize=quantize,
                        lora_path=lora_path, device=device)
    stage.recompute = recompute
    for job in jobs.values():
        c = job.config
        stage.add_adapter(c.name, c.rank, c.alpha, c.dropout, list(c.target_modules), seed=seed, rslora=c.rslora)
    mb = representative(schedule)
    # as the last stage: it also finds the loss tokens
    last = StageWorker(stage, jobs, schedule, stage_index=schedule.num_stages - 1, device=device)
    input_ids, where, batch = last.inputs(mb)
    try:
        with torch.no_grad():
            hidden = stage.embed_tokens(input_ids)
        hidden.requires_grad_(True)
        generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG as training expects it
        grad_out = torch.randn(hidden.shape, generator=generator, device=device, dtype=hidden.dtype)

        def embed() -> None:
            with torch.no_grad():
                stage.embed_tokens(input_ids)

        def layer() -> None:
            with _layers_only(stage):
                out = stage(hidden, batch)
            torch.autograd.backward(out, grad_out)
            hidden.grad = None

        def head() -> None:  # as the last stage computes it: norm, lm_head and loss on the loss tokens
            total, _ = stage.head_loss(hidden, where)
            total.backward()
            hidden.grad = None

        parts = {"embed": embed, "layer": layer, "head": head}  # layer first: the steps need its gradients
        for name in jobs:
            params = stage.adapter_parameters(name)
            if params:
                parts[f"step {name}"] = torch.optim.AdamW(params, lr=0.0, fused=device.type == "cuda" or None).step
        t = _interleaved_medians(parts, device, repeats)
        steps = [v for k, v in t.items() if k.startswith("step ")]
        return LayerProfile(t["embed"], t["layer"], t["head"], statistics.mean(steps) if steps else 0.0, mb.tokens,
                            mb.rows, repeats, wall_s=time.perf_counter() - started, machine=machine_name(device))
    finally:
        del stage
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_stages(measure_here: Callable[[], LayerProfile], num_layers: int, schedule: Schedule,
                   rank: int, world: int) -> ProfiledPlan:
    """Measure on every rank (a bad input anywhere stops every rank with the same line), exchange
    the profiles, and split the layers by them; every rank returns the same plan."""
    mine = agree(rank, world, measure_here)
    profiles = [mine]
    if world > 1:
        profiles = [None] * world
        try:
            dist.all_gather_object(profiles, mine)
        except RuntimeError as exc:
            raise PipelineError(f"rank {rank}: lost a rank while exchanging layer profiles ({exc})") from None
    job_steps = sum(1 for actions in schedule.stages[:1] for a in actions if a.kind == "S")
    tokens = sum(mb.tokens for mb in schedule.micro_batches if not mb.eval)  # evaluations are small next to training
    return plan_from_profiles(num_layers, profiles, tokens, job_steps)


def describe(plan: ProfiledPlan) -> str:
    """One line for the log: the split and what each stage is predicted to cost."""
    p = plan.profiles[0]
    times = " / ".join(f"{t:.2f} s" for t in plan.predicted_s)
    return (f"balance: profile: layers {plan.counts}, predicted busy {times} (rank 0, {p.tokens}-token "
            f"micro-batch: layer {p.layer_s * 1e3:.2f} ms, head {p.head_s * 1e3:.2f} ms, "
            f"embedding {p.embed_s * 1e3:.2f} ms, AdamW {p.step_s * 1e3:.2f} ms per layer and job; "
            f"profiling took {max(q.wall_s for q in plan.profiles):.1f} s)")


def compare(plan: ProfiledPlan, busy_s: list[float]) -> str:
    """One line for the end of the run: predicted against measured busy seconds per stage."""
    cells = ", ".join(f"stage {s} {p:.2f} s vs {b:.2f} s ({(b - p) / max(p, 1e-9):+.0%})"
                      for s, (p, b) in enumerate(zip(plan.predicted_s, busy_s)))
    return (f"balance: profile: predicted vs measured busy time: {cells}; the slowest stage is "
            f"{spread(busy_s):.1%} above the fastest")


def spread(busy_s: list[float]) -> float:
    """How much the slowest stage's busy time exceeds the fastest's, relative to the fastest."""
    return max(busy_s) / max(min(busy_s), 1e-9) - 1.0


# ------------------------------------------------------------------------------- fusion probe
# Whether fusing jobs into one micro-batch pays depends on what each forward and backward costs
# beyond its tokens (Python, kernel launches, small GEMMs): `schedule.choose_streams` weighs that
# against the longer fill and drain of larger micro-batches. Each stage times it here.


@dataclass(frozen=True)
class FusionProfile:
    """One stage's forward + backward seconds for two micro-batches of different jobs, apart (the
    two summed) and fused into one, with their padded tokens (first, second, fused); and, where a
    job has two micro-batches of like length, those two as one micro-batch of that one job (`lone`),
    which tells what fusing costs per job beyond the tokens it adds."""

    stage: int
    apart_s: float
    fused_s: float
    tokens: tuple[int, int, int]
    lone_s: float | None = None
    lone_tokens: int | None = None

    def overhead_and_rate(self) -> tuple[float, float]:
        """(seconds per forward + backward beyond its tokens, seconds per padded token), from
        t = overhead + rate * tokens: apart = 2 overhead + rate (t1 + t2), and lone = overhead +
        rate tl (or, without a lone time, fused = overhead + rate tf: then what an extra job costs
        is netted out of the overhead)."""
        t1, t2, tf = self.tokens
        single, tokens = (self.fused_s, tf) if self.lone_s is None else (self.lone_s, self.lone_tokens)
        det = 2 * tokens - (t1 + t2)
        overhead = (self.apart_s * tokens - single * (t1 + t2)) / det if det else -1.0
        rate = (2 * single - self.apart_s) / det if det else -1.0
        if rate <= 0 or overhead < 0:  # noise beyond the model: no overhead, all per token
            return 0.0, single / tokens
        return overhead, rate

    def job_overhead(self) -> float:
        """Seconds per forward + backward that each job beyond the first adds to a fused
        micro-batch, beyond its tokens (its adapters' own small kernels); 0 without a lone time."""
        if self.lone_s is None:
            return 0.0
        overhead, rate = self.overhead_and_rate()
        return max(0.0, self.fused_s - overhead - rate * self.tokens[2])


FusionProbe = tuple[MicroBatch, MicroBatch, MicroBatch, MicroBatch | None]
"""Micro-batches the fusion probe times: first, second (different jobs), the two fused, and two of
one job's micro-batches as one (None when no job has two)."""


def fusion_pair(schedule: Schedule) -> FusionProbe | None:
    """Two one-job micro-batches of different jobs, as alike in padded length as the run has (near
    its median), the two fused, and two micro-batches of one job as alike (near the fused pair's
    length) as one; None with fewer than two jobs."""
    parts = sorted((p for mb in schedule.micro_batches for p in mb.parts if not p.eval),
                   key=lambda p: (p.tokens / p.rows, p.job))
    middle = len(parts) / 2
    pairs = [(abs(a.tokens / a.rows - b.tokens / b.rows), abs(i - middle), i)
             for i, (a, b) in enumerate(zip(parts, parts[1:])) if a.job != b.job]
    if not pairs:
        return None
    a, b = parts[min(pairs)[2]], parts[min(pairs)[2] + 1]
    length = (a.tokens / a.rows + b.tokens / b.rows) / 2
    own: dict[str, list[MicroBatchPart]] = {}
    for p in parts:
        own.setdefault(p.job, []).append(p)
    same = [(abs(x.tokens / x.rows - y.tokens / y.rows) + abs((x.tokens / x.rows + y.tokens / y.rows) / 2 - length),
             x.job, k) for x_job in own.values() for k, (x, y) in enumerate(zip(x_job, x_job[1:]))]
    lone = None
    if same:
        _, job, k = min(same)
        lone = MicroBatch(-1, (own[job][k], own[job][k + 1]))
    return MicroBatch(-1, (a,)), MicroBatch(-1, (b,)), MicroBatch(-1, (a, b)), lone


FUSION_REPEATS = 7
"""Timed rounds of the fusion probe: its estimate of the per-action cost is a small difference of
two larger times (11-18 ms of about 150 ms on the CPU benchmark across runs at 5 rounds)."""


def measure_fusion(worker: StageWorker, probe: FusionProbe, repeats: int = FUSION_REPEATS) -> FusionProfile:
    """Time `fusion_pair`'s micro-batches on this stage (interleaved rounds, medians). Inputs of
    later stages and output gradients are random (only shapes matter); gradients are cleared. The
    lone micro-batch runs as one job's rows in one adapter segment, as the schedule's own would."""
    generator = torch.Generator(worker.device).manual_seed(0)

    def forward_backward(mb: MicroBatch) -> Callable[[], None]:
        def run() -> None:
            _, x, where, batch = worker.probe_inputs(mb, generator)
            out, total, _ = worker._compute(mb, x, where, batch)
            worker.probe_backward(out, total, generator)
        return run

    first, second, fused, lone = probe
    timed = {"first": forward_backward(first), "second": forward_backward(second), "fused": forward_backward(fused)}
    if lone is not None:
        timed["lone"] = forward_backward(lone)
    medians = _interleaved_medians(timed, worker.device, repeats)
    for name in worker.jobs:
        for param in worker.stage.adapter_parameters(name):
            param.grad = None
    t1, t2, tf = (micro_shape(mb)[0] for mb in (first, second, fused))
    return FusionProfile(worker.stage_index, medians["first"] + medians["second"], medians["fused"], (t1, t2, tf),
                         medians.get("lone"), micro_shape(lone)[0] if lone is not None else None)


def fusion_cost(profiles: list[FusionProfile]) -> CostModel:
    """The per-stage `CostModel` of the profiles (forward a third of a forward + backward, as in
    `CostModel`'s default backward_ratio of 2; the overheads split evenly between F and B), for
    `schedule.choose_streams`."""
    ordered = sorted(profiles, key=lambda p: p.stage)
    fits = [p.overhead_and_rate() for p in ordered]
    return CostModel(forward_per_token=tuple(rate / 3 for _, rate in fits), backward_ratio=2.0,
                     action_overhead=tuple(overhead / 2 for overhead, _ in fits),
                     fused_job_overhead=tuple(p.job_overhead() / 2 for p in ordered))


def describe_fusion(profiles: list[FusionProfile]) -> str:
    """One line: per stage, the measured seconds beyond the tokens, per token and per fused job."""
    parts = []
    for p in sorted(profiles, key=lambda p: p.stage):
        overhead, rate = p.overhead_and_rate()
        extra = f" (+ {p.job_overhead() * 1e3:.1f} ms per fused job)" if p.lone_s is not None else ""
        parts.append(f"stage {p.stage} {overhead * 1e3:.1f} ms + {rate * 1e6:.0f} us/token{extra}")
    return ", ".join(parts)
