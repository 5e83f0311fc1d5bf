"""The simulator calibrated on a real run: per-action costs fitted from a short run's trace.json.

`benchmarks.run` first trains a short version of its workload (the same model, jobs and
micro-batches, a quarter of the steps, `1f1b`) on the scenario's own ranks and links, so every
action runs as it does in the measured runs: both cores busy, the probe sampling, the real
transport, step records and checkpoint writes. `fit_cost` reads that run's trace (each action's
compute time, waits for peers excluded) and fits, per stage:
- F and B: seconds = overhead + per-token x padded tokens (least squares; one overhead per stage,
  the mean of the two intercepts);
- S: the mean of the steps that are not a job's last, and the mean of the last ones (those write
  the job's final checkpoint);
- the time outside any action within the training window (start-up and the end of the run), from
  the stages' `wall_s` minus the trace's span.
The link (bandwidth, latency) is the scenario's stated rate, not fitted. `predict` then replays the
exact action lists of each of our methods' full runs (`mlora_pp.sim.simulate`). The calibration
run is a separate run with a different number of steps, so no measured makespan feeds its own
prediction.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlora_pp.schedule import CostModel, Schedule, build_schedule
from mlora_pp.sim import simulate


@dataclass(frozen=True)
class Fabric:
    """A link between adjacent stages, per direction, as stated (not measured)."""

    name: str
    bandwidth: float  # bytes/s
    latency: float  # s


LOOPBACK = Fabric("loopback TCP (assumed)", 1e9, 50e-6)
TWO_HOSTS = Fabric("veth shaped to 1 Gbit/s (tbf)", 125e6, 100e-6)


@dataclass(frozen=True)
class Fit:
    cost: CostModel
    outside_s: float
    """Seconds of the training window outside any action (the longest stage's)."""
    final_step_seconds: tuple[float, ...]
    """Per stage: mean S of a job's last step (it writes the final checkpoint)."""
    samples: dict[str, int]

    def as_dict(self) -> dict:
        return {"cost": asdict(self.cost), "outside_s": self.outside_s,
                "final_step_seconds": list(self.final_step_seconds), "samples": self.samples}


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of seconds over tokens (slope 0 if every x is equal)."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def final_steps(schedule: Schedule) -> dict[str, int]:
    """Job -> the step index of its last S in `schedule`."""
    last: dict[str, int] = {}
    for action in schedule.stages[0]:
        if action.kind == "S":
            last[action.job] = max(last.get(action.job, -1), action.step)
    return last


def fit_cost(events: list[dict], schedule: Schedule, walls: list[float], fabric: Fabric,
             activation_bytes_per_token: float) -> Fit:
    """Fit a `CostModel` to the trace events (`mlora_pp.training.write_trace`) of a run of `schedule`."""
    tokens = {mb.id: mb.tokens for mb in schedule.micro_batches}
    last = final_steps(schedule)
    slices = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("F", "B", "S")]
    if not slices:
        raise ValueError("the calibration run's trace has no actions")
    stages = schedule.num_stages
    forward, backward, overhead, step, final = [], [], [], [], []
    samples = {"F": 0, "B": 0, "S": 0}
    for s in range(stages):
        mine = [e for e in slices if e["tid"] == s]
        by_kind: dict[str, list[tuple[int, float]]] = {"F": [], "B": []}
        steps: tuple[list[float], list[float]] = ([], [])
        for e in mine:
            seconds = e["dur"] / 1e6
            if e["cat"] == "S":
                job, index = e["name"].split(" ", 1)[1].rsplit(":", 1)
                steps[int(index) == last.get(job)].append(seconds)
            else:
                by_kind[e["cat"]].append((tokens[int(e["name"].split()[0][1:])], seconds))
        for kind in samples:
            samples[kind] += len(by_kind[kind]) if kind != "S" else len(mine) - len(by_kind["F"]) - len(by_kind["B"])
        (f0, f1), (b0, b1) = _line(by_kind["F"]), _line(by_kind["B"])
        forward.append(f1)
        backward.append(b1)
        overhead.append((f0 + b0) / 2)
        step.append(statistics.fmean(steps[0]) if steps[0] else statistics.fmean(steps[1]))
        final.append(statistics.fmean(steps[1]) if steps[1] else step[-1])
    span = (max(e["ts"] + e["dur"] for e in events if e.get("ph") == "X")
            - min(e["ts"] for e in events if e.get("ph") == "X")) / 1e6
    cost = CostModel(forward_per_token=tuple(forward), backward_per_token=tuple(backward), step_seconds=tuple(step),
                     action_overhead=tuple(overhead), link_latency=fabric.latency, link_bandwidth=fabric.bandwidth,
                     activation_bytes_per_token=activation_bytes_per_token)
    return Fit(cost, max(0.0, max(walls) - span), tuple(final), samples)


@dataclass(frozen=True)
class Prediction:
    makespan_s: float
    bubble: float


def predict(schedule: Schedule, fit: Fit, fabric: Fabric | None = None) -> Prediction:
    """Replay `schedule` under the fitted costs (on `fabric`'s link if given): its makespan plus
    the time outside actions. A job's last S costs the fitted final-step time."""
    cost = fit.cost if fabric is None else replace(fit.cost, link_latency=fabric.latency,
                                                  link_bandwidth=fabric.bandwidth)
    timeline = simulate(schedule, cost, final_step_seconds=fit.final_step_seconds)
    return Prediction(timeline.makespan + fit.outside_s, timeline.bubble)


def schedule_of(config: Path, ranks: int) -> Schedule:
    """The action lists the launcher builds for `config` on `ranks` stages (a fresh run, no budget)."""
    from mlora_pp.config import load_config
    from mlora_pp.preflight import check_inputs
    from mlora_pp.training import prepare_jobs

    cfg = load_config(config)
    checked = check_inputs(cfg, 0, ranks)
    jobs = prepare_jobs(cfg, checked.tokenizer)
    return build_schedule([j.job_steps() for j in jobs.values()], ranks, cfg.pipeline.schedule, cfg.pipeline.fuse,
                          hide_latency=cfg.pipeline.hide_latency, streams=cfg.pipeline.streams)


def fit_run(out: Path, config: Path, ranks: int, fabric: Fabric, activation_bytes_per_token: float) -> Fit:
    """`fit_cost` on the launcher's output directory `out` of a finished run of `config`."""
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    walls = [r["wall_s"] for r in records if r.get("event") == "stage"]
    return fit_cost(events, schedule_of(config, ranks), walls, fabric, activation_bytes_per_token)
