"""One command, one table: the same jobs trained by every method, one method after another.

``python -m benchmarks.run --scenario loopback|two-hosts-1gbit [--quick] [--out FILE]``

Methods, each in fresh processes on the same ranks (2 ranks, one per stage or shard; the machine's
cores split evenly between a method's ranks, so a one-process method gets them all):
- ``lora``: our launcher, `lora` schedule (jobs interleaved; fused into the streams its start-up
  fusion probe picks);
- ``lora-apart``: the same with `pipeline.fuse: false` (each job its own stream), to show what
  fusion is worth;
- ``1f1b``, ``gpipe``: our launcher with those schedules, which run the jobs one after another
  (one launcher invocation, the schedule puts job after job; no fusion);
- ``torch-1f1b``: `torch.distributed.pipelining.Schedule1F1B`, one job after another;
- ``fsdp2``: `fully_shard` per decoder block, frozen base, LoRA trainable, one job after another;
- ``single``: our launcher in one process (world size 1, `1f1b`: one job after another);
- ``peft``: plain peft in one process, one job after another.
The baselines are in `benchmarks.baselines`; every process runs under `benchmarks.probe`, which
measures its peak RSS and peak malloc'd bytes. Reported per method: tokens/s (non-padding tokens
over the makespan), the average job completion time (from the method's start to the job's last
step), the makespan, per-stage utilisation (busy over wall), peak memory per rank and the bytes
each rank sent to the others. Prints a table and writes benchmarks/results/<scenario>.json.

Short calibration runs (half the steps, on the same ranks and links: ours with `1f1b` once per
rank count, each baseline on its own runtime) fit the simulator's costs (`benchmarks.calibration`).
Each runs just before the first method it calibrates, so that the machine's drift (5-10% over
minutes here) separates a prediction from its measurement as little as it can. At the end, the
predicted makespan of every method is printed next to the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.calibration import (
    LOOPBACK, TWO_HOSTS, fit_baseline, fit_run, fused_job_overhead, predict, predict_baseline, prepared_jobs,
    schedule_of,
)
from benchmarks import RESULTS, write_result
from benchmarks.scenarios import SCENARIOS, Scenario, Workspace, prepare

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "benchmarks" / "cluster.sh"
MIB = 2**20


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    ranks: int
    schedule: str | None = None
    """Our launcher's pipeline.schedule; None for a baseline of `benchmarks.baselines`."""
    fuse: bool = True
    """Our launcher's pipeline.fuse (False: each job its own lora stream)."""

    def module_args(self, config: Path, out: Path) -> list[str]:
        if self.schedule is not None:
            return ["launcher", str(config), "--no-live", "--fresh"]
        return ["benchmarks.baselines", self.key, str(config), "--out", str(out)]


METHODS: tuple[Method, ...] = (
    Method("lora", "ours: lora (fused, interleaved)", 2, "lora"),
    Method("lora-apart", "ours: lora, no fusion (each job its own stream)", 2, "lora", fuse=False),
    Method("1f1b", "ours: 1f1b (job after job)", 2, "1f1b"),
    Method("gpipe", "ours: gpipe (job after job)", 2, "gpipe"),
    Method("torch-1f1b", "torch pipelining Schedule1F1B", 2),
    Method("fsdp2", "FSDP2 fully_shard (data parallel)", 2),
    Method("single", "ours, 1 process (job after job)", 1, "1f1b"),
    Method("peft", "peft, 1 process (job after job)", 1),
)


@dataclass
class MethodResult:
    key: str
    label: str
    ranks: int
    tokens: int
    makespan_s: float
    tokens_per_s: float
    avg_jct_s: float
    jct_s: dict[str, float]
    utilization: list[float | None]
    peak_rss_mib: list[float]
    peak_heap_mib: list[float | None]
    sent_mib: list[float]
    first_loss: dict[str, float]
    last_loss: dict[str, float]
    process_s: float
    """Wall time of the whole command (start-up, model load, training, teardown)."""
    threads_per_rank: int = 0
    wire_mib: list[float] | None = None
    """Bytes each host's veth sent (two-hosts scenario only): everything on the wire, headers included."""
    predicted_makespan_s: float | None = None
    """The simulator's prediction, calibrated on the method family's short calibration run."""
    predicted_bubble: float | None = None
    notes: list[str] = field(default_factory=list)


