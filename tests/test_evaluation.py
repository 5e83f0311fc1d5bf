"""Held-out evaluation: forward-only micro-batches in every schedule, and the loss they report
checked against peft on the adapter of the same step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from mlora_pp.config import ConfigError, parse_config
from mlora_pp.data import DataError, IGNORE_INDEX, load_examples, load_template
from mlora_pp.memory import MemoryModel, predicted_peak
from mlora_pp.schedule import (
    POLICIES,
    Action,
    EvalPoint,
    JobSteps,
    Schedule,
    ScheduleError,
    build_schedule,
    remaining_steps,
    validate,
)
from mlora_pp.training import load_tokenizer, prepare_jobs, train
from test_training import JOBS, SHORT_TEMPLATE, make_raw, make_workspace, write_dataset


def steps_job(name: str, steps: int, micros: int, evals: tuple[int, ...] = (), eval_micros: int = 2,
              rnd: random.Random | None = None) -> JobSteps:
    rnd = rnd or random.Random(0)
    micro_batches = tuple(tuple((2, 2 * rnd.randint(3, 9)) for _ in range(micros)) for _ in range(steps))
    points = tuple(EvalPoint(k, tuple((2, 2 * rnd.randint(3, 9)) for _ in range(eval_micros))) for k in evals)
    return JobSteps(name, micro_batches, evals=points)


def mixed_jobs() -> list[JobSteps]:
    rnd = random.Random(3)
    return [steps_job("a", 4, 2, (2, 4), 2, rnd), steps_job("b", 3, 3, (1, 2, 3), 1, rnd),
            steps_job("c", 2, 1, (2,), 3, rnd), steps_job("d", 5, 2, (), 0, rnd)]


def check_evaluations(schedule: Schedule, jobs: list[JobSteps]) -> None:
    """Every evaluation micro-batch is forwarded once on every stage and never backwarded, holds
    evaluation rows only, and runs after its job's step k-1 and before its step k on each stage."""
    evals = {mb.id: mb for mb in schedule.micro_batches if mb.eval}
    want = sorted((j.name, p.after, m) for j in jobs for p in j.evals for m in range(len(p.micro_batches)))
    assert sorted((part.job, part.step, part.micro) for mb in evals.values() for part in mb.parts) == want
    assert all(not part.eval for mb in schedule.micro_batches if not mb.eval for part in mb.parts)
    for actions in schedule.stages:
        assert sorted(a.micro_batch for a in actions if a.kind == "F" and a.micro_batch in evals) == sorted(evals)
        assert not [a for a in actions if a.kind == "B" and a.micro_batch in evals]
        position = {(a.job, a.step): i for i, a in enumerate(actions) if a.kind == "S"}
        for i, a in enumerate(actions):
            if a.kind == "F" and a.micro_batch in evals:
                for part in evals[a.micro_batch].parts:
                    assert position.get((part.job, part.step - 1), -1) < i < position.get((part.job, part.step), 10**9)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("variant", ["plain", "hide_latency", "token_bound", "unfused"])
def test_evaluations_are_forward_only_on_every_stage(stages, policy, variant):
    jobs = mixed_jobs()
    schedule = build_schedule(jobs, stages, policy, fuse=variant != "unfused", hide_latency=variant == "hide_latency",
                              token_bound=variant == "token_bound")
    check_evaluations(schedule, jobs)
    # the same training parts and steps as without evaluations: evaluations never change what trains
    bare = build_schedule([JobSteps(j.name, j.micro_batches) for j in jobs], stages, policy,
                          fuse=variant != "unfused", hide_latency=variant == "hide_latency",
                          token_bound=variant == "token_bound")

    def training(s: Schedule) -> tuple[list, list]:
        parts = sorted((p.job, p.step, p.micro) for mb in s.micro_batches for p in mb.parts if not p.eval)
        return parts, sorted((a.job, a.step) for a in s.stages[0] if a.kind == "S")

    assert training(schedule) == training(bare)


@pytest.mark.parametrize("stages", [1, 3])
def test_a_plan_cut_anywhere_continues_the_evaluations(stages):
    """A change of plan (a submission or cancellation) at any micro-batch: the next plan runs
    exactly the parts left, an evaluation cut in the middle included (`first_micro`)."""
    jobs = mixed_jobs()
    schedule = build_schedule(jobs, stages, "lora")
    for cut in range(len(schedule.micro_batches) + 1):
        rest = remaining_steps(schedule, cut)
        left = sorted((p.job, p.step, p.micro, p.eval) for mb in schedule.micro_batches[cut:] for p in mb.parts)
        if not rest:
            assert not left
            continue
        following = build_schedule(rest, stages, "lora")
        assert sorted((p.job, p.step, p.micro, p.eval) for mb in following.micro_batches for p in mb.parts) == left
        for j in rest:
            for point in j.evals:
                cut_short = [p for mb in schedule.micro_batches[:cut] for p in mb.parts
                             if p.eval and p.job == j.name and p.step == point.after]
                assert point.first_micro == len(cut_short)


