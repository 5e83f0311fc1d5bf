"""benchmarks.simulate and benchmarks.calibration: the GPU grid on a small grid, and the fit of the
simulator's costs to a run's trace (fast, no processes)."""

import json
from dataclasses import replace

import pytest

from benchmarks.calibration import (
    LOOPBACK, Fabric, fit_baseline, fit_cost, fused_job_overhead, predict, predict_baseline, torch_job_steps,
    torch_pairs,
)
from benchmarks.simulate import (
    HARDWARE, Device, Shape, fsdp_makespan, gpu_cost, grid, saved_bytes_per_token, stage_memory,
)
from mlora_pp.schedule import CostModel, JobSteps, build_schedule
from mlora_pp.sim import simulate


def test_small_grid_lora_bubble_at_most_1f1b():
    rows = grid([2, 4], [2, 6], list(HARDWARE), micros=2, steps=2)
    assert len(rows) == 2 * 2 * len(HARDWARE) * 4  # lora, 1f1b, gpipe, fsdp2
    by = {(r["hardware"], r["stages"], r["jobs"], r["policy"]): r for r in rows}
    for hw in HARDWARE:
        for s in (2, 4):
            for j in (2, 6):
                lora, base = by[(hw, s, j, "lora")], by[(hw, s, j, "1f1b")]
                assert lora["bubble"] <= base["bubble"] + 1e-9, (hw, s, j)
                assert lora["speedup_vs_1f1b"] == pytest.approx(base["makespan_s"] / lora["makespan_s"])
                assert all(by[(hw, s, j, p)]["makespan_s"] > 0 for p in ("lora", "1f1b", "gpipe", "fsdp2"))
                fsdp = by[(hw, s, j, "fsdp2")]["makespan_s"]
                assert lora["speedup_vs_fsdp2"] == pytest.approx(fsdp / lora["makespan_s"])


def test_saved_activations_scale_with_the_widths_and_fill_the_stage_estimate():
    """The 1/scale measurement scaled back up agrees with the full-width one (linear in the widths
    but for rank-sized and rotary terms), and a stage's memory adds weights, LoRA state and its
    micro-batches in flight."""
    shape = Shape(hidden=512, intermediate=1792, heads=8, kv_heads=2, seq=64, rank=8)
    full, scaled = saved_bytes_per_token(shape, scale=1), saved_bytes_per_token(shape, scale=2)
    assert scaled == pytest.approx(full, rel=0.03)  # rank-sized, rotary and per-row terms do not scale
    # the MLP's gate, up and their product (bf16) are kept for backward: a floor on the count
    assert full > 3 * shape.intermediate * 2
    per_stage = shape.layers // 4
    expected = per_stage * (shape.weights() * 2 + 3 * shape.lora_params() * 16 + 5 * shape.tokens * full)
    assert stage_memory(shape, 4, 3, 5, full) == pytest.approx(expected)
    rows = grid([4], [2], ["h100-nvlink"], shape=shape, micros=2, steps=1, saved_per_token=full)
    lora = next(r for r in rows if r["policy"] == "lora")
    assert lora["stage_memory_gib"] == pytest.approx(
        stage_memory(shape, 4, 2, lora["peak_in_flight"], full) / 2**30) and lora["fits_device"]


