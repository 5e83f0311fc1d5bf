"""The simulator calibrated on real runs: costs fitted to short runs' timed pieces, then predictions.

`benchmarks.run` trains a short version of its workload (the same model and jobs, half
the steps, odd jobs with micro-batches twice as large, so that the fit spans the sizes fusion
forms; `1f1b`) just before the first method each calibration predicts, on the scenario's own
ranks and links, so every
action runs as it does in the measured runs: both cores busy, the probe sampling, the real
transport, step records and checkpoint writes. `fit_cost` reads that run's trace (each action's
compute time, waits for peers excluded) and fits, per stage:
- F and B: seconds = overhead + per-token x padded tokens (least squares; one overhead per stage,
  the mean of the two intercepts);
- S: the mean of the steps that are not a job's last, and the mean of the last ones (those write
  the job's final checkpoint);
- the time outside any action within the training window (start-up and the end of the run), from
  the stages' `wall_s` minus the trace's span.
The link (bandwidth, latency) is the scenario's stated rate, not fitted. What each job beyond the
first adds to a fused micro-batch's F and B (its adapters' own small kernels: 4-12 ms per F + B on
this CPU, 3-8% of a fused action) cannot come from a calibration that fuses nothing: it is read
from the measured run's own start-up fusion probe (`fused_job_overhead`), which times, before the
training window, one job's two micro-batches as one against two jobs' fused at like tokens, in
interleaved rounds. `predict` then replays the exact action lists of each of our methods' full runs
(`mlora_pp.sim.simulate`). The external
baselines are fitted to their own short runs (`fit_baseline`, `predict_baseline`; see
`BaselineFit`). The calibration runs are separate runs with other step or job counts, so no
measured makespan (nor any timing from a run's training window) feeds its own prediction.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlora_pp.data import row_lengths
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
    """Fit a `CostModel` to the trace events (`mlora_pp.trace.write_trace`) of a run of `schedule`."""
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


def predict(schedule: Schedule, fit: Fit, fabric: Fabric | None = None,
            fused_job_overhead: tuple[float, ...] | None = None) -> Prediction:
    """Replay `schedule` under the fitted costs (on `fabric`'s link if given; with what each extra
    job of a fused micro-batch adds to its F and B, per stage, if given): its makespan plus the time
    outside actions. A job's last S costs the fitted final-step time."""
    cost = fit.cost if fabric is None else replace(fit.cost, link_latency=fabric.latency,
                                                  link_bandwidth=fabric.bandwidth)
    if fused_job_overhead is not None:
        cost = replace(cost, fused_job_overhead=fused_job_overhead)
    timeline = simulate(schedule, cost, final_step_seconds=fit.final_step_seconds)
    return Prediction(timeline.makespan + fit.outside_s, timeline.bubble)


def _prepared(config: Path, ranks: int) -> tuple:
    """The run config and the jobs (tokenized rows, step plans) the launcher prepares for `config`."""
    from mlora_pp.config import load_config
    from mlora_pp.preflight import check_inputs
    from mlora_pp.training import prepare_jobs

    cfg = load_config(config)
    return cfg, prepare_jobs(cfg, check_inputs(cfg, 0, ranks).tokenizer)


def prepared_jobs(config: Path, ranks: int) -> dict:
    """The jobs the launcher prepares for `config` on `ranks` ranks."""
    return _prepared(config, ranks)[1]


def run_record(out: Path) -> dict:
    """The `event: run` record of a finished run's metrics.jsonl under its output directory `out`."""
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip() and (record := json.loads(line)).get("event") == "run":
            return record
    raise ValueError(f"{out / 'metrics.jsonl'} has no run record")


def fused_job_overhead(out: Path) -> tuple[float, ...] | None:
    """Per stage, seconds each job beyond the first adds to a fused micro-batch's F and B, from the
    run's own start-up fusion probe (timed before its training window, interleaved rounds: one
    job's two micro-batches as one against two jobs' fused, at like tokens; half on F, half on B).
    None when the run did not probe (no fusion to choose) or its probe had no lone time."""
    from mlora_pp.profiling import FusionProfile

    probes = sorted(run_record(out).get("fusion_probe") or [], key=lambda p: p["stage"])
    if not probes or any(p.get("lone_s") is None for p in probes):
        return None
    return tuple(FusionProfile(**{**p, "tokens": tuple(p["tokens"])}).job_overhead() / 2 for p in probes)


