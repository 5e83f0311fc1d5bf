"""Runs that torchrun restarts after a kill (`--max-restarts 1`): do they finish by themselves, with
the uninterrupted run's adapters, and what does a kill cost? ``python -m benchmarks.restarts
[--kills N] [--seed S]``

The demo's three jobs (`configs/demo.yaml` on the tiny LLaMA of `make demo`: 4 layers, hidden 256),
one epoch each (25 steps), a checkpoint every 2 steps, on 2 ranks over loopback (Gloo, one thread
each). An uninterrupted run first and last; between them N runs, each with one rank SIGKILLed at a
seeded random action or inside a checkpoint write (`MLORA_PP_FAULT`, which fires in torchrun's first
attempt only). A killed run passes when it exits 0 with adapters bitwise equal to the first
uninterrupted run's. Times are torchrun's wall time, start to end.

Writes benchmarks/results/restarts.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import RESULTS, write_result
from benchmarks.run import _free_port

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("upper", "reverse", "increment")


def _config(workdir: Path, model: Path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["output_dir"] = str(workdir / "out")
    raw["pipeline"]["timeout_s"] = 60
    for job in raw["jobs"]:
        for key in ("data", "eval_data", "template"):
            job[key] = str(ROOT / job[key])
        job["epochs"], job["save_every"] = 1, 2
    path = workdir / "restarts.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(config: Path, fault: str | None) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLORA_PP_FAULT", None)
    if fault is not None:
        env["MLORA_PP_FAULT"] = fault
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "launcher", str(config),
           "--no-live"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - start


def _adapters(config: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    return {job: load_file(out / job / "adapter_model.safetensors") for job in JOBS}


def _same(a: dict[str, dict], b: dict[str, dict]) -> bool:
    import torch

    return all(a[j].keys() == b[j].keys() and all(torch.equal(a[j][k], b[j][k]) for k in a[j]) for j in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "restarts.json")
    args = p.parse_args(argv)
    from mlora_pp.demo import ensure_model

    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ensure_model(workdir / "tiny")
        config = _config(workdir, workdir / "tiny")
        proc, first_s = _run(config, None)
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{proc.stderr[-3000:]}")
        reference = _adapters(config)
        for _ in range(args.kills):
            rank = rng.randrange(2)
            fault = (f"{rank}:save:{rng.randrange(0, 12)}:kill" if rng.random() < 0.4
                     else f"{rank}:{rng.randrange(1, 360)}:kill")
            proc, seconds = _run(config, fault)
            killed = "failed (exitcode: -9)" in proc.stderr
            resumed = "resuming after step" in proc.stdout
            same = proc.returncode == 0 and _same(_adapters(config), reference)
            rows.append({"fault": fault, "killed": killed, "resumed": resumed, "exit": proc.returncode,
                         "same_adapters": same, "seconds": round(seconds, 1)})
            print(f"{fault:>16}: exit {proc.returncode}, killed {killed}, resumed {resumed}, same {same}, "
                  f"{seconds:.1f} s", flush=True)
            if not same:
                print(proc.stderr[-3000:], flush=True)
        proc, last_s = _run(config, None)
        last_same = proc.returncode == 0 and _same(_adapters(config), reference)

    print()
    print("| run | exit | killed | resumed | adapters equal | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| uninterrupted (first) | 0 | - | - | reference | {first_s:.1f} |")
    for r in rows:
        print(f"| `{r['fault']}` | {r['exit']} | {r['killed']} | {r['resumed']} | {r['same_adapters']} | "
              f"{r['seconds']} |")
    print(f"| uninterrupted (last) | {proc.returncode} | - | - | {last_same} | {last_s:.1f} |")
    result = {"workload": "configs/demo.yaml, 1 epoch (25 steps a job), save_every 2, 2 ranks, Gloo, 1 thread",
              "uninterrupted_s": [round(first_s, 1), round(last_s, 1)], "last_uninterrupted_equal": last_same,
              "kills": rows}
    print(f"wrote {write_result(args.out, result)}")
    return 0 if all(r["same_adapters"] for r in rows) and last_same else 1


if __name__ == "__main__":
    sys.exit(main())
