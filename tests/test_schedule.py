"""Schedules are pure data: formed micro-batches, action order, and validation."""

import itertools
import random

import pytest

from mlora_pp.schedule import (
    Action,
    CostModel,
    EvalPoint,
    JobSteps,
    MicroBatch,
    MicroBatchPart,
    PlanStream,
    Schedule,
    ScheduleError,
    _single_stage,
    admission,
    build_schedule,
    form_micro_batches,
    group_jobs,
    render,
    validate,
)
from mlora_pp.sim import simulate


def job(name: str, steps: int, micros: int) -> JobSteps:
    return JobSteps(name, tuple(tuple((2, 16) for _ in range(micros)) for _ in range(steps)))


def test_lora_fuses_one_micro_batch_of_each_live_job():
    jobs = [job("a", 2, 2), job("b", 1, 3), job("c", 3, 1)]
    s = build_schedule(jobs, 1, "lora")
    assert [mb.jobs for mb in s.micro_batches] == [("a", "b", "c"), ("a", "b", "c"), ("a", "b", "c"), ("a",)]
    steps = [a for a in s.stages[0] if a.kind == "S"]
    # every job steps as soon as its own step is complete, never waiting for others
    assert [(a.job, a.step) for a in steps] == [("c", 0), ("a", 0), ("c", 1), ("b", 0), ("c", 2), ("a", 1)]


def test_baselines_run_jobs_one_after_another_unfused():
    jobs = [job("a", 2, 2), job("b", 1, 2)]
    for policy in ("gpipe", "1f1b"):
        s = build_schedule(jobs, 1, policy)
        assert [mb.jobs for mb in s.micro_batches] == [("a",)] * 4 + [("b",)] * 2


def test_unfused_lora_interleaves():
    s = build_schedule([job("a", 1, 2), job("b", 1, 2)], 1, "lora", fuse=False)
    assert [mb.jobs for mb in s.micro_batches] == [("a",), ("b",), ("a",), ("b",)]


def test_validate_catches_early_step_and_missing_backward():
    good = build_schedule([job("a", 2, 2)], 1, "lora")
    assert [str(a) for a in good.stages[0][:5]] == ["F0", "B0", "F1", "B1", "S[a#0]"]
    # step 0 applied after only one of its two backwards: the update would miss a gradient
    early = good.stages[0][:2] + (Action("S", job="a", step=0),) + good.stages[0][2:4] + good.stages[0][5:]
    with pytest.raises(ScheduleError, match="optimizer step before all its backwards"):
        validate(Schedule(good.policy, good.micro_batches, (early,)))
    # a forward of step 1 before step 0's update reads stale weights
    stale = good.stages[0][:4] + good.stages[0][5:6] + good.stages[0][4:5] + good.stages[0][6:]
    with pytest.raises(ScheduleError, match="before its step 0 update"):
        validate(Schedule(good.policy, good.micro_batches, (stale,)))
    missing = tuple(a for a in good.stages[0] if a != Action("B", 1))
    with pytest.raises(ScheduleError):
        validate(Schedule(good.policy, good.micro_batches, (missing,)))


def test_render_names_actions():
    s = build_schedule([job("a", 1, 1)], 1, "lora")
    assert render(s).startswith("stage 0: F0")


# ---------------------------------------------------------------------------------------------
# Several stages.

POLICIES = ("gpipe", "1f1b", "lora")


def mixed_jobs(count: int) -> list[JobSteps]:
    """Jobs of different step counts, micro-batches per step, rows and lengths."""
    shapes = [(3, 2, 16), (2, 3, 24), (4, 1, 8), (1, 4, 16), (2, 2, 40)]
    out = []
    for i in range(count):
        steps, micros, length = shapes[i % len(shapes)]
        out.append(JobSteps(f"j{i}", tuple(
            tuple((1 + (k + m) % 2, length * (1 + (k + m) % 2)) for m in range(micros + (k % 2) * (i % 2)))
            for k in range(steps)
        )))
    return out


def kinds(actions, kind):
    return [a.micro_batch for a in actions if a.kind == kind]


