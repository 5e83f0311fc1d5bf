"""Throughput, MFU and peak memory on a GPU (issue 7): a Llama-shaped ~1B model, 1/4/8 jobs, seq 512.

``python -m benchmarks.gpu`` on a CUDA machine; ``--smoke`` runs the same code on a tiny model on
any device (CPU here) to check the script, and writes nothing to benchmarks/results/.

FLOPs counted per trained (non-padding) token, the base being frozen:
  base  = 4 * N_lin            forward (2 N) + input-gradient backward (2 N); no weight gradient.
                               N_lin = multiply-adds of every projection and the lm_head per token
                               (the lm_head runs on loss tokens only: with the plain template used
                               here, every token of a row but its first).
  lora  = 6 * r * (in + out)   per targeted projection: forward 2r(in+out) + backward 4r(in+out).
  attn  = 6 * L * s * d_attn   causal QK^T and AV: forward 2*s*d per layer (halved by causality),
                               backward twice that; s = padded sequence length, d_attn = heads*head_dim.
MFU = FLOPs per second / the device's dense bf16 peak (H100/H200 SXM: 989e12, datasheet).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(config, rank: int, seq: int) -> dict[str, float]:
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    shapes = {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    n_lin = layers * sum(i * o for i, o in shapes.values()) + d * config.vocab_size
    lora = layers * sum(6 * rank * (i + o) for i, o in shapes.values())
    attn = 6 * layers * seq * heads * hd
    return {"base": 4.0 * n_lin, "lora_per_job_token": float(lora), "attn": float(attn)}


def run(jobs: int, model: Path, work: Path, seq: int, steps: int, rows: int, dtype: str, micro: int,
        profile_to: Path | None = None) -> dict:
    from mlora_pp.config import parse_config
    from mlora_pp.tiny import WORDS
    from mlora_pp.training import train

    rnd = random.Random(jobs)
    job_cfgs = []
    for j in range(jobs):
        data = work / f"j{jobs}-{j}.jsonl"
        # about `seq` tokens per row: a word and a space are two tokens
        data.write_text("".join(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(seq // 2 - 1))}) + "\n"
                                for _ in range(rows * steps)))
        job_cfgs.append({"name": f"job{j}", "data": str(data), "template": "plain", "rank": 16, "alpha": 32,
                         "dropout": 0.05, "target_modules": TARGETS, "batch_size": rows, "micro_batch_size": micro,
                         "max_steps": steps, "max_seq_len": seq})
    out = work / f"out{jobs}"
    cfg = parse_config({"model": {"path": str(model), "dtype": dtype}, "output_dir": str(out), "jobs": job_cfgs},
                       "gpu-bench.yaml")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if profile_to is None:
        train(cfg, progress=False)
    else:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            train(cfg, progress=False)
        averages = prof.key_averages()
        device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        profile_to.write_text(f"{jobs} jobs, by device time\n" + averages.table(sort_by=device_key, row_limit=30)
                              + f"\n{jobs} jobs, by host time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30))
        print(f"wrote {profile_to}")
    wall = time.perf_counter() - start
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r and "event" not in r]
    first = min(r["time"] for r in steps_)
    # tokens/s over the steady part: after the first finished step (start-up, compilation) and up to
    # the last step but one (the final step also writes every job's final checkpoint).
    middle = [r for r in steps_ if r["time"] > first and r["step"] < steps]
    tokens = sum(r["tokens"] for r in middle)
    span = max((r["time"] for r in middle), default=first) - first
    return {"jobs": jobs, "tokens_per_s": tokens / span if span > 0 else float("nan"), "wall_s": wall,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "window": "steps 2 .. last-1 (first step and final checkpoint writes excluded)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on any device, nothing written")
    parser.add_argument("--jobs", type=int, nargs="+", default=None, help="job counts (default 1 4 8)")
    parser.add_argument("--rows", type=int, default=None, help="rows (of seq tokens) per optimizer step per job")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 12)")
    parser.add_argument("--micro", type=int, default=None, help="rows per micro-batch per job (default rows/2)")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables to this file")
    parser.add_argument("--vocab", type=int, default=None,
                        help="model vocabulary (default: the tiny tokenizer's 1024); e.g. 128256, Llama 3's, "
                             "to weigh the lm_head and the loss as a real model does")
    parser.add_argument("--layer-kernels", choices=("fused", "eager"), default="fused",
                        help="the base layers' RMSNorm, rotary and SiLU-times-up as compiled kernels (default) or "
                             "eager operators, to measure what fusing them buys")
    parser.add_argument("--fuse-projections", choices=("on", "off"), default="on",
                        help="one base GEMM for q/k/v and one for gate/up (default), or one a projection, to "
                             "measure what fusing them buys")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/gpu-<device>.json)")
    args = parser.parse_args(argv)
    os.environ["MLORA_PP_FUSE_PROJECTIONS"] = "1" if args.fuse_projections == "on" else "0"
    from mlora_pp.kernels import set_layer_kernels

    set_layer_kernels(args.layer_kernels)
    from mlora_pp.model import read_model_config
    from mlora_pp.tiny import make_tiny_model

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs CUDA (use --smoke to check the script on CPU)")
    seq, steps, rows = (64, 3, 4) if args.smoke else (512, 12, 8)
    rows = args.rows or rows
    steps = args.steps or steps
    micro = args.micro or rows // 2
    shape = dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256) if args.smoke else \
        dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=5632)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", max_positions=max(1024, seq), init_std=0.02, vocab=args.vocab, **shape)
        config = read_model_config(model)
        f = flops_per_token(config, 16, seq)
        for jobs in args.jobs or ((1, 2) if args.smoke else (1, 4, 8)):
            r = run(jobs, model, work, seq, steps, rows, dtype, micro, args.profile)
            per_token = f["base"] + f["lora_per_job_token"] + f["attn"]
            r["flops_per_token"] = per_token
            r["mfu"] = r["tokens_per_s"] * per_token / peak if peak else None
            rows_out.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
            print(f"{jobs} jobs: {r['tokens_per_s']:.0f} tokens/s, MFU {mfu}, peak memory {mem}", flush=True)
    result = {"device": device, "dtype": dtype, "layer_kernels": args.layer_kernels,
              "fuse_projections": args.fuse_projections, "seq": seq, "rows_per_step": rows, "rows_per_micro_batch": micro,
              "steps": steps, "model": dict(shape, vocab=config.vocab_size), "torch": torch.__version__,
              "peak_flops": peak, "flops_formula": __doc__.split("FLOPs counted")[1].strip(), "rows": rows_out,
              "target": "MFU >= 50% at 8 jobs"}
    if args.smoke:
        print(json.dumps(result)[:400])
        return 0
    out = args.out or RESULTS / ("gpu-" + device.replace(" ", "_").replace("/", "_") + ".json")
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