DEFINITIONS: dict[str, str] = {
    "tokens": "non-padding tokens of every optimizer step of every job (prompt and response)",
    "makespan_s": "the longest rank's training window: from its start of training (models built, data "
                  "planned) to its end; a baseline's per-job model set-up is not counted, our launcher's "
                  "final checkpoint write after each job's last step is",
    "tokens_per_s": "tokens / makespan_s",
    "jct_s": "per job: from the method's start of training to the end of the job's last optimizer step "
             "(ours: from trace.json, the end of the job's last S action on any stage)",
    "utilization": "per rank: busy / wall. Ours: compute time of its actions, waits on peers excluded. "
                   "torch-1f1b: time inside PipelineStage.forward_one_chunk/backward_one_chunk plus the "
                   "optimizer. fsdp2: not measured (null). One process: busy = wall",
    "peak_rss_mib": "per rank: the process's resident-set high-water mark (getrusage ru_maxrss), whole process",
    "peak_heap_mib": "per rank: peak of glibc malloc's bytes in use (mallinfo2, sampled every 20 ms): "
                     "every CPU tensor plus the interpreter's malloc'd objects",
    "environment": "every method runs with MKL_DISABLE_FAST_MM=1, as our launcher sets by default: MKL's "
                   "memory manager otherwise keeps every GEMM buffer it has used (about 21 MiB per rank "
                   "for ours, 10 for FSDP2), which is not a property of the method",
    "sent_mib": "per rank: bytes sent to other ranks by the training data path. Ours: activation and "
                "gradient tensors plus their headers, counted in StageTransport. torch-1f1b: activations "
                "and gradients, from their shapes. fsdp2: what a ring algorithm sends for FSDP2's "
                "all-gathers, reduce-scatters and all-reduces (counted by wrapping torch.distributed). "
                "Control traffic (rendezvous, step records, the final adapter gather) is not counted",
    "wire_mib": "two-hosts-1gbit only: tx_bytes of each host's veth over the whole command (everything)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads(method: Method) -> int:
    """Each method gets the machine's cores, split evenly between its ranks (on 2 cores: 1 per rank)."""
    return max(1, (os.cpu_count() or 2) // method.ranks)


def command(method: Method, scenario: Scenario, config: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `method` on the scenario's ranks."""
    probed = ["-m", "benchmarks.probe", str(out), *method.module_args(config, out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS=str(threads(method)), MKL_DISABLE_FAST_MM="1")
    if method.ranks == 1:
        return [sys.executable, *probed], env
    if scenario.hosts == "netns":
        env["PYTHON"] = sys.executable
        env["CLUSTER_STATS"] = str(out / "wire.json")
        return ["bash", str(CLUSTER), *probed], env
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(method.ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *probed], env


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ours(out: Path) -> tuple[list[dict], list[dict], dict[str, float] | None]:
    """Step records, stage records and, from trace.json, when each job's last step ended on any stage."""
    records = _read_jsonl(out / "out" / "metrics.jsonl")
    steps = [r for r in records if "job" in r and "step" in r and "loss" in r]
    stages = sorted((r for r in records if r.get("event") == "stage"), key=lambda r: r["rank"])
    done: dict[str, float] | None = None
    trace = out / "out" / "trace.json"
    if trace.is_file():
        done = _last_steps(json.loads(trace.read_text()))
    return steps, stages, done


def _last_steps(trace: dict) -> dict[str, float] | None:
    """Job -> end (s, from the trace's origin) of its last optimizer step on any stage; None if the
    trace has no ``S job:step`` slices. Rank 0 hears of steps late (step records arrive at the end of
    the run), so the trace, timed on each stage, is the better clock. None too where a stage left
    actions out of the file (`pipeline.trace_actions`): a job may have finished in its middle."""
    stages = trace.get("mlora_pp_stages")
    if isinstance(stages, list) and any(isinstance(s, dict) and s.get("kept") != s.get("actions") for s in stages):
        return None
    finished: dict[str, tuple[int, float]] = {}
    try:
        for e in trace.get("traceEvents", []):
            if e.get("ph") != "X" or e.get("cat") != "S":
                continue
            job, step = e["name"].split(" ", 1)[1].rsplit(":", 1)
            end = (e["ts"] + e["dur"]) / 1e6
            if job not in finished or (int(step), end) > finished[job]:
                finished[job] = (int(step), end)
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    return {job: end for job, (_, end) in finished.items()} or None


def collect(method: Method, out: Path, process_s: float) -> MethodResult:
    """Read what the method's processes wrote under `out`."""
    probes = sorted((json.loads(p.read_text()) for p in out.glob("probe-rank*.json")), key=lambda r: r["rank"])
    notes: list[str] = []
    if method.schedule is not None:
        steps, stages, done = _ours(out)
        makespan = max(s["wall_s"] for s in stages)
        utilization = [s["utilization"] for s in stages]
        sent = [s.get("bytes_sent", 0) / MIB for s in stages]
        if done is None:
            done = {}
            for r in steps:
                done[r["job"]] = max(done.get(r["job"], 0.0), r["time"])
            notes.append("job completion from metrics.jsonl times (no trace.json)")
        notes.append("bytes: activation and gradient payloads with their headers (StageTransport)")
    else:
        reports = sorted((json.loads(p.read_text()) for p in out.glob("result-rank*.json")), key=lambda r: r["rank"])
        merged: dict[tuple[str, int], dict] = {}
        for report in reports:
            for r in report["steps"]:
                m = merged.setdefault((r["job"], r["step"]), {"job": r["job"], "step": r["step"], "tokens": 0,
                                                             "loss": 0.0, "time": 0.0})
                m["tokens"] += r["tokens"]
                m["loss"] += r["loss"] or 0.0
                m["time"] = max(m["time"], r["time"])
        steps = list(merged.values())
        makespan = max(r["wall_s"] for r in reports)
        utilization = [r["busy_s"] / r["wall_s"] if r["busy_s"] is not None else None for r in reports]
        sent = [r["bytes_sent"] / MIB for r in reports]
        done = {}
        for r in steps:
            done[r["job"]] = max(done.get(r["job"], 0.0), r["time"])
        if reports and reports[0]["bytes_note"]:
            notes.append(f"bytes: {reports[0]['bytes_note']}")
    tokens = sum(r["tokens"] for r in steps)
    by_job: dict[str, list[dict]] = {}
    for r in sorted(steps, key=lambda r: r["step"]):
        by_job.setdefault(r["job"], []).append(r)
    wire = None
    if (out / "wire.json").is_file():
        wire = [v / MIB for v in json.loads((out / "wire.json").read_text())["tx_bytes"]]
    return MethodResult(
        key=method.key, label=method.label, ranks=method.ranks, tokens=tokens, makespan_s=makespan,
        tokens_per_s=tokens / makespan, avg_jct_s=sum(done.values()) / max(len(done), 1), jct_s=done,
        utilization=utilization, peak_rss_mib=[p["peak_rss_bytes"] / MIB for p in probes],
        peak_heap_mib=[p["peak_heap_bytes"] / MIB if p["peak_heap_bytes"] is not None else None for p in probes],
        sent_mib=sent, first_loss={j: rs[0]["loss"] for j, rs in by_job.items()},
        last_loss={j: rs[-1]["loss"] for j, rs in by_job.items()}, process_s=process_s, wire_mib=wire, notes=notes,
    )


def run_method(method: Method, scenario: Scenario, workspace: Workspace, timeout_s: float) -> MethodResult:
    out = workspace.root / method.key
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = workspace.config(method.key, method.schedule or "1f1b", fuse=method.fuse)
    cmd, env = command(method, scenario, config, out)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM first: cluster.sh then stops its agents and removes its namespaces
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise SystemExit(f"{method.key} ran past {timeout_s:.0f}s and was stopped:\n{stderr[-3000:]}") from None
    elapsed = time.perf_counter() - start
    (out / "stdout.txt").write_text(stdout)
    (out / "stderr.txt").write_text(stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{method.key} failed (exit {proc.returncode}):\n{stdout[-1500:]}\n{stderr[-3000:]}")
    result = collect(method, out, elapsed)
    result.threads_per_rank = threads(method)
    return result


# ------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Target:
    what: str
    ours: str
    other: str
    measure: str  # "tokens_per_s" (ours / other at least `ratio`) or "memory" (ours / other at most `ratio`)
    ratio: float


TARGETS: dict[str, tuple[Target, ...]] = {
    "two-hosts-1gbit": (
        Target("tokens/s at least 2.0x FSDP2's", "lora", "fsdp2", "tokens_per_s", 2.0),
        Target("tokens/s at least 1.5x torch Schedule1F1B's", "lora", "torch-1f1b", "tokens_per_s", 1.5),
        Target("peak RSS per rank at most 0.7x FSDP2's", "lora", "fsdp2", "peak_rss_mib", 0.7),
        Target("peak heap per rank at most 0.7x FSDP2's", "lora", "fsdp2", "peak_heap_mib", 0.7),
    ),
    "loopback": (
        Target("tokens/s at least 1.1x FSDP2's", "lora", "fsdp2", "tokens_per_s", 1.1),
        Target("peak RSS per rank at most 0.7x FSDP2's", "lora", "fsdp2", "peak_rss_mib", 0.7),
        Target("peak heap per rank at most 0.7x FSDP2's", "lora", "fsdp2", "peak_heap_mib", 0.7),
    ),
}


def check_targets(scenario: str, results: dict[str, MethodResult]) -> list[dict]:
    checks = []
    for t in TARGETS.get(scenario, ()):
        if t.ours not in results or t.other not in results:
            continue
        ours, other = results[t.ours], results[t.other]
        if t.measure == "tokens_per_s":
            ratio = ours.tokens_per_s / other.tokens_per_s
            ok = ratio >= t.ratio
        else:
            mine = max(v for v in getattr(ours, t.measure) if v is not None)
            theirs = max(v for v in getattr(other, t.measure) if v is not None)
            ratio = mine / theirs
            ok = ratio <= t.ratio
        checks.append({"target": f"ours {t.what}", "ratio": ratio, "pass": ok})
    return checks


def consistency(results: dict[str, MethodResult]) -> list[dict]:
    """Every method trained the same tokens, and the first step (LoRA B = 0: the base model's loss) agrees."""
    tokens = {r.tokens for r in results.values()}
    checks = [{"check": "same non-padding tokens in every method", "values": sorted(tokens), "pass": len(tokens) == 1}]
    first = [loss for r in results.values() for loss in r.first_loss.values()]
    jobs = {j for r in results.values() for j in r.first_loss}
    worst = 0.0
    for job in jobs:
        values = [r.first_loss[job] for r in results.values() if job in r.first_loss]
        worst = max(worst, (max(values) - min(values)) / abs(min(values)))
    checks.append({"check": "first-step loss agrees across methods (relative spread)", "values": [worst],
                   "pass": bool(first) and worst < 1e-4})
    return checks


def family(method: Method) -> str:
    """The calibration that predicts `method`: ours once per rank count, each baseline its own."""
    return f"ours-{method.ranks}" if method.schedule is not None else method.key


def calibration_workspace(workspace: Workspace, method: Method) -> Workspace:
    """The short workload `method`'s calibration run trains, odd jobs with micro-batches twice as
    large (so that the fit spans the sizes fusion forms): half the steps; for FSDP2 half the jobs
    with every step instead, because its rounds stay slow for about the first 4 steps of each job
    (a fresh model's allocations), so a run of half the steps never shows the steady rounds that
    most of the measured run's steps are."""
    workload = workspace.workload
    if method.key == "fsdp2":
        return prepare(workspace.root / "calibration-fsdp2", replace(workload, jobs=max(1, workload.jobs // 2)),
                       mixed_micro=True)
    return prepare(workspace.root / "calibration", replace(workload, steps=max(1, workload.steps // 2)),
                   mixed_micro=True)


FSDP2_WARM_STEPS = 4
"""Steps at the start of each FSDP2 job counted as its warm-up (see `calibration_workspace`)."""


def calibrate(method: Method, scenario: Scenario, short: Workspace, timeout_s: float) -> dict:
    """Fitted costs of `method`'s family (`family`), from its short run (`short`, from
    `calibration_workspace`) on the scenario's own ranks and links: ours with `1f1b`, a baseline
    on its own runtime."""
    fabric = TWO_HOSTS if scenario.hosts == "netns" else LOOPBACK
    act, key = short.workload.model.hidden * 4, family(method)
    if method.schedule is not None:
        method = Method(f"calibrate-{method.ranks}", f"calibration run, {method.ranks} rank(s)", method.ranks, "1f1b")
    result = run_method(method, scenario, short, timeout_s)
    config, out = short.root / f"{method.key}.yaml", short.root / method.key
    if method.schedule is not None:
        fit = fit_run(out / "out", config, method.ranks, fabric, act)
    else:
        reports = [json.loads(p.read_text()) for p in sorted(out.glob("result-rank*.json"))]
        warm = min(FSDP2_WARM_STEPS, max(1, short.workload.steps // 2)) if method.key == "fsdp2" else 1
        fit = fit_baseline(method.key, reports, prepared_jobs(config, method.ranks), fabric, act, warm_steps=warm)
    print(f"calibration run of {key}: {result.makespan_s:.2f}s", flush=True)
    return {"fit": fit, "makespan_s": result.makespan_s, "steps_per_job": short.workload.steps,
            "jobs": short.workload.jobs}


def add_predictions(results: dict[str, MethodResult], workspace: Workspace, fits: dict[str, dict]) -> list[dict]:
    """Predict each method's makespan (ours: the launcher's own action lists for its config) and
    check it is within 10% of the measured one."""
    checks = []
    for method in METHODS:
        r = results.get(method.key)
        key = family(method)
        if r is None or key not in fits:
            continue
        config, fit = workspace.root / f"{method.key}.yaml", fits[key]["fit"]
        if method.schedule is not None:
            out = workspace.root / method.key / "out"
            p = predict(schedule_of(config, method.ranks, out), fit, fused_job_overhead=fused_job_overhead(out))
        else:
            p = predict_baseline(fit, prepared_jobs(config, method.ranks), method.ranks)
        r.predicted_makespan_s, r.predicted_bubble = p.makespan_s, p.bubble
        ratio = p.makespan_s / r.makespan_s
        checks.append({"target": f"simulator predicts {method.key}'s makespan within 10%", "ratio": ratio,
                       "pass": abs(ratio - 1) <= 0.10})
    return checks


def print_predictions(results: dict[str, MethodResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="simulator, calibrated on the calibration runs: predicted vs measured makespan")
    for i, col in enumerate(["method", "predicted s", "measured s", "error", "predicted bubble", "utilization"]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in results.values():
        if r.predicted_makespan_s is None:
            continue
        table.add_row(r.label, f"{r.predicted_makespan_s:.2f}", f"{r.makespan_s:.2f}",
                      f"{r.predicted_makespan_s / r.makespan_s - 1:+.1%}", f"{r.predicted_bubble:.1%}",
                      _cells([u * 100 if u is not None else None for u in r.utilization], ".0f") + " %")
    Console(width=200).print(table)


def _cells(values: list[float | None], fmt: str) -> str:
    return " / ".join("n/a" if v is None else format(v, fmt) for v in values)


def print_table(title: str, results: dict[str, MethodResult], wire: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    ours = results.get("lora")
    table = Table(title=title)
    columns = ["method", "tokens/s", "lora / this", "avg JCT s", "makespan s", "util per stage", "peak RSS MiB",
               "peak heap MiB", "sent MiB"] + (["wire MiB"] if wire else [])
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in results.values():
        ratio = f"{ours.tokens_per_s / r.tokens_per_s:.2f}x" if ours is not None else "-"
        row = [r.label, f"{r.tokens_per_s:,.0f}", ratio, f"{r.avg_jct_s:.2f}", f"{r.makespan_s:.2f}",
               _cells([u * 100 if u is not None else None for u in r.utilization], ".0f") + (
                   " %" if any(u is not None for u in r.utilization) else ""),
               _cells(r.peak_rss_mib, ".0f"), _cells(r.peak_heap_mib, ".0f"), _cells(r.sent_mib, ".1f")]
        if wire:
            row.append(_cells(r.wire_mib or [None], ".1f"))
        table.add_row(*row)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/<scenario>[-quick].json)")
    parser.add_argument("--methods", default=",".join(m.key for m in METHODS),
                        help="comma-separated subset of " + ",".join(m.key for m in METHODS))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the workspace here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    chosen = [m for m in METHODS if m.key in args.methods.split(",")]
    unknown = set(args.methods.split(",")) - {m.key for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    if scenario.hosts == "netns":
        probe = subprocess.run(["bash", str(CLUSTER), "--check"], capture_output=True, text=True)
        if probe.returncode != 0:
            print(probe.stderr.strip() or probe.stdout.strip(), file=sys.stderr)
            return 1
    workload = scenario.workload(args.quick)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = args.workdir or Path(tmp)
        workspace = prepare(root, workload)
        fits: dict[str, dict] = {}
        shorts: dict[bool, Workspace] = {}  # the calibration workspaces, made once: FSDP2's, the others'

        def short(method: Method) -> Workspace:
            if (method.key == "fsdp2") not in shorts:
                shorts[method.key == "fsdp2"] = calibration_workspace(workspace, method)
            return shorts[method.key == "fsdp2"]

        results: dict[str, MethodResult] = {}
        for method in chosen:
            if family(method) not in fits:
                fits[family(method)] = calibrate(method, scenario, short(method), args.timeout)
            results[method.key] = run_method(method, scenario, workspace, args.timeout)
            r = results[method.key]
            print(f"{method.key:10s} {r.tokens_per_s:8.0f} tokens/s  makespan {r.makespan_s:6.2f}s  "
                  f"avg JCT {r.avg_jct_s:6.2f}s  ({r.process_s:.0f}s in all)", flush=True)
        predicted = add_predictions(results, workspace, fits)
    total_s = time.perf_counter() - started
    checks = check_targets(scenario.name, results) + predicted
    sanity = consistency(results)
    title = (f"{scenario.name}{' --quick' if args.quick else ''}: {scenario.description}; "
             f"{workload.model.describe()}; {workload.describe()}")
    print_table(title, results, wire=scenario.hosts == "netns")
    print_predictions(results)
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['target']}: {c['ratio']:.2f}x")
    for c in sanity:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['values']}")
    result = {
        "command": "python -m benchmarks.run --scenario " + scenario.name + (" --quick" if args.quick else ""),
        "scenario": scenario.name, "description": scenario.description, "quick": args.quick,
        "model": asdict(workload.model), "workload": {k: v for k, v in asdict(workload).items() if k != "model"},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "total_s": total_s,
        "definitions": DEFINITIONS,
        "methods": {k: asdict(r) for k, r in results.items()},
        "calibration": {key: {"jobs": f["jobs"], "steps_per_job": f["steps_per_job"], "makespan_s": f["makespan_s"],
                              **f["fit"].as_dict()}
                        for key, f in fits.items()},
        "targets": checks,
        "consistency": sanity,
    }
    out = args.out or RESULTS / f"{scenario.name}{'-quick' if args.quick else ''}.json"
    write_result(out, result)
    print(f"wrote {out} ({total_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