def check_schedule(s, jobs):
    """What the runtime relies on, beyond `validate`."""
    # every job's micro-batches appear exactly once, in training order
    for job in jobs:
        seen = [(p.step, p.micro) for mb in s.micro_batches for p in mb.parts if p.job == job.name]
        assert seen == [(k, m) for k in range(job.steps) for m in range(len(job.micro_batches[k]))]
    ids = list(range(len(s.micro_batches)))
    for stage, actions in enumerate(s.stages):
        # forwards and backwards in ascending id order on every stage: neighbours agree by construction
        assert kinds(actions, "F") == ids and kinds(actions, "B") == ids, stage
    t = simulate(s)
    for stage in range(s.num_stages - 1):
        f_end = {x.action.micro_batch: x.end for x in t.stages[stage] if x.action.kind == "F"}
        f_start = {x.action.micro_batch: x.start for x in t.stages[stage + 1] if x.action.kind == "F"}
        b_end = {x.action.micro_batch: x.end for x in t.stages[stage + 1] if x.action.kind == "B"}
        b_start = {x.action.micro_batch: x.start for x in t.stages[stage] if x.action.kind == "B"}
        assert all(f_end[m] <= f_start[m] for m in ids) and all(b_end[m] <= b_start[m] for m in ids)
    if s.max_in_flight is not None:
        assert max(t.max_in_flight) <= s.max_in_flight
    return t


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_every_policy_is_runnable(stages):
    for count, policy, fuse in itertools.product(range(1, 6), POLICIES, (True, False)):
        jobs = mixed_jobs(count)
        s = build_schedule(jobs, stages, policy, fuse=fuse)
        assert s.num_stages == stages and s.policy == policy
        check_schedule(s, jobs)
        if stages == 1:  # one stage keeps the original lists
            mbs = form_micro_batches(jobs, policy, fuse)
            assert list(s.micro_batches) == mbs and s.stages == (_single_stage(mbs),)


def test_lora_fuses_within_token_balanced_groups_and_stays_runnable():
    jobs = mixed_jobs(5) + [job(f"x{i}", 2, 2) for i in range(5)]
    for stages, streams in ((2, None), (2, 1), (3, 2), (4, 3), (1, 2), (1, 3)):
        s = build_schedule(jobs, stages, "lora", streams=streams)
        check_schedule(s, jobs)
        groups = group_jobs(jobs, stages, streams=streams)
        # a micro-batch only fuses jobs of one group
        where = {j.name: g for g, members in enumerate(groups) for j in members}
        assert all(len({where[p.job] for p in mb.parts}) == 1 for mb in s.micro_batches)
        assert streams is None or len(groups) == streams  # one stage too: streams asked for are kept
        assert {where[mb.parts[0].job] for mb in s.micro_batches} == set(range(len(groups)))


def test_lora_steps_right_after_each_jobs_last_backward():
    jobs = mixed_jobs(4)
    s = build_schedule(jobs, 3, "lora")
    by_id = {mb.id: mb for mb in s.micro_batches}
    for actions in s.stages:
        for pos, a in enumerate(actions):
            if a.kind == "S":
                before = actions[pos - 1]
                while before.kind == "S":  # several jobs may complete in one fused backward
                    pos -= 1
                    before = actions[pos - 1]
                assert before.kind == "B" and (a.job, a.step) in {(p.job, p.step) for p in by_id[before.micro_batch].parts}


def test_1f1b_orders_and_memory():
    s = build_schedule([job("a", 1, 6)], 4, "1f1b")
    assert [str(a) for a in s.stages[0][:5]] == ["F0", "F1", "F2", "F3", "B0"]
    assert [str(a) for a in s.stages[3][:4]] == ["F0", "B0", "F1", "B1"]
    assert simulate(s).max_in_flight == (4, 3, 2, 1)
    g = build_schedule([job("a", 1, 6)], 4, "gpipe")
    assert [str(a) for a in g.stages[2]] == [f"F{i}" for i in range(6)] + [f"B{i}" for i in range(6)] + ["S[a#0]"]
    assert simulate(g).max_in_flight == (6,) * 4


@pytest.mark.parametrize("bound", [1, 2, 3, 5])
def test_lora_in_flight_bound(bound):
    jobs = [job(f"j{i}", 2, 3) for i in range(4)]
    s = build_schedule(jobs, 3, "lora", max_in_flight=bound)
    assert s.max_in_flight == bound
    for actions in s.stages:
        live = peak = 0
        for a in actions:
            live += {"F": 1, "B": -1, "S": 0}[a.kind]
            peak = max(peak, live)
        assert peak <= bound
    assert max(check_schedule(s, jobs).max_in_flight) == bound
    # validate holds a schedule to its recorded bound
    gp = build_schedule(jobs, 3, "gpipe")
    with pytest.raises(ScheduleError, match=r"stage 0, action 1 \(F1\): more than 1 micro-batches in flight"):
        validate(Schedule(gp.policy, gp.micro_batches, gp.stages, max_in_flight=1))