def test_validate_refuses_a_backward_of_an_evaluation_and_mixed_micro_batches():
    jobs = [steps_job("a", 1, 1, (1,), 1)]
    schedule = build_schedule(jobs, 1, "lora")
    (evaluation,) = [mb for mb in schedule.micro_batches if mb.eval]
    bad = Schedule("lora", schedule.micro_batches, (schedule.stages[0] + (Action("B", evaluation.id),),))
    with pytest.raises(ScheduleError, match="backward of an evaluation"):
        validate(bad)
    training = next(mb for mb in schedule.micro_batches if not mb.eval)
    mixed = type(training)(training.id, training.parts + evaluation.parts)
    micro_batches = tuple(mixed if mb.id == training.id else mb for mb in schedule.micro_batches)
    with pytest.raises(ScheduleError, match="mixes evaluation and training"):
        validate(Schedule("lora", micro_batches, schedule.stages))


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_evaluations_add_nothing_to_the_predicted_peak(stages, policy):
    """An evaluation keeps no activation, gradient or optimizer state: the predicted peak is that
    of the same action lists without the evaluations' forwards."""
    jobs = mixed_jobs()
    model = MemoryModel(0, static=1000, per_token=10.0, per_token_length=0.5, job={j.name: 100 for j in jobs})
    schedule = build_schedule(jobs, stages, policy)
    evals = {mb.id for mb in schedule.micro_batches if mb.eval}
    stripped = Schedule(policy, schedule.micro_batches, tuple(
        tuple(a for a in actions if not (a.kind == "F" and a.micro_batch in evals)) for actions in schedule.stages))
    for s in range(stages):
        assert predicted_peak(model, schedule, s) == predicted_peak(model, stripped, s)
    if stages == 1 or policy != "lora":  # the same training order with or without evaluations
        bare = build_schedule([JobSteps(j.name, j.micro_batches) for j in jobs], stages, policy)
        for s in range(stages):
            assert predicted_peak(model, schedule, s) == predicted_peak(model, bare, s)


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root, model, data = make_workspace(tmp_path_factory.mktemp("eval"), layers=3)
    heldout = write_dataset(root / "heldout.jsonl", seed=99, n=7)
    return (root, model, data), heldout


def peft_eval_loss(model_dir: Path, adapter_dir: Path, heldout: Path, max_seq_len: int = 64,
                   template: Path = SHORT_TEMPLATE) -> float:
    """The token-mean cross-entropy of `heldout` under peft's model with our saved adapter, one
    record at a time (no padding), summed in float64."""
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    examples = load_examples(heldout, load_template(str(template)), load_tokenizer(model_dir), max_seq_len)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                                             reduction="sum").double())
            tokens += int((labels != IGNORE_INDEX).sum())
    return total / tokens


def eval_records(out: Path) -> dict[tuple[str, int], float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["job"], r["step"]): r["eval_loss"] for r in lines if r.get("event") == "eval"}


def test_eval_loss_equals_peft_on_the_adapter_of_that_step(workspace):
    """alpha (dropout 0.1) is evaluated after steps 2 and 3, gamma after its last step only; each
    reported loss equals peft's on the held-out records with the adapter of that step (for step 2:
    the adapter of a run that stops there, the same weights under a constant learning rate)."""
    ws, heldout = workspace
    root, model_dir, _ = ws
    alpha = dict(JOBS[0], eval_data=str(heldout), eval_every=2, micro_batch_size=1)
    gamma = dict(JOBS[2], eval_data=str(heldout))
    result = train(parse_config(make_raw(ws, [alpha, gamma], "full"), "t.yaml"), progress=False)
    assert result.eval_loss.keys() == {"alpha", "gamma"}
    assert set(result.eval_loss["alpha"]) == {2, 3} and set(result.eval_loss["gamma"]) == {4}
    assert eval_records(root / "full") == {(j, k): v for j, got in result.eval_loss.items() for k, v in got.items()}
    train(parse_config(make_raw(ws, [dict(alpha, max_steps=2)], "two-steps"), "t.yaml"), progress=False)
    for job, step, out in (("alpha", 3, "full"), ("gamma", 4, "full"), ("alpha", 2, "two-steps")):
        reference = peft_eval_loss(model_dir, root / out / job, heldout)
        assert result.eval_loss[job][step] == pytest.approx(reference, rel=1e-5), (job, step)
    # learning moved the held-out loss (the check above is not of an untouched adapter)
    assert result.eval_loss["alpha"][2] != pytest.approx(result.eval_loss["alpha"][3], rel=1e-4)


def test_resumed_job_evaluates_only_after_its_checkpoint(workspace):
    ws, heldout = workspace
    cfg = parse_config(make_raw(ws, [dict(JOBS[2], eval_data=str(heldout), eval_every=1)], "unused"), "t.yaml")
    job = prepare_jobs(cfg, load_tokenizer(ws[1]))["gamma"]
    assert [p.after for p in job.job_steps().evals] == [1, 2, 3, 4]
    job.steps_done = 2
    steps = job.job_steps()
    assert [p.after for p in steps.evals] == [3, 4] and steps.first_step == 2
    assert all(len(p.micro_batches) == len(job.eval_batches) for p in steps.evals)


def test_bad_evaluation_settings_name_the_field(workspace, tmp_path):
    ws, heldout = workspace
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.eval_every: needs eval_data"):
        parse_config(make_raw(ws, [dict(JOBS[0], eval_every=2)], "x"), "t.yaml")
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.eval_every: must be at least 1"):
        parse_config(make_raw(ws, [dict(JOBS[0], eval_data=str(heldout), eval_every=0)], "x"), "t.yaml")
    missing = parse_config(make_raw(ws, [dict(JOBS[0], eval_data=str(tmp_path / "nope.jsonl"))], "x"), "t.yaml")
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.eval_data: .*nope\.jsonl: data file not found"):
        train(missing, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 3\n')
    bad = parse_config(make_raw(ws, [dict(JOBS[0], eval_data=str(broken))], "x"), "t.yaml")
    with pytest.raises(DataError, match=r"jobs\[0\]\.eval_data: .*broken\.jsonl"):
        train(bad, progress=False)