def schedule_of(config: Path, ranks: int, out: Path | None = None) -> Schedule:
    """The action lists the launcher builds for `config` on `ranks` stages (a fresh run, no budget).
    With `out`, the finished run's output directory, the lora streams it chose (recorded in its
    metrics.jsonl: `pipeline.streams: null` picks them from a probe at start-up) are used."""
    cfg, jobs = _prepared(config, ranks)
    streams, hide = cfg.pipeline.streams, cfg.pipeline.hide_latency is True
    if out is not None:
        run = run_record(out)
        streams, hide = run.get("streams", streams), run.get("hide_latency", hide)
    return build_schedule([j.job_steps() for j in jobs.values()], ranks, cfg.pipeline.schedule, cfg.pipeline.fuse,
                          hide_latency=hide, streams=streams)


def fit_run(out: Path, config: Path, ranks: int, fabric: Fabric, activation_bytes_per_token: float) -> Fit:
    """`fit_cost` on the launcher's output directory `out` of a finished run of `config`."""
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    walls = [r["wall_s"] for r in records if r.get("event") == "stage"]
    return fit_cost(events, schedule_of(config, ranks, out), walls, fabric, activation_bytes_per_token)


# ------------------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class BaselineFit:
    """Costs of an external baseline, fitted to its calibration run's timed pieces
    (`benchmarks.baselines` RankReport.timings).

    torch-1f1b: per-stage F and B chunk lines and S, replayed by the simulator on a `1f1b` schedule
    of torch's shapes (every micro-batch of a step padded to the step's longest row). fsdp2 and peft:
    one line per micro-batch (forward + backward; for FSDP2 the intercept holds its all-gathers
    of the frozen weights and reduce-scatters, the slope its compute), a step on the data-parallel
    ranks lasting as long as its slowest rank's micro-batches, plus S. The lines are fitted to the
    steps after each job's first `warm_steps` (1; FSDP2's rounds stay slow for about 4); `warmup_s`
    is those steps' excess over them (lazy initialisation, a fresh model's allocations), once per
    job, from the jobs after the first; the first job's excess beyond that (the process's own
    warm-up) is `first_job_s`, once per run. torch-1f1b's `setup` is a line over micro-batch tokens
    of the lazy set-up each new stage/schedule pair does before its first chunk (one pair per job and
    padded length: P2P warm-up and shape inference, which runs the stage; logged as "I"), the
    slowest rank's per pair, fitted without the run's first (one-off process warm-up). Its slope
    matters: the calibration's jobs with larger micro-batches pay about twice the set-up of the
    full run's. `per_unit_s` is the rest of the calibration run's measured time, per optimizer step
    (fsdp2, peft) or per stage/schedule pair (torch-1f1b), added to every prediction."""

    method: str
    stage_cost: CostModel | None
    micro_batch: tuple[float, float] | None  # (seconds per micro-batch, per padded token)
    step_seconds: float
    warmup_s: float
    per_unit_s: float
    setup: tuple[float, float] | None = None  # torch-1f1b: (seconds per pair, per micro-batch token)
    warm_steps: int = 1
    """Steps at the start of each job that `warmup_s` covers (every predicted job must have as many)."""
    first_job_s: float = 0.0
    """What the run's first job's warm-up adds to `warmup_s` (the process's own), once per run."""

    def as_dict(self) -> dict:
        return {"method": self.method, "stage_cost": None if self.stage_cost is None else asdict(self.stage_cost),
                "micro_batch": self.micro_batch, "step_seconds": self.step_seconds, "warmup_s": self.warmup_s,
                "warm_steps": self.warm_steps, "first_job_s": self.first_job_s, "per_unit_s": self.per_unit_s,
                "setup": self.setup}


def _longest(job, ids) -> int:
    lengths = row_lengths(job.examples)
    return max(lengths[i] for i in ids)


