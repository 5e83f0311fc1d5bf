"""Before / after: the same 2-rank `lora` run with two checkouts of this project, alternating.

    git worktree add /tmp/before HEAD~1   # the code before a change (with its own .venv or PYTHON)
    python -m benchmarks.ab --before /tmp/before --after . --workload alpaca-32k --reps 3
    python -m benchmarks.ab --before . --after . --after-set max_grad_norm=1.0 --workload loopback

``--after-set FIELD=VALUE`` sets a job field (a YAML value) on every job of the after side's runs:
one checkout, a config option off and on.

Each run is ``torchrun --standalone --nproc-per-node 2 -m benchmarks.probe OUT launcher CONFIG``
started in that checkout (so its code runs), on the same model, data and config; the order
alternates between rounds (before, after; after, before; ...) so slow drifts of the machine hit
both alike. Reported per run: non-padding tokens/s over the training window (from the first
finished step to the last: start-up left out), wall time, and per rank the peak RSS and the peak
malloc'd bytes (`benchmarks/probe.py`). Writes benchmarks/results/ab-<workload>.json.

Workloads:
* ``loopback``   - `benchmarks.run`'s loopback scenario (8 layers, hidden 512, 1024-token vocabulary,
                   `plain` template: every real token is a loss token);
* ``alpaca-32k`` - the same model shape with a 32,000-token vocabulary and Alpaca records (an
                   instruction and an input of 8-16 words, an output of 12-20): most tokens are prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks import RESULTS, write_result
from benchmarks.scenarios import ALL_TARGETS, SCENARIOS, prepare



def alpaca_workspace(root: Path, vocab: int = 32_000) -> Path:
    """The alpaca-32k workload's model, data and config under `root`; returns the config."""
    from mlora_pp.tiny import WORDS, make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(root / "model", layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1024, vocab=vocab)
    jobs = []
    for j in range(4):
        rnd = random.Random(j)

        def words(low: int, high: int) -> str:
            return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(low, high)))

        path = root / f"job{j}.jsonl"
        path.write_text("".join(json.dumps({"instruction": words(8, 16), "input": words(8, 16),
                                            "output": words(12, 20)}) + "\n" for _ in range(64)))
        jobs.append({"name": f"job{j}", "data": str(path), "template": "alpaca", "rank": 16, "alpha": 32,
                     "dropout": 0.05, "lr": 3e-4, "batch_size": 8, "micro_batch_size": 2, "max_steps": 8,
                     "max_seq_len": 256, "save_every": None, "keep_last": 1, "target_modules": list(ALL_TARGETS)})
    config = root / "lora.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "output_dir": str(root / "out"), "seed": 0,
                                      "pipeline": {"schedule": "lora", "timeout_s": 300}, "jobs": jobs}))
    return config


def run_once(checkout: Path, python: str, config: Path, out: Path, balance: list[int] | None,
             job_fields: dict | None = None) -> dict:
    """One 2-rank run of `config` with the code of `checkout` (and `job_fields` set on every job); its numbers."""
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(out)
    if balance is not None:
        cfg["pipeline"]["balance"] = balance
    cfg["jobs"] = [dict(job, **(job_fields or {})) for job in cfg["jobs"]]
    out.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "benchmarks.probe", str(out / "probe"), "launcher", str(path), "--no-live", "--fresh"],
                          cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run in {checkout} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    first = min(r["time"] for r in steps)
    tokens = sum(r["tokens"] for r in steps if r["time"] > first)
    probes = [json.loads((out / "probe" / f"probe-rank{rank}.json").read_text()) for rank in (0, 1)]
    stages = sorted((r for r in records if r.get("event") == "stage"), key=lambda r: r["rank"])
    return {"tokens_per_s": tokens / (max(r["time"] for r in steps) - first), "wall_s": wall,
            "first_step_losses": sorted((r["job"], r["loss"]) for r in steps if r["step"] == 1),
            "grad_norms": [min((r["grad_norm"] for r in steps if "grad_norm" in r), default=None),
                           max((r["grad_norm"] for r in steps if "grad_norm" in r), default=None)],
            "layers": [r["last_layer"] - r["first_layer"] if "last_layer" in r else None for r in stages],
            "utilization": [r["utilization"] for r in stages],
            "peak_rss_mib": [p["peak_rss_bytes"] / 2**20 for p in probes],
            "peak_heap_mib": [p["peak_heap_bytes"] / 2**20 for p in probes]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout with the code before")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout with the code after (default .)")
    parser.add_argument("--workload", choices=("loopback", "alpaca-32k"), required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--balance", type=int, nargs="+", default=None, help="fixed layers per stage for both")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlora-ab"))
    parser.add_argument("--after-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a job field for every job of the after side (repeatable)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    after_fields = {}
    for item in args.after_set:
        field, sep, value = item.partition("=")
        if not sep or not field:
            parser.error(f"--after-set {item!r}: expected FIELD=VALUE")
        after_fields[field] = yaml.safe_load(value)
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    python = {k: str(v / ".venv/bin/python") if (v / ".venv/bin/python").exists() else sys.executable
              for k, v in sides.items()}
    work = args.workdir / args.workload
    config = (prepare(work, SCENARIOS["loopback"].full).config("lora", "lora") if args.workload == "loopback"
              else alpaca_workspace(work))
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for rep in range(args.reps):
        for side in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            r = run_once(sides[side], python[side], config, work / f"{side}-{rep}", args.balance,
                         after_fields if side == "after" else None)
            runs[side].append(r)
            print(f"{side} {rep}: {r['tokens_per_s']:,.0f} tok/s, {r['wall_s']:.1f} s, layers {r['layers']}, "
                  f"peak heap per rank {', '.join(f'{m:.0f}' for m in r['peak_heap_mib'])} MiB", flush=True)
    print("\n| side | tok/s (median, range) | wall s (median) | peak heap MiB per rank (median) |")
    print("|---|---|---|---|")
    for side, rs in runs.items():
        tok = [r["tokens_per_s"] for r in rs]
        heap = [statistics.median(r["peak_heap_mib"][k] for r in rs) for k in (0, 1)]
        print(f"| {side} | {statistics.median(tok):,.0f} ({min(tok):,.0f}-{max(tok):,.0f}) "
              f"| {statistics.median(r['wall_s'] for r in rs):.1f} | {heap[0]:.0f} / {heap[1]:.0f} |")
    result = {"workload": args.workload, "balance": args.balance, "reps": args.reps, "after_set": after_fields,
              "before": str(sides["before"]), "after": str(sides["after"]), "runs": runs}
    out = args.out or RESULTS / f"ab-{args.workload}.json"
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