def test_fusion_only_when_jobs_outnumber_stages():
    for stages in (2, 3, 4):
        few = build_schedule([job(f"j{i}", 2, 2) for i in range(stages + 1)], stages, "lora")
        assert max(len(mb.parts) for mb in few.micro_batches) == 1
        many = build_schedule([job(f"j{i}", 2, 2) for i in range(2 * (stages + 1))], stages, "lora")
        assert max(len(mb.parts) for mb in many.micro_batches) == 2
        assert len(group_jobs([job(f"j{i}", 2, 2) for i in range(4 * stages)], stages)) >= stages + 1
        off = build_schedule([job(f"j{i}", 2, 2) for i in range(2 * (stages + 1))], stages, "lora", fuse=False)
        assert max(len(mb.parts) for mb in off.micro_batches) == 1
    # one stage: every live job in each micro-batch, as before
    one = build_schedule([job(f"j{i}", 2, 2) for i in range(3)], 1, "lora")
    assert max(len(mb.parts) for mb in one.micro_batches) == 3
    # jobs that cannot be split into balanced groups stay apart: a 2:1 mix would break the rhythm
    assert len(group_jobs([job(f"j{i}", 2, 2) for i in range(7)], 2)) == 7


def test_neighbour_order_disagreement_is_caught():
    s = build_schedule([job("a", 1, 3)], 2, "gpipe")
    st1 = list(s.stages[1])
    st1[0], st1[1] = st1[1], st1[0]  # stage 1 forwards F1 before F0
    bad = Schedule(s.policy, s.micro_batches, (s.stages[0], tuple(st1)))
    with pytest.raises(ScheduleError, match=r"stage 1, action 0 \(F1\).*forward orders of stages 0 and 1 disagree"):
        validate(bad)
    with pytest.raises(ScheduleError, match=r"stage 1, action 0 \(F1\).*forward orders of stages 0 and 1 disagree"):
        simulate(bad)
    st0 = list(s.stages[0])
    st0[3], st0[4] = st0[4], st0[3]  # stage 0 backwards B1 before B0, stage 1 B0 before B1
    bad = Schedule(s.policy, s.micro_batches, (tuple(st0), s.stages[1]))
    with pytest.raises(ScheduleError, match=r"stage 0, action 3 \(B1\).*backward orders of stages 0 and 1 disagree"):
        validate(bad)


def test_backward_before_forward_is_caught():
    s = build_schedule([job("a", 1, 2)], 2, "1f1b")
    st0 = (Action("B", 0),) + tuple(a for a in s.stages[0] if a != Action("B", 0))
    bad = Schedule(s.policy, s.micro_batches, (st0, s.stages[1]))
    with pytest.raises(ScheduleError, match=r"stage 0, action 0 \(B0\): backward without forward"):
        validate(bad)


def test_cyclic_wait_is_a_deadlock():
    """Orders agree between neighbours, yet stage 0 waits for B0 while stage 1 waits for F1."""
    s = build_schedule([job("a", 1, 2)], 2, "gpipe")
    F, B, S = (lambda m: Action("F", m)), (lambda m: Action("B", m)), Action("S", job="a", step=0)
    bad = Schedule(s.policy, s.micro_batches, ((F(0), B(0), F(1), B(1), S), (F(0), F(1), B(0), B(1), S)))
    with pytest.raises(ScheduleError, match="DEADLOCK") as err:
        validate(bad)
    msg = str(err.value)
    assert "stage 0 stuck at action 1 (B0): waits for the gradient of B0 from stage 1" in msg
    assert "stage 1 stuck at action 1 (F1): waits for the activation of F1 from stage 0" in msg
    assert "stage 0: F0" in msg  # the schedule is rendered


def test_build_rejects_bad_arguments():
    with pytest.raises(ScheduleError, match="unknown schedule policy"):
        build_schedule([job("a", 1, 1)], 2, "zb")
    with pytest.raises(ScheduleError, match="max_in_flight"):
        build_schedule([job("a", 1, 1)], 2, max_in_flight=0)
    with pytest.raises(ScheduleError, match=r"forward_per_token: 3 values for 2 stages"):
        build_schedule([job("a", 1, 1)], 2, cost=CostModel(forward_per_token=[1, 1, 1]))
    with pytest.raises(ScheduleError, match="unique"):
        build_schedule([job("a", 1, 1), job("a", 1, 1)], 2)
    assert build_schedule([], 3).stages == ((), (), ())


