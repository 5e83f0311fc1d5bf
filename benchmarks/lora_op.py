"""Benchmark of the batched LoRA operator (forward + backward) against the obvious alternatives.

For n adapters (rank 16) sharing 2048 tokens split into segments of mixed lengths, fp32, it times:

* base      - the frozen base GEMM alone (forward + input grad): the floor every variant pays;
* ours-loop / ours-grouped - `BatchedLoRALinear` with each path;
* naive     - the same shared base plus a Python loop of per-adapter deltas under ordinary autograd
              (`F.dropout`, slicing, `torch.cat`), the straightforward implementation;
* separate  - each adapter's base + delta run on its own rows, as if every job trained alone.

All variants run once per round, in a shuffled order, for warm-up and then timed rounds (machines
are noisy); totals are medians over rounds. A variant's delta (its time minus base) is the median of
its per-round differences to the base timed in the same round, which cancels slow drifts of the
machine. Targets, checked at 8 adapters for the path `auto` picks: (i) ours' delta is at most
1.5 * 3r/d of base (3r/d is the LoRA share of the FLOPs), (ii) naive's delta is at least twice ours.
The naive and separate variants use `F.dropout` (torch's RNG); ours uses its hashed mask.

    python -m benchmarks.lora_op [--quick]
    python -m benchmarks.lora_op --device cuda --dtype bfloat16 --tokens 8192 --dims 2048 4096

On CUDA every variant is followed by a device synchronize inside its timed region.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlora_pp.lora import BatchedLoRALinear, LoRABatch, LoRAContext, LoRASegment

RANK = 16
ALPHA = 32.0
TOKENS = 2048
SEQ = 32
VARIANTS = ("base", "ours-loop", "ours-grouped", "naive", "separate")
RESULTS = Path(__file__).resolve().parent / "results" / "lora_op.json"
QUICK_RESULTS = RESULTS.with_name("lora_op_quick.json")


@dataclass
class Case:
    d: int
    adapters: int
    dropout: float
    tokens: int = TOKENS
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def _segment_rows(n: int, rows: int, seed: int) -> list[int]:
    """Split `rows` into n mixed, non-empty lengths (deterministic)."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.3, 1.7) for _ in range(n)]
    sizes = [max(1, int(rows * w / sum(weights))) for w in weights]
    sizes[-1] += rows - sum(sizes)
    while sizes[-1] < 1:  # rounding pushed the last one under 1: take from the largest
        big = max(range(n - 1), key=lambda i: sizes[i])
        sizes[big] -= 1
        sizes[-1] += 1
    return sizes


def _build(case: Case) -> dict[str, Callable[[], None]]:
    """One closure per variant, each running forward + backward once."""
    d, n, p = case.d, case.adapters, case.dropout
    gen = torch.Generator().manual_seed(0)
    rows = case.tokens // SEQ
    dev, dt = case.device, case.dtype
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
    base = base.to(dev, dt)
    x = torch.randn(rows, SEQ, d, generator=gen).to(dev, dt).requires_grad_(True)
    dy = torch.randn(rows, SEQ, d, generator=gen).to(dev, dt)
    sizes = _segment_rows(n, rows, seed=n)
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(n)]
    names = [f"job{i}" for i in range(n)]
    segments = tuple(
        LoRASegment(name, a, b, tuple(range(a, b))) for name, (a, b) in zip(names, bounds)
    )
    batch = LoRABatch(segments, seq_len=SEQ, training=True)

    modules = {}
    for path in ("loop", "grouped"):
        ctx = LoRAContext()
        ctx.batch = batch
        m = BatchedLoRALinear(base, d, d, module_id=3, context=ctx, path=path)
        for i, name in enumerate(names):
            m.add_adapter(name, RANK, ALPHA, p, init_seed=i)
            with torch.no_grad():
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=gen) * 0.01)
        modules[path] = m.to(dev)
    # Plain tensors for the naive and separate variants, same values as ours.
    As = [modules["loop"].lora_A[nm].detach().to(dt).requires_grad_(True) for nm in names]
    Bs = [modules["loop"].lora_B[nm].detach().to(dt).requires_grad_(True) for nm in names]
    scale = ALPHA / RANK
    xs_sep = [x[a:b].detach().clone().requires_grad_(True) for a, b in bounds]

    def clear(params) -> None:
        x.grad = None
        for t in params:
            t.grad = None

    def run_base() -> None:
        clear(())
        base(x).backward(dy)

    def run_ours(m: BatchedLoRALinear) -> Callable[[], None]:
        params = list(m.lora_A.values()) + list(m.lora_B.values())

        def run() -> None:
            clear(params)
            m(x).backward(dy)

        return run

    def run_naive() -> None:
        clear(As + Bs)
        y = base(x)
        deltas = []
        for (a, b), A, B in zip(bounds, As, Bs):
            xi = F.dropout(x[a:b], p, training=True) if p > 0 else x[a:b]
            deltas.append((xi @ A.t() @ B.t()) * scale)
        (y + torch.cat(deltas)).backward(dy)

    def run_separate() -> None:
        for (a, b), xi, A, B in zip(bounds, xs_sep, As, Bs):
            xi.grad = None
            A.grad = B.grad = None
            xd = F.dropout(xi, p, training=True) if p > 0 else xi
            (base(xi) + (xd @ A.t() @ B.t()) * scale).backward(dy[a:b])

    return {
        "base": run_base,
        "ours-loop": run_ours(modules["loop"]),
        "ours-grouped": run_ours(modules["grouped"]),
        "naive": run_naive,
        "separate": run_separate,
    }


