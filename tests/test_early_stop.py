"""Early stopping on held-out loss: when a job stops, which adapter it keeps, and that a restart or
a resume keeps the same decision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from test_checkpoint import Stop
from test_evaluation import peft_eval_loss
from test_pipeline import ranks
from test_training import JOBS, adapter, assert_adapters_equal, make_raw, make_workspace, rel_err, write_dataset

from mlora_pp.checkpoint import step_dirs
from mlora_pp.config import ConfigError, parse_config
from mlora_pp.early_stop import EarlyStopping
from mlora_pp.runtime import StageWorker
from mlora_pp.status import read_status
from mlora_pp.training import train

PATIENCE = 2


def test_patience_counts_evaluations_without_a_new_best():
    early = EarlyStopping()
    early.watch("a", 2, [1, 2, 3, 4, 5, 6])
    assert early.keep("a") == {1, 2, 3, 4, 5, 6}  # nothing heard: any may become the best
    assert not early.observe("a", 1, 3.0) and early.best("a") == (1, 3.0)
    assert not early.observe("a", 2, 3.5)  # one worse
    assert not early.observe("a", 3, 2.5) and early.best("a") == (3, 2.5)  # a new best resets the count
    assert early.keep("a") == {3, 4, 5, 6}
    assert not early.observe("a", 4, 2.5)  # equal is not better
    assert not early.observe("a", 3, 0.1)  # a step heard already changes nothing
    assert early.observe("a", 5, float("nan"))  # NaN is never a new best: patience runs out here, once
    assert early.decided("a") and early.best("a") == (3, 2.5) and early.keep("a") == {3}
    assert not early.observe("a", 6, 0.0) and early.best("a") == (3, 2.5)  # after the decision: logged only
    assert not early.observe("b", 1, 1.0) and early.best("b") is None and early.keep("b") == set()


def test_bad_early_stopping_settings_name_the_field(tmp_path):
    base = {"model": {"path": str(tmp_path)}, "jobs": [dict(name="a", data="d.jsonl", eval_data="e.jsonl")]}
    base["jobs"][0]["early_stop_patience"] = 2
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.early_stop_patience: needs eval_every"):
        parse_config(base, "t.yaml")
    base["jobs"][0].update(eval_every=1, early_stop_patience=0)
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.early_stop_patience: must be at least 1"):
        parse_config(base, "t.yaml")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root, model, data = make_workspace(tmp_path_factory.mktemp("early"), layers=3)
    return (root, model, data), write_dataset(root / "heldout.jsonl", seed=99, n=7)


def jobs(heldout: Path, patience: int | None = PATIENCE) -> list[dict]:
    """alpha's learning rate is high enough that its held-out loss turns back up (18 steps planned);
    gamma trains as usual next to it."""
    alpha = dict(JOBS[0], lr=0.3, epochs=3, max_steps=None, save_every=None, keep_last=1,
                 eval_data=str(heldout), eval_every=1, early_stop_patience=patience)
    return [alpha, JOBS[2]]


def expected(losses: dict[int, float], patience: int) -> tuple[int, int]:
    """(best step, step whose evaluation runs out of patience), computed from the logged losses."""
    best, worse = None, 0
    for step in sorted(losses):
        if best is None or losses[step] < losses[best]:
            best, worse = step, 0
        else:
            worse += 1
            if worse == patience:
                return best, step
    raise AssertionError(f"patience never ran out: {losses}")


def early_stop_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == "early_stopped"]


@pytest.fixture(scope="module")
def stopped(workspace):
    ws, heldout = workspace
    result = train(parse_config(make_raw(ws, jobs(heldout), "stopped"), "t.yaml"), progress=False)
    return result, ws[0] / "stopped"


def test_a_job_stops_early_and_keeps_its_best_evaluations_adapter(workspace, stopped):
    ws, heldout = workspace
    result, out = stopped
    losses = result.eval_loss["alpha"]
    best, decided = expected(losses, PATIENCE)
    assert best > 1, losses  # the held-out loss fell first, then rose
    assert result.best["alpha"] == (best, losses[best])
    assert decided <= result.early_stopped["alpha"] < 18 and result.steps["alpha"] == result.early_stopped["alpha"]
    assert "gamma" not in result.early_stopped and result.steps["gamma"] == 4
    # The adapter written is the best step's: peft on it gives that evaluation's held-out loss.
    assert peft_eval_loss(ws[1], out / "alpha", heldout) == pytest.approx(losses[best], rel=1e-5)
    note = json.loads((out / "alpha" / "early_stopping.json").read_text())
    assert (note["best_step"], note["stopped_early_after_steps"]) == (best, result.early_stopped["alpha"])
    # keep_last 1 keeps the newest checkpoint and the best one
    assert [s for s, _ in step_dirs(out, "alpha")] == [best, result.early_stopped["alpha"]]
    (record,) = early_stop_records(out)
    assert (record["job"], record["step"], record["best_step"]) == ("alpha", result.early_stopped["alpha"], best)
    assert {j.name: j.state for j in read_status(out).jobs} == {"alpha": "stopped early", "gamma": "done"}


def test_the_other_job_trains_as_without_early_stopping(workspace, stopped):
    ws, heldout = workspace
    train(parse_config(make_raw(ws, jobs(heldout, patience=None), "patient"), "t.yaml"), progress=False)
    ours, ref = adapter(stopped[1], "gamma"), adapter(ws[0] / "patient", "gamma")
    assert all(rel_err(ours[p][i], ref[p][i]) < 1e-5 for p in ref for i in (0, 1))


def test_a_restart_keeps_the_decision_and_the_adapter(workspace, stopped, capsys):
    ws, heldout = workspace
    result, out = stopped
    before = {name: (out / name / "adapter_model.safetensors").read_bytes() for name in ("alpha", "gamma")}
    capsys.readouterr()
    again = train(parse_config(make_raw(ws, jobs(heldout), "stopped"), "t.yaml"), progress=False)
    printed = capsys.readouterr().out
    assert "[alpha] resuming" not in printed and "stopped early at step" in printed, printed
    assert again.best["alpha"] == result.best["alpha"] and again.early_stopped == result.early_stopped
    for name, data in before.items():
        assert (out / name / "adapter_model.safetensors").read_bytes() == data, name
    last_run = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_run = last_run[max(i for i, r in enumerate(last_run) if r.get("event") == "run"):]
    assert not [r for r in last_run if "loss" in r], "a job trained again"
    again_stopped = next(r for r in last_run if r.get("event") == "early_stopped" and r["job"] == "alpha")
    assert (again_stopped["best_step"], again_stopped["best_eval_loss"]) == result.best["alpha"]
    assert read_status(out).jobs[0].state == "stopped early"


def test_a_resumed_run_remembers_the_evaluations_before_its_checkpoint(workspace, stopped, monkeypatch):
    """Stopped (like a kill) right after the evaluation that follows the best one, the run resumes
    from that step's checkpoint: the evaluations logged before it still count, so the same step
    stays the best and the adapter is the uninterrupted run's."""
    ws, heldout = workspace
    result, _ = stopped
    best, _ = expected(result.eval_loss["alpha"], PATIENCE)
    real = StageWorker.evaluate

    def evaluate(self, mb, *args):
        real(self, mb, *args)
        if any(p.job == "alpha" and p.step == best + 1 and p.last_in_step for p in mb.parts):
            raise Stop()

    monkeypatch.setattr(StageWorker, "evaluate", evaluate)
    cfg = parse_config(make_raw(ws, jobs(heldout), "resumed"), "t.yaml")
    with pytest.raises(Stop):
        train(cfg, progress=False)
    monkeypatch.setattr(StageWorker, "evaluate", real)
    again = train(cfg, progress=False)
    assert again.resumed["alpha"] == best + 1
    assert again.best["alpha"][0] == best and again.best["alpha"][1] == pytest.approx(result.best["alpha"][1], rel=1e-6)
    ours, ref = adapter(cfg.output_dir, "alpha"), adapter(stopped[1], "alpha")
    assert all(rel_err(ours[p][i], ref[p][i]) <= 1e-6 for p in ref for i in (0, 1))


