"""Per-stage utilisation of the `lora` schedule against `1f1b` and `gpipe`, 2 stages on CPU (Gloo).

``python -m benchmarks.pipeline_util [--quick]`` trains the same jobs with each schedule, one run
after another in this invocation, through torchrun with 2 ranks, and reads each rank's measured
busy time (compute, not waiting on a peer) over its wall time from metrics.jsonl. It prints a table
and writes benchmarks/results/pipeline_util.json (``--balance profile``: pipeline_util_profile.json,
with each run's profiled split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import RESULTS, write_result
import yaml

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("lora", "1f1b", "gpipe")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(path: Path, seed: int, n: int) -> Path:
    from mlora_pp.tiny import WORDS

    rnd = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = [rnd.choice(WORDS) for _ in range(rnd.randint(24, 40))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def run_one(work: Path, model: Path, policy: str, jobs: int, steps: int, stages: int,
            balance: str = "auto") -> list[dict]:
    out = work / f"{policy}-{jobs}"
    raw = {
        "model": {"path": str(model)},
        "output_dir": str(out),
        "seed": 0,
        "pipeline": {"schedule": policy, "balance": balance, "timeout_s": 120},
        "jobs": [
            {"name": f"job{i}", "data": str(_dataset(work / f"d{i}.jsonl", i, 96)), "template": "plain",
             "rank": 16, "alpha": 32, "dropout": 0.05, "batch_size": 8, "micro_batch_size": 2,
             "max_steps": steps, "max_seq_len": 128,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
            for i in range(jobs)
        ],
    }
    config = work / f"{policy}-{jobs}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(stages),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "launcher", str(config), "--no-live"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{policy} with {jobs} jobs failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    split = [r["layers"] for r in records if r.get("event") == "balance"]  # with --balance profile
    return [dict(r, layers=split[0]) if split else r for r in records if r.get("event") == "stage"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_util", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--balance", default="auto", choices=("auto", "profile"), help="how layers are split")
    args = parser.parse_args(argv)
    from mlora_pp.tiny import make_tiny_model

    steps = 2 if args.quick else 8
    job_counts = (1, 2, 4, 8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", layers=8, hidden=256, heads=8, kv_heads=4, intermediate=512)
        for jobs in job_counts:
            for policy in POLICIES:
                stages = run_one(work, model, policy, jobs, steps, args.stages, args.balance)
                utils = [s["utilization"] for s in stages]
                rows.append({"jobs": jobs, "policy": policy, "utilization": utils, "min_utilization": min(utils),
                             "wall_s": max(s["wall_s"] for s in stages), "layers": stages[0].get("layers")})
                print(f"jobs={jobs} {policy:5s} utilization per stage {', '.join(f'{u:.1%}' for u in utils)} "
                      f"wall {rows[-1]['wall_s']:.2f}s", flush=True)
    checks = [{"jobs": r["jobs"], "target": 0.97, "min_utilization": r["min_utilization"],
               "pass": r["min_utilization"] >= 0.97} for r in rows if r["policy"] == "lora" and r["jobs"] >= 4]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        "settings": {"stages": args.stages, "balance": args.balance, "steps_per_job": steps, "quick": args.quick,
                     "model": "tiny llama 8 layers, hidden 256, vocab 1004", "rows": "64-100 tokens",
                     "lora": "rank 16 on all 7 projections, dropout 0.05", "batch_size": 8, "micro_batch_size": 2},
        "rows": rows,
        "checks": checks,
    }
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"per-stage utilisation, {args.stages} stages, CPU/Gloo")
        for col in ("jobs", *POLICIES):
            table.add_column(col, justify="right")
        for jobs in job_counts:
            cells = []
            for policy in POLICIES:
                r = next(r for r in rows if r["jobs"] == jobs and r["policy"] == policy)
                cells.append(" / ".join(f"{u:.0%}" for u in r["utilization"]))
            table.add_row(str(jobs), *cells)
        Console().print(table)
    except ImportError:
        pass
    for c in checks:
        print(f"lora with {c['jobs']} jobs: min stage utilisation {c['min_utilization']:.1%} "
              f"(target 97%): {'PASS' if c['pass'] else 'FAIL'}")
    name = f"pipeline_util{'_profile' if args.balance == 'profile' else ''}{'_quick' if args.quick else ''}.json"
    write_result(RESULTS / name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