def test_auto_hide_latency_takes_the_wide_windows_only_where_they_fit():
    """As the launcher's `hide_latency: auto`, with the device's memory as the budget: on the
    H100 model the wide windows of a small shape fit; at a per-token size that puts their fullest
    stage between the default windows' and the wide ones' memory on A6000, the default is kept."""
    shape = Shape(layers=8)
    common = dict(micros=4, steps=2)
    hide = {r["hardware"]: r for r in grid([8], [6], ["h100-nvlink"], shape=shape, hide_latency=True, **common,
                                           saved_per_token=1e3) if r["policy"] == "lora"}
    plain = {r["hardware"]: r for r in grid([8], [6], ["h100-nvlink"], shape=shape, **common,
                                            saved_per_token=1e3) if r["policy"] == "lora"}
    wide_in_flight, default_in_flight = hide["h100-nvlink"]["peak_in_flight"], plain["h100-nvlink"]["peak_in_flight"]
    assert wide_in_flight > default_in_flight
    fixed = stage_memory(shape, 8, 6, 0, 0.0)
    # a per-token size at which the A6000 (48 GiB) holds the default windows but not the wide ones
    between = (48 * 2**30 - fixed) / (shape.tokens * (shape.layers // 8) * (wide_in_flight + default_in_flight) / 2)
    rows = grid([8], [6], ["h100-nvlink", "a6000-pcie4"], shape=shape, hide_latency="auto", saved_per_token=between,
                **common)
    lora = {r["hardware"]: r for r in rows if r["policy"] == "lora"}
    assert not lora["a6000-pcie4"]["hide_latency"] and lora["a6000-pcie4"]["peak_in_flight"] == default_in_flight
    assert lora["a6000-pcie4"]["fits_device"]
    assert lora["h100-nvlink"]["hide_latency"] and lora["h100-nvlink"]["peak_in_flight"] == wide_in_flight
    assert lora["h100-nvlink"]["bubble"] == pytest.approx(
        next(r for r in grid([8], [6], ["h100-nvlink"], shape=shape, hide_latency=True, **common)
             if r["policy"] == "lora")["bubble"])
    with pytest.raises(ValueError, match="saved_per_token"):
        grid([8], [6], ["h100-nvlink"], shape=shape, hide_latency="auto", **common)


def test_fsdp_model_is_compute_bound_on_a_fast_link_and_gather_bound_on_a_slow_one():
    """Against hand arithmetic: 4 ranks, 8 micro-batches a step (2 rounds), 3 jobs x 2 steps."""
    shape = Shape(layers=4)
    device = Device("test", flops=2e15, memory_bandwidth=1e12)
    fwd, bwd = shape.flops_per_token()
    t_f, t_b = shape.tokens * fwd / 1e15, shape.tokens * bwd / 1e15  # at EFFICIENCY 0.5
    optimizer = 4 * shape.lora_params() * 28 / 0.5e12 / 4
    fast, bubble = fsdp_makespan(device, Fabric("fast", 1e18, 0.0), shape, 4, 3, 2, 8)
    assert fast == pytest.approx(6 * (2 * 4 * (t_f + t_b) + optimizer)) and bubble == pytest.approx(0.0, abs=1e-9)
    slow, bubble = fsdp_makespan(device, Fabric("slow", 1e9, 0.0), shape, 4, 3, 2, 8)
    gather = 0.75 * shape.weights() * 2 / 1e9
    scatter = 0.75 * shape.lora_params() * 4 / 1e9
    assert slow == pytest.approx(6 * (2 * 4 * (2 * gather + scatter) + optimizer))
    assert 0.9 < bubble < 1.0
    _, idle = fsdp_makespan(device, Fabric("fast", 1e18, 0.0), shape, 16, 3, 2, 8)  # 8 of 16 ranks work
    assert idle == pytest.approx(0.5, abs=0.01)


def test_gpu_cost_is_per_stage_share_of_the_model():
    shape = Shape()
    fwd, bwd = shape.flops_per_token()
    assert 1.0 < bwd / fwd < 1.1  # frozen base: input gradients only
    one, four = (gpu_cost(*HARDWARE["h100-nvlink"], shape, s) for s in (64, 16))
    assert four.forward(0, 2048) == pytest.approx(4 * one.forward(0, 2048))
    with pytest.raises(ValueError):
        gpu_cost(*HARDWARE["h100-nvlink"], shape, 3)


def trace_of(timeline, outside: float) -> tuple[list[dict], list[float]]:
    """The trace events `mlora_pp.trace.write_trace` would write for `timeline`, and the stages'
    wall times with `outside` seconds outside any action."""
    events = []
    for s, actions in enumerate(timeline.stages):
        for t in actions:
            a = t.action
            name = f"S {a.job}:{a.step}" if a.kind == "S" else f"{a.kind}{a.micro_batch} x"
            events.append({"name": name, "cat": a.kind, "ph": "X", "pid": 0, "tid": s,
                           "ts": t.start * 1e6, "dur": (t.end - t.start) * 1e6})
    return events, [timeline.makespan + outside] * timeline.num_stages


def test_calibration_recovers_the_costs_a_trace_was_made_with():
    """A trace made by replaying a run under known per-stage costs (the last stage slower, final
    steps that write a checkpoint) is fitted back to those costs, and predicts another schedule's
    makespan as the known costs do."""
    truth = CostModel(forward_per_token=(2e-4, 3e-4), backward_per_token=(2.2e-4, 3.1e-4), step_seconds=(0.01, 0.02),
                      action_overhead=(0.004, 0.006), link_latency=LOOPBACK.latency,
                      link_bandwidth=LOOPBACK.bandwidth, activation_bytes_per_token=2048)
    final = (0.05, 0.07)
    lengths = [100, 140, 180, 260]
    short = [JobSteps(f"j{i}", tuple(tuple((2, lengths[(i + s + m) % 4]) for m in range(4)) for s in range(2)))
             for i in range(3)]
    calibration = build_schedule(short, 2, "1f1b")
    events, walls = trace_of(simulate(calibration, truth, final_step_seconds=final), outside=0.25)
    fit = fit_cost(events, calibration, walls, LOOPBACK, 2048)
    for name in ("forward_per_token", "backward_per_token", "step_seconds", "action_overhead"):
        assert getattr(fit.cost, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert fit.final_step_seconds == pytest.approx(final) and fit.outside_s == pytest.approx(0.25)
    assert fit.samples == {"F": 2 * 3 * 2 * 4, "B": 2 * 3 * 2 * 4, "S": 2 * 3 * 2}

    long = [JobSteps(j.name, tuple(j.micro_batches) * 4) for j in short]
    for policy in ("lora", "1f1b", "gpipe"):
        schedule = build_schedule(long, 2, policy)
        expected = simulate(schedule, truth, final_step_seconds=final).makespan + 0.25
        assert predict(schedule, fit).makespan_s == pytest.approx(expected, rel=1e-6), policy


def test_fused_micro_batches_are_predicted_with_the_probes_per_job_cost(tmp_path):
    """Fusion's extra cost per job cannot be fitted from a calibration that fuses nothing (1f1b);
    the run's start-up probe (one job's two micro-batches as one against two jobs' fused) gives it.
    A fused lora schedule replayed with that term is predicted as the truth does; without it, low."""
    truth = CostModel(forward_per_token=(2e-4, 3e-4), backward_per_token=(2.2e-4, 3.1e-4), step_seconds=0.01,
                      action_overhead=(0.004, 0.006), fused_job_overhead=(0.003, 0.005),
                      link_latency=LOOPBACK.latency, link_bandwidth=LOOPBACK.bandwidth, activation_bytes_per_token=2048)
    lengths = [100, 140, 180, 260]
    short = [JobSteps(f"j{i}", tuple(tuple((2 if i % 2 == 0 else 4, lengths[(i + s + m) % 4])
                                           for m in range(4 - 2 * (i % 2))) for s in range(2))) for i in range(4)]
    calibration = build_schedule(short, 2, "1f1b")
    events, walls = trace_of(simulate(calibration, truth), outside=0.0)
    fit = fit_cost(events, calibration, walls, LOOPBACK, 2048)
    # what the probe would time on each stage under the truth: apart, fused, lone at 130/130/260 tokens
    probes = []
    for s in (0, 1):
        def fb(tokens: int, jobs: int = 1) -> float:
            return truth.forward(s, tokens, jobs) + truth.backward(s, tokens, jobs)
        probes.append({"stage": s, "apart_s": 2 * fb(130), "fused_s": fb(260, 2), "tokens": [130, 130, 260],
                       "lone_s": fb(264), "lone_tokens": 264})
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"event": "run", "streams": 2, "fusion_probe": probes}) + "\n")
    assert fused_job_overhead(out) == pytest.approx(truth.fused_job_overhead)
    run = [JobSteps(f"j{i}", tuple(tuple((2, lengths[(i + s + m) % 4]) for m in range(4)) for s in range(6)))
           for i in range(4)]
    fused = build_schedule(run, 2, "lora", streams=2)
    assert all(len(set(mb.jobs)) == 2 for mb in fused.micro_batches)
    expected = simulate(fused, truth).makespan
    assert predict(fused, fit, fused_job_overhead=fused_job_overhead(out)).makespan_s == pytest.approx(expected, rel=1e-6)
    assert predict(fused, fit).makespan_s < 0.97 * expected
    # a run that did not probe, or an older probe without a lone time: no term
    (out / "metrics.jsonl").write_text(json.dumps({"event": "run", "fusion_probe": [
        {k: v for k, v in p.items() if not k.startswith("lone")} for p in probes]}) + "\n")
    assert fused_job_overhead(out) is None