def torch_job_steps(jobs: dict) -> list:
    """`JobSteps` with torch-1f1b's shapes: a step is padded to its longest row, so each of its
    micro-batches has rows x that length tokens."""
    from mlora_pp.schedule import JobSteps

    out = []
    for job in jobs.values():
        steps = []
        for plan in job.plans:
            longest = max(_longest(job, ids) for ids in plan.micro_batches)
            steps.append(tuple((len(ids), len(ids) * longest) for ids in plan.micro_batches))
        out.append(JobSteps(job.name, tuple(steps)))
    return out


def torch_pairs(jobs: dict) -> list[int]:
    """The stage/schedule pairs torch-1f1b builds, in run order (per job, per distinct (padded
    length, micro-batches) of its steps), each as its micro-batches' padded tokens."""
    out = []
    for job in jobs.values():
        seen = set()
        for plan in job.plans:
            key = (max(_longest(job, ids) for ids in plan.micro_batches), len(plan.micro_batches))
            if key not in seen:
                seen.add(key)
                out.append(len(plan.micro_batches[0]) * key[0])
    return out


def _units(method: str, jobs: dict) -> int:
    """Optimizer steps, or for torch-1f1b the stage/schedule pairs it builds."""
    if method != "torch-1f1b":
        return sum(len(job.plans) for job in jobs.values())
    return len(torch_pairs(jobs))


def _model_makespan(fit: BaselineFit, jobs: dict, world: int) -> float:
    """The fitted lines' makespan of `jobs` (no warm-up, no per-unit time), with torch-1f1b's set-up."""
    if fit.stage_cost is not None:
        setup = sum(fit.setup[0] + fit.setup[1] * tokens for tokens in torch_pairs(jobs)) if fit.setup else 0.0
        return simulate(build_schedule(torch_job_steps(jobs), world, "1f1b"), fit.stage_cost).makespan + setup
    assert fit.micro_batch is not None
    a, b = fit.micro_batch
    total = 0.0
    for job in jobs.values():
        for plan in job.plans:
            for tokens in _rounds(job, plan, world):
                total += a + b * max(tokens)
            total += fit.step_seconds
    return total


def _rounds(job, plan, world: int) -> list[list[int]]:
    """A data-parallel step's micro-batches in rounds, one per rank each (rank r takes micro-batches
    r, r+W, ...), as padded tokens. The ranks meet in every layer's collectives, so a round lasts
    as long as its largest micro-batch."""
    tokens = [_longest(job, ids) * len(ids) for ids in plan.micro_batches]
    return [tokens[k:k + world] for k in range(0, len(tokens), world)]


def _steps_of(report: dict, jobs: dict) -> list[tuple[int, list[tuple[str, int, float]], float]]:
    """A rank's timed pieces split into its optimizer steps, in run order: (step index within its
    job, the pieces, the S seconds)."""
    order = [s for job in jobs.values() for s in range(len(job.plans))]
    steps, pieces = [], []
    for kind, tokens, seconds in report["timings"]:
        if kind == "I":
            continue
        if kind == "S":
            steps.append((order[len(steps)], pieces, seconds))
            pieces = []
        else:
            pieces.append((kind, tokens, seconds))
    return steps


