"""Host work per micro-batch: the operators one stage dispatches, and their time on a tiny width.

    python -m benchmarks.host_overhead                      # 16 layers, 8 jobs, grouped path, fp32, CPU
    python -m benchmarks.host_overhead --dropout 0 --device cuda --dtype bfloat16

On a GPU the benchmark model of `benchmarks.gpu` is host-bound (14% MFU at 8 jobs: the host spent
several times the device's time, see the README's "On a GPU"): every operator costs the host a
dispatch and a kernel launch whatever its size. This counts the ATen operators of one micro-batch
(forward, backward, and each job's optimizer step) through a `TorchDispatchMode`, apart those
that would launch a GPU kernel (not views, allocations or bookkeeping), and times them
on a model of the real depth but a tiny width (hidden 64), where the arithmetic is negligible and
the wall time is the host's own work. Both are measured with the jobs' adapters (the batched LoRA
operator on every projection) and without (the frozen base alone), so the difference is what the
adapters cost the host. The operator counts on CPU are those a CUDA run dispatches too: the
dropout hash and the layers' fused kernels (`mlora_pp.kernels`) run eagerly on CPU
(`MLORA_PP_COMPILE=0` there unless set), and each of their calls is counted as the one compiled
kernel it is on CUDA (`--layer-kernels eager` counts their eager operators instead).

Writes benchmarks/results/host_overhead-<path>-<dtype>-<device>.json. ``--device cuda`` runs the
same on a GPU (the times then include the device's work: each phase ends with a synchronize).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import RESULTS, write_result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
             "_record_function_enter_new", "_record_function_exit", "set_", "_local_scalar_dense",
             "unsafe_split_with_sizes"}
"""Operators that launch no kernel on a GPU besides the views (`OpOverload.is_view`)."""


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while active (autograd's backward included), and
    apart those that would launch a GPU kernel (not a view, an allocation or bookkeeping)."""

    active: "OpCounter | None" = None

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.kernels = 0

    def __enter__(self):
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.counts[name] += 1
        if not func.is_view and name not in NO_KERNEL:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def layer_kernels_counted(how: str) -> Iterator[None]:
    """`fused`: count each call of the model's fused layer kernels (`mlora_pp.kernels`) and of the
    dropout hash as the one kernel it is on CUDA, whether it runs compiled or (on CPU) eagerly, its
    own operators not counted; `eager`: run them eagerly everywhere and count their operators.
    Restored on exit."""
    import mlora_pp.model
    from mlora_pp.kernels import set_layer_kernels
    from torch.utils._python_dispatch import _disable_current_modes

    def one(name: str, kernel: Callable):
        def call(*args):
            counter = OpCounter.active
            if counter is None:
                return kernel(*args)
            counter.counts[f"fused {name}"] += 1
            counter.kernels += 1
            with _disable_current_modes():
                return kernel(*args)
        return call

    import mlora_pp.lora

    kept = mlora_pp.model.LAYER_KERNELS
    dropped = mlora_pp.lora._dropped, mlora_pp.lora._dropped_pair
    if how == "fused":
        mlora_pp.model.LAYER_KERNELS = {name: one(name, k) for name, k in kept.items()}
        # the dropout hash too: one compiled kernel a call in training (eager here, MLORA_PP_COMPILE=0)
        mlora_pp.lora._dropped = one("dropout", dropped[0])
        mlora_pp.lora._dropped_pair = one("dropout_pair", dropped[1])
    else:
        set_layer_kernels("eager")
    try:
        yield
    finally:
        mlora_pp.model.LAYER_KERNELS = kept
        mlora_pp.lora._dropped, mlora_pp.lora._dropped_pair = dropped
        set_layer_kernels("fused")


