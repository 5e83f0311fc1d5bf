"""`python -m launcher status OUTPUT_DIR`: a run's job states, speeds and ETAs from its metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import launcher.__main__ as launcher
from mlora_pp.status import headline, read_status, render

WALL = 1_764_000_000.0


def write_metrics(directory: Path, records: list[dict], tail: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (directory / "metrics.jsonl").write_text(text)
    return directory


def run_line(jobs: dict[str, int], time: float = 0.0, wall: float = WALL) -> dict:
    return {"event": "run", "jobs": {n: {"total_steps": t, "priority": 0} for n, t in jobs.items()},
            "admission": "fifo", "stages": 2, "wall_clock": wall, "time": time}


def step(job: str, n: int, time: float, loss: float = 2.0, tokens: int = 100) -> dict:
    return {"job": job, "step": n, "loss": loss, "tokens": tokens, "loss_tokens": tokens - 4, "lr": 5e-4, "time": time}


def by_name(status):
    return {job.name: job for job in status.jobs}


def words(text: str) -> str:
    """The text's words, one space apart: a table's caption wraps at its width."""
    return " ".join(text.split())


def table_text(status) -> str:
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(render(status))
    return console.export_text()


def test_every_job_state_in_a_running_run(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"done": 2, "run": 10, "wait": 4, "bad": 5, "stop": 8}),
        {"event": "stage", "rank": 0, "busy_s": 1.0},
        {"event": "admitted", "job": "done", "time": 1.0},
        {"event": "admitted", "job": "run", "time": 1.0},
        {"event": "admitted", "job": "bad", "time": 1.0},
        {"event": "admitted", "job": "stop", "time": 2.0},
        step("done", 1, 2.0, loss=3.0), step("run", 1, 2.0), step("bad", 1, 2.0),
        step("done", 2, 3.0, loss=2.5), step("run", 2, 3.0, loss=1.75), step("stop", 1, 3.0),
        {"event": "failed", "job": "bad", "step": 2, "reason": "non-finite gradients at step 2 on stage 0",
         "time": 3.5},
        {"event": "balance", "whatever": [1, 2]},
        {"event": "memory", "rank": 0, "peak": 123},
        {"event": "cancelled", "job": "stop", "step": 1, "time": 4.0},
        step("run", 3, 5.0, tokens=200),
    ])
    status = read_status(out, now=WALL + 15.0)
    assert status.state == "running" and not status.finished
    assert status.runs == 1 and status.admission == "fifo" and status.stages == 2
    assert status.last_record_s == 5.0 and status.last_record_ago_s == pytest.approx(10.0)
    jobs = by_name(status)
    assert [j.name for j in status.jobs] == ["done", "run", "wait", "bad", "stop"]  # the run line's order
    assert {n: j.state for n, j in jobs.items()} == {
        "done": "done", "run": "running", "wait": "queued", "bad": "failed", "stop": "cancelled"}
    run = jobs["run"]
    assert (run.step, run.total_steps, run.loss) == (3, 10, 2.0)
    assert run.tokens_per_s == pytest.approx(400 / 4.0)  # 100+100+200 tokens from admission at 1.0 to 5.0
    assert run.eta_s == pytest.approx(4.0 / 3 * 7)  # 4 s for 3 steps, 7 steps left
    assert jobs["done"].eta_s is None and jobs["done"].tokens_per_s == pytest.approx(200 / 2.0)
    assert jobs["done"].loss == 2.5
    wait = jobs["wait"]
    assert (wait.step, wait.loss, wait.tokens_per_s, wait.eta_s) == (0, None, None, None)
    assert jobs["bad"].reason == "non-finite gradients at step 2 on stage 0" and jobs["bad"].eta_s is None
    assert jobs["bad"].step == 1 and jobs["stop"].eta_s is None

    text = table_text(status)
    assert "running (last record 10 s ago)" in text
    for column in ("job", "step", "loss", "tokens/s", "ETA", "state"):
        assert column in text
    assert "3/10" in text and "0/4" in text and "queued" in text and "non-finite gradients" in text


def test_a_run_without_its_done_line_is_running_while_locked_and_stopped_after(tmp_path, capsys):
    """No done line: "running" while a process holds the output_dir's lock (as rank 0 does for the
    whole run), "stopped" once none does (killed, interrupted); a run from before the lock (no lock
    file) stays "running", as nothing tells otherwise. `--watch` returns at once on a stopped run."""
    from mlora_pp.run_lock import RunLock

    out = write_metrics(tmp_path / "run", [
        run_line({"a": 4, "b": 2}),
        {"event": "admitted", "job": "a", "time": 0.5}, {"event": "admitted", "job": "b", "time": 0.5},
        step("a", 1, 1.0), step("b", 1, 1.0), step("b", 2, 2.0),
    ])
    assert read_status(out, now=WALL + 10.0).state == "running"  # no lock file
    lock = RunLock(out)
    lock.acquire("test")
    try:
        status = read_status(out, now=WALL + 10.0)
        assert status.state == "running" and not status.over
        assert {j.name: j.state for j in status.jobs} == {"a": "running", "b": "done"}
    finally:
        lock.release()
    status = read_status(out, now=WALL + 10.0)
    assert status.state == "stopped" and status.over and not status.finished
    assert {j.name: j.state for j in status.jobs} == {"a": "stopped", "b": "done"}
    assert all(j.eta_s is None for j in status.jobs)
    assert headline(status) == "stopped without finishing, last record 8 s ago: run its config again to resume"
    assert "stopped without finishing" in words(table_text(status))
    assert launcher.main(["status", str(out), "--watch", "0.01"]) == 0  # returns: nothing more will come
    assert launcher.main(["status", str(out), "--json"]) == 0
    capsys.readouterr()


def test_finished_run(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 2}),
        {"event": "admitted", "job": "a", "time": 0.5},
        step("a", 1, 1.0), step("a", 2, 1.5, loss=1.25),
        {"event": "stage", "rank": 0, "busy_s": 1.0, "wall_s": 2.0},
        {"event": "done", "time": 12.3},
    ])
    status = read_status(out, now=WALL + 1000)
    assert status.state == "finished" and status.finished_s == 12.3 and status.last_record_ago_s is None
    (a,) = status.jobs
    assert (a.state, a.step, a.total_steps, a.loss, a.eta_s) == ("done", 2, 2, 1.25, None)
    assert "finished in 12.3 s" in words(table_text(status))


def test_resumed_run_counts_only_the_latest_run_for_speed(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 6, "b": 2}),
        {"event": "admitted", "job": "a", "time": 0.0},
        {"event": "admitted", "job": "b", "time": 0.0},
        step("a", 1, 1.0, tokens=1000), step("b", 1, 1.0), step("a", 2, 2.0, tokens=1000), step("b", 2, 2.0),
        step("a", 3, 3.0, loss=1.5, tokens=1000),
        {"event": "failed", "job": "b", "step": 3, "reason": "old failure", "time": 3.0},  # an earlier run's
        # killed: no done line. The resume appends to the same file; its times start at 0 again.
        run_line({"a": 6, "b": 2}, wall=WALL + 100),
        {"event": "resumed", "job": "a", "step": 3, "checkpoint": "ckpt/a/step-3"},
        {"event": "resumed", "job": "b", "step": 2, "checkpoint": "ckpt/b/step-2"},
    ])
    status = read_status(out, now=WALL + 100.5)
    assert status.runs == 2 and status.state == "running"
    a, b = status.jobs
    assert (a.state, a.step, a.loss, a.tokens_per_s, a.eta_s) == ("queued", 3, 1.5, None, None)
    assert (b.state, b.step, b.reason) == ("done", 2, None)  # an earlier run's failure is not this run's
    assert status.last_record_ago_s == pytest.approx(0.5)

    with (out / "metrics.jsonl").open("a") as f:
        for record in ({"event": "admitted", "job": "a", "time": 10.0}, step("a", 4, 11.0, loss=1.0, tokens=50),
                       step("a", 5, 12.0, loss=0.5, tokens=50)):
            f.write(json.dumps(record) + "\n")
    status = read_status(out, now=WALL + 113.0)
    a = by_name(status)["a"]
    assert (a.state, a.step, a.total_steps, a.loss) == ("running", 5, 6, 0.5)  # steps continue
    assert a.tokens_per_s == pytest.approx(100 / 2.0)  # this run's tokens only
    assert a.eta_s == pytest.approx(1.0)  # 2 s for this run's 2 steps, 1 step left
    assert status.last_record_ago_s == pytest.approx(1.0)


def test_truncated_last_line_and_unknown_events_are_skipped(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 4}),
        {"event": "from-the-future", "job": "a", "step": 99, "time": 0.1},
        {"job": "a", "step": 1, "loss": 2.0, "tokens": 10, "time": 1.0, "new_field": [1]},
        ["not", "an", "object"],
    ], tail='{"job": "a", "step": 2, "loss": 1.9, "tok')
    status = read_status(out, now=WALL + 1.0)
    (a,) = status.jobs
    assert (a.state, a.step, a.loss) == ("running", 1, 2.0)
    assert a.tokens_per_s is None and a.eta_s is None  # one record without an admitted time: no interval yet


def test_missing_totals_without_run_line(tmp_path):
    out = write_metrics(tmp_path / "old", [
        step("x", 1, 1.0), step("y", 1, 1.0), step("x", 2, 2.0, tokens=300), step("x", 3, 3.0, tokens=300),
        {"event": "failed", "job": "y", "step": 2, "reason": "nan", "time": 2.5},
    ])
    status = read_status(out)
    assert status.runs == 0 and status.state == "running" and status.last_record_ago_s is not None
    x, y = status.jobs
    assert (x.state, x.step, x.total_steps, x.eta_s) == ("running", 3, None, None)
    assert x.tokens_per_s == pytest.approx(600 / 2.0)  # from its first record: that record's own tokens left out
    assert y.state == "failed"
    row = next(line for line in table_text(status).splitlines() if line.startswith("│ x "))  # x's row only:
    assert " 3 " in row and "3/" not in row  # the title's output path may hold "3/" (pytest-193/)

    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "done", "time": 4.0}) + "\n")
    status = read_status(out)
    assert status.state == "finished" and [j.state for j in status.jobs] == ["done", "failed"]


def test_old_resumed_file_without_run_lines_starts_a_new_run_at_resume(tmp_path):
    out = write_metrics(tmp_path / "old", [
        step("x", 1, 1.0), step("x", 2, 50.0),
        {"event": "resumed", "job": "x", "step": 2, "checkpoint": "c"},
        step("x", 3, 1.0, tokens=10), step("x", 4, 2.0, tokens=10),
    ])
    (x,) = read_status(out).jobs
    assert x.step == 4 and x.tokens_per_s == pytest.approx(10 / 1.0)


def test_cli_json(tmp_path, capsys):
    out = write_metrics(tmp_path / "run", [run_line({"a": 2, "b": 3}), step("a", 1, 1.0), step("a", 2, 2.0),
                                           {"event": "done", "time": 2.5}])
    assert launcher.main(["status", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "finished" and data["finished_s"] == 2.5 and data["output_dir"] == str(out)
    jobs = {j["name"]: j for j in data["jobs"]}
    assert jobs["a"]["state"] == "done" and jobs["a"]["step"] == 2 and jobs["a"]["total_steps"] == 2
    assert jobs["b"]["state"] == "queued" and jobs["b"]["eta_s"] is None


def test_the_status_command_answers_without_importing_torch(tmp_path):
    """`python -m launcher status` only reads a file: it must not pay the seconds of importing torch
    and transformers that a rank does (`-X importtime` lists every module a process imports)."""
    out = write_metrics(tmp_path / "run", [run_line({"a": 1}), step("a", 1, 1.0), {"event": "done", "time": 1.5}])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", "status", str(out), "--json"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["state"] == "finished"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "mlora_pp.status" in imported and not {"torch", "transformers"} & imported


def test_latest_evaluation_is_shown_per_job(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 4, "b": 2}),
        step("a", 1, 1.0), step("a", 2, 1.5),
        {"job": "a", "event": "eval", "step": 2, "eval_loss": 3.5, "eval_loss_tokens": 70, "time": 1.6},
        step("a", 3, 2.0), step("b", 1, 2.1),
        {"job": "a", "event": "eval", "step": 4, "eval_loss": 2.75, "eval_loss_tokens": 70, "time": 2.6},
    ])
    got = by_name(read_status(out, now=WALL + 3))
    assert (got["a"].eval_loss, got["a"].eval_step) == (2.75, 4)
    assert (got["b"].eval_loss, got["b"].eval_step) == (None, None)
    assert got["a"].step == 3  # an evaluation is not a step record
    text = table_text(read_status(out, now=WALL + 3))
    assert "eval loss" in text and "2.7500 (4)" in text
    plain = write_metrics(tmp_path / "plain", [run_line({"a": 1}), step("a", 1, 1.0)])
    assert "eval loss" not in table_text(read_status(plain, now=WALL + 3))


def test_a_clipped_jobs_last_gradient_norm_is_shown(tmp_path):
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 4, "b": 2}),
        dict(step("a", 1, 1.0), grad_norm=1.25), dict(step("a", 2, 1.5), grad_norm=0.875), step("b", 1, 2.1),
    ])
    status = read_status(out, now=WALL + 3)
    assert (by_name(status)["a"].grad_norm, by_name(status)["b"].grad_norm) == (0.875, None)
    text = table_text(status)
    assert "grad norm" in text and "0.8750" in text
    plain = write_metrics(tmp_path / "plain", [run_line({"a": 1}), step("a", 1, 1.0)])
    assert "grad norm" not in table_text(read_status(plain, now=WALL + 3))


def test_cli_table_and_watch_of_a_finished_run(tmp_path, capsys):
    out = write_metrics(tmp_path / "run", [run_line({"alpha": 1}), step("alpha", 1, 1.0),
                                           {"event": "done", "time": 1.5}])
    assert launcher.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "1/1" in text and "finished in 1.5 s" in text
    assert launcher.main(["status", str(out), "--watch", "0.01"]) == 0  # returns at once: the run is done
    assert "alpha" in capsys.readouterr().out


@pytest.mark.parametrize("make", ["missing", "empty-dir"])
def test_cli_error_without_metrics(tmp_path, capsys, make):
    target = tmp_path / "nowhere"
    if make == "empty-dir":
        target.mkdir()
    assert launcher.main(["status", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {target}: no metrics.jsonl (not a run directory?)\n"


# --- end to end: a real tiny 1-rank run --------------------------------------------------------------------------

def test_status_of_a_real_run(tmp_path):
    from mlora_pp.config import parse_config
    from mlora_pp.tiny import make_tiny_model
    from mlora_pp.training import train
    from test_training import JOBS, make_raw, write_dataset

    jobs = [dict(JOBS[0], max_steps=2), dict(JOBS[1], max_steps=1)]
    model = make_tiny_model(tmp_path / "model", layers=2, seed=7)
    data = {job["name"]: write_dataset(tmp_path / f"{job['name']}.jsonl", seed=i) for i, job in enumerate(jobs)}
    cfg = parse_config(make_raw((tmp_path, model, data), jobs, "out", schedule="lora"), "test.yaml")
    train(cfg, progress=False)

    status = read_status(cfg.output_dir)
    totals = {job["name"]: job["max_steps"] for job in jobs}
    got = by_name(status)
    assert set(got) == set(totals)
    for name, total in totals.items():
        assert got[name].step == total and got[name].loss is not None
        # Without the run line (older training code) the totals come from the config instead.
        assert got[name].total_steps in (total, None)
        assert got[name].state == "done" or (got[name].total_steps is None and got[name].state == "running")
    if status.runs:  # training writes run/done lines
        assert status.state == "finished" and all(j.state == "done" for j in status.jobs)
    memory = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
              if '"event": "memory"' in line]
    assert [(m.predicted_bytes, m.measured_bytes) for m in status.memory] == [
        (r["predicted_peak_bytes"], r["measured_peak_bytes"]) for r in memory]


def test_memory_shows_the_plans_predicted_peaks_then_the_measured_ones(tmp_path):
    MiB = 2**20
    start = dict(run_line({"alpha": 2}), memory_budget_bytes=64 * MiB, predicted_peak_bytes=[30 * MiB, 20 * MiB])
    running = write_metrics(tmp_path / "running", [start, step("alpha", 1, 1.0)])
    status = read_status(running, now=WALL + 2)
    assert [(m.stage, m.predicted_bytes, m.measured_bytes) for m in status.memory] == [
        (0, 30 * MiB, None), (1, 20 * MiB, None)]
    assert "memory: stage 0 predicted 30.0 MiB; stage 1 predicted 20.0 MiB (budget 64.0 MiB)" in words(table_text(status))
    replanned = write_metrics(tmp_path / "replanned", [start, step("alpha", 1, 1.0), {
        "event": "plan", "predicted_peak_bytes": [33 * MiB, 21 * MiB], "time": 1.1}])  # a job submitted mid-run
    assert [m.predicted_bytes for m in read_status(replanned).memory] == [33 * MiB, 21 * MiB]
    ended = [{"event": "memory", "rank": r, "predicted_peak_bytes": p, "measured_peak_bytes": m, "time": 2.0}
             for r, p, m in ((0, 31 * MiB, 29 * MiB), (1, 20 * MiB, 19 * MiB))]
    done = write_metrics(tmp_path / "done", [start, step("alpha", 1, 1.0), step("alpha", 2, 2.0), *ended,
                                             {"event": "done", "time": 2.1}])
    text = words(table_text(read_status(done)))
    assert ("memory: stage 0 predicted 31.0 MiB, measured 29.0 MiB; stage 1 predicted 20.0 MiB, measured 19.0 MiB "
            "(budget 64.0 MiB)") in text
    assert read_status(done).to_json()["memory"][0] == {"stage": 0, "predicted_bytes": 31 * MiB,
                                                        "measured_bytes": 29 * MiB}
    assert "memory: stage" not in words(table_text(read_status(write_metrics(tmp_path / "none", [run_line({"alpha": 1})]))))


def test_a_paused_job_shows_paused_until_its_next_step(tmp_path):
    """A job pre-empted for a more urgent one (a `paused` event) is `paused`, not running, until it
    finishes a step again."""
    records = [run_line({"low": 6, "urgent": 2}),
               {"event": "admitted", "job": "low", "time": 0.5}, step("low", 1, 1.0), step("low", 2, 2.0),
               {"event": "paused", "job": "low", "step": 2, "for": "urgent", "time": 2.5},
               {"event": "admitted", "job": "urgent", "time": 2.6}, step("urgent", 1, 3.0)]
    out = write_metrics(tmp_path / "run", records)
    assert {j.name: j.state for j in read_status(out, now=WALL + 4).jobs} == {"low": "paused", "urgent": "running"}
    assert "paused" in table_text(read_status(out, now=WALL + 4))
    write_metrics(out, records + [step("urgent", 2, 4.0), step("low", 3, 5.0)])
    assert {j.name: j.state for j in read_status(out, now=WALL + 6).jobs} == {"low": "running", "urgent": "done"}



def test_priorities_come_from_the_run_line_submissions_and_changes_and_show_under_priority_admission(tmp_path):
    records = [dict(run_line({"a": 4, "b": 4}), admission="priority"),
               {"event": "submitted", "job": "c", "total_steps": 2, "priority": 3, "time": 1.0},
               {"event": "priority", "job": "b", "priority": 7, "time": 2.0}]
    out = write_metrics(tmp_path / "run", records)
    status = read_status(out, now=WALL + 3)
    assert {j.name: j.priority for j in status.jobs} == {"a": 0, "b": 7, "c": 3}
    text = table_text(status)
    assert "priority" in text and "7" in text
    write_metrics(out, [run_line({"a": 4})])  # fifo: priorities order nothing, no column
    assert "priority" not in table_text(read_status(out, now=WALL + 3))


def test_watching_reads_only_what_was_appended_and_equals_reading_the_whole_file(tmp_path):
    """`--watch` keeps one `StatusReader`: after every piece of the file written so far (cut at
    random bytes, mid-line included) its status equals a fresh read of the same bytes. A file
    written anew (a fresh run) is read from its start. Step records are summed, not kept."""
    import random

    from mlora_pp.status import StatusReader

    records = [run_line({"a": 6, "b": 2, "c": 3}), {"event": "admitted", "job": "a", "time": 0.5},
               {"event": "admitted", "job": "b", "time": 0.5}, step("a", 1, 1.0, tokens=1000), step("b", 1, 1.5),
               {"event": "eval", "job": "a", "step": 1, "eval_loss": 1.25, "time": 1.6}, step("a", 2, 2.0, tokens=900),
               {"event": "paused", "job": "b", "time": 2.1}, {"event": "cancelled", "job": "c", "step": 0, "time": 2.2},
               run_line({"a": 6, "b": 2, "c": 3}, wall=WALL + 50),
               {"event": "resumed", "job": "a", "step": 2, "checkpoint": "x"},
               {"event": "admitted", "job": "a", "time": 1.0}, step("a", 3, 2.0, loss=1.5, tokens=80),
               step("a", 4, 3.0, loss=1.25, tokens=70), {"event": "done", "time": 3.5}]
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    rng = random.Random(2)
    cuts = sorted(rng.sample(range(1, len(text)), 25)) + [len(text)]
    run = tmp_path / "run"
    run.mkdir()
    path, whole = run / "metrics.jsonl", tmp_path / "whole"
    whole.mkdir()
    path.write_bytes(b"")
    reader = StatusReader(run)
    for cut in cuts:
        with path.open("ab") as f:
            f.write(text[len(path.read_bytes()):cut])
        (whole / "metrics.jsonl").write_bytes(text[:cut])
        assert reader.read(now=WALL + 60).to_json() | {"output_dir": ""} == \
            read_status(whole, now=WALL + 60).to_json() | {"output_dir": ""}
    assert reader.read(now=WALL + 60).state == "finished"
    assert reader._jobs["a"].steps.count == 2  # this run's two steps, summed
    path.write_bytes(text[:text.index(b"\n") + 1])  # written anew: one run line
    assert [j.step for j in reader.read(now=WALL + 60).jobs] == [0, 0, 0]


def test_a_resume_does_not_show_the_stopped_runs_later_steps(tmp_path):
    """Killed after step 5 with a checkpoint of a at step 3 and none of b: the resumed run redoes a from
    step 3 and b from 0. Status showed the killed run's steps and losses until each job's next step."""
    out = write_metrics(tmp_path / "run", [
        run_line({"a": 10, "b": 10}),
        step("a", 3, 3.0, loss=1.3), step("b", 3, 3.0), step("a", 5, 5.0, loss=1.1), step("b", 5, 5.0, loss=1.7),
        run_line({"a": 10, "b": 10}, wall=WALL + 100),
        {"event": "resumed", "job": "a", "step": 3, "checkpoint": "ckpt/a/step-3"},
    ])
    a, b = read_status(out, now=WALL + 100.5).jobs
    assert (a.step, a.loss) == (3, None)  # step 5's loss is not step 3's
    assert (b.step, b.loss) == (0, None)