def test_only_a_jobs_last_step_costs_the_final_step_time():
    jobs = [JobSteps("a", (((1, 10),),) * 3)]
    schedule = build_schedule(jobs, 1, "1f1b")
    plain = simulate(schedule, CostModel(forward_per_token=0.0, step_seconds=1.0))
    final = simulate(schedule, CostModel(forward_per_token=0.0, step_seconds=1.0), final_step_seconds=(5.0,))
    assert final.makespan - plain.makespan == pytest.approx(4.0)


def test_cost_aware_lora_with_extra_in_flight():
    rows = grid([4], [6], ["8hosts-1gbit", "h100-nvlink"], micros=2, steps=2, cost_aware=True, extra_in_flight=2)
    by = {(r["hardware"], r["policy"]): r for r in rows}
    for hw in ("8hosts-1gbit", "h100-nvlink"):
        assert by[(hw, "lora")]["max_in_flight"] == 6
        assert by[(hw, "lora")]["bubble"] <= by[(hw, "1f1b")]["bubble"]


def fake_jobs(steps: int, seed: int = 0) -> dict:
    """Stand-ins for prepared jobs: what the baseline models read (plans of row ids, row lengths)."""
    import random
    from types import SimpleNamespace

    rnd = random.Random(seed)
    jobs = {}
    for j in range(3):
        examples = [SimpleNamespace(input_ids=[0] * rnd.randint(40, 90)) for _ in range(8 * steps)]
        plans = [SimpleNamespace(micro_batches=[[8 * s + 2 * m, 8 * s + 2 * m + 1] for m in range(4)])
                 for s in range(steps)]
        jobs[f"j{j}"] = SimpleNamespace(name=f"j{j}", examples=examples, plans=plans)
    return jobs


