"""The base layers' elementwise kernels, eager against compiled: `python -m benchmarks.layer_kernels`.

Times each function of `mlora_pp.kernels` (RMSNorm, SiLU-times-up and rotary, forward and
backward) on one micro-batch's worth of tokens of the 0.72B benchmark model (hidden 2048,
intermediate 5632, 32 query and 8 key-value heads of 64), eagerly and as one compiled kernel,
alternating, and reports the medians and the time of one decoder layer's calls (two norms, one
SwiGLU middle, one rotary; forward and backward). On CPU the compiled kernels are inductor's C++;
the model compiles on CUDA only, where each eager operator is also a launch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import RESULTS, write_result
from mlora_pp import kernels
from mlora_pp.kernels import FusedKernel

PER_LAYER = {"rms_norm_forward": 2, "rms_norm_backward": 2, "silu_mul_forward": 1, "silu_mul_backward": 1,
             "rotary_forward": 1, "rotary_backward": 1}
"""Calls per decoder layer per micro-batch (forward and backward)."""


def inputs(tokens: int, seq: int, dtype: torch.dtype, device: str, hidden: int = 2048, intermediate: int = 5632,
           heads: int = 32, kv_heads: int = 8, head_dim: int = 64) -> dict[str, tuple]:
    gen = torch.Generator(device=device).manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    rows = tokens // seq
    x, weight = r(tokens, hidden), 1 + 0.1 * r(hidden)
    rstd = kernels.rms_norm_forward(x, weight, 1e-5)[1]
    q, k = r(rows, seq, heads, head_dim).transpose(1, 2), r(rows, seq, kv_heads, head_dim).transpose(1, 2)
    cos, sin = r(1, seq, head_dim), r(1, seq, head_dim)
    return {
        "rms_norm_forward": (x, weight, 1e-5),
        "rms_norm_backward": (r(tokens, hidden), x, weight, rstd),
        "silu_mul_forward": (r(tokens, intermediate), r(tokens, intermediate)),
        "silu_mul_backward": (r(tokens, intermediate), r(tokens, intermediate), r(tokens, intermediate)),
        "rotary_forward": (q, k, cos, sin),
        "rotary_backward": (r(rows, heads, seq, head_dim), r(rows, kv_heads, seq, head_dim), cos, sin),
    }


def _time(fn, args: tuple, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def eager_kernels(name: str, args: tuple) -> int:
    """Kernel-launching ATen operators of one eager call (`benchmarks.host_overhead.OpCounter`)."""
    from benchmarks.host_overhead import OpCounter

    with OpCounter() as counter:
        kernels.LAYER_KERNELS[name].fn(*args)
    return counter.kernels


def cuda_launches(fn, args: tuple) -> int:
    """GPU kernels one call launches, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per micro-batch (default 16384 on CUDA, as benchmarks.gpu's 8 jobs; 2048 on CPU)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=None, help="timed calls per kernel and way (default 30 CUDA, 7 CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    tokens = args.tokens or (16384 if device == "cuda" else 2048)
    reps = args.reps or (30 if device == "cuda" else 7)
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    fused = {name: FusedKernel(k.fn, devices=(device,)) for name, k in kernels.LAYER_KERNELS.items()}
    work = inputs(tokens, args.seq, dtype, device)
    compile_s = {}
    for name, fn in fused.items():  # compile at two shapes first, as the model's warm-up does
        start = time.perf_counter()
        fn(*inputs(2 * (args.seq // 4), args.seq // 4, dtype, device)[name])
        fn(*work[name])
        compile_s[name] = time.perf_counter() - start
        if fn.failed:
            raise SystemExit(f"{name}: compiling failed ({fn.failed})")
    rows = []
    for name in fused:
        eager_t, fused_t = [], []
        for _ in range(reps):  # alternating, so drift hits both
            eager_t.append(_time(kernels.LAYER_KERNELS[name].fn, work[name], device))
            fused_t.append(_time(fused[name], work[name], device))
        row = {"kernel": name, "eager_ms": 1e3 * statistics.median(eager_t), "fused_ms": 1e3 * statistics.median(fused_t),
               "compile_s": compile_s[name], "eager_kernels": eager_kernels(name, work[name])}
        if device == "cuda":
            row["eager_launches"] = cuda_launches(kernels.LAYER_KERNELS[name].fn, work[name])
            row["fused_launches"] = cuda_launches(fused[name], work[name])
        rows.append(row)
    layer = {way: sum(PER_LAYER[r["kernel"]] * r[f"{way}_ms"] for r in rows) for way in ("eager", "fused")}
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, {args.dtype}, {tokens} tokens (seq {args.seq}), median of {reps} alternating calls, ms")
    launches = "launches eager / fused" if device == "cuda" else "eager operators"
    print(f"| kernel | eager | fused | eager / fused | {launches} |")
    print("|---|---|---|---|---|")
    for r in rows:
        count = f"{r['eager_launches']} / {r['fused_launches']}" if device == "cuda" else str(r["eager_kernels"])
        print(f"| {r['kernel']} | {r['eager_ms']:.3f} | {r['fused_ms']:.3f} | {r['eager_ms'] / r['fused_ms']:.2f}x "
              f"| {count} |")
    per_layer_ops = sum(PER_LAYER[r["kernel"]] * r["eager_kernels"] for r in rows)
    print(f"| one decoder layer's calls | {layer['eager']:.3f} | {layer['fused']:.3f} "
          f"| {layer['eager'] / layer['fused']:.2f}x | {per_layer_ops} eager operators |")
    result = {"device": name, "dtype": args.dtype, "tokens": tokens, "seq": args.seq, "reps": reps,
              "threads": torch.get_num_threads() if device == "cpu" else None, "torch": torch.__version__,
              "method": "median of alternating eager and compiled calls after two compiles per kernel",
              "rows": rows, "per_layer_ms": layer, "per_layer_calls": PER_LAYER,
              "per_layer_eager_operators": per_layer_ops}
    suffix = "cpu" if device == "cpu" else name.replace(" ", "_")
    out = args.out or RESULTS / f"layer_kernels-{suffix}-{args.dtype}.json"
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
