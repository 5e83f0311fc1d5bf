"""What we cannot run here: the real schedules replayed on GPU cost models.

``python -m benchmarks.simulate [--stages 4,8,16,64] [--jobs 4,16,64,128,256] [--hardware ...] [--out FILE]``
``python -m benchmarks.simulate --stages 64 --jobs 128 [--extra-in-flight N] [--cost-aware] [--hide-latency [auto]] --out FILE``
(variants of the lora order: more micro-batches in flight, or the order generated with the
hardware's own cost model instead of the launcher's default; see README "Simulator")

Grid mode. For every (stages, jobs) the action lists are built exactly as the launcher builds them
(`build_schedule(job_steps, stages, policy)`, default `CostModel`, fusion on) for `lora`, `1f1b`
and `gpipe`, then `mlora_pp.sim.simulate` replays each list under each hardware cost model below.
Reported: makespan, bubble (idle stage-seconds over stages x makespan, optimizer steps counted as
busy) and lora's speedup over 1f1b (1f1b makespan / lora makespan) and over FSDP2 on the same
GPUs, data-parallel (`fsdp_makespan`: an analytic model of the benchmark's FSDP2 baseline, not a
replayed schedule). Prints a table and writes
benchmarks/results/sim.json.

Cost model assumptions (all stated here, none measured):
- Compute: datasheet dense bf16 tensor-core peaks, at an assumed 50% efficiency (`EFFICIENCY`):
  NVIDIA RTX A6000 154.8 TFLOP/s (datasheet "peak FP16/BF16 tensor", dense; 309.7 with sparsity),
  768 GB/s memory; NVIDIA H100 SXM5 989 TFLOP/s (datasheet "BF16 tensor core", dense; 1979 with
  sparsity), 3.35 TB/s memory.
- Links, per direction, at datasheet rate (no efficiency factor), assumed latencies: PCIe 4.0 x16
  32 GB/s, 10 us; NVLink 4 (H100 SXM) 450 GB/s (900 GB/s both directions), 5 us; Ethernet
  1 Gbit/s = 125 MB/s, 50 us; 100 Gbit/s = 12.5 GB/s, 10 us. The "8 hosts" models put one A6000
  in each host and cost EVERY stage boundary at the network's rate: exact for 4 and 8 stages,
  pessimistic beyond 8 stages, where only 7 boundaries cross hosts (the simulator has one link
  cost for all boundaries).
- Model: Llama-2-70B layer shape (hidden 8192, MLP 28672, 64 heads, 8 KV heads, bf16) with 64
  decoder layers (not 80), so that 4, 8, 16 and 64 stages all get equal whole layers (16/8/4/1).
  Embedding and lm_head are left out (they are a partitioning matter: at 1 layer per stage the
  head would make the last stage ~30% slower, a bubble no schedule can remove).
- Per token and layer: forward 2 x weights (q, k, v, o, gate, up, down) + attention 4 x seq x
  hidden, plus LoRA rank 16 on all 7 projections; backward (frozen base: input gradients only)
  2 x weights + attention 8 x seq x hidden + LoRA input and weight gradients: backward/forward
  ~1.02. No recomputation. Optimizer step per job and stage: AdamW over the stage's LoRA
  parameters, 28 bytes moved per parameter at 50% of memory bandwidth.
- Jobs: equal, LoRA rank 16, micro-batch 4 rows x 512 tokens, 8 micro-batches per step (batch 32),
  8 steps per job (4 steps per job at 256 jobs, to keep the run to minutes; the pipeline then
  holds the same 8192 micro-batches as at 128 jobs). Activations cross a boundary in bf16
  (hidden x 2 bytes per token).

- Memory (reported, not simulated): the fullest stage holds its bf16 weights, every job's LoRA
  state (fp32 parameters, gradients, AdamW moments: 16 bytes a parameter) and the saved
  activations of its most micro-batches in flight in the replay. Saved bytes per token and layer
  are measured on our own stage code at 1/8 of the widths and scaled up
  (`saved_bytes_per_token`); device memory is the datasheet's (A6000 48 GiB, H100 80 GiB).

With equal micro-batches and `lora`'s streams covering each other's round trips, the only idle
time is one fill and one drain: bubble ~ (S-1) / (M+S-1) for M micro-batch slots per stage (see
`mlora_pp.schedule`), so a longer run (more steps) only lowers it.

The simulator calibrated on this machine, against measured makespans: `benchmarks.calibration`,
run and printed by `benchmarks.run`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import RESULTS, write_result
from benchmarks.calibration import Fabric
from mlora_pp.schedule import POLICIES, CostModel, JobSteps, Schedule, build_schedule
from mlora_pp.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
EFFICIENCY = 0.5
"""Assumed fraction of the datasheet compute peak (and of memory bandwidth for the optimizer)."""


@dataclass(frozen=True)
class Device:
    name: str
    flops: float
    """Datasheet dense bf16 tensor peak, FLOP/s."""
    memory_bandwidth: float
    """Datasheet, bytes/s."""
    memory: float = math.inf
    """Datasheet device memory, bytes (a GPU's "80 GB" is 80 GiB)."""


A6000 = Device("RTX A6000", 154.8e12, 768e9, 48 * 2**30)
H100 = Device("H100 SXM", 989e12, 3.35e12, 80 * 2**30)
PCIE4 = Fabric("PCIe 4.0 x16", 32e9, 10e-6)
NVLINK4 = Fabric("NVLink 4", 450e9, 5e-6)
ETH1 = Fabric("1 Gbit/s Ethernet", 125e6, 50e-6)
ETH100 = Fabric("100 Gbit/s Ethernet", 12.5e9, 10e-6)
HARDWARE: dict[str, tuple[Device, Fabric]] = {
    "a6000-pcie4": (A6000, PCIE4),
    "h100-nvlink": (H100, NVLINK4),
    "8hosts-1gbit": (A6000, ETH1),
    "8hosts-100gbit": (A6000, ETH100),
}


@dataclass(frozen=True)
class Shape:
    """Llama-2-70B's layer shape; 64 layers so that 4, 8, 16 and 64 stages split evenly."""

    layers: int = 64
    hidden: int = 8192
    intermediate: int = 28672
    heads: int = 64
    kv_heads: int = 8
    seq: int = 512
    rows: int = 4
    rank: int = 16
    bytes_per_value: int = 2  # bf16

    @property
    def tokens(self) -> int:
        """Padded tokens of one job's micro-batch."""
        return self.rows * self.seq

    def projections(self) -> list[tuple[int, int]]:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return [(h, h), (h, kv), (h, kv), (h, h), (h, self.intermediate), (h, self.intermediate),
                (self.intermediate, h)]

    def weights(self) -> int:
        return sum(i * o for i, o in self.projections())

    def lora_params(self) -> int:
        return sum(self.rank * (i + o) for i, o in self.projections())

    def flops_per_token(self) -> tuple[float, float]:
        """(forward, backward) FLOPs per token of one decoder layer with one LoRA adapter."""
        attn = 4 * self.seq * self.hidden  # QK^T and AV
        lora = 2 * self.lora_params()
        forward = 2 * self.weights() + attn + lora
        backward = 2 * self.weights() + 2 * attn + 2 * lora  # input grads; LoRA input + weight grads
        return float(forward), float(backward)


def saved_bytes_per_token(shape: Shape, scale: int = 8) -> float:
    """Bytes one decoder layer keeps for backward per token, measured on our own stage code (bf16,
    one LoRA adapter of `shape.rank` on all 7 projections, dropout on, CPU): a layer with every
    width divided by `scale` (head size kept) is run forward under `memory.SavedTensorMeter`, and
    the count is scaled back up. Every term is linear in the widths but the adapters' rank-sized
    intermediates and the rotary tables, well under 1% here."""
    import tempfile

    import torch

    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.memory import SavedTensorMeter
    from mlora_pp.model import StageSpec, build_stage
    from mlora_pp.tiny import make_tiny_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory(prefix="sim-layer-") as tmp:
        make_tiny_model(tmp, layers=1, hidden=shape.hidden // scale, heads=shape.heads // scale,
                        kv_heads=max(1, shape.kv_heads // scale), intermediate=shape.intermediate // scale)
        stage = build_stage(tmp, StageSpec(0, 1, False, False), dtype="bfloat16")
        stage.add_adapter("a", shape.rank, 2.0 * shape.rank, 0.05, targets, seed=0)
        x = torch.randn(1, shape.seq, shape.hidden // scale, dtype=torch.bfloat16, requires_grad=True)
        batch = LoRABatch((LoRASegment("a", 0, 1, (1,)),), seq_len=shape.seq, training=True)
        meter = SavedTensorMeter(list(stage.parameters()) + list(stage.buffers()))
        with meter.measure() as saved:
            stage(x, batch)
    return saved.bytes / shape.seq * scale


def stage_memory(shape: Shape, stages: int, jobs: int, in_flight: int, saved_per_token: float) -> float:
    """Bytes one stage holds at its peak: its frozen bf16 weights, every job's LoRA parameters,
    gradients and AdamW moments (fp32: 16 bytes a parameter), and `in_flight` micro-batches'
    saved activations. Not counted: CUDA context, allocator slack, the communication buffers."""
    per_stage = shape.layers // stages
    return per_stage * (shape.weights() * shape.bytes_per_value + jobs * shape.lora_params() * 16
                        + in_flight * shape.tokens * saved_per_token)


def gpu_cost(device: Device, fabric: Fabric, shape: Shape, stages: int) -> CostModel:
    """Seconds per token and per message for `stages` equal stages of `shape.layers / stages` layers."""
    if shape.layers % stages:
        raise ValueError(f"{shape.layers} layers do not split evenly over {stages} stages")
    per_stage = shape.layers // stages
    fwd, bwd = shape.flops_per_token()
    rate = device.flops * EFFICIENCY
    step = per_stage * shape.lora_params() * 28 / (device.memory_bandwidth * EFFICIENCY)
    return CostModel(forward_per_token=per_stage * fwd / rate, backward_ratio=bwd / fwd, step_seconds=step,
                     link_latency=fabric.latency, link_bandwidth=fabric.bandwidth,
                     activation_bytes_per_token=shape.hidden * shape.bytes_per_value)


def fsdp_makespan(device: Device, fabric: Fabric, shape: Shape, gpus: int, jobs: int, steps: int,
                  micros: int) -> tuple[float, float]:
    """(makespan, bubble) of FSDP2 on the pipeline's `gpus`, data-parallel, one job after another, as
    the benchmark's baseline runs it. Every layer all-gathers its frozen bf16 weights before its
    forward and again before its backward (reshard after forward); each gather overlaps the
    previous layer's compute (prefetch), so a layer takes the longer of the two. The backward's
    reduce-scatter of the LoRA gradients (fp32) rides with the second gather. A step's
    micro-batches go to the ranks in rounds (rank r takes r, r+W, ...), so W ranks finish M
    micro-batches in ceil(M/W) rounds; the AdamW step over the sharded LoRA parameters follows.
    Memory is not modelled (the frozen 70B-shaped base sharded over 4 ranks is 27 GB a rank).
    Bubble: GPU-seconds not computing over gpus x makespan."""
    fwd, bwd = shape.flops_per_token()
    rate = device.flops * EFFICIENCY
    t_f, t_b = shape.tokens * fwd / rate, shape.tokens * bwd / rate  # one layer, one micro-batch
    ring = (gpus - 1) / gpus
    hops = (gpus - 1) * fabric.latency
    gather = ring * shape.weights() * shape.bytes_per_value / fabric.bandwidth + hops if gpus > 1 else 0.0
    scatter = ring * shape.lora_params() * 4 / fabric.bandwidth + hops if gpus > 1 else 0.0
    layer_round = max(t_f, gather) + max(t_b, gather + scatter)
    optimizer = shape.layers * shape.lora_params() * 28 / (device.memory_bandwidth * EFFICIENCY) / gpus
    step = math.ceil(micros / gpus) * shape.layers * layer_round + optimizer
    makespan = jobs * steps * step
    busy = jobs * steps * (micros * shape.layers * (t_f + t_b) + gpus * optimizer)
    return makespan, 1.0 - busy / (gpus * makespan)


def default_steps(jobs: int) -> int:
    return 4 if jobs > 128 else 8


def equal_jobs(count: int, steps: int, micros: int, shape: Shape) -> list[JobSteps]:
    micro = tuple((shape.rows, shape.tokens) for _ in range(micros))
    return [JobSteps(f"job{i}", tuple(micro for _ in range(steps))) for i in range(count)]


def grid(stages: list[int], jobs: list[int], hardware: list[str], shape: Shape = Shape(), micros: int = 8,
         steps: int | None = None, progress: bool = False, extra_in_flight: int = 0,
         cost_aware: bool = False, hide_latency: bool | str = False, saved_per_token: float | None = None
         ) -> list[dict]:
    """One row per (hardware, stages, jobs, policy); every row carries `speedup_vs_1f1b`.

    `extra_in_flight` lets lora keep stages + this many micro-batches in flight (build_schedule's
    `max_in_flight`; the launcher always uses the default, stages). `cost_aware` builds the lora
    order with each hardware's cost model (communication included) instead of the launcher's
    default `CostModel` (time proportional to tokens, no communication). `hide_latency` builds lora
    as `pipeline.hide_latency: true` does (2S-1 in flight on stage 0, two fewer per stage). With
    `saved_per_token` (`saved_bytes_per_token`), each pipeline row also gets its fullest stage's
    memory (`stage_memory` at the replay's most micro-batches in flight) and whether it fits the
    device; `hide_latency="auto"` (which needs it) then builds lora as `pipeline.hide_latency: auto`
    with the device's memory as the budget: the wider windows where their fullest stage fits."""
    auto = hide_latency == "auto"
    if auto and saved_per_token is None:
        raise ValueError("hide_latency='auto' needs saved_per_token: the memory it decides by")
    rows: list[dict] = []
    for s in stages:
        costs = {hw: gpu_cost(*HARDWARE[hw], shape, s) for hw in hardware}
        for j in jobs:
            k = steps if steps is not None else default_steps(j)
            work = equal_jobs(j, k, micros, shape)
            tokens = j * k * micros * shape.tokens
            made: dict[str, Schedule] = {}
            started = time.perf_counter()
            for policy in POLICIES if not cost_aware else ("1f1b", "gpipe"):  # the launcher's lists
                hide = hide_latency is True and policy == "lora"
                bound = s + extra_in_flight if policy == "lora" and not hide else None
                made[policy] = build_schedule(work, s, policy, max_in_flight=bound, hide_latency=hide)
            wide = build_schedule(work, s, "lora", hide_latency=True) if auto else None
            for hw in hardware:
                found = {}
                if cost_aware:
                    made["lora"] = build_schedule(work, s, "lora", cost=costs[hw], max_in_flight=s + extra_in_flight)
                for policy in POLICIES:
                    schedule, hidden = made[policy], hide_latency is True and policy == "lora"
                    if auto and policy == "lora":
                        t = simulate(wide, costs[hw])
                        if stage_memory(shape, s, j, max(t.max_in_flight), saved_per_token) <= HARDWARE[hw][0].memory:
                            schedule, hidden = wide, True
                    t = simulate(schedule, costs[hw])
                    found[policy] = t
                    rows.append({"hardware": hw, "stages": s, "jobs": j, "steps": k, "micros_per_step": micros,
                                 "policy": policy, "max_in_flight": schedule.max_in_flight,
                                 "hide_latency": hidden, "micro_batches": len(schedule.micro_batches),
                                 "makespan_s": t.makespan, "bubble": t.bubble, "tokens_per_s": tokens / t.makespan})
                    if saved_per_token is not None:
                        peak = stage_memory(shape, s, j, max(t.max_in_flight), saved_per_token)
                        rows[-1].update(peak_in_flight=max(t.max_in_flight), stage_memory_gib=peak / 2**30,
                                        fits_device=peak <= HARDWARE[hw][0].memory)
                fsdp, fsdp_bubble = fsdp_makespan(*HARDWARE[hw], shape, s, j, k, micros)
                rows.append({"hardware": hw, "stages": s, "jobs": j, "steps": k, "micros_per_step": micros,
                             "policy": "fsdp2", "max_in_flight": None, "micro_batches": j * k * micros,
                             "makespan_s": fsdp, "bubble": fsdp_bubble, "tokens_per_s": tokens / fsdp})
                for r in rows[-len(POLICIES) - 1:]:
                    r["speedup_vs_1f1b"] = found["1f1b"].makespan / r["makespan_s"]
                    r["speedup_vs_fsdp2"] = fsdp / r["makespan_s"]
            if progress:
                print(f"  {s} stages x {j} jobs: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return rows


def print_grid(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"simulated on GPU cost models ({EFFICIENCY:.0%} of datasheet peak; see module docstring)")
    for i, col in enumerate(["hardware", "stages", "jobs x steps", "lora bubble", "1f1b bubble", "gpipe bubble",
                             "FSDP2 bubble", "lora makespan s", "1f1b makespan s", "FSDP2 makespan s",
                             "lora vs 1f1b", "lora vs FSDP2", "lora GiB / stage"]):
        table.add_column(col, justify="left" if i == 0 else "right")
    by = {(r["hardware"], r["stages"], r["jobs"], r["policy"]): r for r in rows}
    for hw, s, j in dict.fromkeys((r["hardware"], r["stages"], r["jobs"]) for r in rows):
        lo, f1, gp, fs = (by[(hw, s, j, p)] for p in ("lora", "1f1b", "gpipe", "fsdp2"))
        table.add_row(hw, str(s), f"{j} x {lo['steps']}", f"{lo['bubble']:.2%}", f"{f1['bubble']:.2%}",
                      f"{gp['bubble']:.2%}", f"{fs['bubble']:.2%}", f"{lo['makespan_s']:.3g}",
                      f"{f1['makespan_s']:.3g}", f"{fs['makespan_s']:.3g}", f"{lo['speedup_vs_1f1b']:.2f}x",
                      f"{lo['speedup_vs_fsdp2']:.2f}x",
                      f"{lo['stage_memory_gib']:.1f}{'' if lo['fits_device'] else ' (too big)'}"
                      if "stage_memory_gib" in lo else "-")
    Console(width=200).print(table)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=_ints, default=[4, 8, 16, 64])
    parser.add_argument("--jobs", type=_ints, default=[4, 16, 64, 128, 256])
    parser.add_argument("--hardware", default=",".join(HARDWARE), help="comma-separated subset of " + ",".join(HARDWARE))
    parser.add_argument("--steps", type=int, default=None, help="steps per job (default 8; 4 above 128 jobs)")
    parser.add_argument("--extra-in-flight", type=int, default=0,
                        help="lora: allow stages + N micro-batches in flight (default 0: the launcher's bound)")
    parser.add_argument("--hide-latency", nargs="?", const="true", choices=["true", "auto"], default=None,
                        help="lora as with pipeline.hide_latency: 2S-1 in flight on stage 0, two fewer per stage "
                             "(auto: where the fullest stage then fits the device's memory)")
    parser.add_argument("--cost-aware", action="store_true",
                        help="build the lora order with each hardware's cost model (not the launcher's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    hardware = args.hardware.split(",")
    unknown = set(hardware) - set(HARDWARE)
    if unknown:
        parser.error(f"unknown hardware {sorted(unknown)}")
    hide = {"true": True, "auto": "auto", None: False}[args.hide_latency]
    saved = saved_bytes_per_token(Shape())
    print(f"activations one decoder layer keeps for backward: {saved / 1e3:.0f} kB per token "
          f"(measured at 1/8 width, bf16, LoRA rank {Shape().rank} on all 7 projections)", file=sys.stderr)
    rows = grid(args.stages, args.jobs, hardware, steps=args.steps, progress=True,
                extra_in_flight=args.extra_in_flight, cost_aware=args.cost_aware, hide_latency=hide,
                saved_per_token=saved)
    print_grid(rows)
    lora = [r for r in rows if r["policy"] == "lora" and r["stages"] == 64 and r["jobs"] == 128]
    for r in lora:
        print(f"{'PASS' if r['bubble'] <= 0.01 else 'MISS'}  64 stages x 128 jobs, {r['hardware']}: "
              f"lora bubble {r['bubble']:.2%} (target <= 1%; hide_latency {'on' if r['hide_latency'] else 'off'}); fullest stage {r['stage_memory_gib']:.1f} GiB "
              f"at {r['peak_in_flight']} in flight: {'fits' if r['fits_device'] else 'does NOT fit'} the device")
    out = args.out or RESULTS / "sim.json"
    payload = {
        "command": " ".join(["python -m benchmarks.simulate", *(sys.argv[1:] if argv is None else argv)]),
        "extra_in_flight": args.extra_in_flight, "cost_aware": args.cost_aware, "hide_latency": hide, "efficiency": EFFICIENCY, "shape": asdict(Shape()),
        "saved_bytes_per_token_per_layer": saved,
        "hardware": {k: {"device": asdict(d), "fabric": asdict(f)} for k, (d, f) in HARDWARE.items()
                     if k in hardware},
        "notes": "schedules built as the launcher builds them (default CostModel, fusion on), replayed under "
                 "each hardware cost model; bubble = idle stage-seconds / (stages * makespan); see "
                 "benchmarks/simulate.py for every assumption",
        "rows": rows,
    }
    payload["total_s"] = time.perf_counter() - started
    write_result(out, payload)
    print(f"wrote {out} ({payload['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