def test_data_parallel_baseline_fit_recovers_its_line_warmup_and_per_step_time():
    """Ranks in lock-step (a round of micro-batches lasts as long as its largest), each job's first
    round slow (lazy initialisation): that goes to the warm-up, not the line."""
    a, b, step, per_step, warmup = 0.03, 2e-4, 0.01, 0.004, 0.2
    jobs = fake_jobs(2)
    reports = [{"wall_s": 0.0, "timings": []} for _ in range(2)]
    wall = 0.0
    def rounds(job, plan) -> list[list[int]]:  # each rank's micro-batch of each round, in padded tokens
        tokens = [len(ids) * max(len(job.examples[i].input_ids) for i in ids) for ids in plan.micro_batches]
        return [tokens[k:k + 2] for k in range(0, len(tokens), 2)]

    for job in jobs.values():
        for s, plan in enumerate(job.plans):
            for k, pair in enumerate(rounds(job, plan)):
                seconds = a + b * max(pair) + (warmup if s == 0 and k == 0 else 0.0)  # ranks in lock-step
                for rank, tokens in enumerate(pair):
                    reports[rank]["timings"].append(("FB", tokens, seconds))
                wall += seconds
            for r in reports:
                r["timings"].append(("S", 0, step))
            wall += step + per_step
    for r in reports:
        r["wall_s"] = wall
    fit = fit_baseline("fsdp2", reports, jobs, LOOPBACK, 2048)
    assert fit.micro_batch == pytest.approx((a, b)) and fit.step_seconds == pytest.approx(step)
    assert fit.warmup_s == pytest.approx(warmup) and fit.per_unit_s == pytest.approx(per_step)
    longer = fake_jobs(6, seed=1)
    expected = sum(sum(a + b * max(pair) for pair in rounds(job, plan)) + step + per_step
                   for job in longer.values() for plan in job.plans) + 3 * warmup
    assert predict_baseline(fit, longer, 2).makespan_s == pytest.approx(expected)


