"""The last stage's norm + lm_head + cross-entropy, forward + backward: the plain way against ours.

* plain - ``lm_head(norm(h)).float()`` over every position, then each part's ``F.cross_entropy``
          with an ignore index (what the last stage computed before `mlora_pp.head_loss`, and what
          transformers' and torchtune's training loops compute);
* ours  - `mlora_pp.head_loss.head_loss`: norm and lm_head on the loss tokens only, a chunk at a
          time, the input gradient computed in the forward and no logits kept.

Rows of a micro-batch: a prompt (no loss) of a given share of each row, then the response, and
right padding up to the longest row, as the data pipeline lays them out. Reported per case:
the median time of interleaved rounds; the bytes autograd keeps from the forward until the
backward (`SavedTensorMeter`); and the peak memory of one forward + backward above what the inputs
hold, measured in a fresh process per (case, method): the resident set's high-water mark on CPU
(reset just before the step), the allocator's peak on CUDA. The result JSON goes to benchmarks/results/head_loss[-<device>].json.

    python -m benchmarks.head_loss [--quick]
    python -m benchmarks.head_loss --device cuda --dtype bfloat16 --dim 2048 --rows 16 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from benchmarks import RESULTS, write_result
from mlora_pp.data import IGNORE_INDEX
from mlora_pp.head_loss import LossTokens, head_loss
from mlora_pp.memory import SavedTensorMeter

METHODS = ("plain", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    dim: int
    vocab: int
    rows: int
    seq: int
    prompt_share: float
    """Share of each row's real tokens that is prompt (no loss)."""
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class Inputs:
    hidden: torch.Tensor
    labels: torch.Tensor  # host
    norm: torch.nn.Module
    weight: torch.Tensor
    parts: list[tuple[int, int]]
    weights: list[float]


def make_inputs(case: Case) -> Inputs:
    """Random hidden states and lm_head; rows of 75-100% of `seq` real tokens, two jobs' parts."""
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    dtype = DTYPES[case.dtype]
    labels = torch.full((case.rows, case.seq), IGNORE_INDEX)
    for r in range(case.rows):
        real = case.seq if r == 0 else rnd.randint(3 * case.seq // 4, case.seq)
        prompt = int(real * case.prompt_share)
        labels[r, prompt:real] = torch.randint(0, case.vocab, (real - prompt,), generator=gen)
    hidden = torch.randn(case.rows, case.seq, case.dim, generator=gen).to(case.device, dtype)
    weight = (torch.randn(case.vocab, case.dim, generator=gen) * case.dim ** -0.5).to(case.device, dtype)
    norm = LlamaRMSNorm(case.dim).to(case.device, dtype).requires_grad_(False)
    half = case.rows // 2
    parts = [(0, half), (half, case.rows)]
    loss_tokens = [max(int((labels[a:b, 1:] != IGNORE_INDEX).sum()), 1) for a, b in parts]
    return Inputs(hidden.requires_grad_(True), labels, norm, weight, parts, [1.0 / n for n in loss_tokens])


def plain(x: Inputs) -> torch.Tensor:
    labels = x.labels.to(x.hidden.device)
    logits = F.linear(x.norm(x.hidden), x.weight).float()
    total = logits.new_zeros(())
    for (a, b), w in zip(x.parts, x.weights):
        part = logits[a:b, :-1]
        total = total + w * F.cross_entropy(part.reshape(-1, part.shape[-1]), labels[a:b, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def ours(x: Inputs) -> torch.Tensor:
    where = LossTokens.find(x.labels, x.parts, x.weights, x.hidden.device)
    return head_loss(x.hidden, x.norm, x.weight, where)[0]


FORWARD: dict[str, Callable[[Inputs], torch.Tensor]] = {"plain": plain, "ours": ours}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(x: Inputs, method: str) -> None:
    FORWARD[method](x).backward()
    x.hidden.grad = None


def time_case(case: Case, rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward per method, over interleaved rounds after a warm-up."""
    x = make_inputs(case)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds + 1):
        order = list(METHODS)
        random.Random(r).shuffle(order)
        for m in order:
            _sync(case.device)
            t0 = time.perf_counter()
            step(x, m)
            _sync(case.device)
            if r:
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def saved_bytes(case: Case) -> dict[str, int]:
    """Bytes autograd keeps from each method's forward for its backward (weights excluded)."""
    x = make_inputs(case)
    meter = SavedTensorMeter([x.weight, x.norm.weight, x.hidden])
    out = {}
    for m in METHODS:
        with meter.measure() as held:
            loss = FORWARD[m](x)
        out[m] = held.bytes
        del loss
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(case: Case, method: str) -> int:
    """(In a fresh process) the peak memory of one forward + backward above what the inputs hold: on
    CPU the resident set's high-water mark, reset just before (Linux: /proc/self/clear_refs)."""
    x = make_inputs(case)
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(x, method)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    step(x, method)
    return (_status_kib("VmHWM") - base) * 1024


def peak_bytes(case: Case, method: str) -> int:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.head_loss", "--child", json.dumps(asdict(case)), method],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return int(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_loss", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds (checks the script)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 128_256])
    parser.add_argument("--prompt-shares", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(peak_child(Case(**json.loads(args.child[0])), args.child[1]))
        return 0
    if args.quick:
        args.dim, args.rows, args.seq, args.vocabs, args.prompt_shares, args.rounds = 64, 2, 32, [1000], [0.5], 2
    cases = [Case(args.dim, v, args.rows, args.seq, s, args.device, args.dtype)
             for v in args.vocabs for s in args.prompt_shares]
    rows = []
    mib = 2**20
    print("| vocab | prompt share | loss tokens | plain ms | ours ms | plain/ours | saved MiB plain | ours "
          "| peak MiB plain | ours |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        loss_tokens = int((make_inputs(case).labels[:, 1:] != IGNORE_INDEX).sum())
        t = time_case(case, args.rounds)
        saved = saved_bytes(case)
        peak = {m: peak_bytes(case, m) for m in METHODS}
        row = {"case": asdict(case), "tokens": case.rows * case.seq, "loss_tokens": loss_tokens,
               "seconds": t, "saved_bytes": saved, "peak_bytes": peak, "speedup": t["plain"] / t["ours"]}
        rows.append(row)
        print(f"| {case.vocab} | {case.prompt_share:.2f} | {loss_tokens} of {case.rows * case.seq} "
              f"| {t['plain'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | {row['speedup']:.2f}x "
              f"| {saved['plain'] / mib:.1f} | {saved['ours'] / mib:.1f} "
              f"| {peak['plain'] / mib:.1f} | {peak['ours'] / mib:.1f} |", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "dim": args.dim, "rows": args.rows, "seq": args.seq, "dtype": args.dtype, "rounds": args.rounds,
              "method": "median of interleaved rounds; peak memory from one fresh process per case and method",
              "rows_out": rows}
    if args.quick and args.out is None:
        return 0
    suffix = "" if args.device == "cpu" else "-" + device.replace(" ", "_")
    out = args.out or RESULTS / f"head_loss{suffix}.json"
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
