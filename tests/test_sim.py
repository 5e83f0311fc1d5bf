"""The dry run: timings under a cost model, deadlock reports, and the bubble formulas of `schedule`."""

import itertools
import random

import pytest

from mlora_pp.schedule import (
    CostModel,
    JobSteps,
    build_schedule,
    choose_streams,
    flush_bubble,
    group_jobs,
    grouping_seconds,
    min_streams,
    lora_bubble,
    lora_slots,
)
from mlora_pp.sim import render_timeline, simulate

TOKENS = 16


def job(name: str, steps: int, micros: int, rows: int = 2) -> JobSteps:
    return JobSteps(name, tuple(tuple((rows, TOKENS) for _ in range(micros)) for _ in range(steps)))


def unit(r: float = 2.0) -> CostModel:
    """Forward 1, backward r per micro-batch of one job, per stage; nothing else costs."""
    return CostModel(forward_per_token=1 / TOKENS, backward_ratio=r)


def run(policy, stages, jobs, r=2.0, **kw):
    cost = unit(r)
    s = build_schedule(jobs, stages, policy, cost=cost, **kw)
    return s, simulate(s, cost)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_flush_bubble_of_gpipe_and_1f1b(stages):
    for count, n, k, r in itertools.product((1, 3), (1, 2, 5), (1, 2), (1.0, 2.0)):
        jobs = [job(f"j{i}", k, n) for i in range(count)]
        for policy in ("gpipe", "1f1b"):
            _, t = run(policy, stages, jobs, r)
            assert t.makespan == pytest.approx(count * k * (n + stages - 1) * (1 + r))
            assert t.bubble == pytest.approx(flush_bubble(stages, n))
            assert t.busy == pytest.approx([count * k * n * (1 + r)] * stages)


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_lora_bubble_unfused(stages):
    for count, n, k in itertools.product((1, 2, 3, 5), (1, 2, 4), (1, 3)):
        jobs = [job(f"j{i}", k, n) for i in range(count)]
        for r in (1.0, 2.0, 3.0):
            _, t = run("lora", stages, jobs, r, fuse=False)
            assert t.makespan == pytest.approx(lora_slots(stages, count, n, k) * (1 + r)), (count, n, k, r)
            assert t.bubble == pytest.approx(lora_bubble(stages, count, n, k))
        if (count - 1) * n >= stages - 1:  # the other jobs cover each one's round trip: fill + drain only
            m = count * n * k
            assert t.bubble == pytest.approx((stages - 1) / (m + stages - 1))
        if count == 1:  # a lone job flushes every step, like 1f1b
            assert t.bubble == pytest.approx(flush_bubble(stages, n))


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_lora_bubble_fused(stages):
    """G = S+1 groups of k equal jobs: the same slot count, each slot k times longer."""
    for fused, n, k in itertools.product((2, 3), (1, 3), (1, 2)):
        jobs = [job(f"j{i}", k, n) for i in range(fused * (stages + 1))]
        s, t = run("lora", stages, jobs)
        assert max(len(mb.parts) for mb in s.micro_batches) == fused
        assert len(group_jobs(jobs, stages)) == stages + 1
        assert t.makespan == pytest.approx(lora_slots(stages, stages + 1, n, k) * 3 * fused)
        assert t.bubble == pytest.approx(lora_bubble(stages, stages + 1, n, k))