def _time_case(case: Case, warmup: int, repeats: int, seed: int) -> dict[str, list[float]]:
    runs = _build(case)
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    sync()
    times: dict[str, list[float]] = {v: [] for v in runs}
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            runs[v]()
            sync()
            times[v].append(time.perf_counter() - t0)
    return times


def _reference_gemm_ms(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median time of one 2048^3 matmul: a yardstick for how loaded the machine was."""
    a = torch.randn(2048, 2048).to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        a @ a
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _auto_path(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The path `auto` resolves to for the benchmark's input."""
    m = BatchedLoRALinear(nn.Linear(512, 512), 512, 512, module_id=0, context=LoRAContext())
    return m.resolve_path(torch.zeros(1, 1, 512, device=device, dtype=dtype))


def _table(rows: list[dict], title: str) -> None:
    headers = ["adapters", *VARIANTS, "ours delta", "ours delta/base", "naive/ours delta"]
    body = [
        [
            str(r["adapters"]),
            *(f"{r['median_ms'][v]:.2f}" for v in VARIANTS),
            f"{r['delta_ms']['ours-' + r['ours_path']]:.2f}",
            f"{r['ours_extra_over_base']:.1%}",
            f"{r['naive_over_ours_delta']:.2f}x",
        ]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for line in body:
            table.add_row(*line)
        Console(width=max(120, Console().width)).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for line in body:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (under a minute)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({QUICK_RESULTS.name} with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per call (multiple of 32)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048], help="layer widths d (d x d base)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    default_out = QUICK_RESULTS if args.quick else RESULTS
    if args.device != "cpu":
        name = torch.cuda.get_device_name().replace(" ", "_") if args.device == "cuda" else args.device
        default_out = default_out.with_name(f"{default_out.stem}-{name}-{args.dtype}.json")
    out_path = args.out or default_out

    dims = tuple(args.dims)
    counts = (8,) if args.quick else (1, 4, 8, 16)
    dropouts = (0.0, 0.05)
    warmup, repeats = (1, 5) if args.quick else (3, 15)
    ours_path = _auto_path(args.device, dtype)
    ours_key = f"ours-{ours_path}"
    gemm_before = _reference_gemm_ms(args.device, dtype)

    results: list[dict] = []
    checks: list[dict] = []
    for d in dims:
        for p in dropouts:
            rows = []
            for n in counts:
                case = Case(d, n, p, args.tokens, args.device, dtype)
                times = _time_case(case, warmup, repeats, seed=d + n)
                med = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
                delta = {
                    v: statistics.median(t - b for t, b in zip(ts, times["base"])) * 1e3
                    for v, ts in times.items()
                    if v != "base"
                }
                base_ms = med["base"]
                extra = delta[ours_key] / base_ms
                ours_delta, naive_delta = delta[ours_key], delta["naive"]
                ratio = naive_delta / ours_delta if ours_delta > 0 else float("inf")
                row = {
                    "d": d,
                    "adapters": n,
                    "dropout": p,
                    "rank": RANK,
                    "tokens": args.tokens,
                    "median_ms": med,
                    "delta_ms": delta,
                    "all_ms": {v: [t * 1e3 for t in ts] for v, ts in times.items()},
                    "ours_path": ours_path,
                    "ours_extra_over_base": extra,
                    "naive_over_ours_delta": ratio,
                }
                rows.append(row)
                results.append(row)
                if n == 8:
                    limit = 1.5 * 3 * RANK / d
                    checks.append(
                        {
                            "d": d,
                            "dropout": p,
                            "path": ours_path,
                            "extra_over_base": extra,
                            "extra_limit": limit,
                            "extra_pass": extra <= limit,
                            "naive_over_ours_delta": ratio,
                            "ratio_limit": 2.0,
                            "ratio_pass": ratio >= 2.0,
                        }
                    )
            _table(rows, f"d={d}, dropout={p}, rank={RANK}, {args.tokens} tokens, {args.dtype} on {args.device}, "
                         f"ms (median of {repeats})")

    print(f"targets at 8 adapters, ours = auto path ({ours_path}):")
    for c in checks:
        print(
            f"  d={c['d']:<5} dropout={c['dropout']:<5} "
            f"(i) extra/base {c['extra_over_base']:.1%} <= {c['extra_limit']:.1%}: "
            f"{'PASS' if c['extra_pass'] else 'FAIL'}   "
            f"(ii) naive/ours delta {c['naive_over_ours_delta']:.2f}x >= 2: {'PASS' if c['ratio_pass'] else 'FAIL'}"
        )

    gemm_after = _reference_gemm_ms(args.device, dtype)
    print(f"reference 2048^3 {args.dtype} matmul: {gemm_before:.1f} ms before, {gemm_after:.1f} ms after (machine load)")
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "reference_gemm_ms_before": gemm_before,
            "reference_gemm_ms_after": gemm_after,
        },
        "settings": {
            "quick": args.quick,
            "rank": RANK,
            "alpha": ALPHA,
            "tokens": args.tokens,
            "seq_len": SEQ,
            "dtype": args.dtype,
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "warmup": warmup,
            "repeats": repeats,
            "naive_and_separate_dropout": "torch.nn.functional.dropout",
            "delta": "median over rounds of (variant - base timed in the same round)",
        },
        "results": results,
        "checks": checks,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