def test_two_stages_stop_at_the_same_best_step_with_the_same_adapter(workspace, stopped):
    ws, heldout = workspace
    result, out = stopped
    raw = make_raw(ws, jobs(heldout), "stopped-two", schedule="lora", timeout_s=60)
    config = ws[0] / "stopped-two.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = ranks(2, config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = ws[0] / "stopped-two"
    note = json.loads((two / "alpha" / "early_stopping.json").read_text())
    assert note["best_step"] == result.best["alpha"][0]
    assert math.isclose(note["best_eval_loss"], result.best["alpha"][1], rel_tol=1e-4)
    assert "alpha: stopped early" in proc.stdout
    # Same adapters up to summation order and padding (one rank fuses the two jobs, so rows of
    # different lengths pad differently than apart on two stages). At alpha's learning rate of 0.3
    # AdamW moves every entry by about the rate whatever its gradient, so fp32 noise in tiny
    # gradients grows: 3e-3 relative on the worst tensor, 2.1e-5 on the held-out loss above.
    ours, ref = adapter(two, "alpha"), adapter(out, "alpha")
    assert all(rel_err(ours[p][i], ref[p][i]) < 1e-2 for p in ref for i in (0, 1))
    assert_adapters_equal(adapter(two, "gamma"), adapter(out, "gamma"))