def fit_baseline(method: str, reports: list[dict], jobs: dict, fabric: Fabric,
                 activation_bytes_per_token: float, warm_steps: int = 1) -> BaselineFit:
    """Fit `method`'s costs to its calibration run (`reports`: result-rank<R>.json of each rank,
    `jobs`: that run's prepared jobs). Each job's first `warm_steps` steps are its warm-up: their
    excess over the lines, summed per job and averaged over the jobs after the first, is
    `warmup_s`, and the first job's beyond that is `first_job_s`; the lines are fitted to the later
    steps (all steps if no job has more)."""
    world = len(reports)
    split = [_steps_of(r, jobs) for r in reports]
    warm_free = any(index >= warm_steps for steps in split for index, _, _ in steps)
    later = [[p for index, pieces, _ in steps if index >= warm_steps or not warm_free for p in pieces]
             for steps in split]
    per_rank_steps = [statistics.fmean([s for _, _, s in steps] or [0.0]) for steps in split]
    step_seconds = statistics.fmean(per_rank_steps)

    def line(kinds: tuple[str, ...], pieces) -> tuple[float, float]:
        return _line([(t, s) for k, t, s in pieces if k in kinds])

    if method == "torch-1f1b":
        lines = [(line(("F",), pieces), line(("B",), pieces)) for pieces in later]
        cost = CostModel(forward_per_token=tuple(f[1] for f, _ in lines),
                         backward_per_token=tuple(b[1] for _, b in lines),
                         action_overhead=tuple((f[0] + b[0]) / 2 for f, b in lines),
                         step_seconds=tuple(per_rank_steps), link_latency=fabric.latency,
                         link_bandwidth=fabric.bandwidth, activation_bytes_per_token=activation_bytes_per_token)
        setups = [[(t, s) for k, t, s in r["timings"] if k == "I"] for r in reports]
        pairs = [max(p, key=lambda ts: ts[1]) for p in zip(*setups)][1:]  # slowest rank's; not the first
        fit = BaselineFit(method, cost, None, step_seconds, 0.0, 0.0, _line(pairs) if pairs else None)

        def excess(k: int) -> float:
            """Step k's chunk time beyond the lines, on its slowest rank."""
            return max(sum(seconds - (cost.forward(rank, tokens) if kind == "F" else cost.backward(rank, tokens))
                           for kind, tokens, seconds in split[rank][k][1]) for rank in range(world))
    else:
        def rounds(k: int) -> list[tuple[int, float]]:
            """Step k's rounds: the largest micro-batch (padded tokens) and the slowest rank's time,
            which includes its waits for the others."""
            return [(max(t for _, t, _ in piece), max(sec for _, _, sec in piece))
                    for piece in zip(*(split[rank][k][1] for rank in range(world)))]

        a, b = _line([p for k, (index, _, _) in enumerate(split[0]) if index >= warm_steps or not warm_free
                      for p in rounds(k)])
        fit = BaselineFit(method, None, (a, b), step_seconds, 0.0, 0.0)

        def excess(k: int) -> float:
            return sum(seconds - (a + b * tokens) for tokens, seconds in rounds(k))
    warming: dict[str, float] = {}  # job -> excess of its first warm_steps steps
    order = [name for name, job in jobs.items() for _ in job.plans]
    for k, (index, _, _) in enumerate(split[0]):
        if index < warm_steps:
            warming[order[k]] = warming.get(order[k], 0.0) + excess(k)
    # the first job also pays the process's own warm-up, once however many jobs a run has
    excesses = list(warming.values()) if warm_free else []
    warmup = statistics.fmean(excesses[1:] or excesses) if excesses else 0.0
    first_job = excesses[0] - warmup if excesses else 0.0
    wall = max(r["wall_s"] for r in reports)
    rest = wall - _model_makespan(fit, jobs, world) - warmup * len(jobs) - first_job
    return replace(fit, warmup_s=warmup, per_unit_s=rest / max(_units(method, jobs), 1), warm_steps=warm_steps,
                   first_job_s=first_job)


def predict_baseline(fit: BaselineFit, jobs: dict, world: int, fabric: Fabric | None = None) -> Prediction:
    """`fit`'s makespan of `jobs` on `world` ranks (on `fabric`'s link if given)."""
    short = [name for name, job in jobs.items() if len(job.plans) < fit.warm_steps]
    if short:
        raise ValueError(f"jobs {short} have fewer steps than the {fit.warm_steps} the fitted warm-up covers")
    if fit.stage_cost is not None and fabric is not None:
        fit = replace(fit, stage_cost=replace(fit.stage_cost, link_latency=fabric.latency,
                                              link_bandwidth=fabric.bandwidth))
    makespan = (_model_makespan(fit, jobs, world) + fit.warmup_s * len(jobs) + (fit.first_job_s if jobs else 0.0)
                + fit.per_unit_s * _units(fit.method, jobs))
    bubble = 0.0
    if fit.stage_cost is not None:
        bubble = simulate(build_schedule(torch_job_steps(jobs), world, "1f1b"), fit.stage_cost).bubble
    return Prediction(makespan, bubble)
