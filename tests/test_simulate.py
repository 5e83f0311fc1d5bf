"""benchmarks.simulate and benchmarks.calibration: the GPU grid on a small grid, and the fit of the
simulator's costs to a run's trace (fast, no processes)."""

import pytest

from benchmarks.calibration import LOOPBACK, fit_cost, predict
from benchmarks.simulate import HARDWARE, Shape, gpu_cost, grid
from mlora_pp.schedule import CostModel, JobSteps, build_schedule
from mlora_pp.sim import simulate


def test_small_grid_lora_bubble_at_most_1f1b():
    rows = grid([2, 4], [2, 6], list(HARDWARE), micros=2, steps=2)
    assert len(rows) == 2 * 2 * len(HARDWARE) * 3
    by = {(r["hardware"], r["stages"], r["jobs"], r["policy"]): r for r in rows}
    for hw in HARDWARE:
        for s in (2, 4):
            for j in (2, 6):
                lora, base = by[(hw, s, j, "lora")], by[(hw, s, j, "1f1b")]
                assert lora["bubble"] <= base["bubble"] + 1e-9, (hw, s, j)
                assert lora["speedup_vs_1f1b"] == pytest.approx(base["makespan_s"] / lora["makespan_s"])
                assert all(by[(hw, s, j, p)]["makespan_s"] > 0 for p in ("lora", "1f1b", "gpipe"))


def test_gpu_cost_is_per_stage_share_of_the_model():
    shape = Shape()
    fwd, bwd = shape.flops_per_token()
    assert 1.0 < bwd / fwd < 1.1  # frozen base: input gradients only
    one, four = (gpu_cost(*HARDWARE["h100-nvlink"], shape, s) for s in (64, 16))
    assert four.forward(0, 2048) == pytest.approx(4 * one.forward(0, 2048))
    with pytest.raises(ValueError):
        gpu_cost(*HARDWARE["h100-nvlink"], shape, 3)


def trace_of(timeline, outside: float) -> tuple[list[dict], list[float]]:
    """The trace events `mlora_pp.training.write_trace` would write for `timeline`, and the stages'
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

    long = [JobSteps(j.name, j.micro_batches * 4) for j in short]
    for policy in ("lora", "1f1b", "gpipe"):
        schedule = build_schedule(long, 2, policy)
        expected = simulate(schedule, truth, final_step_seconds=final).makespan + 0.25
        assert predict(schedule, fit).makespan_s == pytest.approx(expected, rel=1e-6), policy


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