def test_fused_micro_batch_tokens_are_padded_to_the_longest_row():
    mb = MicroBatch(0, (MicroBatchPart("a", 0, 0, True, 2, 20), MicroBatchPart("b", 0, 0, True, 3, 12)))
    assert mb.tokens == 5 * 10


def test_fusion_avoids_padding():
    """Rows of a fused micro-batch are padded to its longest row: only jobs of like length share."""
    short = [JobSteps(f"s{i}", (((8, 8 * 16),) * 2,) * 2) for i in range(4)]  # 8 rows of 16 tokens
    long = [JobSteps(f"l{i}", (((1, 128),) * 2,) * 2) for i in range(4)]  # 1 row of 128 tokens
    jobs = [j for pair in zip(short, long) for j in pair]
    groups = group_jobs(jobs, 2)
    assert len(groups) == 4 and all(len({j.name[0] for j in g}) == 1 and len(g) == 2 for g in groups)
    s = build_schedule(jobs, 2, "lora")
    assert sum(mb.tokens for mb in s.micro_batches) == sum(j.tokens for j in jobs)  # no padding added
    # a mix that cannot be fused without padding or imbalance stays apart
    mixed = [JobSteps(f"m{i}", (((1 + i % 3, (1 + i % 3) * 16 * (1 + i)),),) * 2) for i in range(7)]
    assert len(group_jobs(mixed, 2)) == 7


def test_token_bound():
    jobs = [JobSteps("big", (((4, 256),),) * 3)] + [job(f"small{i}", 3, 2) for i in range(3)]
    s = build_schedule(jobs, 2, "lora", token_bound=True)
    assert s.max_in_flight is None and s.max_in_flight_tokens == 2 * 256
    t = check_schedule(s, jobs)
    assert max(t.max_in_flight) > 2  # small micro-batches fill what one big one would take
    with pytest.raises(ScheduleError, match=r"more than 100 tokens in flight"):
        validate(Schedule(s.policy, s.micro_batches, s.stages, max_in_flight_tokens=100))


def test_hide_latency_absorbs_the_messages_that_stretch_every_slot():
    """Equal micro-batches, backward = forward, a 0.1 ms hop against a 4 ms slot. By default each
    slot stretches by two hops (bubble above the fill-and-drain bound by about 2h/slot); with
    `hide_latency` (2S-1 in flight on stage 0, two fewer per stage) the bubble is the bound: S-1
    slots of fill and drain per stage, plus the hops of that fill and drain, 2(S-1)h."""
    stages, jobs = 8, [JobSteps(f"j{i}", tuple(((2, 1000),) * 4 for _ in range(3))) for i in range(16)]
    hop, m = 1e-4, 16 * 3 * 4
    cost = CostModel(forward_per_token=2e-6, backward_ratio=1.0, link_latency=hop)
    slot = 2 * cost.forward(0, 1000)
    idle = (stages - 1) * (slot + 2 * hop)
    bound = idle / (m * slot + idle)
    stretch = 2 * hop / slot
    plain = simulate(build_schedule(jobs, stages, "lora"), cost)
    hidden = build_schedule(jobs, stages, "lora", hide_latency=True)
    timeline = simulate(hidden, cost)
    assert plain.bubble > bound + 0.5 * stretch
    assert timeline.bubble == pytest.approx(bound, abs=2e-4)
    assert hidden.max_in_flight == 2 * stages - 1
    assert list(timeline.max_in_flight) == [2 * (stages - s) - 1 for s in range(stages)]


def test_hide_latency_orders_are_valid_and_never_deadlock():
    """Counted stage orders follow the stage before (a stage forwards ahead only what the stage
    before forwards before the backward it waits for): random jobs, fused or not, 2-6 stages;
    `build_schedule` validates and replays every one (a deadlock raises)."""
    rnd = random.Random(7)
    for _ in range(300):
        stages = rnd.randint(2, 6)
        jobs = [JobSteps(f"j{i}", tuple(tuple((rnd.randint(1, 3), rnd.randint(10, 40)) for _ in range(rnd.randint(1, 4)))
                                        for _ in range(rnd.randint(1, 4)))) for i in range(rnd.randint(1, 8))]
        schedule = build_schedule(jobs, stages, "lora", hide_latency=True, fuse=rnd.random() < 0.5)
        assert schedule.max_in_flight == 2 * stages - 1