def build(args: argparse.Namespace, workdir: Path):
    """The stage (every layer), its adapters and one micro-batch of `args.jobs` jobs' rows."""
    from mlora_pp.config import JobConfig
    from mlora_pp.job import AdapterJob
    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.model import build_stage
    from mlora_pp.tiny import make_tiny_model

    model = make_tiny_model(workdir / "model", layers=args.layers, hidden=args.hidden, heads=4, kv_heads=2,
                            intermediate=2 * args.hidden, vocab=1024)
    device = torch.device(args.device)
    stage = build_stage(model, dtype=args.dtype, lora_path=args.path, device=device,
                        fuse_projections=args.fuse_projections == "on")
    names = [f"job{j}" for j in range(args.jobs)]
    for j, name in enumerate(names):
        stage.add_adapter(name, args.rank, 2 * args.rank, args.dropout, TARGETS, seed=j)
    rows = args.rows
    segments = tuple(LoRASegment(name, j * rows, (j + 1) * rows, tuple(range(j * rows, (j + 1) * rows)))
                     for j, name in enumerate(names))
    batch = LoRABatch(segments, seq_len=args.seq, training=True)
    hidden = torch.randn(rows * args.jobs, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(device=device, dtype=stage.dtype).requires_grad_(True)  # as a middle stage receives it
    jobs = [AdapterJob(config=JobConfig(name=n, data="unused.jsonl", lr=1e-4), examples=[], plans=[], seed=0,
                       optimizer=torch.optim.AdamW(stage.adapter_parameters(n), lr=1e-4, fused=True))
            for n in names]  # fused AdamW, as on CUDA
    return stage, batch, hidden, jobs


def step_calls(stage, batch, hidden, jobs, lora: bool, micro: int) -> list[tuple[str, Callable[[], None]]]:
    """One optimizer step as training runs it, as separate timed calls: `micro` forwards and
    backwards on the stage's decoder layers (as a middle stage: hidden states in and out), then
    each job's `AdapterJob.optimizer_step`."""
    from mlora_pp.profiling import _layers_only

    state: dict = {}

    def forward() -> None:
        with _layers_only(stage):
            state["out"] = stage(hidden, batch if lora else None)

    def backward() -> None:
        out = state.pop("out")
        out.backward(torch.ones_like(out))
        hidden.grad = None

    def steps() -> None:
        for job in jobs:
            job.optimizer_step()

    calls = [("forward", forward), ("backward", backward)] * micro
    return calls + ([("optimizer steps", steps)] if lora else [])


def measure(stage, batch, hidden, jobs, lora: bool, micro: int, reps: int) -> dict[str, dict]:
    """Per micro-batch: operators (one counted step) and median wall ms (`reps` timed steps, after
    two warm-up steps) of each phase; the optimizer steps are counted per step, divided by `micro`."""
    calls = step_calls(stage, batch, hidden, jobs, lora, micro)
    names = list(dict.fromkeys(name for name, _ in calls))
    times: dict[str, list[float]] = {name: [] for name in names}
    counted: dict[str, collections.Counter] = {name: collections.Counter() for name in names}
    kernels = dict.fromkeys(names, 0)
    for round_ in range(reps + 3):
        spent = dict.fromkeys(names, 0.0)
        for name, call in calls:
            if round_ == 2:
                with OpCounter() as counter:
                    call()
                counted[name].update(counter.counts)
                kernels[name] += counter.kernels
                continue
            start = time.perf_counter()
            call()
            if hidden.is_cuda:
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - start
        if round_ > 2:
            for name in names:
                times[name].append(spent[name] / micro)
    return {name: {"ops": sum(counted[name].values()) / micro, "kernel_ops": kernels[name] / micro,
                   "ms": 1000 * statistics.median(times[name]),
                   "top": {k: v / micro for k, v in counted[name].most_common(14)},
                   "fused_calls": {k: v / micro for k, v in counted[name].items() if k.startswith("fused ")}}
            for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rows", type=int, default=4, help="rows per job in the micro-batch")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (bf16 matmuls are slow on CPU: the operator counts are the same)")
    parser.add_argument("--path", default="grouped", choices=["grouped", "loop"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the times include the device's)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--layer-kernels", default="fused", choices=["fused", "eager"],
                        help="count each call of a fused layer kernel (RMSNorm, SiLU-times-up, rotary) and of the "
                             "dropout hash as one kernel, as on CUDA (default), or their eager operators")
    parser.add_argument("--fuse-projections", default="on", choices=["on", "off"],
                        help="one base GEMM for q/k/v and one for gate/up (default), or one a projection")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("MLORA_PP_COMPILE", "0")  # compiling on CPU is slow; counted as compiled anyway
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, layer_kernels_counted(args.layer_kernels):
        stage, batch, hidden, jobs = build(args, Path(tmp))
        with_lora = measure(stage, batch, hidden, jobs, True, args.micro, args.reps)
        base = measure(stage, batch, hidden, jobs, False, args.micro, args.reps)
    modules = args.layers * len(TARGETS)
    print(f"one micro-batch: {args.layers} layers, {args.jobs} jobs x {args.rows} rows x {args.seq} tokens, "
          f"rank {args.rank} on {len(TARGETS)} projections, dropout {args.dropout}, {args.dtype}, {args.path} path, "
          f"hidden {args.hidden} (host work only), {args.micro} micro-batches per step, layer kernels "
          f"{args.layer_kernels}, fused projections {args.fuse_projections}; per micro-batch:")
    print("| phase | ops with adapters | ops base only (kernels) | adapter ops per projection (kernels) "
          "| ms with adapters | ms base only |")
    print("|---|---|---|---|---|---|")
    for name, got in with_lora.items():
        plain = base.get(name, {"ops": 0, "kernel_ops": 0, "ms": 0.0})
        print(f"| {name} | {got['ops']:,.0f} | {plain['ops']:,.0f} ({plain['kernel_ops']:,.0f}) "
              f"| {(got['ops'] - plain['ops']) / modules:.1f} ({(got['kernel_ops'] - plain['kernel_ops']) / modules:.1f}) "
              f"| {got['ms']:.1f} | {plain['ms']:.1f} |")
    for name, got in with_lora.items():
        print(f"{name}, most dispatched: " + ", ".join(f"{k} {v:g}" for k, v in got["top"].items()))
    out = args.out or RESULTS / f"host_overhead-{args.path}-{args.dtype}-{args.device}.json"
    write_result(out, {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "torch": torch.__version__, "with_adapters": with_lora, "base_only": base,
                       "projections": modules, "time": time.time()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
