"""How long a plan takes to make, and what it holds, as runs grow, for jobs of equal 4-micro-batch
steps, by stages, jobs and steps; made whole, and made as it runs.

Whole: `build_schedule` (the lora generator, then `validate`, which replays the plan in
`sim.simulate`), every remaining step of every job at once. Reported per shape: the seconds (median
of `--repeat` builds), microseconds per action, and with `--memory` the bytes the finished plan
holds and the peak while making it (tracemalloc, in a separate build, as tracing slows Python
several times over).

As it runs (what a rank does, `mlora_pp.stage_plan`): a `StagePlan` over a `PlanStream` of
`--window` micro-batches per segment, stage 0's actions taken one by one and forgotten behind it
as the runtime does. Reported: the seconds to the first segment (a rank's start-up and the stall at
a change of plan), the seconds to take every action, and with `--memory` the peak while doing so.
`--long` adds 8 jobs of 20,000 steps on 4 stages (5.8 million actions; minutes with `--memory`).
Without `--quick`, 64 x 128 x 8 with `hide_latency` comes last, made whole once (`whole_seconds`)
and as it runs.

Grouping (what a plan's start reads of every micro-batch of the run, at start-up and at every
change of plan), for jobs of unequal lengths (`varied_jobs`: 1, 2 or 4 rows of 100-512 tokens, 4
micro-batches a step): `group_jobs`; `choose_streams` with a per-action cost; and the first
segment of a plan under a memory budget that admits a third of the jobs at once
(`admission_check`, asked at every job's start and end).

From data (what a rank does between its jobs' rows and its first action, at every start; the
sizes again at every change of plan), for jobs of `--records` rows of 50-511 tokens over 3 epochs,
batches of 16 in micro-batches of 2: `plan_steps` of every job, the scheduler's sizes of every job
(`AdapterJob.job_steps`) and the bytes they hold, and the first segment of stage 0's plan.

    python -m benchmarks.planning [--quick] [--memory] [--long] [--window N] [--records N]
    python -m benchmarks.planning --from-data-only --out F   # only the from-data table
    python -m benchmarks.planning --grouping-only --out F    # only the grouping table (its last
                                                             # shape's jobs made from arrays)
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
import tracemalloc
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import RESULTS, write_result
from mlora_pp.config import DEFAULT_PLAN_WINDOW
from mlora_pp.memory import MemoryModel, admission_check
from mlora_pp.schedule import CostModel, JobSteps, PlanStream, admission, build_schedule, choose_streams, group_jobs
from mlora_pp.stage_plan import StagePlan

SHAPES = [  # (stages, jobs, steps per job)
    (2, 4, 1000),
    (4, 8, 1000),
    (8, 8, 250),
    (16, 32, 100),
    (64, 128, 8),
]
QUICK = [(2, 4, 50), (4, 8, 20)]
LONG = (4, 8, 20_000)
GROUPING = [(4, 8, 20_000), (16, 64, 1000), (64, 128, 200), (16, 128, 5000)]
QUICK_GROUPING = [(4, 8, 50)]


def jobs_of(count: int, steps: int) -> list[JobSteps]:
    """`count` jobs of `steps` steps, each of 4 micro-batches of 2 rows x 512 tokens."""
    return [JobSteps(f"job{j}", tuple(tuple((2, 1024) for _ in range(4)) for _ in range(steps)))
            for j in range(count)]


def varied_jobs(count: int, steps: int, seed: int = 0) -> list[JobSteps]:
    """`count` jobs of `steps` steps of 4 micro-batches, each job 1, 2 or 4 rows a micro-batch, each
    micro-batch's rows padded to a length drawn from 100-512 (real data: no two alike)."""
    rng = random.Random(seed)
    out = []
    for j in range(count):
        rows = rng.choice([1, 2, 4])
        out.append(JobSteps(f"job{j}", tuple(tuple((rows, rows * rng.randint(100, 512)) for _ in range(4))
                                             for _ in range(steps))))
    return out


def varied_arrays(count: int, steps: int, seed: int = 0) -> list[JobSteps]:
    """`varied_jobs`' kind of jobs made from arrays (`StepSizes`), for runs too long to spell out as
    tuples: each job 1, 2 or 4 rows a micro-batch, 4 micro-batches a step, lengths of 100-511."""
    import numpy as np

    from mlora_pp.step_sizes import StepSizes

    rng = np.random.default_rng(seed)
    out = []
    for j in range(count):
        rows = np.full(4 * steps, int(rng.choice([1, 2, 4])))
        out.append(JobSteps(f"job{j}", StepSizes(rows, rows * rng.integers(100, 512, 4 * steps),
                                                 np.arange(1, steps + 1) * 4)))
    return out