def test_lora_fills_the_bubbles_1f1b_leaves():
    for count in (4, 6, 8):
        jobs = [job(f"j{i}", 3, 2) for i in range(count)]
        _, lora = run("lora", 2, jobs)
        _, base = run("1f1b", 2, jobs)
        assert base.bubble == pytest.approx(1 / 3)
        assert lora.bubble == pytest.approx(lora_bubble(2, len(group_jobs(jobs, 2)), 2, 3))
        assert lora.bubble < base.bubble / 5
    # mixed jobs too (lengths, rows, steps differ)
    jobs = [JobSteps(f"m{i}", tuple(tuple((1 + (i + s) % 3, 8 * (1 + i % 4)) for _ in range(1 + i % 3))
                                   for s in range(2 + i % 2))) for i in range(6)]
    _, lora = run("lora", 2, jobs)
    _, base = run("1f1b", 2, jobs)
    assert lora.bubble < base.bubble * 0.6
    # unequal micro-batches: a token bound (same worst case) lets small ones fill the gaps
    s, by_tokens = run("lora", 2, jobs, token_bound=True)
    largest = max(t for j in jobs for micros in j.micro_batches for _, t in micros)
    assert s.max_in_flight is None and s.max_in_flight_tokens == 2 * largest
    assert by_tokens.makespan < lora.makespan and by_tokens.max_in_flight[0] > 2


def test_communication_and_step_costs():
    cost = CostModel(forward_per_token=[1 / TOKENS, 2 / TOKENS], step_seconds=0.5, link_latency=0.25,
                     link_bandwidth=64.0, activation_bytes_per_token=2.0)
    s = build_schedule([job("a", 1, 1)], 2, "gpipe", cost=cost)
    t = simulate(s, cost)
    wire = TOKENS * 2.0 / 64.0 + 0.25  # 0.5 on the wire + latency
    # F0 on 0: [0, 1]; F0 on 1: [1.75, 3.75]; B0 on 1: [3.75, 7.75], S; B0 on 0: [8.5, 10.5], S until 11
    assert [(str(x.action), x.start, x.end) for x in t.stages[1]] == [
        ("F0", 1 + wire, 3 + wire), ("B0", 3 + wire, 7 + wire), ("S[a#0]", 7 + wire, 7.5 + wire)]
    assert t.stages[0][1].start == 7 + 2 * wire and t.makespan == 9 + 2 * wire + 0.5
    assert t.busy == pytest.approx((3.5, 6.5))
    # messages on one link leave one after another (FIFO), so a small one never overtakes a big one
    s = build_schedule([job("a", 1, 3)], 2, "gpipe", cost=cost)
    arrivals = [x.start for x in simulate(s, cost).stages[1] if x.action.kind == "F"]
    assert arrivals == sorted(arrivals)


def test_slow_stage_sets_the_pace():
    cost = CostModel(forward_per_token=[1 / TOKENS, 3 / TOKENS])
    jobs = [job(f"j{i}", 2, 2) for i in range(3)]
    s = build_schedule(jobs, 2, "lora", cost=cost)
    t = simulate(s, cost)
    assert t.busy[1] == pytest.approx(3 * t.busy[0])
    assert t.makespan < t.busy[1] * 1.2  # the slow stage is almost never idle


def test_render_timeline():
    s, t = run("lora", 3, [job("a", 1, 2), job("b", 1, 2)])
    text = render_timeline(t)
    lines = text.splitlines()
    assert lines[0].startswith("time/col") and "bubble" in lines[0]
    assert [line[:8] for line in lines[1:]] == ["stage 0:", "stage 1:", "stage 2:"]
    assert lines[1][9:].startswith("F0") and "." in lines[3]
    assert len({len(line) for line in lines[1:]}) == 1


# ------------------------------------------------------------------ fusion chosen by per-action cost


