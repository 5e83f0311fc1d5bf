"""Admission: which jobs run at once (a memory budget), and who goes first (fifo, priority,
shortest-first). Pure schedule properties are checked on the simulator's timeline; the memory
model's fit on exact synthetic data; a 2-stage run under a budget that fits one job at a time
against the same run without a budget."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline import ranks, torchrun
from test_training import JOBS, adapter, assert_adapters_equal, make_raw, make_workspace
from test_checkpoint import assert_same

from mlora_pp.config import LORA_TARGETS, ConfigError, parse_config
from mlora_pp.control import ControlDir
from mlora_pp.memory import (
    MemoryModel, admission_check, bound_above, fit_activation, input_groups, largest_micro, predicted_peak,
)
from mlora_pp.model import read_model_config
from mlora_pp.replan import lora_params
from mlora_pp.schedule import JobSteps, ScheduleError, admission, build_schedule
from mlora_pp.sim import simulate
from mlora_pp.training import load_tokenizer, prepare_jobs, train


def equal_jobs(count: int, steps: int = 3, micros: int = 2) -> list[JobSteps]:
    return [JobSteps(f"j{i}", tuple(((2, 40),) * micros for _ in range(steps))) for i in range(count)]


MIXED = [JobSteps(f"m{i}", tuple(((2, 40),) * 2 for _ in range(n))) for i, n in enumerate([8, 2, 6, 1, 4])]


def intervals(schedule, stage: int) -> dict[str, tuple[float, float]]:
    """Per job, on one stage: start of its first forward to the end of its last optimizer step."""
    timeline = simulate(schedule)
    jobs_of = {mb.id: mb.jobs for mb in schedule.micro_batches}
    spans: dict[str, list[float]] = {}
    for timed in timeline.stages[stage]:
        names = jobs_of[timed.action.micro_batch] if timed.action.kind != "S" else (timed.action.job,)
        for name in names:
            span = spans.setdefault(name, [math.inf, -math.inf])
            span[0] = min(span[0], timed.start)
            if timed.action.kind == "S":
                span[1] = max(span[1], timed.end)
    return {name: (a, b) for name, (a, b) in spans.items()}


def completion(schedule) -> dict[str, float]:
    """When each job's last optimizer step ends on its last stage to finish it."""
    done: dict[str, float] = {}
    for stage in simulate(schedule).stages:
        for timed in stage:
            if timed.action.kind == "S":
                done[timed.action.job] = max(done.get(timed.action.job, 0.0), timed.end)
    return done


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_fifo_without_a_budget_is_the_plain_schedule(stages):
    jobs = equal_jobs(4)
    assert build_schedule(jobs, stages, admission=admission(jobs, "fifo")) == build_schedule(jobs, stages)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("policy", ["fifo", "priority", "shortest-first"])
def test_running_jobs_never_exceed_what_fits_and_none_overtakes(stages, policy):
    jobs = MIXED
    order = admission(jobs, policy, {"m3": 2, "m1": 1}, fits=lambda running: len(running) <= 2)
    schedule = build_schedule(jobs, stages, "lora", admission=order)
    for stage in range(stages):
        spans = intervals(schedule, stage)
        assert set(spans) == {j.name for j in jobs}
        for name, (start, _) in spans.items():  # at any job's start, at most 2 jobs are running
            assert sum(1 for a, b in spans.values() if a <= start < b) <= 2, (stage, name)
    starts = intervals(schedule, 0)
    firsts = [starts[name][0] for name in order.order]  # jobs admitted together start together (fused)
    assert firsts == sorted(firsts)


def test_priority_orders_completion_and_shortest_first_lowers_mean_completion():
    jobs = equal_jobs(4, steps=4)
    for stages in (2, 3, 4):
        done = completion(build_schedule(jobs, stages, admission=admission(jobs, "priority", {"j1": 5, "j3": 3, "j2": 1})))
        assert sorted(done, key=done.get) == ["j1", "j3", "j2", "j0"], stages
    for stages in (2, 3, 4):
        mean = {policy: sum(completion(build_schedule(MIXED, stages, admission=admission(MIXED, policy))).values())
                for policy in ("fifo", "shortest-first")}
        assert mean["shortest-first"] < 0.9 * mean["fifo"], (stages, mean)


@pytest.mark.parametrize("policy", ["gpipe", "1f1b"])
def test_flush_schedules_run_jobs_in_admission_order(policy):
    order = admission(MIXED, "shortest-first")
    assert order.order == ("m3", "m1", "m4", "m2", "m0")
    schedule = build_schedule(MIXED, 2, policy, admission=order)
    seen = []
    for mb in schedule.micro_batches:
        if mb.parts[0].job not in seen:
            seen.append(mb.parts[0].job)
    assert tuple(seen) == order.order


def test_a_job_that_does_not_fit_alone_is_refused():
    jobs = equal_jobs(3)
    with pytest.raises(ScheduleError, match="'j1' does not fit on its own"):
        build_schedule(jobs, 2, admission=admission(jobs, "fifo", fits=lambda running: "j1" not in running))
    with pytest.raises(ScheduleError, match="'j1' does not fit on its own"):
        build_schedule(jobs, 2, "1f1b", admission=admission(jobs, "fifo", fits=lambda running: "j1" not in running))


