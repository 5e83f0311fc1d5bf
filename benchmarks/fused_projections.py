"""One decoder layer with q/k/v and gate/up fused into one base GEMM each, against one GEMM a
projection: `python -m benchmarks.fused_projections`.

Builds one decoder layer of the 0.72B benchmark model's shapes (hidden 2048, intermediate 5632,
32 query and 8 key-value heads of 64) twice from the same files, fused and unfused
(`mlora_pp.model.FusedBase`), each with `--jobs` adapters of rank 16 on all 7 projections, and
times forward + backward of one micro-batch on each, alternating, as a middle stage sees it
(hidden states in, their gradient out). It also counts the kernel-launching operators of one
micro-batch (`benchmarks.host_overhead.OpCounter`, the fused layer kernels counted as one each).
Writes benchmarks/results/fused_projections-<device>-<dtype>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import RESULTS, write_result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_projections", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU (bf16 GEMMs are slow there)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=None, help="rows per job (default 2 CUDA, 1 CPU)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=None, help="timed micro-batches per way (default 30 CUDA, 7 CPU)")
    parser.add_argument("--smoke", action="store_true", help="a tiny layer, to check the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    rows = args.rows or (2 if cuda else 1)
    reps = args.reps or (30 if cuda else 7)
    if not cuda:
        os.environ.setdefault("MLORA_PP_COMPILE", "0")
    from benchmarks.host_overhead import OpCounter, layer_kernels_counted
    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.model import build_stage
    from mlora_pp.profiling import _layers_only
    from mlora_pp.tiny import make_tiny_model

    shape = dict(hidden=64, heads=4, kv_heads=2, intermediate=128) if args.smoke else \
        dict(hidden=2048, heads=32, kv_heads=8, intermediate=5632)
    seq = 16 if args.smoke else args.seq
    names = [f"job{j}" for j in range(args.jobs)]
    batch = LoRABatch(tuple(LoRASegment(n, j * rows, (j + 1) * rows, tuple(range(j * rows, (j + 1) * rows)))
                            for j, n in enumerate(names)), seq_len=seq, training=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "m", layers=1, vocab=1024, max_positions=max(1024, seq), **shape)
        stages = {}
        for way in ("fused", "unfused"):
            stage = build_stage(model, dtype=dtype, device=args.device, fuse_projections=way == "fused")
            for j, n in enumerate(names):
                stage.add_adapter(n, 16, 32, 0.0, TARGETS, seed=j)
            stages[way] = stage
    hidden = torch.randn(batch.rows, seq, shape["hidden"], device=args.device).to(getattr(torch, dtype))
    hidden.requires_grad_(True)

    def micro_batch(stage) -> None:
        with _layers_only(stage):
            out = stage(hidden, batch)
        out.backward(torch.ones_like(out))
        hidden.grad = None
        stage.zero_grad(set_to_none=True)

    def timed(stage) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        micro_batch(stage)
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    times: dict[str, list[float]] = {way: [] for way in stages}
    launches: dict[str, int] = {}
    with layer_kernels_counted("fused"):
        for way, stage in stages.items():
            for _ in range(2):
                micro_batch(stage)  # warm-up (compiles on CUDA)
            with OpCounter() as counter:
                micro_batch(stage)
            launches[way] = counter.kernels
        for _ in range(reps):
            for way, stage in stages.items():
                times[way].append(timed(stage))
    ms = {way: statistics.median(t) for way, t in times.items()}
    print(f"one decoder layer (hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['heads']}/"
          f"{shape['kv_heads']} heads), {args.jobs} jobs x {rows} rows x {seq} tokens, rank 16 on 7 projections, "
          f"{dtype} on {args.device}, forward + backward, median of {reps}:")
    print("| base GEMMs | ms | kernel launches |")
    print("|---|---|---|")
    for way in stages:
        print(f"| {way} | {ms[way]:.2f} | {launches[way]} |")
    print(f"unfused / fused: {ms['unfused'] / ms['fused']:.3f}x time, {launches['unfused'] - launches['fused']} "
          f"launches fewer fused")
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype, "jobs": args.jobs,
              "rows_per_job": rows, "seq": seq, "shape": shape, "reps": reps, "ms": ms, "kernel_launches": launches,
              "times_ms": times, "torch": torch.__version__, "time": time.time()}
    if args.smoke:
        return 0
    out = args.out or RESULTS / f"fused_projections-{args.device.split(':')[0]}-{dtype}.json"
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
