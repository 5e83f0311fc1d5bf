"""benchmarks.simulate: the GPU grid on a small grid, and the calibrated predictor (fast, no processes)."""

import pytest

from benchmarks.simulate import HARDWARE, Shape, calibrated_cost, gpu_cost, grid
from mlora_pp.profiling import LayerProfile
from mlora_pp.schedule import JobSteps, build_schedule
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


def test_calibrated_predictor_gives_positive_makespans():
    from benchmarks.simulate import LOOPBACK, TWO_HOSTS

    profile = LayerProfile(embed_s=1e-4, layer_s=0.05, head_s=0.008, step_s=4e-4, tokens=134, rows=2)
    jobs = [JobSteps(f"j{i}", tuple(tuple((2, 134) for _ in range(4)) for _ in range(2))) for i in range(4)]
    spans = {}
    for fabric in (LOOPBACK, TWO_HOSTS):
        cost = calibrated_cost(profile, [4, 4], fabric, hidden=512)
        assert cost.forward(1, 134) > cost.forward(0, 134)  # the head is on the last stage
        for policy in ("lora", "1f1b", "gpipe"):
            spans[(fabric.name, policy)] = simulate(build_schedule(jobs, 2, policy), cost).makespan
    assert all(v > 0 for v in spans.values())
    busy = 4 * 2 * 4 * (4 * 0.05 + 0.008)  # micro-batches x the slower stage's forward + backward
    assert all(v >= busy for v in spans.values())
    assert spans[(LOOPBACK.name, "lora")] < spans[(LOOPBACK.name, "1f1b")]


def test_calibrate_profiles_here_and_predicts(tmp_path):
    """The whole --calibrate path on the quick workload (no measured JSON there: measured is None)."""
    from benchmarks.simulate import calibrate

    rows = calibrate(quick=True, repeats=1, results=tmp_path)
    assert {(r.scenario, r.policy) for r in rows} == {
        (s, p) for s in ("loopback", "two-hosts-1gbit") for p in ("lora", "1f1b", "gpipe")}
    assert all(r.predicted_s > 0 and r.measured_s is None and r.error is None for r in rows)


def test_cost_aware_lora_with_extra_in_flight():
    rows = grid([4], [6], ["8hosts-1gbit", "h100-nvlink"], micros=2, steps=2, cost_aware=True, extra_in_flight=2)
    by = {(r["hardware"], r["policy"]): r for r in rows}
    for hw in ("8hosts-1gbit", "h100-nvlink"):
        assert by[(hw, "lora")]["max_in_flight"] == 6
        assert by[(hw, "lora")]["bubble"] <= by[(hw, "1f1b")]["bubble"]