@pytest.mark.parametrize("under_way", [{"first_step": 1}, {"first_micro": 1}], ids=["resumed", "mid-step"])
@pytest.mark.parametrize("policy", ["lora", "1f1b", "gpipe"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_a_job_under_way_keeps_its_place_before_a_more_urgent_one(stages, under_way, policy):
    """Room for one job at a time, a more urgent job arriving: a job under way before the plan
    (resumed, or mid-step across a change of plan) holds its gradients and AdamW moments whether
    it runs or not, so it runs first; the urgent job starts once it has finished. A job that has
    not started yet is overtaken by the urgent one, as before. The flush schedules, which run one
    job at a time, once ran the urgent one first while the other held its state."""
    steps = tuple(((2, 40),) * 2 for _ in range(3))
    urgent = JobSteps("urgent", steps)
    for old, holds in ((JobSteps("old", steps, **under_way), True), (JobSteps("old", steps), False)):
        jobs = [old, urgent]
        order = admission(jobs, "priority", {"urgent": 5}, fits=lambda running: len(running) <= 1)
        assert order.order == ("urgent", "old") and order.holding == ({"old"} if holds else set())
        schedule = build_schedule(jobs, stages, policy, admission=order)
        for stage in range(stages):
            spans = intervals(schedule, stage)
            first, second = ("old", "urgent") if holds else ("urgent", "old")
            assert spans[first][1] <= spans[second][0], (stage, spans)


def test_predicted_peak_counts_a_job_under_way_from_the_plan_start():
    """On one stage with no budget, the urgent job runs first and the resumed one after it: the
    resumed job's AdamW moments are held while the urgent one runs, so the peak counts both."""
    one_step = (((2, 40),),)
    jobs = [JobSteps("resumed", one_step, first_step=4), JobSteps("urgent", one_step)]
    schedule = build_schedule(jobs, 1, "lora", False, admission=admission(jobs, "priority", {"urgent": 5}))
    assert [mb.jobs for mb in schedule.micro_batches] == [("urgent",), ("resumed",)]
    model = MemoryModel(0, static=1000, per_token=10.0, per_token_length=0.0, job={"resumed": 100, "urgent": 30})
    assert predicted_peak(model, schedule, 0) == 1000 + 100 + 30 + 400
    fresh = [JobSteps("resumed", one_step), jobs[1]]
    schedule = build_schedule(fresh, 1, "lora", False, admission=admission(fresh, "priority", {"urgent": 5}))
    assert predicted_peak(model, schedule, 0) == 1000 + 100 + 400  # not started: counted from its first forward


def test_activation_fit_recovers_exact_coefficients_and_stays_non_negative():
    samples = [(t, l, int(3000 * t + 7 * t * l)) for t, l in [(64, 16), (128, 64), (96, 24), (256, 32)]]
    b1, b2 = fit_activation(samples)
    assert b1 == pytest.approx(3000, rel=1e-6) and b2 == pytest.approx(7, rel=1e-6)
    same_length = [(t, 32, 5000 * t) for t in (64, 128, 256)]  # L never varies: b2 cannot be told apart
    assert fit_activation(same_length) == pytest.approx((5000, 0.0))
    falling = [(64, 16, 10_000), (128, 64, 9_000)]  # bytes falling with T·L: no negative coefficient
    b1, b2 = fit_activation(falling)
    assert b1 >= 0 and b2 >= 0


def test_a_micro_batch_is_charged_its_own_jobs_lora_and_admission_the_costliest():
    """LoRA keeps x·Aᵀ per token of a job's rows (c[j]): a micro-batch of known parts costs its
    parts' c; admission, which knows only the largest micro-batch's size, charges every row the
    costliest running job's. It keeps the projections' inputs whole, once per micro-batch for each
    input some part's job reads. The fit's bound lifts the line above every probe."""
    one = (((2, 40),),)  # one step of one micro-batch: 2 rows of 20 tokens
    jobs = [JobSteps("cheap", one), JobSteps("dear", one)]
    model = MemoryModel(0, static=1000, per_token=10.0, per_token_length=0.0, job={"cheap": 100, "dear": 100},
                        lora_per_token={"cheap": 1.0, "dear": 3.0})
    schedule = build_schedule(jobs, 1, "lora", False)
    costs = {mb.jobs: model.micro_bytes(mb) for mb in schedule.micro_batches}
    assert costs == {("cheap",): 40 * 10 + 2 * 20 * 1.0, ("dear",): 40 * 10 + 2 * 20 * 3.0}
    assert model.peak({"cheap"}, 2, 40, 20) == 1000 + 100 + 2 * (400 + 40 * 1.0)
    assert model.peak({"cheap", "dear"}, 2, 40, 20) == 1000 + 200 + 2 * (400 + 40 * 3.0)
    # the inputs LoRA keeps whole: once per micro-batch for every input some part's job reads
    wide = dataclasses.replace(model, input_per_token={"attention": 5.0, "mlp": 7.0, "down_proj": 11.0},
                               job_targets={"cheap": ("q_proj",), "dear": ("v_proj", "down_proj")})
    assert {mb.jobs: wide.micro_bytes(mb) for mb in schedule.micro_batches} == {
        ("cheap",): costs[("cheap",)] + 40 * 5.0, ("dear",): costs[("dear",)] + 40 * (5.0 + 11.0)}
    assert wide.peak({"cheap", "dear"}, 2, 40, 20) == 1000 + 200 + 2 * (400 + 40 * (3.0 + 5.0 + 11.0))
    assert input_groups(["q_proj", "v_proj", "gate_proj", "up_proj"]) == ("attention", "mlp")
    samples = [(100, 10, 1000), (200, 10, 2600), (300, 10, 3000)]  # least squares: 10.5/token, under the middle one
    b1, b2 = bound_above(samples, *fit_activation(samples))
    assert all(b1 * t + b2 * t * l >= b * (1 - 1e-12) for t, l, b in samples)  # to rounding
    assert max(b / (b1 * t + b2 * t * l) for t, l, b in samples) == pytest.approx(1.0)


def test_admission_check_and_predicted_peak_follow_the_model():
    jobs = equal_jobs(3)
    model = MemoryModel(0, static=1000, per_token=10.0, per_token_length=0.0, job={"j0": 100, "j1": 100, "j2": 100})
    assert largest_micro(jobs, {"j0", "j1"}, 2, "lora", True) == (40, 20)  # 3 jobs on 2 stages: not fused
    # 2 in flight of 40 tokens: 1000 + 100 per job + 2 * 400
    two_stages = [model, MemoryModel(1, 1000, 10.0, 0.0, model.job)]
    fits = admission_check(two_stages, jobs, budget=1000 + 200 + 800, in_flight=2, policy="lora", fuse=True)
    assert fits(frozenset({"j0", "j1"})) and not fits(frozenset({"j0", "j1", "j2"}))
    schedule = build_schedule(jobs, 2, max_in_flight=2, admission=admission(jobs, "fifo", fits=fits))
    for stage in range(2):
        assert predicted_peak(model, schedule, stage) <= 2000


def test_jobs_fused_into_one_stream_are_admitted_by_their_fused_micro_batches():
    """Fused, two running jobs form micro-batches of both jobs' rows: a budget that holds two jobs'
    state and one job's activations admits them together apart, one at a time fused, and the
    fused schedule stays within it."""
    jobs = equal_jobs(2)
    model = MemoryModel(0, static=1000, per_token=10.0, per_token_length=0.0, job={"j0": 100, "j1": 100})
    both = frozenset({"j0", "j1"})
    assert largest_micro(jobs, both, 2, "lora", True, streams=2) == (40, 20)
    assert largest_micro(jobs, both, 2, "lora", True, streams=1) == (80, 20)
    budget = 1000 + 200 + 2 * 400
    apart = admission_check([model, model], jobs, budget, in_flight=2, policy="lora", fuse=True, streams=2)
    fused = admission_check([model, model], jobs, budget, in_flight=2, policy="lora", fuse=True, streams=1)
    assert apart(both) and not fused(both) and fused(frozenset({"j0"}))
    schedule = build_schedule(jobs, 2, max_in_flight=2, streams=1, admission=admission(jobs, "fifo", fits=fused))
    for stage in range(2):
        assert predicted_peak(model, schedule, stage) <= budget


def test_largest_micro_bounds_every_micro_batch_the_plan_forms():
    """`largest_micro` (the streams and each job's sizes read once, `MicroBound`) against the
    micro-batches a plan of the running jobs forms: none is larger, in tokens or in row length,
    and a job alone is bounded by its own largest micro-batch's rows at its longest row."""
    import random

    rng = random.Random(11)
    for _ in range(40):
        jobs = [JobSteps(f"j{i}", tuple(tuple((r, r * rng.randint(5, 40)) for r in [rng.randint(1, 4)] * rng.randint(1, 3))
                                        for _ in range(rng.randint(1, 3))))
                for i in range(rng.randint(1, 9))]
        stages, fuse = rng.randint(1, 3), rng.random() < 0.8
        # one stage without a budget fuses every job of a slot, whatever `streams` says (a budget's
        # admission plans by streams there too)
        streams = rng.choice([None, None, 1, 2]) if stages > 1 else None
        running = {j.name for j in jobs}
        tokens, length = largest_micro(jobs, running, stages, "lora", fuse, streams)
        for mb in build_schedule(jobs, stages, "lora", fuse=fuse, streams=streams).micro_batches:
            assert mb.tokens <= tokens and max(math.ceil(p.tokens / p.rows) for p in mb.parts) <= length
        for j in jobs:
            sizes = [size for micros in j.micro_batches for size in micros]
            longest = max(math.ceil(t / r) for r, t in sizes)
            assert largest_micro(jobs, {j.name}, stages, "lora", fuse, streams) == (max(r for r, _ in sizes) * longest, longest)


# -------------------------------------------------------------------------------- a real run, 2 stages


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("admit"))


BIG_JOBS = [dict(job, rank=64, alpha=64, target_modules=list(LORA_TARGETS)) for job in JOBS]
"""Adapters whose gradients and AdamW state outweigh the activations: admission decides by them."""


def run(workspace, out: str, **pipeline):
    raw = make_raw(workspace, BIG_JOBS, out, **{"schedule": "lora", "timeout_s": 30, **pipeline})
    path = workspace[0] / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = ranks(2, path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (workspace[0] / out / "metrics.jsonl").read_text().splitlines()]
    return proc, records


@pytest.fixture(scope="module")
def free(workspace):
    """The run without a budget, and the memory models it fitted (one per stage)."""
    _, records = run(workspace, "free")
    models = [MemoryModel(**r["model"]) for r in sorted((r for r in records if r.get("event") == "memory"),
                                                         key=lambda r: r["rank"])]
    assert len(models) == 2
    return records, models


def plan(workspace, jobs=BIG_JOBS) -> list:
    cfg = parse_config(make_raw(workspace, jobs, "free", schedule="lora"), "test.yaml")
    return [j.job_steps() for j in prepare_jobs(cfg, load_tokenizer(workspace[1])).values()]


def test_a_budget_for_one_job_at_a_time_finishes_every_job_within_it(workspace, free):
    """The unbudgeted run's fitted models give each job's predicted peak alone; a budget just above
    the largest of those admits one job at a time. Every job still finishes, equal to the unbudgeted
    run (rows of different jobs never mix), and every stage's measured peak stays under the budget."""
    _, models = free
    steps = plan(workspace)
    names = [j.name for j in steps]

    def peak(running: set[str]) -> float:
        return max(m.peak(running, 2, *largest_micro(steps, running, 2, "lora", True)) for m in models)

    budget = int(max(peak({name}) for name in names) * 1.02)
    assert all(peak({a, b}) > budget for a in names for b in names if a != b), "the budget must bind"
    _, records = run(workspace, "budget", memory_budget=budget)

    memory = [r for r in records if r.get("event") == "memory"]
    assert len(memory) == 2
    for r in memory:
        assert r["budget_bytes"] == budget
        assert r["predicted_peak_bytes"] <= budget
        assert r["measured_peak_bytes"] <= budget, r
    finished = {r["job"]: r["step"] for r in records if "loss" in r}
    assert finished == {j.name: j.steps for j in steps}
    # one job at a time: rank 0 admits each job after the previous one's last step there
    admitted = [r for r in records if r.get("event") == "admitted"]
    assert [r["job"] for r in admitted] == names
    last_record = {r["job"]: r["time"] for r in records if "loss" in r}
    for before, after in zip(admitted, admitted[1:]):
        assert after["time"] >= last_record[before["job"]] - 1.0, (before, after)  # records are held until then
    assert_same(workspace[0] / "budget", workspace[0] / "free", tol=1e-5)


def test_a_budget_that_fits_only_smaller_micro_batches_cuts_them(workspace, free):
    """Even one micro-batch of 2 rows in flight is over the budget, one of 1 row is not: the jobs run
    1-row micro-batches (the same rows per step, and dropout keyed by a row's place in its step), so
    the adapters equal the unbudgeted run's up to summation order, within the budget."""
    _, models = free
    full, one_row = plan(workspace), plan(workspace, [dict(job, micro_batch_size=1) for job in BIG_JOBS])

    def need(steps, name: str) -> float:
        return max(m.peak({name}, 1, *largest_micro(steps, {name}, 2, "lora", True)) for m in models)

    budget = int(max(need(one_row, j.name) for j in one_row) * 1.01)
    assert any(need(full, j.name) > budget for j in full), "the budget must need smaller micro-batches"
    proc, records = run(workspace, "cut", memory_budget=budget)
    assert "memory: job 'alpha' runs micro-batches of at most 1 row instead of 2" in proc.stdout
    memory = [r for r in records if r.get("event") == "memory"]
    assert len(memory) == 2 and all(r["measured_peak_bytes"] <= budget and r["in_flight"] == 1 for r in memory)
    assert {r["job"]: r["step"] for r in records if "loss" in r} == {j.name: j.steps for j in full}
    for job in BIG_JOBS:  # fp32 summation order only (the project's tolerance for that, see test_training)
        assert_adapters_equal(adapter(workspace[0] / "cut", job["name"]), adapter(workspace[0] / "free", job["name"]))


@pytest.mark.parametrize("on", [True, False])
def test_hide_latency_auto_hides_it_only_when_every_job_fits_with_the_wider_windows(workspace, free, on):
    """`hide_latency: auto` under a budget: 2S-1 micro-batches in flight on stage 0 (two fewer per
    stage) when every job fits at once with that many, else the default windows with every job still
    at once (it never costs a job its place). The adapters equal the unbudgeted run's either way."""
    _, models = free
    steps = plan(workspace)
    everyone = frozenset(j.name for j in steps)

    def peak(in_flight: int) -> float:
        return max(m.peak(everyone, in_flight, *largest_micro(steps, everyone, 2, "lora", True)) for m in models)

    assert peak(3) > peak(2) * 1.02, "the wider windows must cost memory"
    budget = int(peak(3) * 1.02) if on else int((peak(2) + peak(3)) / 2)
    proc, records = run(workspace, f"auto-{on}", memory_budget=budget, hide_latency="auto")
    word = "on" if on else "off"
    assert f"memory: hide_latency auto: {word} (every job with 3 micro-batches in flight" in proc.stdout
    memory = [r for r in records if r.get("event") == "memory"]
    assert len(memory) == 2
    for r in memory:
        assert r["hide_latency"] is on and r["in_flight"] == (3 if on else 2), r
        assert r["measured_peak_bytes"] <= budget, r
    run_record = next(r for r in records if r.get("event") == "run")
    assert run_record["hide_latency"] is on
    admitted = [r for r in records if r.get("event") == "admitted"]
    assert len(admitted) == len(steps) and all(r["time"] < 5.0 for r in admitted), admitted  # all at once
    assert_same(workspace[0] / f"auto-{on}", workspace[0] / "free", tol=1e-5)


@pytest.mark.parametrize("value, message", [
    ("auto", "auto needs pipeline.memory_budget"), ("sometimes", "must be true, false or auto")])
def test_hide_latency_is_validated(workspace, value, message):
    with pytest.raises(ConfigError, match=rf"pipeline\.hide_latency: .*{message}"):
        parse_config(make_raw(workspace, JOBS, "x", hide_latency=value), "test.yaml")
    cfg = parse_config(make_raw(workspace, JOBS, "x", hide_latency="auto", memory_budget="1GiB"), "test.yaml")
    assert cfg.pipeline.hide_latency == "auto"


def test_a_budget_no_job_fits_is_refused_before_training(workspace):
    raw = make_raw(workspace, JOBS, "tiny-budget", schedule="lora", timeout_s=30, memory_budget="64KiB")
    path = workspace[0] / "tiny-budget.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = torchrun(2, path)
    assert proc.returncode != 0, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error")]
    # both ranks decide alike; torchrun may stop the second before it prints (test_bad_input checks both)
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, lines
    assert f"{path}: pipeline.memory_budget: job 'beta' alone needs about" in lines[0], lines
    assert "more than the budget of 64.0 KiB" in lines[0], lines
    assert "to fit the budget" not in proc.stdout, proc.stdout  # no job is said to be cut to fit it first
    units = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    sizes = re.findall(r"([\d.]+) (B|KiB|MiB|GiB)\b", lines[0])  # the total, its three parts, the budget
    total, static, job, activations = (float(n) * units[u] for n, u in sizes[:4])
    rounding = sum(0.05 * units[u] for _, u in sizes[:4])  # each printed to 0.1 of its unit
    assert abs(static + job + activations - total) <= rounding, lines[0]  # the parts add up to the whole
    assert not (workspace[0] / "tiny-budget" / "metrics.jsonl").exists()


@pytest.mark.parametrize("value, message", [
    ("12 parsecs", "expected bytes"), (-1, "must be positive"), ("0.5B", "at least 1 byte")])
def test_memory_budget_is_validated(workspace, value, message):
    raw = make_raw(workspace, JOBS, "x", memory_budget=value)
    with pytest.raises(ConfigError, match=rf"pipeline\.memory_budget: .*{message}"):
        parse_config(raw, "test.yaml")
    with pytest.raises(ConfigError, match=r"pipeline\.admission: must be one of fifo, priority, shortest-first"):
        parse_config(make_raw(workspace, JOBS, "x", admission="lifo"), "test.yaml")


def test_a_submitted_job_is_cut_to_fit_the_budget_or_rejected(workspace, capsys):
    """One rank under a budget that the start-up jobs fill: a submitted job that fits only with
    smaller micro-batches runs them, as a start-up job would; one too big even with 1-row
    micro-batches, and one whose weights would leave a running job no room, are rejected (they
    used to end the run on every rank). The run goes on within the budget."""
    start = [dict(job, max_seq_len=64, data=str(workspace[2][job["name"]])) for job in BIG_JOBS[:2]]
    narrow = dict(start[0], name="narrow", rank=4, alpha=4, batch_size=8, micro_batch_size=8)
    huge = dict(start[0], name="huge", rank=1024, alpha=1024)
    wide = dict(start[0], name="wide")
    free = parse_config(make_raw(workspace, BIG_JOBS[:2], "submit-free", schedule="lora"), "test.yaml")
    train(free, progress=False)
    records = [json.loads(line) for line in (free.output_dir / "metrics.jsonl").read_text().splitlines()]
    model = MemoryModel(**next(r for r in records if r.get("event") == "memory")["model"])
    model_config = read_model_config(workspace[1])

    def need(job: dict, micro_batch_size: int | None = None, extra_static: int = 0) -> float:
        """Alone, with its weights and state from the shapes (a start-up job's weights are in static)."""
        job = dict(job, micro_batch_size=micro_batch_size or job["micro_batch_size"])
        cfg = parse_config(dict(make_raw(workspace, [], "x"), jobs=[job]), "test.yaml")
        prepared = list(prepare_jobs(cfg, load_tokenizer(workspace[1])).values())
        steps = [j.job_steps() for j in prepared]
        params = lora_params(model_config, 4, job["rank"], list(job["target_modules"]))
        weights = 0 if job["name"] in model.job else 4 * params
        lora = 4 * len(job["target_modules"]) * job["rank"] * 4  # x·Aᵀ in fp32, per token, 4 layers
        m = MemoryModel(0, model.static + weights + extra_static, model.per_token, model.per_token_length,
                        {job["name"]: 12 * params}, lora_per_token={job["name"]: lora},
                        input_per_token=model.input_per_token, job_targets={job["name"]: tuple(job["target_modules"])},
                        per_length=model.per_length, loss_token_bytes=model.loss_token_bytes,
                        loss_share={job["name"]: prepared[0].loss_share()})
        return m.peak({job["name"]}, 1, *largest_micro(steps, {job["name"]}, 1, "lora", True))

    budget = int(max(need(job) for job in start) * 1.01)
    rows = next(r for r in (8, 4, 2, 1) if need(narrow, r) <= budget)
    assert rows < 8 and need(huge, 1) > budget, "the budget must bind"
    wide_weights = 4 * lora_params(model_config, 4, wide["rank"], list(wide["target_modules"]))
    assert need(wide, 1) <= budget < max(need(job, extra_static=wide_weights) for job in start)
    out = workspace[0] / "submit-budget"
    control = ControlDir(out)
    for job in (narrow, huge, wide):
        control.request("submit", {"job": job})
    cfg = parse_config(make_raw(workspace, BIG_JOBS[:2], "submit-budget", schedule="lora", memory_budget=budget),
                       "test.yaml")
    result = train(cfg, progress=False)
    assert f"memory: job 'narrow' runs micro-batches of at most {rows} row" in capsys.readouterr().out
    assert result.steps == {"alpha": 3, "beta": 2, "narrow": 3}
    outcomes = [json.loads(p.read_text())["outcome"] for p in sorted((out / "control" / "done").glob("*.json"))]
    assert outcomes[0] == "accepted"
    assert outcomes[1].startswith("rejected: memory: job 'huge' alone needs about ") and "1-row" in outcomes[1]
    assert outcomes[2].startswith("rejected: memory: next to job 'wide''s LoRA weights, job '"), outcomes[2]
    memory = next(r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
                  if r.get("event") == "memory")
    assert memory["predicted_peak_bytes"] <= budget and memory["measured_peak_bytes"] <= budget, memory


@pytest.mark.parametrize("preempt", [True, False])
def test_a_submission_that_would_crowd_the_jobs_under_way_pauses_one_or_is_rejected(workspace, capsys, preempt):
    """Two start-up jobs fit the budget together and are under way when a job is submitted whose
    LoRA weights would leave them no room together, though each would still fit alone. By default
    the next plan pauses the later of them in admission order (its moments off the device) until
    the other is done, and both end with the adapters of a run without the submission. With `pipeline.preempt: false`
    they keep their state until they finish, so the submission is rejected. Either way the run
    stays within the budget."""
    start = [dict(job, max_seq_len=64, data=str(workspace[2][job["name"]])) for job in BIG_JOBS[:2]]
    names = {job["name"] for job in start}
    wide = dict(start[0], name="wide")
    free = parse_config(make_raw(workspace, BIG_JOBS[:2], "crowd-free", schedule="lora", fuse=False), "test.yaml")
    train(free, progress=False)
    records = [json.loads(line) for line in (free.output_dir / "metrics.jsonl").read_text().splitlines()]
    model = MemoryModel(**next(r for r in records if r.get("event") == "memory")["model"])
    steps = [j.job_steps() for j in prepare_jobs(free, load_tokenizer(workspace[1])).values()]
    wide_weights = 4 * lora_params(read_model_config(workspace[1]), 4, wide["rank"], list(wide["target_modules"]))

    def need(running: set[str], extra_static: int = 0) -> float:
        m = dataclasses.replace(model, static=model.static + extra_static)
        return m.peak(running, 1, *largest_micro(steps, running, 1, "lora", False))

    budget = int(need(names) + wide_weights / 2)
    assert need(names, wide_weights) > budget, "together, next to wide's weights, they must not fit"
    assert all(need({n}, wide_weights) <= budget for n in names), "alone, each must still fit"
    out = workspace[0] / f"crowd-budget-{preempt}"
    ControlDir(out).request("submit", {"job": wide})
    cfg = parse_config(make_raw(workspace, BIG_JOBS[:2], out.name, schedule="lora", fuse=False,
                                memory_budget=budget, preempt=preempt), "test.yaml")
    capsys.readouterr()
    result = train(cfg, progress=False)
    (outcome,) = [json.loads(p.read_text())["outcome"] for p in sorted((out / "control" / "done").glob("*.json"))]
    if preempt:
        assert outcome == "accepted" and result.steps == {"alpha": 3, "beta": 2, "wide": 3}
        (paused,) = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
                     if r.get("event") == "paused"]
        assert paused["job"] in names and paused["why"] == ("because the jobs under way do not fit "
                                                            "pipeline.memory_budget together")
        assert f"memory: job {paused['job']!r} is paused because" in capsys.readouterr().out
        for name in ("alpha", "beta"):
            assert_adapters_equal(adapter(out, name), adapter(free.output_dir, name))
    else:
        assert result.steps == {"alpha": 3, "beta": 2}
        assert outcome.startswith("rejected: memory: next to job 'wide''s LoRA weights, the jobs under way (alpha, "
                                  "beta) would no longer fit pipeline.memory_budget"), outcome
    memory = next(r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
                  if r.get("event") == "memory")
    assert memory["predicted_peak_bytes"] <= budget and memory["measured_peak_bytes"] <= budget, memory



