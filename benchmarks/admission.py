"""Average job completion time (JCT) of each admission policy: simulated on a GPU cost model, and
measured in real 2-rank runs here.

``python -m benchmarks.admission [--sim-only | --real-only] [--repeats N] [--quick]``

Simulated (`--sim-only`): 16 jobs of unequal length (steps drawn once from 1..16 with a fixed seed,
8 micro-batches of 4 x 512 tokens per step), the 70B-layer cost model of `benchmarks.simulate` on
H100 + NVLink, 4 and 8 stages. For each admission policy (fifo, priority with priorities drawn
once from 0..3, shortest-first), all jobs submitted at time 0: the lora schedule with every job
admitted at once, and with at most 4 running at a time (a stand-in for a memory budget that fits
4); and 1f1b (jobs one after another, in the policy's order). Reported: mean JCT (when a job's last
optimizer step ends on its last stage), mean JCT of the top-priority jobs, makespan, bubble.

Measured (`--real-only`): the benchmarks.run workload shape (random LLaMA, 8 layers, hidden 512,
fp32, 2 ranks over loopback, Gloo, one thread each) with 4 jobs of 8, 2, 6 and 1 steps and
priorities 0, 1, 3, 2. Every policy runs `--repeats` times, interleaved (policy after policy, then
again), and each policy's median is reported. A job's completion time is the `time` of its last
step record in metrics.jsonl (seconds since that run's training started; model loading excluded).

Writes benchmarks/results/admission.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import RESULTS, write_result
from benchmarks.run import _free_port
from benchmarks.scenarios import ModelShape, Workload, prepare
from benchmarks.simulate import HARDWARE, Shape, gpu_cost
from mlora_pp.schedule import ADMISSION, JobSteps, admission, build_schedule
from mlora_pp.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
SIM_JOBS = 16
RUNNING_CAP = 4
REAL_STEPS = (8, 2, 6, 1)
REAL_PRIORITY = (0, 1, 3, 2)


def completion(schedule, cost) -> tuple[dict[str, float], float, float]:
    """Each job's completion time, the makespan and the bubble of `schedule` under `cost`."""
    timeline = simulate(schedule, cost)
    done: dict[str, float] = {}
    for stage in timeline.stages:
        for timed in stage:
            if timed.action.kind == "S":
                done[timed.action.job] = max(done.get(timed.action.job, 0.0), timed.end)
    return done, timeline.makespan, timeline.bubble


def simulated(stages_list: tuple[int, ...] = (4, 8), hardware: str = "h100-nvlink") -> list[dict]:
    rnd = random.Random(0)
    shape = Shape()
    micro = tuple((shape.rows, shape.tokens) for _ in range(8))
    jobs = [JobSteps(f"job{i}", tuple(micro for _ in range(rnd.randint(1, 16)))) for i in range(SIM_JOBS)]
    priority = {j.name: rnd.randint(0, 3) for j in jobs}
    top = {n for n, p in priority.items() if p == max(priority.values())}
    rows = []
    for stages in stages_list:
        cost = gpu_cost(*HARDWARE[hardware], shape, stages)
        for policy in ADMISSION:
            variants = {
                "lora, all at once": ("lora", None),
                f"lora, at most {RUNNING_CAP} running": ("lora", lambda running: len(running) <= RUNNING_CAP),
                "1f1b, one job at a time": ("1f1b", None),
            }
            for variant, (schedule_policy, fits) in variants.items():
                order = admission(jobs, policy, priority, fits)
                done, makespan, bubble = completion(build_schedule(jobs, stages, schedule_policy, admission=order), cost)
                rows.append({"hardware": hardware, "stages": stages, "jobs": len(jobs), "policy": policy,
                             "variant": variant, "mean_jct_s": statistics.mean(done.values()),
                             "mean_jct_top_priority_s": statistics.mean(done[n] for n in top),
                             "makespan_s": makespan, "bubble": bubble})
    return rows


def _run(config: Path, timeout_s: float) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "launcher", str(config), "--no-live", "--fresh"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def measured(repeats: int, quick: bool, timeout_s: float = 900) -> list[dict]:
    model = ModelShape(4, 128, 4, 2, 256) if quick else ModelShape(8, 512, 8, 4, 1024)
    steps = (2, 1, 2, 1) if quick else REAL_STEPS
    workload = Workload(model, jobs=len(steps), steps=max(steps), batch_size=8, micro_batch_size=2, words=(24, 40))
    with tempfile.TemporaryDirectory(prefix="mlora-admission-") as tmp:
        space = prepare(Path(tmp), workload)
        configs = {}
        for policy in ADMISSION:
            raw = yaml.safe_load(space.config(policy, "lora").read_text())
            raw["pipeline"]["admission"] = policy
            for job, n, p in zip(raw["jobs"], steps, REAL_PRIORITY):
                job["max_steps"], job["priority"] = n, p
            path = Path(tmp) / f"{policy}.yaml"
            path.write_text(yaml.safe_dump(raw))
            configs[policy] = path
        runs: dict[str, list[dict]] = {p: [] for p in ADMISSION}
        for round_ in range(repeats):
            for policy in ADMISSION:
                started = time.perf_counter()
                records = _run(configs[policy], timeout_s)
                done = {r["job"]: r["time"] for r in records if "loss" in r}
                finish = next(r["time"] for r in records if r.get("event") == "done")
                runs[policy].append({"jct": done, "finish_s": finish})
                print(f"  {policy} #{round_ + 1}: mean JCT {statistics.mean(done.values()):.1f} s "
                      f"({time.perf_counter() - started:.0f} s wall)", file=sys.stderr, flush=True)
    top = f"job{REAL_PRIORITY.index(max(REAL_PRIORITY))}"
    rows = []
    for policy, found in runs.items():
        rows.append({"policy": policy, "repeats": repeats, "steps": list(steps), "priority": list(REAL_PRIORITY),
                     "model": model.describe(),
                     "mean_jct_s": statistics.median(statistics.mean(r["jct"].values()) for r in found),
                     "top_priority_jct_s": statistics.median(r["jct"][top] for r in found),
                     "finish_s": statistics.median(r["finish_s"] for r in found),
                     "jct_s": {job: statistics.median(r["jct"][job] for r in found) for job in found[0]["jct"]}})
    return rows


def print_rows(title: str, rows: list[dict], keys: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{k:>22}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:>22.3f}" if isinstance(r[k], float) else f"{str(r[k]):>22}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.admission", description=__doc__.splitlines()[0])
    parser.add_argument("--sim-only", action="store_true")
    parser.add_argument("--real-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model and fewer steps (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "admission.json")
    args = parser.parse_args(argv)
    result: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count()}
    if args.out.exists():
        result = {**json.loads(args.out.read_text()), **result}
    if not args.real_only:
        result["simulated"] = simulated()
        print_rows("simulated (H100 + NVLink cost model, 16 jobs of 1-16 steps)", result["simulated"],
                   ["stages", "policy", "variant", "mean_jct_s", "mean_jct_top_priority_s", "makespan_s", "bubble"])
    if not args.sim_only:
        result["measured"] = measured(args.repeats, args.quick)
        result["measured_quick"] = args.quick
        print_rows("measured (2 CPU ranks, Gloo, loopback)", result["measured"],
                   ["policy", "mean_jct_s", "top_priority_jct_s", "finish_s"])
    if not args.quick:
        write_result(args.out, result)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