def measure_grouping(stages: int, jobs: int, steps: int) -> dict:
    """Seconds of `group_jobs`, of `choose_streams`, and to the first segment of a plan under a
    memory budget that admits a third of the jobs."""
    work = varied_jobs(jobs, steps) if jobs * steps <= 1_000_000 else varied_arrays(jobs, steps)
    row: dict = {"stages": stages, "jobs": jobs, "steps": steps}
    started = time.perf_counter()
    row["streams"] = len(group_jobs(work, stages))
    row["group_jobs_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    choose_streams(work, stages, CostModel(forward_per_token=1e-6, action_overhead=1e-3))
    row["choose_streams_seconds"] = time.perf_counter() - started
    # 100 bytes a job, nothing a token: a third of the jobs fit at once
    models = [MemoryModel(s, static=0, per_token=0.0, per_token_length=0.0, job={j.name: 100 for j in work})
              for s in range(stages)]
    admitted = max(1, jobs // 3)
    started = time.perf_counter()
    fits = admission_check(models, work, budget=100 * admitted, in_flight=stages, policy="lora", fuse=True)
    stream = PlanStream(work, stages, "lora", admission=admission(work, "fifo", fits=fits), window=DEFAULT_PLAN_WINDOW)
    stream.next_segment()
    row["admitted"] = admitted
    row["budget_first_segment_seconds"] = time.perf_counter() - started
    return row


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


FROM_DATA = [(4, 8), (8, 32), (16, 128)]  # (stages, jobs)
QUICK_FROM_DATA = [(2, 4)]


def measure_from_data(stages: int, jobs: int, records: int, seed: int = 0) -> dict:
    """Seconds of `plan_steps` and of `job_steps` for every job, the bytes the `JobSteps` hold
    (beyond the arrays each job keeps of its plan), and seconds to stage 0's first segment."""
    import numpy as np

    from mlora_pp.config import JobConfig
    from mlora_pp.data import plan_steps
    from mlora_pp.job import AdapterJob
    from mlora_pp.tokenized import TokenizedRows

    lengths = np.random.default_rng(seed).integers(50, 512, records)
    offsets = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = TokenizedRows(np.zeros(int(offsets[-1]), np.int32), np.ones(int(offsets[-1]), bool), offsets)
    configs = [JobConfig(name=f"job{j}", data="unused.jsonl", batch_size=16, micro_batch_size=2, epochs=3)
               for j in range(jobs)]
    started = time.perf_counter()
    plans = [plan_steps(rows, batch_size=c.batch_size, micro_batch_size=c.micro_batch_size, epochs=c.epochs,
                        max_steps=None, seed=seed, job=c.name) for c in configs]
    row: dict = {"stages": stages, "jobs": jobs, "records": records, "epochs": 3,
                 "plan_steps_seconds": time.perf_counter() - started}
    adapters = [AdapterJob(config=c, examples=rows, plans=p, seed=seed) for c, p in zip(configs, plans)]
    for a in adapters:
        a.micro_sizes()  # kept by every job whatever the scheduler holds
    started = time.perf_counter()
    steps = [a.job_steps() for a in adapters]
    row["job_steps_seconds"] = time.perf_counter() - started
    row["micro_batches"] = sum(len(m) for s in steps for m in s.micro_batches)
    del steps
    tracemalloc.start()
    steps = [a.job_steps() for a in adapters]
    row["job_steps_bytes"] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    started = time.perf_counter()
    StagePlan(PlanStream(steps, stages, "lora", window=DEFAULT_PLAN_WINDOW), 0, steps)
    row["first_segment_seconds"] = time.perf_counter() - started
    return row


def take_all(stages: int, jobs: list[JobSteps], window: int, hide_latency: bool = False) -> tuple[float, int, int]:
    """Stage 0 of a plan made as it runs, every action taken and forgotten behind (its oldest
    micro-batch in flight, as `StageWorker` does): (seconds to the first segment, actions, segments)."""
    started = time.perf_counter()
    plan = StagePlan(PlanStream(jobs, stages, "lora", window=window, hide_latency=hide_latency), 0, jobs)
    first = time.perf_counter() - started
    in_flight: dict[int, None] = {}
    last, position = -1, 0
    while (action := plan.action(position)) is not None:
        position += 1
        if action.kind == "F":
            last = action.micro_batch
            in_flight[last] = None
        elif action.kind == "B":
            del in_flight[action.micro_batch]
        plan.forget(position, min(in_flight, default=last + 1))
    return first, position, plan.segments


def measure_stream(stages: int, jobs: int, steps: int, window: int, memory: bool, hide_latency: bool = False) -> dict:
    work = jobs_of(jobs, steps)
    started = time.perf_counter()
    first, actions, segments = take_all(stages, work, window, hide_latency)
    row = {"stages": stages, "jobs": jobs, "steps": steps, "hide_latency": hide_latency, "window": window,
           "segments": segments,
           "stage_actions": actions, "first_segment_seconds": first, "seconds": time.perf_counter() - started}
    if memory:
        tracemalloc.start()
        take_all(stages, work, window, hide_latency)
        row["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planning", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (a smoke run)")
    parser.add_argument("--memory", action="store_true", help="also trace the memory of one more build per shape")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=int, default=DEFAULT_PLAN_WINDOW, help="micro-batches per segment")
    parser.add_argument("--long", action="store_true", help="also stream 8 jobs x 20,000 steps on 4 stages")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/planning.json)")
    parser.add_argument("--records", type=int, default=None,
                        help="rows of each job in the from-data table (default 52,000; 2,000 with --quick)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--from-data-only", action="store_true", help="only the from-data table")
    only.add_argument("--grouping-only", action="store_true", help="only the grouping table")
    args = parser.parse_args(argv)
    if args.grouping_only:
        grouping = grouping_table(args.quick)
        out = write_result(RESULTS / "planning-grouping.json" if args.out is None else Path(args.out), {
            "command": "python -m benchmarks.planning --grouping-only" + (" --quick" if args.quick else ""),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "grouping": grouping,
        })
        print(f"wrote {out}")
        return 0
    if args.records is None:
        args.records = 2_000 if args.quick else 52_000
    from_data = [measure_from_data(s, j, args.records) for s, j in (QUICK_FROM_DATA if args.quick else FROM_DATA)]
    table = Table(title=f"from data: jobs of {args.records:,} rows x 3 epochs, micro-batches of 2 rows")
    for name in ["stages", "jobs", "micro-batches", "plan_steps s", "job_steps s", "job_steps MiB",
                 "B/micro-batch", "first segment s"]:
        table.add_column(name, justify="right")
    for r in from_data:
        table.add_row(str(r["stages"]), str(r["jobs"]), f"{r['micro_batches']:,}", f"{r['plan_steps_seconds']:.2f}",
                      f"{r['job_steps_seconds']:.2f}", f"{r['job_steps_bytes'] / 2**20:.1f}",
                      f"{r['job_steps_bytes'] / max(1, r['micro_batches']):.0f}", f"{r['first_segment_seconds']:.2f}")
    Console(width=140).print(table)
    if args.from_data_only:
        out = write_result(RESULTS / "planning-from-data.json" if args.out is None else Path(args.out), {
            "command": "python -m benchmarks.planning --from-data-only" + (" --quick" if args.quick else "")
                       + f" --records {args.records}",
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "from_data": from_data,
        })
        print(f"wrote {out}")
        return 0
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
    streamed = [measure_stream(s, j, k, args.window, args.memory) for s, j, k in shapes + ([LONG] if args.long else [])]
    if not args.quick:  # the shape hide_latency is for (see README "Simulator"): whole, then as it runs
        started = time.perf_counter()
        build_schedule(jobs_of(128, 8), 64, "lora", hide_latency=True)
        whole = time.perf_counter() - started
        streamed.append(dict(measure_stream(64, 128, 8, args.window, args.memory, hide_latency=True),
                             whole_seconds=whole))
    table = Table(title=f"making it as it runs (StagePlan, {args.window} micro-batches a segment, stage 0's actions)")
    for name in ["stages", "jobs", "steps/job", "hide_latency", "segments", "first segment s", "every action s"] + (
            ["peak MiB"] if args.memory else []):
        table.add_column(name, justify="right")
    for r in streamed:
        cells = [str(r["stages"]), str(r["jobs"]), str(r["steps"]), "yes" if r["hide_latency"] else "",
                 f"{r['segments']:,}",
                 f"{r['first_segment_seconds']:.3f}", f"{r['seconds']:.2f}"]
        if args.memory:
            cells.append(f"{r['peak_bytes'] / 2**20:.1f}")
        table.add_row(*cells)
    Console(width=140).print(table)
    grouping = grouping_table(args.quick)
    out = write_result(RESULTS / "planning.json" if args.out is None else Path(args.out), {
        "command": ("python -m benchmarks.planning" + (" --quick" if args.quick else "")
                    + (" --memory" if args.memory else "") + (" --long" if args.long else "")
                    + f" --window {args.window}"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "streamed": streamed,
        "grouping": grouping,
        "from_data": from_data,
    })
    print(f"wrote {out}")
    return 0


def grouping_table(quick: bool) -> list[dict]:
    grouping = [measure_grouping(s, j, k) for s, j, k in (QUICK_GROUPING if quick else GROUPING)]
    table = Table(title="a plan's start: grouping jobs of unequal lengths into streams (varied_jobs)")
    for name in ["stages", "jobs", "steps/job", "streams", "group_jobs s", "choose_streams s",
                 "first segment under a budget s"]:
        table.add_column(name, justify="right")
    for r in grouping:
        table.add_row(str(r["stages"]), str(r["jobs"]), str(r["steps"]), str(r["streams"]),
                      f"{r['group_jobs_seconds']:.2f}", f"{r['choose_streams_seconds']:.2f}",
                      f"{r['budget_first_segment_seconds']:.2f}")
    Console(width=140).print(table)
    return grouping


if __name__ == "__main__":
    raise SystemExit(main())