def _train_on(workspace, raw: dict, stages: int, capsys) -> tuple[str, list[dict]]:
    """Run `raw` on `stages` ranks (one: in this process); (what rank 0 printed, metrics.jsonl records)."""
    out = Path(raw["output_dir"])
    if stages == 1:
        train(parse_config(raw, "test.yaml"), progress=False)
        printed = capsys.readouterr().out
    else:
        path = workspace[0] / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        proc = ranks(stages, path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        printed = proc.stdout
    return printed, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def budget_for_one_job(workspace, free: dict, stages: int, capsys) -> int:
    """Run `free` (two jobs, no budget) and return a budget 2% above the larger job's predicted peak
    alone, from that run's memory models: it holds one job's gradients and AdamW state at a time."""
    _, records = _train_on(workspace, free, stages, capsys)
    models = [MemoryModel(**r["model"]) for r in records if r.get("event") == "memory"]
    assert len(models) == stages
    steps = [j.job_steps() for j in prepare_jobs(parse_config(free, "t.yaml"), load_tokenizer(workspace[1])).values()]
    names = {j.name for j in steps}

    def need(running: set[str]) -> float:
        return max(m.peak(running, stages, *largest_micro(steps, running, stages, "lora", True)) for m in models)

    budget = int(max(need({name}) for name in names) * 1.02)
    assert need(names) > budget, "the budget must hold one job's state at a time"
    return budget


@pytest.mark.parametrize("stages, schedule", [(1, "lora"), (2, "lora"), (1, "1f1b")])
def test_a_more_urgent_submission_pauses_a_job_under_way_which_then_finishes_exactly(workspace, capsys, stages,
                                                                                      schedule):
    """Priority admission under a budget that holds one job's gradients and AdamW state at a time:
    a more urgent job submitted while a less urgent one is under way, in the middle of a step,
    pauses it (that step's gradients dropped, its moments off the device) and runs first, every
    stage deciding alike. The paused job (clipped: its gradient norm is gathered over the stages at
    every step) then goes on from the start of that step and ends with the adapter of a run where
    nothing was paused. Predicted and measured peaks stay within the budget."""
    low = dict(BIG_JOBS[0], max_seq_len=64, data=str(workspace[2]["alpha"]), batch_size=6, micro_batch_size=2,
               max_steps=6, epochs=2, priority=0,  # 3 micro-batches a step: the request lands mid-step
               max_grad_norm=0.5, lr_schedule="cosine", warmup_steps=1)  # its norm is gathered over the stages
    urgent = dict(BIG_JOBS[1], name="urgent", max_seq_len=64, data=str(workspace[2]["beta"]), priority=5)
    pipeline = dict(schedule=schedule, admission="priority", timeout_s=30)
    free = dict(make_raw(workspace, [], f"pause-free-{stages}-{schedule}", **pipeline), jobs=[low, urgent])
    budget = budget_for_one_job(workspace, free, stages, capsys)

    raw = dict(make_raw(workspace, [], f"pause-budget-{stages}-{schedule}", memory_budget=budget, **pipeline),
               jobs=[low])
    ControlDir(Path(raw["output_dir"])).request("submit", {"job": urgent})
    printed, records = _train_on(workspace, raw, stages, capsys)
    assert "memory: job 'alpha' is paused for the more urgent job 'urgent' (priority 5 over 0)" in printed
    paused = next(i for i, r in enumerate(records) if r.get("event") == "paused")
    assert records[paused]["job"] == "alpha"
    assert records[paused]["why"] == "for the more urgent job 'urgent' (priority 5 over 0)"
    done_before = records[paused]["step"]
    assert 0 < done_before < 6, "the request is taken while alpha is under way"
    after = [r["job"] for r in records[paused:] if "loss" in r]
    assert after == ["urgent"] * 2 + ["alpha"] * (6 - done_before), after
    memory = [r for r in records if r.get("event") == "memory"]
    assert len(memory) == stages
    for r in memory:
        assert r["predicted_peak_bytes"] <= budget and r["measured_peak_bytes"] <= budget, r
    for name in ("alpha", "urgent"):
        assert_adapters_equal(adapter(Path(raw["output_dir"]), name), adapter(Path(free["output_dir"]), name))
    if stages == 1:  # pipeline.preempt: false: the urgent job waits for alpha instead
        raw = dict(make_raw(workspace, [], f"pause-off-{schedule}", memory_budget=budget, preempt=False, **pipeline),
                   jobs=[low])
        ControlDir(Path(raw["output_dir"])).request("submit", {"job": urgent})
        printed, records = _train_on(workspace, raw, stages, capsys)
        assert "paused" not in printed and not any(r.get("event") == "paused" for r in records)
        steps_in_order = [r["job"] for r in records if "loss" in r]
        assert steps_in_order == ["alpha"] * 6 + ["urgent"] * 2, steps_in_order
        memory = next(r for r in records if r.get("event") == "memory")
        assert memory["predicted_peak_bytes"] <= budget and memory["measured_peak_bytes"] <= budget, memory


def test_jobs_resumed_under_a_lowered_budget_are_paused_until_they_fit(workspace, capsys, monkeypatch):
    """Two jobs stopped under way (checkpointed after every step) resume under a budget that holds
    one job's state at a time. Both hold their AdamW moments, so both would run at once over the
    budget: the less urgent one is paused at start-up instead, the other runs first, and both end
    with the adapters of an uninterrupted run without a budget, within the budget."""
    from test_checkpoint import Stop, stop_after_actions

    jobs = [dict(BIG_JOBS[0], max_seq_len=64, data=str(workspace[2]["alpha"]), max_steps=4, save_every=1, priority=0),
            dict(BIG_JOBS[1], max_seq_len=64, data=str(workspace[2]["beta"]), max_steps=3, save_every=1, priority=3)]
    pipeline = dict(schedule="lora", admission="priority")
    raw_free = dict(make_raw(workspace, [], "resume-free", **pipeline), jobs=jobs)
    budget = budget_for_one_job(workspace, raw_free, 1, capsys)
    free = parse_config(raw_free, "test.yaml")

    raw = dict(make_raw(workspace, [], "resume-budget", **pipeline), jobs=jobs)
    stop_after_actions(monkeypatch, 9)  # each job has done a step or more, neither has finished
    with pytest.raises(Stop):
        train(parse_config(raw, "test.yaml"), progress=False)
    monkeypatch.undo()
    capsys.readouterr()
    raw["pipeline"]["memory_budget"] = budget
    result = train(parse_config(raw, "test.yaml"), progress=False)
    assert set(result.resumed) == {"alpha", "beta"} and all(0 < n < 3 for n in result.resumed.values()), result.resumed
    printed = capsys.readouterr().out
    assert ("memory: job 'alpha' is paused because the jobs under way do not fit pipeline.memory_budget together; "
            f"it goes on from the start of step {result.resumed['alpha'] + 1}") in printed, printed
    assert "are predicted over the budget together" not in printed
    records = [json.loads(line) for line in (free.output_dir.parent / "resume-budget" / "metrics.jsonl")
               .read_text().splitlines()]
    last_run = max(i for i, r in enumerate(records) if r.get("event") == "run")
    in_order = [r["job"] for r in records[last_run:] if "loss" in r]
    assert in_order == ["beta"] * (3 - result.resumed["beta"]) + ["alpha"] * (4 - result.resumed["alpha"]), in_order
    memory = [r for r in records[last_run:] if r.get("event") == "memory"]
    assert memory and all(r["predicted_peak_bytes"] <= budget and r["measured_peak_bytes"] <= budget for r in memory)
    for name in ("alpha", "beta"):
        assert_adapters_equal(adapter(free.output_dir.parent / "resume-budget", name), adapter(free.output_dir, name))


def test_raising_a_waiting_jobs_priority_mid_run_pauses_the_job_under_way(workspace, capsys):
    """Two equal jobs under a budget for one: beta waits for alpha. `launcher priority` raises
    beta's priority while alpha is under way: at the next plan alpha is paused and beta runs; both
    end with the adapters of a run without a budget. Bad priority requests are rejected with a
    reason; the accepted change is logged, so a restart keeps the new priority."""
    from mlora_pp.control import priority_main

    jobs = [dict(BIG_JOBS[0], max_seq_len=64, data=str(workspace[2]["alpha"]), batch_size=6, max_steps=6, epochs=2),
            dict(BIG_JOBS[1], max_seq_len=64, data=str(workspace[2]["beta"]))]
    pipeline = dict(schedule="lora", admission="priority")
    raw_free = dict(make_raw(workspace, [], "priority-free", **pipeline), jobs=jobs)
    budget = budget_for_one_job(workspace, raw_free, 1, capsys)
    free = parse_config(raw_free, "test.yaml")
    cfg = parse_config(dict(make_raw(workspace, [], "priority-budget", memory_budget=budget, **pipeline), jobs=jobs),
                       "test.yaml")
    control = ControlDir(cfg.output_dir)
    control.write_config(cfg)  # as a run writes it at start-up: what the command checks names against
    assert priority_main([str(cfg.output_dir), "beta", "5"]) == 0
    control.request("priority", {"name": "beta", "priority": "high"})
    control.request("priority", {"name": "nobody", "priority": 1})
    # valid JSON written by hand, but no request: answered, never a crash (nor one at every restart)
    control.request("cancel", {"name": ["alpha"]})
    control.request("priority", {"name": {"beta": 1}, "priority": 1})
    by_hand = control.root / "requests" / f"{time.time_ns():020d}-0-by-hand.json"
    by_hand.write_text("[]")
    capsys.readouterr()
    result = train(cfg, progress=False)
    printed = capsys.readouterr().out
    assert result.steps == {"alpha": 6, "beta": 2}
    assert "[beta] priority 5" in printed
    assert "memory: job 'alpha' is paused for the more urgent job 'beta' (priority 5 over 0)" in printed
    records = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    changed = next(i for i, r in enumerate(records) if r.get("event") == "priority")
    assert records[changed]["job"] == "beta" and records[changed]["priority"] == 5
    done_before = sum(1 for r in records[:changed] if r.get("job") == "alpha" and "loss" in r)
    assert 0 < done_before < 6 and not any(r.get("job") == "beta" and "loss" in r for r in records[:changed])
    after = [r["job"] for r in records[changed:] if "loss" in r]
    assert after == ["beta"] * 2 + ["alpha"] * (6 - done_before), after
    outcomes = [json.loads(p.read_text())["outcome"] for p in sorted((cfg.output_dir / "control" / "done").glob("*"))]
    assert outcomes == ["accepted", "rejected: priority: must be an integer; got 'high'",
                        "rejected: priority: no job named 'nobody' in this run",
                        "rejected: cancel: 'name' must be a job's name; got ['alpha']",
                        "rejected: priority: 'name' must be a job's name; got {'beta': 1}",
                        f"rejected: {by_hand}: not a submit, cancel or priority request"]
    assert ControlDir(cfg.output_dir).accepted().priority == {"beta": 5}
    assert ControlDir(cfg.output_dir).read_config().job("beta").priority == 5
    from mlora_pp.training import DistEnv, _accepted_changes

    again = parse_config(dict(make_raw(workspace, [], "priority-budget", memory_budget=budget, **pipeline), jobs=jobs),
                         "test.yaml")
    _accepted_changes(again, DistEnv(0, 1, 0), fresh=False)  # what a restart of the config reads
    assert again.job("beta").priority == 5 and again.job("alpha").priority == 0
    for name in ("alpha", "beta"):
        assert_adapters_equal(adapter(cfg.output_dir, name), adapter(free.output_dir, name))
