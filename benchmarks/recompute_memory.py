"""Peak memory and time with and without `pipeline.recompute` (activation checkpointing), 1 rank, CPU.

``python -m benchmarks.recompute_memory [--quick]`` trains the same job twice, each in a fresh
process, and reports the process's peak RSS and wall time, the autograd-saved tensor bytes of one
forward (what a micro-batch holds until its backward), and the run's memory record: the memory
model's predicted peak, the CPU meter's measured one (tensor bytes: weights, job state, saved
activations and, under recompute, the layer a backward recomputes) and, under recompute, the most
a probe's backward recomputed on top of what its forward kept. Writes
benchmarks/results/recompute_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time, yaml, torch
from mlora_pp.config import parse_config
from mlora_pp.training import train
torch.set_num_threads(2)
cfg = parse_config(yaml.safe_load(open(sys.argv[1])), sys.argv[1])
start = time.perf_counter()
train(cfg, progress=False)
wall = time.perf_counter() - start
memory = next(r for r in map(json.loads, open(cfg.output_dir / "metrics.jsonl")) if r.get("event") == "memory")
layer = memory["model"]["recomputed"]
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "predicted_peak_mib": memory["predicted_peak_bytes"] / 2**20,
                  "measured_peak_mib": memory["measured_peak_bytes"] / 2**20,
                  "recomputed_layer_mib": max(s[2] for s in layer["samples"]) / 2**20 if layer else None}))
"""


def saved_bytes(model: Path, rows: int, seq: int, recompute: bool) -> int:
    """Bytes autograd keeps from one forward of the whole model until its backward (distinct storages)."""
    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.model import build_stage

    stage = build_stage(model)
    stage.recompute = recompute
    stage.add_adapter("a", 16, 32, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0)
    ids = torch.randint(3, stage.config.vocab_size, (rows, seq))
    batch = LoRABatch((LoRASegment("a", 0, rows, tuple(range(rows))),), seq, training=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t.detach()  # kept as itself, a saved output would hold its own node: a leaked graph

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(ids, batch)
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recompute_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from mlora_pp.tiny import WORDS, make_tiny_model

    rows, steps = 8, (2 if args.quick else 4)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1024,
                                max_positions=1024)
        rnd = random.Random(0)
        data = work / "d.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(700))}) + "\n"
                                for _ in range(64)))
        for recompute in (False, True):
            raw = {"model": {"path": str(model)}, "output_dir": str(work / f"out-{recompute}"), "seed": 0,
                   "pipeline": {"recompute": recompute},
                   "jobs": [{"name": "job", "data": str(data), "template": "plain", "rank": 16, "alpha": 32,
                             "dropout": 0.05, "batch_size": rows, "micro_batch_size": rows, "max_steps": steps,
                             "max_seq_len": 1024, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]}]}
            config = work / f"r{recompute}.yaml"
            config.write_text(yaml.safe_dump(raw))
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(config)], cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="2"))
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            measured["saved_tensor_mib_per_micro_batch"] = saved_bytes(model, rows, 1024, recompute) / 2**20
            results["recompute" if recompute else "keep"] = measured
            print(f"recompute={recompute}: peak RSS {measured['peak_rss_mib']:.0f} MiB, wall {measured['wall_s']:.1f} s, "
                  f"saved by one forward {measured['saved_tensor_mib_per_micro_batch']:.0f} MiB, "
                  f"predicted peak {measured['predicted_peak_mib']:.1f} MiB, measured {measured['measured_peak_mib']:.1f} "
                  f"MiB", flush=True)
    out = {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        "settings": {"model": "random llama, 8 layers, hidden 512, intermediate 1024", "rows": rows,
                     "seq_len": "about 1000 tokens (700 words)", "steps": steps, "lora": "rank 16, all 7 projections"},
        "results": results,
        "ratios": {"peak_rss": results["recompute"]["peak_rss_mib"] / results["keep"]["peak_rss_mib"],
                   "wall": results["recompute"]["wall_s"] / results["keep"]["wall_s"]},
    }
    write_result(RESULTS / ("recompute_memory_quick.json" if args.quick else "recompute_memory.json"), out)
    rows_out = [("saved by one forward until its backward (MiB)", "saved_tensor_mib_per_micro_batch"),
                ("most a backward recomputed on top, probes (MiB)", "recomputed_layer_mib"),
                ("predicted peak, memory model (MiB)", "predicted_peak_mib"),
                ("measured peak, tensor bytes (MiB)", "measured_peak_mib"),
                ("process peak RSS (MiB)", "peak_rss_mib"), ("wall (s)", "wall_s")]
    print(f"| | keep activations | recompute |\n|---|---|---|")
    for label, key in rows_out:
        cells = [results[k].get(key) for k in ("keep", "recompute")]
        print(f"| {label} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    print(f"peak RSS ratio {out['ratios']['peak_rss']:.2f}, wall ratio {out['ratios']['wall']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
