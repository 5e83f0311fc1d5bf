"""The demo and the public entry points, end to end through torchrun, at a small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mlora_pp.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def small_demo_config(tmp_path: Path, steps: int = 3) -> Path:
    """configs/demo.yaml, pointed at a small model in tmp_path and capped at a few steps."""
    raw = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    raw["model"]["path"] = str(make_tiny_model(tmp_path / "model", layers=2, init_std=0.06))
    raw["output_dir"] = str(tmp_path / "out")
    for job in raw["jobs"]:
        job["data"] = str(ROOT / job["data"])
        job["eval_data"] = str(ROOT / job["eval_data"])
        if job["template"].endswith((".yaml", ".json")):
            job["template"] = str(ROOT / job["template"])
        job["max_steps"] = steps
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_demo_runs_end_to_end(tmp_path):
    config = small_demo_config(tmp_path)
    proc = run(["-m", "mlora_pp.demo", "--config", str(config), "--heldout", str(ROOT / "configs/data/heldout.json")],
               cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    names = [job["name"] for job in yaml.safe_load(config.read_text())["jobs"]]
    for name in names:
        assert (out / name / "adapter_config.json").is_file()
        assert (out / name / "adapter_model.safetensors").is_file()
        assert f"task '{name}'" in proc.stdout  # the generations table of each task was printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "job" in r and "event" not in r]
    assert sorted({(r["job"], r["step"]) for r in steps}) == sorted((n, s) for n in names for s in (1, 2, 3))
    evals = [r for r in records if r.get("event") == "eval"]  # eval_every 50 > 3 steps: after the last only
    assert sorted((r["job"], r["step"]) for r in evals) == sorted((n, 3) for n in names)
    assert all(r["eval_loss"] > 0 and r["eval_loss_tokens"] > 0 for r in evals)
    stages = [r for r in records if r.get("event") == "stage"]
    assert [r["rank"] for r in stages] == [0, 1] and all(0 < r["utilization"] <= 1 for r in stages)
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert {e["cat"] for e in trace if e["ph"] == "X"} >= {"F", "B", "S"}


def test_generate_cli_with_adapter_and_base(tmp_path):
    config = small_demo_config(tmp_path, steps=1)
    assert run(["-m", "launcher", str(config), "--no-live"], cwd=ROOT).returncode == 0
    model = yaml.safe_load(config.read_text())["model"]["path"]
    proc = run(["-m", "mlora_pp.generate", "--model", model, "--adapter", str(tmp_path / "out/upper"),
                "--template", "alpaca", "--max-new-tokens", "4", "Uppercase the words.", "--input", "the of"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[upper]") == 1 and proc.stdout.count("[(base)]") == 1


def test_generate_cli_names_a_missing_adapter_in_one_line(tmp_path, capsys):
    from mlora_pp import generate
    from mlora_pp.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m", layers=1)
    capsys.readouterr()  # the model writer's progress bar
    missing = tmp_path / "no-such-adapter"
    assert generate.main(["--model", str(model), "--adapter", str(missing), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(missing) in err, err


def test_bad_config_is_one_line_exit_2(tmp_path):
    config = small_demo_config(tmp_path)
    config.write_text(config.read_text().replace("rank: 16", "rank: -1", 1))
    proc = run(["-m", "launcher", str(config)], cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "jobs[0].rank" in lines[0] and str(config) in lines[0]


def test_missing_data_file_is_one_line_exit_2(tmp_path):
    config = small_demo_config(tmp_path)
    config.write_text(config.read_text().replace("upper.jsonl", "nope.jsonl"))
    proc = run(["-m", "launcher", str(config)], cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nope.jsonl" in proc.stderr


def test_output_dir_that_is_a_file_is_one_line_exit_2(tmp_path):
    config = small_demo_config(tmp_path)
    (tmp_path / "out").write_text("not a directory")
    proc = run(["-m", "launcher", str(config)], cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "output_dir:" in proc.stderr and "is not a directory" in proc.stderr


def test_sigterm_stops_a_single_rank_run_with_its_jobs_checkpointed(tmp_path):
    """SIGTERM while training: the run stops at its next decision point with every unfinished job
    checkpointed at its last finished step, says so in one line, and exits 143."""
    import signal
    import time

    config = small_demo_config(tmp_path, steps=500)
    raw = yaml.safe_load(config.read_text())
    raw["log_every"] = 1
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", str(config), "--no-live"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)  # until training has started
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: rank 0: stopped by SIGTERM after ")
    stopped = {r["job"]: r["step"] for r in map(json.loads, metrics.read_text().splitlines())
               if r.get("event") == "stopped"}
    assert set(stopped) == {job["name"] for job in raw["jobs"]} and all(0 < n < 500 for n in stopped.values())
    for name, steps in stopped.items():
        assert f"{name}: stopped after {steps} of its steps" in out
        assert (tmp_path / "out" / "checkpoints" / name / f"step-{steps}" / "manifest.json").is_file()


def test_ctrl_c_ends_a_run_with_one_line_and_the_next_run_resumes(tmp_path):
    """SIGINT (Ctrl-C) mid-run: one line, exit code 130, no traceback; run again, every job resumes
    from its newest checkpoint (one after every step here) and finishes."""
    import signal
    import time

    config = small_demo_config(tmp_path, steps=40)
    raw = yaml.safe_load(config.read_text())
    raw["log_every"] = 1
    for job in raw["jobs"]:
        job["save_every"] = 1
    config.write_text(yaml.safe_dump(raw))
    # SIGINT's default back: a shell that runs the suite in the background ignores it for its children
    proc = subprocess.Popen([sys.executable, "-m", "launcher", str(config), "--no-live"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until every job has logged 2 steps: step 1's part was queued
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        logged = [r["job"] for r in records if "event" not in r]
        if all(logged.count(job["name"]) >= 2 for job in raw["jobs"]):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("error: rank 0: interrupted (Ctrl-C); running this config again resumes "
                                            "every job from its newest checkpoint")
    rerun = run(["-m", "launcher", str(config), "--no-live"], cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [json.loads(line) for line in metrics.read_text().splitlines() if '"resumed"' in line]
    assert {r["job"] for r in resumed} == {job["name"] for job in raw["jobs"]}, resumed
    assert all(0 < r["step"] < 40 for r in resumed), resumed
    for job in raw["jobs"]:
        assert (tmp_path / "out" / job["name"] / "adapter_model.safetensors").is_file()