def random_mix(seed: int) -> tuple[list[JobSteps], int, str, dict]:
    """Jobs of random sizes (some resumed, some with evaluations) and random planning options."""
    r = random.Random(seed)
    jobs = []
    for j in range(r.randint(1, 7)):
        steps, first = r.randint(1, 5), r.choice([0, 0, 2])
        micros = tuple(tuple((r.randint(1, 4), r.randint(1, 4) * r.choice([8, 16, 32]))
                             for _ in range(r.randint(1, 4))) for _ in range(steps))
        evals = tuple(EvalPoint(first + k, ((1, 16), (2, 32)))
                      for k in sorted(r.sample(range(steps + 1), r.randint(0, 2))))
        jobs.append(JobSteps(f"j{j}", micros, first_step=first, evals=evals))
    options: dict = dict(fuse=r.random() < 0.6, token_bound=r.random() < 0.3, hide_latency=r.random() < 0.2,
                         streams=r.choice([None, None, 2, 3]))
    policy = r.choice(["fifo", "priority", "shortest-first", None])
    if policy is not None:
        cap = r.randint(1, 3)
        options["admission"] = admission(jobs, policy, {j.name: r.randint(0, 3) for j in jobs},
                                         lambda running: len(running) <= cap)
    if r.random() < 0.5:
        options["cost"] = CostModel(action_overhead=r.random(), link_latency=r.random() / 2, fused_job_overhead=0.1)
    return jobs, r.choice([1, 2, 3, 4, 6]), r.choice(["lora", "lora", "lora", "1f1b", "gpipe"]), options


@pytest.mark.parametrize("window", [1, 3, 16])
def test_a_streamed_plan_is_the_whole_plan_in_segments(window):
    for seed in range(40):
        jobs, stages, policy, options = random_mix(seed)
        whole = build_schedule(jobs, stages, policy, **options)
        stream = PlanStream(jobs, stages, policy, window=window, **options)
        micro_batches, lists, segments = [], [[] for _ in range(stages)], []
        while (segment := stream.next_segment()) is not None:
            segments.append(segment)
            first = len(micro_batches)
            assert [mb.id for mb in segment.micro_batches] == list(range(first, first + len(segment.micro_batches)))
            micro_batches += segment.micro_batches
            for s, actions in enumerate(segment.stages):
                lists[s] += actions
        assert tuple(micro_batches) == whole.micro_batches and tuple(map(tuple, lists)) == whole.stages, seed
        assert [s.final for s in segments] == [False] * (len(segments) - 1) + [True]
        assert (stream.max_in_flight, stream.max_in_flight_tokens, stream.paused) == (
            whole.max_in_flight, whole.max_in_flight_tokens, whole.paused)
        clock = policy == "lora" and (stages > 1 or not options.get("admission", admission(jobs, "fifo")).default)
        if clock:  # every segment but the last injects exactly `window` micro-batches
            assert all(len(s.micro_batches) == window for s in segments[:-1])
        else:  # whole steps (gpipe, 1f1b) or slots (one stage) up to at least `window`
            assert all(len(s.micro_batches) >= window for s in segments[:-1])


@pytest.mark.parametrize("window", [1, 7])
def test_hide_latency_orders_are_made_in_segments_too(window):
    """The later stages' counted orders wait for what they cannot tell yet, and come out as the
    orders counted over the whole plan, on 2 to 8 stages with evaluations and resumed jobs."""
    for seed in range(30):
        jobs, _, _, options = random_mix(seed)
        stages = 2 + seed % 7
        options.update(hide_latency=True, token_bound=False)
        whole = build_schedule(jobs, stages, "lora", **options)
        stream = PlanStream(jobs, stages, "lora", window=window, **options)
        lists = [[] for _ in range(stages)]
        while (segment := stream.next_segment()) is not None:
            for s, actions in enumerate(segment.stages):
                lists[s] += actions
        assert tuple(map(tuple, lists)) == whole.stages, seed


