"""Jobs submitted and cancelled while a run goes on (`launcher submit` / `cancel`).

Requests are placed before a run starts, so rank 0 takes them at the first decision point: a
fixed micro-batch, the same in every run, which makes the runs comparable. A submitted job's
adapter must equal the one it gets when it is in the config from the start, since its masks,
order and learning rate are keyed by (seed, job, step), never by when it ran; the other jobs
must not notice (their rows never mix with its rows, and a step that straddles the change
continues with its gradients). A cancelled job's adapter must equal the uninterrupted run's
checkpoint at the step where it stopped.
"""

from __future__ import annotations

import json
import random

import pytest
import yaml

from test_checkpoint import CK_JOBS, assert_checkpoints_complete, assert_same
from test_pipeline import ranks
from test_evaluation import eval_records
from test_training import JOBS, adapter, make_raw, make_workspace, rel_err, write_dataset

import launcher.__main__ as launcher
from mlora_pp.checkpoint import CHECKPOINTS, checkpoint_weights, newest_checkpoint, read_checkpoint, step_dirs
from mlora_pp.config import parse_config
from mlora_pp.control import DECISION_LEAD, REQUESTS_EVERY, Change, ControlDir
from mlora_pp.data_cache import DATA_CACHE, DataCache, job_sources
from mlora_pp.preflight import load_tokenizer
from mlora_pp.run_lock import RunLock
from mlora_pp.runtime import StageWorker
from mlora_pp.schedule import EvalPoint, JobSteps, PlanStream, build_schedule, cut_actions, remaining_steps
from mlora_pp.stage_plan import StagePlan
from mlora_pp.training import train
from mlora_pp.transport import ACTIVATION


def test_a_cut_then_the_next_plan_run_every_part_and_step_once():
    """Whatever the policy, stages and cut: the actions run before the cut, the cut lists and the
    plan built from `remaining_steps` forward every (job, step, micro) exactly once on every stage
    and step every (job, step) exactly once; evaluations (some jobs have them) included."""
    rnd = random.Random(1)

    def random_job(i: int) -> JobSteps:
        steps = rnd.randint(1, 4)
        micro_batches = tuple(tuple((rnd.randint(1, 3), rnd.randint(10, 40)) for _ in range(rnd.randint(1, 3)))
                              for _ in range(steps))
        after = sorted(rnd.sample(range(1, steps + 1), rnd.randint(0, steps)))
        evals = tuple(EvalPoint(k, tuple((rnd.randint(1, 3), rnd.randint(10, 40)) for _ in range(rnd.randint(1, 3))))
                      for k in after)
        return JobSteps(f"j{i}", micro_batches, evals=evals)

    for trial in range(200):
        stages = rnd.randint(1, 4)
        jobs = [random_job(i) for i in range(rnd.randint(1, 6))]
        policy = rnd.choice(["lora", "1f1b", "gpipe"])
        hide = policy == "lora" and rnd.random() < 0.5  # counted stage orders too
        old = build_schedule(jobs, stages, policy, hide_latency=hide)
        cut = rnd.randint(0, len(old.micro_batches))
        rest = remaining_steps(old, cut)
        new = build_schedule(rest, stages, policy, hide_latency=hide) if rest else None
        parts = {(p.job, p.step, p.micro, p.eval) for mb in old.micro_batches for p in mb.parts}
        assert len(parts) == sum(len(m) for j in jobs for m in j.micro_batches) + sum(
            len(e.micro_batches) for j in jobs for e in j.evals)
        steps = {(p.job, p.step) for mb in old.micro_batches for p in mb.parts if not p.eval}
        for stage in range(stages):
            actions = list(old.stages[stage])
            position = next((i for i, a in enumerate(actions) if a.kind == "F" and a.micro_batch == cut), len(actions))
            ran = [(a, old) for a in actions[:position] + cut_actions(old, stage, position, cut)]
            ran += [(a, new) for a in (new.stages[stage] if new else ())]
            forwarded = [(p.job, p.step, p.micro, p.eval) for a, s in ran if a.kind == "F"
                         for p in s.micro_batches[a.micro_batch].parts]
            stepped = [(a.job, a.step) for a, _ in ran if a.kind == "S"]
            assert sorted(forwarded) == sorted(parts) and len(set(forwarded)) == len(forwarded), (trial, stage)
            assert sorted(stepped) == sorted(steps) and len(set(stepped)) == len(stepped), (trial, stage)