def test_min_streams_covers_the_round_trip_with_a_slot_to_spare():
    for stages, n in itertools.product((2, 3, 4, 8), (1, 2, 3, 4, 8)):
        g = min_streams([job("a", 2, n), job("b", 1, n + 1)], stages)
        assert (g - 1) * n >= stages and (g - 2) * n < stages
        assert min_streams([job("a", 2, n)], stages, hide_latency=True) == 1 + -(-(2 * stages - 1) // n)
    assert min_streams([job("a", 2, 1)], 3) == 4  # steps of one micro-batch: S+1, the rule of group_jobs
    # the step with the fewest micro-batches sets N
    assert min_streams([job("a", 2, 4), JobSteps("b", (((2, TOKENS),) * 4, ((2, TOKENS),)))], 2) == 3


def overhead_cost(overhead: float) -> CostModel:
    """Forward 1 and backward 2 per micro-batch of one job, plus `overhead` per action."""
    return CostModel(forward_per_token=1 / TOKENS, backward_ratio=2.0, action_overhead=overhead)


def test_choose_streams_fuses_only_where_the_overhead_outweighs_the_longer_fill():
    jobs = [job(f"j{i}", 8, 4) for i in range(4)]  # the CPU benchmark's shape: 4 jobs, 2 stages
    assert choose_streams(jobs, 2, unit()) is None  # token-linear costs: fusion cannot pay
    assert choose_streams(jobs, 1, overhead_cost(1.0)) is None  # one stage fuses every job anyway
    assert choose_streams(jobs, 2, overhead_cost(0.01)) is None  # too little to beat the longer fill
    # a quarter of a slot per action (as measured on the CPU benchmark): 2 streams of 2 jobs
    assert choose_streams(jobs, 2, overhead_cost(0.75)) == 2
    # never fewer streams than keep the pipeline full, however large the overhead
    assert choose_streams(jobs, 2, overhead_cost(100.0)) == min_streams(jobs, 2) == 2
    many = [job(f"j{i}", 2, 4) for i in range(30)]
    assert choose_streams(many, 8, overhead_cost(0.0)) is None
    assert choose_streams(many, 8, overhead_cost(100.0)) == min_streams(many, 8) == 3


@pytest.mark.parametrize("stages, count, overhead", [(2, 4, 0.75), (3, 6, 0.5), (4, 9, 1.0), (2, 6, 0.9)])
def test_chosen_streams_are_faster_in_the_simulator(stages, count, overhead):
    """The choice is made from a closed formula; the simulator, replaying the actual schedules
    under the same costs, must agree that it beats group_jobs's rule."""
    jobs = [job(f"j{i}", 4, 4) for i in range(count)]
    cost = overhead_cost(overhead)
    g = choose_streams(jobs, stages, cost)
    assert g is not None
    chosen = simulate(build_schedule(jobs, stages, "lora", cost=cost, streams=g), cost)
    rule = simulate(build_schedule(jobs, stages, "lora", cost=cost), cost)
    assert chosen.makespan < rule.makespan
    assert grouping_seconds(group_jobs(jobs, stages, streams=g), stages, cost) < \
        grouping_seconds(group_jobs(jobs, stages), stages, cost)


def test_grouping_seconds_sums_every_fused_micro_batch_of_the_streams():
    """`grouping_seconds` sums in closed form; here each fused micro-batch (one stage's plan of the
    group: every live job of a slot in one micro-batch) is costed one by one, as the plan costs it."""
    rng = random.Random(3)
    for _ in range(30):
        jobs = [JobSteps(f"j{i}", tuple(tuple((r, r * rng.randint(10, 40)) for r in [rng.choice([1, 2, 3])] * rng.randint(1, 3))
                                        for _ in range(rng.randint(1, 4))))
                for i in range(rng.randint(1, 9))]
        stages = rng.randint(1, 5)
        cost = CostModel(forward_per_token=tuple(rng.uniform(0.5, 2) for _ in range(stages)),
                         action_overhead=rng.uniform(0, 40), fused_job_overhead=rng.uniform(0, 5), backward_ratio=1.7)
        groups = group_jobs(jobs, stages, streams=rng.choice([None, 1, 2, 3]))
        fused = [mb for g in groups for mb in build_schedule(g, 1, "lora").micro_batches]

        def slot(s: int, mb) -> float:
            return cost.forward(s, mb.tokens, mb.job_count) + cost.backward(s, mb.tokens, mb.job_count)

        largest = max(fused, key=lambda mb: (mb.tokens, mb.job_count))
        expected = max(sum(slot(s, mb) for mb in fused) + (stages - 1) * slot(s, largest) for s in range(stages))
        assert grouping_seconds(groups, stages, cost) == pytest.approx(expected, rel=1e-12)
