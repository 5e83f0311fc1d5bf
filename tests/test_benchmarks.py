"""Benchmark scripts stay runnable: their smoke modes run the same code path at a tiny size."""

import json

from benchmarks import gpu, head_loss, host_overhead


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