class _Recorder:
    """What one stage's `StageWorker._execute` does, in order: decisions, posted receives, actions."""

    def __init__(self, change_at: int | None):
        self.change_at, self.log = change_at, []

    def decide(self, point: int) -> Change | None:
        self.log.append(("decide", point))
        return Change(stop=True) if point == self.change_at else None

    def post(self, peer, kind, micro_batch, shape, dtype) -> None:
        self.log.append(("post", "F" if kind == ACTIVATION else "B", micro_batch))


def _run_stage(jobs, stage: int, decide: bool, change_at: int | None, window: int | None
               ) -> tuple[list, tuple | None, StagePlan]:
    recorder = _Recorder(change_at)
    plan = StagePlan(PlanStream(jobs, 3, "lora", window=window), stage, jobs)
    worker = StageWorker(stage=type("Stage", (), {"dtype": None})(), jobs={}, plan=plan, stage_index=stage,
                         transport=recorder, replan=recorder)
    worker.activation_shape = lambda mb: (1,)
    worker.run_action = lambda action: recorder.log.append(("run", action.kind, action.micro_batch))
    recorder.current = plan
    _, cut = worker._execute(plan.action, None, 0, decide)
    return recorder.log, cut, plan


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("change_at", [None, 2, 5, 9, 13])
def test_decisions_lead_the_forwards_and_never_hold_back_a_posted_receive(change_at, window):
    """On every stage: the decision for micro-batch q comes before the forward of q - DECISION_LEAD;
    a change decided for q stops the plan right at the forward of q and no point is decided after
    it; no receive is posted for a micro-batch at or past a point not decided to go on; and, the
    reason for the lead, the decisions never delay a receive the stage would post without them.
    The same whether the plan is made whole or in segments of `window` micro-batches."""
    jobs = [JobSteps(f"j{i}", tuple(((2, 32),) * 2 for _ in range(3))) for i in range(3)]
    schedule = build_schedule(jobs, 3, "lora")
    count = len(schedule.micro_batches)
    points = list(range(DECISION_LEAD, count)) + [count]
    assert count > 13
    for stage in range(3):
        log, cut, plan = _run_stage(jobs, stage, True, change_at, window)
        decided = [e[1] for e in log if e[0] == "decide"]
        forwards = [e[2] for e in log if e[:2] == ("run", "F")]
        if change_at is None:
            assert decided == points and log[-1] == ("decide", count) and cut is None
        else:
            assert decided == points[:points.index(change_at) + 1], (stage, decided)
            assert cut is not None and cut[1] == change_at, (stage, cut)
            assert forwards == list(range(change_at)), (stage, forwards)
            assert schedule.stages[stage][cut[0]] == next(a for a in schedule.stages[stage]
                                                           if a.kind == "F" and a.micro_batch == change_at)
            assert plan.tail(cut[0], change_at) == cut_actions(schedule, stage, cut[0], change_at)
            by_name = lambda steps: sorted(steps, key=lambda j: j.name)  # noqa: E731
            assert by_name(plan.remaining(change_at)) == by_name(remaining_steps(schedule, change_at))
        for i, event in enumerate(log):
            before = [e[1] for e in log[:i] if e[0] == "decide"]
            if event[:2] == ("run", "F"):
                due = [q for q in points if q < count and q <= event[2] + DECISION_LEAD]
                assert set(due) <= set(before) or change_at in before, (stage, event, before)
            if event[0] == "post":  # every point at or below its micro-batch decided, none a change
                assert all(q in before for q in points if q <= event[2]), (stage, event, before)
                assert change_at is None or event[2] < change_at
        if change_at is None and stage > 0:  # the same receives, each posted no later than without decisions
            ours = [e for e in log if e[0] != "decide"]
            free = _run_stage(jobs, stage, False, None, window)[0]
            assert [e for e in ours if e[0] == "post"] == [e for e in free if e[0] == "post"]
            assert all(ours.index(e) <= free.index(e) for e in ours if e[0] == "post"), stage


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("control"))


