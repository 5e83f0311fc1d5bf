"""A more urgent job submitted while a less urgent one is under way, under a memory budget that
holds one job's gradients and AdamW state at a time: paused (`pipeline.preempt: true`, the
default) against waiting (`false`). ``python -m benchmarks.preemption [--repeats N] [--quick]``

The benchmarks.run workload shape (random LLaMA, 8 layers, hidden 512, fp32, 2 ranks over
loopback, Gloo, one thread each), rank 64 on all 7 projections so that a job's state outweighs
its activations. job0 (priority 0, 16 steps) starts alone; job1 (priority 5, 4 steps) is
submitted before the run starts, so rank 0 takes it at the first decision point that reads
requests (micro-batch 8, in job0's third step). The budget is 5% above what the larger job needs
alone, from the memory models a run without a budget fitted. Each way runs `--repeats` times,
alternating. Times are seconds since training started (metrics.jsonl): the urgent job's
turnaround is from its `submitted` event to its last step record.

Writes benchmarks/results/preemption.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import RESULTS, write_result
from benchmarks.run import _free_port
from benchmarks.scenarios import ModelShape, Workload, prepare

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"job0": 16, "job1": 4}
PRIORITY = {"job0": 0, "job1": 5}


def _run(config: Path, timeout_s: float) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "launcher", str(config), "--no-live"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _budget(raw: dict, records: list[dict]) -> tuple[int, dict[str, float]]:
    """5% above the larger job's predicted peak alone (the worst stage), and each set's peak."""
    from mlora_pp.config import parse_config
    from mlora_pp.memory import MemoryModel, largest_micro
    from mlora_pp.training import load_tokenizer, prepare_jobs

    cfg = parse_config(raw, "free.yaml")
    steps = [j.job_steps() for j in prepare_jobs(cfg, load_tokenizer(cfg.model.path)).values()]
    memory = [r for r in records if r.get("event") == "memory"]
    models = [MemoryModel(**r["model"]) for r in memory]
    in_flight = memory[0]["in_flight"]

    def need(running: set[str]) -> float:
        return max(m.peak(running, in_flight, *largest_micro(steps, running, 2, "lora", True)) for m in models)

    peaks = {"job0": need({"job0"}), "job1": need({"job1"}), "both": need({"job0", "job1"})}
    budget = int(1.05 * max(peaks["job0"], peaks["job1"]))
    if peaks["both"] <= budget:
        raise RuntimeError(f"the budget {budget} holds both jobs ({peaks}): the benchmark would measure nothing")
    return budget, peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preemption", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny model (a smoke test)")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS / "preemption.json")
    args = parser.parse_args(argv)
    model = ModelShape(2, 128, 4, 2, 256) if args.quick else ModelShape(8, 512, 8, 4, 1024)
    workload = Workload(model, jobs=2, steps=max(STEPS.values()), batch_size=8, micro_batch_size=2,
                        words=(24, 40), rank=64, alpha=64.0)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="mlora-preemption-") as tmp:
        space = prepare(Path(tmp), workload)
        base = yaml.safe_load(space.config("free", "lora").read_text())
        base["pipeline"].update(admission="priority", timeout_s=60)
        for job in base["jobs"]:
            job["max_steps"], job["priority"] = STEPS[job["name"]], PRIORITY[job["name"]]
        free = Path(tmp) / "free.yaml"
        free.write_text(yaml.safe_dump(base))
        budget, peaks = _budget(base, _run(free, args.timeout_s))
        print(f"budget {budget / 2**20:.1f} MiB; predicted peaks: job0 alone {peaks['job0'] / 2**20:.1f}, "
              f"job1 alone {peaks['job1'] / 2**20:.1f}, both {peaks['both'] / 2**20:.1f} MiB", file=sys.stderr)
        from mlora_pp.control import ControlDir

        for round_ in range(args.repeats):
            for preempt in ((True, False) if round_ % 2 == 0 else (False, True)):
                raw = json.loads(json.dumps(base))
                raw["output_dir"] = str(Path(tmp) / f"{'pause' if preempt else 'wait'}-{round_}")
                raw["pipeline"].update(memory_budget=budget, preempt=preempt)
                urgent = next(j for j in raw["jobs"] if j["name"] == "job1")
                raw["jobs"] = [j for j in raw["jobs"] if j["name"] != "job1"]
                ControlDir(Path(raw["output_dir"])).request("submit", {"job": urgent})
                path = Path(tmp) / f"run-{preempt}-{round_}.yaml"
                path.write_text(yaml.safe_dump(raw))
                records = _run(path, args.timeout_s)
                submitted = next(r["time"] for r in records if r.get("event") == "submitted")
                last = {r["job"]: r["time"] for r in records if "loss" in r}
                measured = {"urgent_turnaround_s": last["job1"] - submitted, "low_finish_s": last["job0"],
                            "finish_s": next(r["time"] for r in records if r.get("event") == "done"),
                            "paused": any(r.get("event") == "paused" for r in records),
                            "peak_over_budget": max(r["measured_peak_bytes"] for r in records
                                                    if r.get("event") == "memory") / budget}
                runs[preempt].append(measured)
                print(f"  preempt {preempt} #{round_ + 1}: job1 {measured['urgent_turnaround_s']:.2f} s after "
                      f"submission, job0 done at {measured['low_finish_s']:.2f} s", file=sys.stderr, flush=True)
    rows = []
    for preempt, found in runs.items():
        rows.append({"preempt": preempt, "repeats": len(found), "paused_in_every_run": all(r["paused"] for r in found),
                     **{k: statistics.median(r[k] for r in found)
                        for k in ("urgent_turnaround_s", "low_finish_s", "finish_s")},
                     "max_measured_peak_over_budget": max(r["peak_over_budget"] for r in found), "runs": found})
    print(f"\n2 ranks, {model.describe()}, job0 {STEPS['job0']} steps (priority 0) under way, job1 "
          f"{STEPS['job1']} steps (priority 5) submitted; budget for one job's state; median of {args.repeats}:")
    print("| pipeline.preempt | job1 turnaround | job0 finishes | run ends | measured peak / budget |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {str(row['preempt']).lower()} | {row['urgent_turnaround_s']:.2f} s | {row['low_finish_s']:.2f} s "
              f"| {row['finish_s']:.2f} s | {row['max_measured_peak_over_budget']:.2f} |")
    if not args.quick:
        write_result(args.out, {"model": model.describe(), "steps": STEPS, "priority": PRIORITY, "budget_bytes": budget,
                                "predicted_peaks": peaks, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
