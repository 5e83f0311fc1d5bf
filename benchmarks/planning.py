"""How long a plan takes to make, and what it holds, as runs grow: `build_schedule` (the lora
generator, then `validate`, which replays the plan in `sim.simulate`) for jobs of equal 4-micro-batch
steps, by stages, jobs and steps.

Every rank makes the same plan at start-up and again at every change of plan (a job submitted,
cancelled or stopped early), and a plan covers every remaining step of every job: its time is
start-up time, and its size is memory every rank holds for the whole run. Reported per shape: the
seconds (median of `--repeat` builds), microseconds per action, and with `--memory` the bytes the
finished plan holds and the peak while making it (tracemalloc, in a separate build, as tracing
slows Python several times over).

    python -m benchmarks.planning [--quick] [--memory]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import RESULTS, write_result
from mlora_pp.schedule import JobSteps, build_schedule

SHAPES = [  # (stages, jobs, steps per job)
    (2, 4, 1000),
    (4, 8, 1000),
    (8, 8, 250),
    (16, 32, 100),
    (64, 128, 8),
]
QUICK = [(2, 4, 50), (4, 8, 20)]


def jobs_of(count: int, steps: int) -> list[JobSteps]:
    """`count` jobs of `steps` steps, each of 4 micro-batches of 2 rows x 512 tokens."""
    return [JobSteps(f"job{j}", tuple(tuple((2, 1024) for _ in range(4)) for _ in range(steps)))
            for j in range(count)]


def measure(stages: int, jobs: int, steps: int, repeat: int, memory: bool) -> dict:
    work = jobs_of(jobs, steps)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        schedule = build_schedule(work, stages, "lora")
        times.append(time.perf_counter() - started)
    actions = sum(len(a) for a in schedule.stages)
    row = {"stages": stages, "jobs": jobs, "steps": steps, "micro_batches": len(schedule.micro_batches),
           "actions": actions, "seconds": statistics.median(times), "times": times,
           "us_per_action": statistics.median(times) / actions * 1e6}
    del schedule
    if memory:
        tracemalloc.start()
        schedule = build_schedule(work, stages, "lora")
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        row.update(held_bytes=held, peak_bytes=peak, held_bytes_per_action=held / actions)
        del schedule
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planning", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (a smoke run)")
    parser.add_argument("--memory", action="store_true", help="also trace the memory of one more build per shape")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/planning.json)")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    rows = [measure(s, j, k, args.repeat, args.memory) for s, j, k in shapes]
    table = Table(title="making a lora plan (build_schedule, validated)")
    for name in ["stages", "jobs", "steps/job", "actions", "seconds", "us/action"] + (
            ["held MiB", "peak MiB", "B/action"] if args.memory else []):
        table.add_column(name, justify="right")
    for r in rows:
        cells = [str(r["stages"]), str(r["jobs"]), str(r["steps"]), f"{r['actions']:,}", f"{r['seconds']:.2f}",
                 f"{r['us_per_action']:.1f}"]
        if args.memory:
            cells += [f"{r['held_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / 2**20:.0f}",
                      f"{r['held_bytes_per_action']:.0f}"]
        table.add_row(*cells)
    Console(width=140).print(table)
    out = write_result(RESULTS / "planning.json" if args.out is None else Path(args.out), {
        "command": "python -m benchmarks.planning" + (" --quick" if args.quick else "") + (" --memory" if args.memory else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