EVALUATED = {"alpha": 1, "gamma": None}
"""Jobs evaluated on held-out records (every step, or after the last): evaluations pending when the
plan changes carry over to the next plan."""


def raw(workspace, out: str, jobs) -> dict:
    heldout = workspace[0] / "heldout.jsonl"
    if not heldout.exists():
        write_dataset(heldout, seed=99, n=3)
    jobs = [dict(job, eval_data=str(heldout), eval_every=EVALUATED[job["name"]]) if job["name"] in EVALUATED else job
            for job in jobs]
    return make_raw(workspace, jobs, out, schedule="lora", timeout_s=30)


def job_mapping(workspace, job: dict) -> dict:
    return raw(workspace, "x", [job])["jobs"][0]


def write(workspace, out: str, jobs) -> object:
    path = workspace[0] / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw(workspace, out, jobs)))
    return path


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_two(workspace):
    """All three jobs in the config from the start, 2 stages, a checkpoint after every step."""
    proc = ranks(2, write(workspace, "reference", CK_JOBS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workspace[0] / "reference"


def test_submit_and_cancel_on_two_stages_then_restart(workspace, reference_two):
    out = workspace[0] / "live"
    config = write(workspace, "live", CK_JOBS[:2])  # alpha and beta; gamma comes by `submit`
    control = ControlDir(out)
    control.request("submit", {"job": job_mapping(workspace, CK_JOBS[2])})
    control.request("cancel", {"name": "beta"})
    proc = ranks(2, config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = records(out)
    submitted = [r for r in found if r.get("event") == "submitted"]
    cancelled = [r for r in found if r.get("event") == "cancelled"]
    assert [r["job"] for r in submitted] == ["gamma"] and submitted[0]["total_steps"] == 4
    assert [r["job"] for r in cancelled] == ["beta"]
    k = cancelled[0]["step"]
    assert 0 < k < 2, k  # taken for micro-batch REQUESTS_EVERY of 12: beta stopped mid-run
    assert REQUESTS_EVERY == 8
    # the submitted job and the untouched one equal the run that had them from the start, and so
    # do their held-out losses (alpha's evaluations span the change of plan)
    assert_same(out, reference_two, jobs=[JOBS[0], JOBS[2]])
    want = eval_records(reference_two)
    assert set(want) == {("alpha", 1), ("alpha", 2), ("alpha", 3), ("gamma", 4)}
    got = eval_records(out)
    assert set(got) == set(want) and all(got[k] == pytest.approx(v, rel=1e-5) for k, v in want.items()), (got, want)
    # the cancelled one keeps the adapter of its last finished step: the reference's checkpoint there
    assert f"beta: cancelled after {k} steps" in proc.stdout
    assert json.loads((out / "beta" / "cancelled.json").read_text())["cancelled_after_steps"] == k
    saved = checkpoint_weights(read_checkpoint(dict(step_dirs(reference_two, "beta"))[k], "beta")[0])
    ours = adapter(out, "beta")
    assert set(ours) == set(saved)
    for path in saved:
        for i in (0, 1):
            assert rel_err(ours[path][i], saved[path][i]) <= 1e-6, path
    assert [s for s, _ in step_dirs(out, "beta")][-1] == k  # its own checkpoint at the stop
    assert_checkpoints_complete(out)
    assert newest_checkpoint(out, "gamma")[0].step == 4  # the submitted job is checkpointed like the others
    done = sorted((out / "control" / "done").glob("*.json"))
    assert [json.loads(p.read_text())["outcome"] for p in done] == ["accepted", "accepted"]
    assert not list((out / "control" / "requests").glob("*.json"))

    # restart: gamma is still part of the run, beta stays cancelled, nothing is trained again but
    # a job submitted in between (delta, alpha's settings under another name)
    before = {name: adapter(out, name) for name in ("alpha", "beta", "gamma")}
    delta = dict(job_mapping(workspace, CK_JOBS[0]), name="delta")
    control.request("submit", {"job": delta})
    again = ranks(2, config)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "gamma: 4 steps" in again.stdout and f"beta: cancelled after {k} steps" in again.stdout
    assert "delta: 3 steps" in again.stdout
    last_run = records(out)
    last_run = last_run[max(i for i, r in enumerate(last_run) if r.get("event") == "run"):]
    assert {r["job"] for r in last_run if "loss" in r} == {"delta"}, "a finished or cancelled job trained again"
    assert set(last_run[0]["jobs"]) == {"alpha", "beta", "gamma"}
    for name, weights in before.items():
        now = adapter(out, name)
        assert all(rel_err(now[p][i], weights[p][i]) == 0 for p in weights for i in (0, 1)), name


def test_a_job_submitted_at_the_end_of_a_one_rank_plan_trains_after_it(workspace):
    """One rank, requests taken at the plan's end; a request that fails the checks is answered and
    the run goes on."""
    reference = train(parse_config(raw(workspace, "one-ref", JOBS), "test.yaml"), progress=False)
    out = workspace[0] / "one-live"
    control = ControlDir(out)
    control.request("submit", {"job": job_mapping(workspace, JOBS[2])})
    control.request("submit", {"job": dict(job_mapping(workspace, JOBS[2]), name="bad", rank=0)})
    control.request("cancel", {"name": "nobody"})
    result = train(parse_config(raw(workspace, "one-live", JOBS[:2]), "test.yaml"), progress=False)
    assert result.steps == reference.steps
    for job in JOBS:  # one stage fuses differently with and without gamma: summation-order noise only
        ours, ref = adapter(out, job["name"]), adapter(workspace[0] / "one-ref", job["name"])
        assert all(rel_err(ours[p][i], ref[p][i]) < 1e-5 for p in ref for i in (0, 1)), job["name"]
    outcomes = [json.loads(p.read_text())["outcome"] for p in sorted((out / "control" / "done").glob("*.json"))]
    assert outcomes[0] == "accepted"
    assert outcomes[1].startswith("rejected: ") and "rank: must be a positive integer" in outcomes[1]
    assert outcomes[2] == "rejected: cancel: no job named 'nobody' in this run"
    assert len([r for r in records(out) if r.get("event") == "rejected"]) == 2


def test_submit_and_cancel_commands_check_their_input(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    assert launcher.main(["submit", str(out), str(tmp_path / "job.yaml")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    ControlDir(out).write_config(parse_config(raw(workspace, "run", JOBS[:2]), "test.yaml"))
    job_file = tmp_path / "job.yaml"
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    cases = [
        (dict(job_mapping(workspace, JOBS[2]), rank=0), f"error: {job_file}: rank: must be a positive integer"),
        (dict(job_mapping(workspace, JOBS[2]), name="alpha"), f"error: {job_file}: name: duplicate job name 'alpha'"),
        (dict(job_mapping(workspace, JOBS[2]), data=str(tmp_path / "none.jsonl")), "data file not found"),
        (dict(job_mapping(workspace, JOBS[2]), colour="red"), "colour: unknown field"),
        (dict(job_mapping(workspace, JOBS[2]), data=str(bad_data)), f"error: {job_file}: data: {bad_data} line 2: invalid JSON"),
    ]
    for job, message in cases:
        job_file.write_text(yaml.safe_dump(job))
        assert launcher.main(["submit", str(out), str(job_file)]) == 2
        assert message in capsys.readouterr().err
    job_file.write_text(yaml.safe_dump(job_mapping(workspace, JOBS[2])))
    assert launcher.main(["submit", str(out), str(job_file)]) == 0
    printed = capsys.readouterr().out
    assert "submitted 'gamma'" in printed and f"tokenized gamma's data" in printed
    # tokenized here, into the run's cache, so that rank 0 only reads it at its decision point
    cfg = parse_config(raw(workspace, "run", JOBS[:2] + [JOBS[2]]), "test.yaml")
    cache = DataCache(load_tokenizer(cfg.model.path), out / DATA_CACHE)
    keys = {cache.key(source) for source in job_sources(cfg.jobs[-1:])}
    assert keys and keys <= {p.name for p in (out / DATA_CACHE).iterdir()}
    assert launcher.main(["submit", str(out), str(job_file)]) == 2  # the same name is already waiting
    assert "already submitted and waiting" in capsys.readouterr().err
    assert launcher.main(["cancel", str(out), "nobody"]) == 2
    assert "no job named 'nobody'" in capsys.readouterr().err
    assert launcher.main(["cancel", str(out), "gamma"]) == 0  # a waiting submission can be cancelled too
    assert "cancel 'gamma' requested: the run stops it" in capsys.readouterr().out  # no lock file: said as before
    lock = RunLock(out)  # a run held it, and ended: the next run will act on the requests
    lock.acquire("test")
    lock.release()
    job_file.write_text(yaml.safe_dump(dict(job_mapping(workspace, JOBS[2]), name="delta")))
    assert launcher.main(["submit", str(out), str(job_file)]) == 0
    assert "no run is using this output_dir now: the next run of its config picks it up" in capsys.readouterr().out
    assert launcher.main(["priority", str(out), "alpha", "high"]) == 2
    assert "priority must be an integer; got 'high'" in capsys.readouterr().err
    assert launcher.main(["priority", str(out), "nobody", "3"]) == 2
    assert "no job named 'nobody'" in capsys.readouterr().err
    assert launcher.main(["priority", str(out), "alpha"]) == 2
    assert "usage: python -m launcher priority OUTPUT_DIR NAME PRIORITY" in capsys.readouterr().err
    assert launcher.main(["priority", str(out), "delta", "-2"]) == 0  # a waiting submission too
    said = capsys.readouterr().out
    assert "priority -2 for 'delta' requested" in said and "pipeline.admission is fifo" in said
    requests = [json.loads(p.read_text()) for p in sorted((out / "control" / "requests").glob("*.json"))]
    assert [r["kind"] for r in requests] == ["submit", "cancel", "submit", "priority"]
    assert requests[-1] == {"kind": "priority", "name": "delta", "priority": -2}
    (out / "control" / "requests" / "by-hand.json").write_text('{"kind": "submit", "job": "oops"}')  # not a job
    assert launcher.main(["cancel", str(out), "delta"]) == 0  # the broken request is the run's to reject
    assert "cancel 'delta' requested" in capsys.readouterr().out
    assert launcher.main(["submit", str(out), str(tmp_path)]) == 2  # a directory for the job file
    assert f"error: {tmp_path}: cannot read job file" in capsys.readouterr().err
    assert launcher.main(["cancel", str(job_file), "delta"]) == 2  # a file for the run's directory
    assert f"error: {job_file}: not a run directory" in capsys.readouterr().err
    assert not (out / CHECKPOINTS).exists()


def test_cancelling_every_job_ends_the_run_cleanly(workspace):
    out = workspace[0] / "all-cancelled"
    control = ControlDir(out)
    for job in JOBS:
        control.request("cancel", {"name": job["name"]})
    proc = ranks(2, write(workspace, "all-cancelled", CK_JOBS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    cancelled = {r["job"]: r["step"] for r in records(out) if r.get("event") == "cancelled"}
    assert set(cancelled) == {job["name"] for job in JOBS}
    for name, step in cancelled.items():
        line = f"{name}: cancelled after {step} steps" if step else f"{name}: cancelled before its first step"
        assert line in proc.stdout, proc.stdout[-2000:]
        assert json.loads((out / name / "cancelled.json").read_text())["cancelled_after_steps"] == step


def test_a_damaged_accepted_log_is_one_line_not_a_traceback(workspace, capsys):
    out = workspace[0] / "damaged"
    (out / "control").mkdir(parents=True)
    (out / "control" / "accepted.jsonl").write_text('{"submit": [], "cancel": {}}\n{"submit": [\n')
    config = write(workspace, "damaged", JOBS[:1])
    assert launcher.main([str(config), "--no-live"]) == launcher.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: {out / 'control' / 'accepted.jsonl'} line 2: not an accepted change" in err


def test_the_launchers_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as ended:
        launcher.main(["--help"])
    assert ended.value.code == 0
    printed = capsys.readouterr().out
    for name in launcher.SUBCOMMANDS:
        assert f"python -m launcher {name} " in printed, printed
