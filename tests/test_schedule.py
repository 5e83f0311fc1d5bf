"""Schedules are pure data: formed micro-batches, action order, and validation."""

import pytest

from mlora_pp.schedule import Action, JobSteps, Schedule, ScheduleError, build_schedule, render, validate


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
