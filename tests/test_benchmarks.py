"""Benchmark scripts stay runnable: their smoke modes run the same code path at a tiny size."""

import argparse
import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks import data_loading, fused_projections, gpu, head_loss, host_overhead, planning


def test_gpu_benchmark_smoke_runs_on_any_device(capsys):
    assert gpu.main(["--smoke", "--vocab", "4096"]) == 0
    out = capsys.readouterr().out
    assert "1 jobs:" in out and "2 jobs:" in out and "tokens/s" in out
    assert '"vocab": 4096' in out  # the model was built with the vocabulary asked for


def test_flops_formula_counts_frozen_base_as_4n():
    from mlora_pp.tiny import build_config, build_tokenizer

    config = build_config(build_tokenizer(), layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256)
    f = gpu.flops_per_token(config, rank=8, seq=32)
    n_lin = 2 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256) + 128 * config.vocab_size
    assert f["base"] == 4 * n_lin
    assert f["lora_per_job_token"] == 2 * 6 * 8 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 256) * 2 + (256 + 128))
    assert f["attn"] == 6 * 2 * 32 * 128


def test_head_loss_benchmark_quick_runs(capsys):
    assert head_loss.main(["--quick"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1000 |")]
    assert len(rows) == 1 and "x |" in rows[0]


def test_host_overhead_counts_each_fused_layer_kernel_as_one_launch(tmp_path):
    """In bf16 a decoder layer calls the fused norm kernels twice and the SwiGLU and rotary kernels
    once, forward and backward; counted as the one kernel each is on CUDA, the frozen base launches
    fewer kernels than with their eager operators."""
    found = {}
    for how in ("fused", "eager"):
        out = tmp_path / f"{how}.json"
        assert host_overhead.main(["--layers", "1", "--jobs", "2", "--dropout", "0", "--reps", "1", "--seq", "8",
                                   "--dtype", "bfloat16", "--layer-kernels", how, "--out", str(out)]) == 0
        found[how] = json.loads(out.read_text())["base_only"]
    assert found["fused"]["forward"]["fused_calls"] == {
        "fused rms_norm_forward": 2, "fused silu_mul_forward": 1, "fused rotary_forward": 1}
    assert found["fused"]["backward"]["fused_calls"] == {
        "fused rms_norm_backward": 2, "fused silu_mul_backward": 1, "fused rotary_backward": 1}
    assert found["eager"]["forward"]["fused_calls"] == {} == found["eager"]["backward"]["fused_calls"]
    for phase in ("forward", "backward"):
        assert found["fused"][phase]["kernel_ops"] + 20 < found["eager"][phase]["kernel_ops"], phase


def test_fused_projections_benchmark_smoke_runs_and_the_fused_layer_launches_fewer_kernels(capsys):
    """The layer with one base GEMM for q/k/v and one for gate/up launches fewer kernels per
    micro-batch than with one a projection, with 8 jobs' adapters on all projections."""
    assert fused_projections.main(["--smoke", "--reps", "1"]) == 0
    table = dict(re.findall(r"^\| (fused|unfused) \| [0-9.]+ \| (\d+) \|$", capsys.readouterr().out, re.M))
    assert int(table["fused"]) < int(table["unfused"]), table


def test_the_grouped_path_dispatches_as_many_operators_for_8_jobs_as_for_2(tmp_path, capsys):
    """The batched operator's host work does not grow with the adapters it serves (weights kept
    stacked, gradients added in one batched add), counted on a 1-layer stage: what a GPU run pays
    per operator, launch by launch."""
    found = {}
    for jobs in (2, 8):
        out = tmp_path / f"{jobs}.json"
        assert host_overhead.main(["--layers", "1", "--jobs", str(jobs), "--dropout", "0", "--reps", "1", "--seq", "8",
                                   "--out", str(out)]) == 0
        found[jobs] = json.loads(out.read_text())
    assert "| backward |" in capsys.readouterr().out
    for phase in ("forward", "backward"):
        ops = {jobs: r["with_adapters"][phase]["ops"] - r["base_only"][phase]["ops"] for jobs, r in found.items()}
        assert 0 < ops[8] <= ops[2] * 1.1, (phase, ops)


def test_gpu_check_script_parses_and_its_benchmark_commands_take_their_arguments(tmp_path, monkeypatch):
    """A GPU lease is short and rare: `benchmarks/gpu_check.sh` must not fail on a typo. The script
    parses, ONLY= runs just the steps named (none here), and every `python -m benchmarks.X ...` step
    is accepted by X's argument parser (stopped right after parsing)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), str(tmp_path / "log")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ONLY": "no-such-step"}, cwd=script.parents[1])
    assert proc.returncode == 0 and "===" not in proc.stdout, proc.stdout + proc.stderr

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    commands = re.findall(r"^step \S+ \d+ \$PY -m benchmarks\.(\w+)(.*)$", script.read_text(), re.M)
    assert {name for name, _ in commands} >= {"gpu", "layer_kernels", "host_overhead", "lora_op", "head_loss"}
    for name, rest in commands:
        args = [a.replace("$LOG", str(tmp_path)) for a in shlex.split(rest)]
        with pytest.raises(Parsed):
            importlib.import_module(f"benchmarks.{name}").main(args)


def test_planning_benchmark_times_whole_plans(tmp_path, capsys):
    """Each shape's plan has, on every stage, a forward and a backward per micro-batch and one
    optimizer step per job and step; its time and traced bytes are recorded."""
    out = tmp_path / "planning.json"
    assert planning.main(["--quick", "--memory", "--repeat", "1", "--window", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["stages"], r["jobs"], r["steps"]) for r in rows] == planning.QUICK
    for r in rows:
        assert r["actions"] == r["stages"] * (2 * r["micro_batches"] + r["jobs"] * r["steps"])
        assert r["seconds"] > 0 and 0 < r["held_bytes"] <= r["peak_bytes"]
    for whole, r in zip(rows, result["streamed"]):  # stage 0 of the same plan, made in segments of 64
        assert r["stage_actions"] == 2 * whole["micro_batches"] + r["jobs"] * r["steps"]
        assert r["segments"] == -(-whole["micro_batches"] // 64) and 0 < r["first_segment_seconds"] < r["seconds"]
        assert 0 < r["peak_bytes"]
    for r in result["grouping"]:
        assert (r["stages"], r["jobs"], r["steps"]) in planning.QUICK_GROUPING and r["streams"] >= 1
        assert r["group_jobs_seconds"] > 0 and r["choose_streams_seconds"] > 0 and r["budget_first_segment_seconds"] > 0
    for r in result["from_data"]:  # 3 epochs of 125 steps of 8 micro-batches
        assert (r["stages"], r["jobs"]) in planning.QUICK_FROM_DATA and r["micro_batches"] == r["jobs"] * 3 * 1000
        assert r["plan_steps_seconds"] > 0 and r["job_steps_bytes"] > 0 and r["first_segment_seconds"] > 0
    assert "making a lora plan" in capsys.readouterr().out


def test_planning_benchmark_runs_one_table_alone(tmp_path):
    """`--grouping-only` and `--from-data-only` write just their table's rows."""
    for flag, key, shapes in (("--grouping-only", "grouping", planning.QUICK_GROUPING),
                              ("--from-data-only", "from_data", planning.QUICK_FROM_DATA)):
        out = tmp_path / f"{key}.json"
        assert planning.main(["--quick", flag, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert "rows" not in result and len(result[key]) == len(shapes) and flag in result["command"]
    big = planning.varied_arrays(3, 50)  # the long grouping shape's jobs, made from arrays
    assert [j.steps for j in big] == [50] * 3 and all(len(m) == 4 for j in big for m in j.micro_batches)
    assert all(len({r for m in j.micro_batches for r, _ in m}) == 1 for j in big)


def test_data_loading_benchmark_tokenizes_each_file_once_between_the_ranks(capsys):
    """Two rank processes: without a cache each tokenizes all 3 files; with it they tokenize 3
    between them, and a fresh reader finds all 3 (the script asserts both, and equal tokens)."""
    result = data_loading.main(["--files", "3", "--records", "40", "--ranks", "2", "--quick"])
    assert [r["misses"] for r in result["every_rank_tokenizes"]] == [3, 3]
    assert sum(r["misses"] for r in result["shared"]) == 3 and result["read_back"]["hits"] == 3
    assert result["read_back_hashing"]["hits"] == 3 and result["digests"]["bytes"] >= 2**20
    assert "the ranks share it through the cache" in capsys.readouterr().out
