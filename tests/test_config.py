"""The YAML config: defaults, and one clear error naming the file and field per mistake."""

from pathlib import Path

import pytest

from mlora_pp.config import ConfigError, load_config

GOOD = """
model: {path: runs/tiny, dtype: float32}
pipeline: {schedule: lora}
output_dir: runs/demo
seed: 0
jobs:
  - name: upper
    data: data/upper.jsonl
    template: alpaca
    rank: 8
    alpha: 16
    dropout: 0.05
    target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    lr: 3.0e-4
    batch_size: 8
    micro_batch_size: 2
    epochs: 1
    max_steps: null
    max_seq_len: 256
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_issue_example_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    job = cfg.jobs[0]
    assert cfg.model.path == Path("runs/tiny") and cfg.model.dtype == "float32"
    assert job.grad_accumulation == 4 and job.scale == 2.0 and job.max_steps is None
    assert len(job.target_modules) == 7 and cfg.pipeline.schedule == "lora"


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("rank: 8", "rank: 0", "jobs[0].rank: must be a positive integer"),
        ("rank: 8", "rank: eight", "jobs[0].rank: expected an integer"),
        ("rank: 8", "rnak: 8", "jobs[0].rnak: unknown field (did you mean 'rank'?)"),
        ("micro_batch_size: 2", "micro_batch_size: 3", "jobs[0].micro_batch_size: 3 does not divide batch_size 8"),
        ("dropout: 0.05", "dropout: 1.5", "jobs[0].dropout: must be in [0, 1)"),
        ("schedule: lora", "schedule: lorra", "pipeline.schedule: must be one of lora, 1f1b, gpipe; got 'lorra' (did you mean 'lora'?)"),
        ("v_proj, o_proj", "v_proj, x_proj", "jobs[0].target_modules[3]: must be one of"),
        ("    data: data/upper.jsonl\n", "", "jobs[0].data: missing required field"),
        ("dtype: float32", "dtype: float8", "model.dtype: must be one of"),
        ("lr: 3.0e-4", "lr: .nan", "jobs[0].lr: expected a finite number"),
        ("lr: 3.0e-4", "lr: 1.0e37", "jobs[0].lr: must be at most 1e+30"),
        ("lr: 3.0e-4", "lr: 3.0e-4\n    max_grad_norm: 0", "jobs[0].max_grad_norm: must be positive (or null: no clipping); got 0"),
        ("lr: 3.0e-4", "lr: 3.0e-4\n    max_grad_norm: one", "jobs[0].max_grad_norm: expected a number or null"),
        ("schedule: lora", "schedule: lora, trace_actions: -1", "pipeline.trace_actions: must be 0 or more; got -1"),
        ("schedule: lora", "schedule: lora, trace_actions: many", "pipeline.trace_actions: expected an integer"),
        ("schedule: lora", "schedule: lora, plan_window: 0", "pipeline.plan_window: must be at least 1; got 0"),
        ("schedule: lora", "schedule: lora, plan_window: null", "pipeline.plan_window: expected an integer"),
    ],
)
def test_bad_field_names_file_and_field(tmp_path, old, new, expected):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_job_name_with_dot_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("name: upper", "name: up.per"))
    with pytest.raises(ConfigError, match=r"jobs\[0\].name: 'up.per' must be letters, digits"):
        load_config(path)


def test_duplicate_job_names(tmp_path):
    job = GOOD[GOOD.index("  - name: upper"):]
    path = write(tmp_path, GOOD + job)
    with pytest.raises(ConfigError, match=r"jobs\[1\].name: duplicate job name 'upper'"):
        load_config(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "model: {path: x\njobs: [")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: YAML syntax error"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/run.yaml")


@pytest.mark.parametrize("text,value", [("5e-4", 5e-4), ("1.0e37", 1e37), ("2E+3", 2000.0)])
def test_exponent_without_dot_or_sign_is_a_number(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads these as strings; users mean numbers."""
    from mlora_pp.config import _convert

    assert _convert(text, float, "jobs[0].alpha", lambda w, m: ConfigError(f"{w}: {m}")) == value
