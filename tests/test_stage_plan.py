"""A plan made as it runs (`StagePlan` over a `PlanStream`) against the same plan made whole: each
stage runs the same actions, and what the runtime asks of it mid-run (where stage 0 steps, what a
change of plan at a micro-batch leaves to run and to plan) has the whole plan's answers, while it
holds only what is around the stage's position."""

import random

import pytest

from test_schedule import random_mix

from mlora_pp.schedule import (EvalPoint, JobSteps, PlanStream, build_schedule, cut_actions, parts_after,
                               remaining_steps, steps_after, steps_of)
from mlora_pp.stage_plan import StagePlan


def walk(plan: StagePlan, upto: int | None = None):
    """Take the stage's actions (up to `upto` of them) as `StageWorker` does, forgetting behind its
    oldest micro-batch in flight; yields (position, action) before each runs."""
    in_flight: dict[int, None] = {}
    last, position = -1, 0
    while (upto is None or position < upto) and (action := plan.action(position)) is not None:
        yield position, action
        position += 1
        if action.kind == "F":
            last = action.micro_batch
            if not plan.micro_batch(last).eval:
                in_flight[last] = None
        elif action.kind == "B":
            del in_flight[action.micro_batch]
        plan.forget(position, min(in_flight, default=last + 1))


@pytest.mark.parametrize("window", [1, 2, 5])
def test_each_stage_runs_the_whole_plans_actions_and_knows_where_stage_0_steps(window):
    for seed in range(30):
        jobs, stages, policy, options = random_mix(seed)
        whole = build_schedule(jobs, stages, policy, **options)
        f0 = {a.micro_batch: i for i, a in enumerate(whole.stages[0]) if a.kind == "F"}
        s0 = {(a.job, a.step): i for i, a in enumerate(whole.stages[0]) if a.kind == "S"}
        for stage in range(stages):
            plan = StagePlan(PlanStream(jobs, stages, policy, window=window, **options), stage, jobs, forget_every=3)
            ran, stepped = [], []
            for _, action in walk(plan):
                if action.kind == "F":  # what `StageWorker._due` asks before a forward
                    for job, step in stepped[-4:]:
                        assert plan.stepped_before(job, step, action.micro_batch) == (
                            s0[(job, step)] < f0[action.micro_batch]), (seed, stage, job, step, action)
                if action.kind == "S":
                    stepped.append((action.job, action.step))
                ran.append(action)
            assert tuple(ran) == whole.stages[stage], (seed, stage)
            assert plan.complete and plan.end == len(whole.micro_batches)
            # behind the stage's last action: no micro-batch left, fewer actions than `forget_every`
            assert not plan._micro and not plan._f0 and len(plan._own) < 3, (seed, stage)
            if plan._base > 0:  # a forgotten action is an error, not the list's end read backwards
                with pytest.raises(IndexError, match="forgotten"):
                    plan.action(plan._base - 1)


@pytest.mark.parametrize("window", [1, 3])
def test_a_change_of_plan_leaves_what_the_whole_plan_leaves(window):
    """At a decision point q (before the stage forwards q - DECISION_LEAD... here: anywhere at or
    after its last forward), the cut list and the parts left are the whole plan's."""
    rnd = random.Random(0)
    for seed in range(30):
        jobs, stages, policy, options = random_mix(seed)
        whole = build_schedule(jobs, stages, policy, **options)
        count = len(whole.micro_batches)
        if count < 2:
            continue
        for stage in range(stages):
            cut = rnd.randint(1, count - 1)
            plan = StagePlan(PlanStream(jobs, stages, policy, window=window, **options), stage, jobs, forget_every=2)
            stop = next(i for i, a in enumerate(whole.stages[stage]) if a.kind == "F" and a.micro_batch == cut)
            for _ in walk(plan, stop):
                pass
            by_name = lambda steps: sorted(steps, key=lambda j: j.name)  # noqa: E731
            assert by_name(plan.remaining(cut)) == by_name(remaining_steps(whole, cut)), (seed, stage, cut)
            assert plan.tail(stop, cut) == cut_actions(whole, stage, stop, cut), (seed, stage, cut)
            assert [j.name for j in plan.remaining(cut)] == [j.name for j in jobs if j.name in
                                                              {k.name for k in remaining_steps(whole, cut)}]


def test_a_jobs_steps_after_a_count_of_parts_are_those_its_parts_make():
    """`steps_after` reads the job's sizes; the reference makes every part (`parts_after`) and
    gathers those left (`steps_of`), for every count, on jobs resumed mid-step, with evaluations
    before steps, after the last one and cut mid-evaluation."""
    rng = random.Random(7)
    for _ in range(300):
        steps = rng.randint(0, 4)
        first, first_micro = rng.choice([0, 0, 3]), 0
        micros = tuple(tuple((rng.randint(1, 3), rng.randint(1, 64)) for _ in range(rng.randint(1, 3)))
                       for _ in range(steps))
        if micros and rng.random() < 0.3:
            first_micro = rng.randint(1, 2)
        afters = sorted(rng.sample(range(first, first + steps + 2), rng.randint(0 if steps else 1, 2)))
        evals = tuple(EvalPoint(a, tuple((1, rng.randint(1, 9)) for _ in range(rng.randint(1, 3))),
                                first_micro=rng.choice([0, 0, 2])) for a in afters)
        job = JobSteps("j", micros, first_step=first, first_micro=first_micro, evals=evals)
        total = sum(1 for _ in parts_after(job, 0))
        for count in range(total + 2):
            left = list(parts_after(job, count))
            assert steps_after(job, count) == (steps_of("j", left) if left else None), (job, count)