def test_data_parallel_fit_with_a_warm_up_of_several_steps():
    """FSDP2's rounds stay slow for the first few steps of each job: with warm_steps = 3 the line
    comes from the later steps only and each job's warm-up is the excess of its first three; the
    first job's extra (the process warming up) is counted once per run, not per job."""
    a, b, step, decay, process = 0.05, 3e-4, 0.01, (0.12, 0.08, 0.04), 0.3
    jobs = fake_jobs(6)
    reports = [{"wall_s": 0.0, "timings": []} for _ in range(2)]
    wall = 0.0
    for job in jobs.values():
        for s, plan in enumerate(job.plans):
            tokens = [len(ids) * max(len(job.examples[i].input_ids) for i in ids) for ids in plan.micro_batches]
            for k in range(0, len(tokens), 2):
                pair = tokens[k:k + 2]
                seconds = a + b * max(pair) + (decay[s] if s < len(decay) else 0.0)
                seconds += process if job.name == "j0" and s == 0 and k == 0 else 0.0  # once per process
                for rank, t in enumerate(pair):
                    reports[rank]["timings"].append(("FB", t, seconds))
                wall += seconds
            for r in reports:
                r["timings"].append(("S", 0, step))
            wall += step
    for r in reports:
        r["wall_s"] = wall
    fit = fit_baseline("fsdp2", reports, jobs, LOOPBACK, 2048, warm_steps=3)
    rounds_per_step = 2  # fake_jobs: 4 micro-batches a step on 2 ranks
    assert fit.micro_batch == pytest.approx((a, b))
    assert fit.warmup_s == pytest.approx(rounds_per_step * sum(decay)) and fit.warm_steps == 3
    assert fit.first_job_s == pytest.approx(process)
    assert fit.per_unit_s == pytest.approx(0.0, abs=1e-9)
    assert predict_baseline(fit, jobs, 2).makespan_s == pytest.approx(wall)
    # a longer run of fewer jobs: predicted exactly; fitted with the first step only as warm-up, the lines absorb
    # the later warm-up steps and predict it high
    longer = dict(list(fake_jobs(12, seed=1).items())[:2])  # fewer jobs than the calibration's 3
    truth = process
    for job in longer.values():
        for s, plan in enumerate(job.plans):
            tokens = [len(ids) * max(len(job.examples[i].input_ids) for i in ids) for ids in plan.micro_batches]
            truth += sum(a + b * max(tokens[k:k + 2]) + (decay[s] if s < len(decay) else 0.0)
                         for k in range(0, len(tokens), 2)) + step
    assert predict_baseline(fit, longer, 2).makespan_s == pytest.approx(truth)
    one = fit_baseline("fsdp2", reports, jobs, LOOPBACK, 2048)
    assert predict_baseline(one, longer, 2).makespan_s > 1.02 * truth
    with pytest.raises(ValueError, match="fewer steps"):
        predict_baseline(fit, fake_jobs(2), 2)


