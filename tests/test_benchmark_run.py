"""`python -m benchmarks.run --quick` runs every method end to end and they all train the same tokens."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import METHODS, _last_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_quick_loopback_runs_every_runtime_on_the_same_tokens(tmp_path):
    """One method of each runtime and each calibration family: ours on 2 ranks and on 1, torch's
    Schedule1F1B, FSDP2 and peft. Our other schedules (`lora-apart`, `1f1b`, `gpipe`) run on the same
    runtime with another schedule, checked against one rank in test_pipeline.py; leaving them out
    here saves a third of this test's time (each method is a few seconds of process start-up)."""
    out = tmp_path / "loopback.json"
    chosen = ["lora", "torch-1f1b", "fsdp2", "single", "peft"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--scenario", "loopback", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), "--methods", ",".join(chosen)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == set(chosen) and set(chosen) <= {m.key for m in METHODS}
    for key, r in methods.items():
        assert r["tokens_per_s"] > 0 and r["makespan_s"] > 0, key
        assert len(r["peak_rss_mib"]) == r["ranks"] and all(v > 0 for v in r["peak_rss_mib"]), key
        assert r["jct_s"] and all(0 < t <= r["makespan_s"] * 1.05 for t in r["jct_s"].values()), key
    assert len({r["tokens"] for r in methods.values()}) == 1, {k: r["tokens"] for k, r in methods.items()}
    assert all(c["pass"] for c in result["consistency"]), result["consistency"]
    for key in ("lora", "torch-1f1b", "fsdp2"):  # the 2-rank methods exchanged data
        assert all(v > 0 for v in methods[key]["sent_mib"]), key
    assert "method" in proc.stdout and "tokens/s" in proc.stdout  # the table
    # the simulator, calibrated on short runs: ours per rank count, each baseline on its own runtime
    assert set(result["calibration"]) == {"ours-1", "ours-2", "torch-1f1b", "fsdp2", "peft"}
    assert all(r["predicted_makespan_s"] > 0 for r in methods.values())
    assert "predicted vs measured makespan" in proc.stdout


def test_job_completion_comes_from_the_trace_only_where_it_kept_every_action():
    """A trace that left a stage's middle out may have lost a job's last step: the benchmark then
    times jobs from metrics.jsonl instead (`_last_steps` gives None)."""
    steps = [{"ph": "X", "cat": "S", "name": "S a:0", "ts": 0, "dur": 1e6},
             {"ph": "X", "cat": "S", "name": "S a:1", "ts": 2e6, "dur": 1e6}]
    whole = {"traceEvents": steps, "mlora_pp_stages": [{"actions": 2, "kept": 2}]}
    assert _last_steps(whole) == {"a": 3.0}
    assert _last_steps({"traceEvents": steps}) == {"a": 3.0}  # written before the totals existed
    assert _last_steps({"traceEvents": steps, "mlora_pp_stages": [{"actions": 9, "kept": 2}]}) is None