def test_a_streamed_plan_holds_only_what_is_in_flight():
    """A long run's generator holds its in-flight micro-batches, not the run's."""
    jobs = [job(f"j{k}", 400, 4) for k in range(4)]
    stream = PlanStream(jobs, 4, "lora", window=64)
    held, count = 0, 0
    while (segment := stream.next_segment()) is not None:
        count += len(segment.micro_batches)
        held = max(held, len(stream._clock.live))
    assert count == 4 * 400 * 4 and held <= 4
    with pytest.raises(ScheduleError, match="window"):
        PlanStream(jobs, 4, "lora", window=0)
    whole = PlanStream(jobs, 4, "lora")
    whole.next_segment()
    with pytest.raises(ScheduleError, match="handed out"):
        whole.whole()


def test_the_lora_clock_keeps_each_streams_readiness_only_while_it_holds(monkeypatch):
    """The generator keeps each stream's earliest ready time until the stream injects, one of its
    jobs steps or admission changes; at every read the kept value equals one computed afresh, on
    random mixes with evaluations, resumed and paused jobs, admission limits and priorities."""
    import mlora_pp.schedule as schedule

    reads = {"kept": 0}
    kept_read = schedule._Clock._ready_at

    def checked(self, i):
        got = kept_read(self, i)
        assert got == self._stream_ready(self.streams[i]), i
        reads["kept"] += 1
        return got

    monkeypatch.setattr(schedule._Clock, "_ready_at", checked)
    for seed in range(120):
        rng = random.Random(seed)
        jobs = []
        for j in range(rng.randint(1, 10)):
            steps, rows, first = rng.randint(1, 5), rng.choice([1, 2, 4]), rng.choice([0, 0, 3])
            micros = tuple(tuple((rows, rows * rng.randint(10, 60)) for _ in range(rng.randint(1, 4)))
                           for _ in range(steps))
            evals = tuple(EvalPoint(a + first, ((1, rng.randint(5, 30)),))
                          for a in sorted(rng.sample(range(steps + 1), rng.randint(0, 2))))
            jobs.append(JobSteps(f"j{j}", micros, first_step=first, evals=evals, paused=rng.random() < 0.1))
        kw: dict = {}
        if rng.random() < 0.4:
            limit = rng.randint(1, len(jobs))
            kw["admission"] = admission(jobs, rng.choice(["fifo", "priority", "shortest-first"]),
                                        priority={j.name: rng.randint(0, 3) for j in jobs},
                                        fits=lambda running, limit=limit: len(running) <= limit)
        build_schedule(jobs, rng.randint(2, 5), "lora", fuse=rng.random() < 0.7,  # validated as it is built
                       streams=rng.choice([None, None, rng.randint(1, len(jobs))]), **kw)
    assert reads["kept"] > 10_000


def test_a_packing_weighed_against_a_bound_is_the_full_answer_wherever_that_is_within_it():
    """`_packing` with a bound stops weighing a packing once its padded tokens must exceed it, and
    weighs each set of jobs once: on random mixes it returns the unbounded answer whenever that
    answer is within the bound, and None only when it is not; the weigher's tokens equal the
    micro-batches fused one by one."""
    import mlora_pp.schedule as schedule

    rng = random.Random(11)
    within = over = 0
    for _ in range(150):
        jobs = []
        for j in range(rng.randint(2, 14)):
            rows, lo = rng.choice([1, 2, 4]), rng.choice([100, 300])
            jobs.append(JobSteps(f"j{j}", tuple(tuple((rows, rows * rng.randint(lo, lo + rng.choice([5, 200])))
                                                      for _ in range(rng.randint(1, 4)))
                                                for _ in range(rng.randint(1, 12)))))
        live = [(i, schedule._Sizes(j)) for i, j in enumerate(jobs)]
        raw = sum(j.tokens for j in jobs)
        weigh = schedule._Weigher()
        for g in range(1, len(jobs) + 1):
            full = schedule._packing(live, g, schedule._Weigher())
            bounded = schedule._packing(live, g, weigh, bound=(1 + schedule.BALANCE) * raw)
            if full[1][0] <= (1 + schedule.BALANCE) * raw:
                within += 1
                assert bounded == full
            else:
                over += 1
                assert bounded is None or bounded[1][0] > (1 + schedule.BALANCE) * raw
            for members in full[0]:
                if members:
                    fused = build_schedule([jobs[i] for i, _ in members], 1, "lora").micro_batches
                    assert weigh.tokens(members) == sum(mb.tokens for mb in fused)
    assert within > 50 and over > 50