def test_torch_pipeline_fit_recovers_its_stage_costs():
    truth = CostModel(forward_per_token=(2e-4, 3e-4), backward_per_token=(2.5e-4, 3.5e-4), step_seconds=(0.01, 0.02),
                      action_overhead=(0.004, 0.002), link_latency=LOOPBACK.latency,
                      link_bandwidth=LOOPBACK.bandwidth, activation_bytes_per_token=2048)
    def shapes(jobs) -> int:  # the stage/schedule pairs torch-1f1b builds: per job, per padded length
        return sum(len({max(len(job.examples[i].input_ids) for ids in plan.micro_batches for i in ids)
                        for plan in job.plans}) for job in jobs.values())

    jobs, per_shape = fake_jobs(2), 0.03
    schedule = build_schedule(torch_job_steps(jobs), 2, "1f1b")
    timeline = simulate(schedule, truth)
    tokens = {mb.id: mb.tokens for mb in schedule.micro_batches}
    reports = [{"wall_s": timeline.makespan + per_shape * shapes(jobs),
                "timings": [(t.action.kind, tokens.get(t.action.micro_batch, 0), t.end - t.start) for t in stage]}
               for stage in timeline.stages]
    fit = fit_baseline("torch-1f1b", reports, jobs, LOOPBACK, 2048)
    for name in ("forward_per_token", "backward_per_token", "step_seconds", "action_overhead"):
        assert getattr(fit.stage_cost, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert fit.warmup_s == pytest.approx(0.0, abs=1e-9) and fit.per_unit_s == pytest.approx(per_shape)
    longer = fake_jobs(5, seed=2)
    expected = simulate(build_schedule(torch_job_steps(longer), 2, "1f1b"), truth).makespan + per_shape * shapes(longer)
    assert predict_baseline(fit, longer, 2).makespan_s == pytest.approx(expected)


def test_torch_pipeline_fit_charges_each_pairs_setup_by_its_micro_batch_size():
    """torch builds a stage/schedule pair per job and padded length and sets it up lazily (shape
    inference runs the stage on a micro-batch): the "I" pieces' line over micro-batch tokens is
    fitted, the run's first (process warm-up) left to the per-pair rest, and a run whose
    micro-batches differ from the calibration's is charged by its own sizes."""
    truth = CostModel(forward_per_token=(2e-4, 3e-4), backward_per_token=(2.5e-4, 3.5e-4), step_seconds=(0.01, 0.02),
                      action_overhead=(0.004, 0.002), link_latency=LOOPBACK.latency,
                      link_bandwidth=LOOPBACK.bandwidth, activation_bytes_per_token=2048)
    a, b, first_extra, per_pair = 0.05, 8e-4, 0.3, 0.01
    jobs = fake_jobs(3)
    pairs = torch_pairs(jobs)
    assert len(pairs) > 3 and len(set(pairs)) > 1
    schedule = build_schedule(torch_job_steps(jobs), 2, "1f1b")
    timeline = simulate(schedule, truth)
    tokens = {mb.id: mb.tokens for mb in schedule.micro_batches}
    setups = [a + b * t + (first_extra if k == 0 else 0.0) for k, t in enumerate(pairs)]
    reports = []
    for rank, stage in enumerate(timeline.stages):
        chunks = [(t.action.kind, tokens.get(t.action.micro_batch, 0), t.end - t.start) for t in stage]
        # the set-up pieces sit before their pair's chunks; the fit reads them wherever they are
        reports.append({"wall_s": timeline.makespan + sum(setups) + per_pair * len(pairs),
                        "timings": [("I", t, s * (1.0 if rank else 0.9)) for t, s in zip(pairs, setups)] + chunks})
    fit = fit_baseline("torch-1f1b", reports, jobs, LOOPBACK, 2048)
    assert fit.setup == pytest.approx((a, b), rel=1e-6)  # the slowest rank's (rank 1 here)
    assert fit.per_unit_s == pytest.approx(per_pair + first_extra / len(pairs))
    longer = fake_jobs(5, seed=3)
    expected = (simulate(build_schedule(torch_job_steps(longer), 2, "1f1b"), truth).makespan
                + sum(a + b * t + fit.per_unit_s for t in torch_pairs(longer)))
    assert predict_baseline(fit, longer, 2).makespan_s == pytest.approx(expected)
