"""Bad input: one clear line naming the file and the field (or data line), exit code 2, no traceback,
before any model weight is read, the same on every rank. One test per kind of mistake."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

import mlora_pp.model
import mlora_pp.training
from launcher.__main__ import main
from mlora_pp.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"instruction": "Repeat the words.", "input": "the cat", "output": "the cat"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A 2-layer tiny model (hidden 128, 4 heads, 2 kv heads: k_proj is 128 -> 64; 512 positions)
    and a good data file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input")
    make_tiny_model(root / "model", layers=2, seed=3)
    (root / "good.jsonl").write_text("".join(json.dumps(RECORD) + "\n" for _ in range(8)))
    return root


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Bad input must be refused before any model weight is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(mlora_pp.training, "build_stage", refuse)
    monkeypatch.setattr(mlora_pp.model.SafetensorsIndex, "read", refuse)


def job(root: Path, **overrides) -> dict:
    base = dict(name="upper", data=str(root / "good.jsonl"), rank=4, alpha=8, target_modules=["q_proj", "k_proj"],
                batch_size=2, micro_batch_size=1, max_steps=1, max_seq_len=32)
    return base | overrides


def make_raw(root: Path, model: Path | None = None, jobs: list[dict] | None = None, **top) -> dict:
    """The YAML mapping of a small, valid run; keyword arguments replace top-level fields."""
    raw = {"model": {"path": str(model or root / "model")}, "output_dir": str(root / "out"), "seed": 0,
           "jobs": jobs if jobs is not None else [job(root)]}
    return raw | top


def write_config(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def copy_model(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root / "model", tmp_path / "model"))


def data_file(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def unreadable(path: Path) -> Path:
    """`path` with mode 000; skips the test where that does not stop reads (root, CAP_DAC_OVERRIDE)."""
    path.chmod(0)
    try:
        path.read_bytes()
    except PermissionError:
        return path
    pytest.skip("this user (root) reads files whatever their mode")


GOOD_LINE = json.dumps(RECORD) + "\n"

# Each case: (workspace, tmp_path) -> (config mapping or raw YAML text, substrings the line must name).
# "{cfg}" in a substring stands for the config file's path.
Case = Callable[[Path, Path], tuple[dict | str, list[str]]]


def _data(text: str, where: str, what: str, name: str = "data.jsonl") -> Case:
    """A job whose data file holds `text`; the line must name the file, `where` in it, and `what`."""

    def case(root: Path, tmp: Path):
        path = data_file(tmp, text, name)
        return make_raw(root, jobs=[job(root, data=str(path))]), ["{cfg}", "jobs[0].data", f"{path}{where}", what]

    return case


def _broken_model(break_it: Callable[[Path], object], *parts: str) -> Case:
    """A copy of the model with one thing broken; "{model}" in a part stands for its directory."""

    def case(root: Path, tmp: Path):
        model = copy_model(root, tmp)
        break_it(model)
        return make_raw(root, model=model), ["{cfg}", "model.path", *(p.replace("{model}", str(model)) for p in parts)]

    return case


def _unreadable_data(root: Path, tmp: Path):
    path = unreadable(data_file(tmp, GOOD_LINE))
    return make_raw(root, jobs=[job(root, data=str(path))]), ["{cfg}", "jobs[0].data", str(path), "cannot read data file"]


def _edited_config_json(**changes) -> Callable[[Path], None]:
    """Breaks a model copy by changing fields of its config.json."""

    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | changes))

    return edit


def _config_json_field(model: Path, name: str) -> int:
    return json.loads((model / "config.json").read_text())[name]


CASES: dict[str, Case] = {
    "yaml_syntax_error": lambda root, tmp: (
        "model: {path: x\njobs: [\n", ["{cfg}", "line 2, column", "YAML syntax error"]),
    "wrong_type": lambda root, tmp: (
        make_raw(root, jobs=[job(root, rank="eight")]), ["{cfg}", "jobs[0].rank", "expected an integer"]),
    "unknown_field_did_you_mean": lambda root, tmp: (
        make_raw(root, jobs=[job(root, rnak=4)]), ["{cfg}", "jobs[0].rnak", "did you mean 'rank'?"]),
    "missing_required_field": lambda root, tmp: (
        make_raw(root, jobs=[{k: v for k, v in job(root).items() if k != "data"}]),
        ["{cfg}", "jobs[0].data", "missing required field"]),
    "model_path_missing": lambda root, tmp: (
        make_raw(root, model=tmp / "nope"), ["{cfg}", "model.path", str(tmp / "nope"), "no such directory"]),
    "model_path_unreadable": _broken_model(lambda m: unreadable(m / "config.json"),
                                           "{model}/config.json", "cannot read"),
    "model_config_json_malformed": _broken_model(lambda m: (m / "config.json").write_text("{oops"),
                                                 "{model}/config.json line 1", "invalid JSON"),
    "model_without_safetensors": _broken_model(lambda m: (m / "model.safetensors").unlink(),
                                               "{model}: no model.safetensors"),
    "model_without_tokenizer": _broken_model(lambda m: (m / "tokenizer.json").unlink(),
                                             "{model}: cannot load the tokenizer"),
    "data_path_missing": lambda root, tmp: (
        make_raw(root, jobs=[job(root, data=str(tmp / "nope.jsonl"))]),
        ["{cfg}", "jobs[0].data", str(tmp / "nope.jsonl"), "data file not found"]),
    "data_path_unreadable": _unreadable_data,
    "malformed_jsonl_line": _data(GOOD_LINE * 2 + '{"instruction": "x",\n', " line 3:", "invalid JSON"),
    "malformed_json_file": _data('[\n  {"instruction": "x", "output": "y"},\n  oops\n]\n', " line 3:", "invalid JSON",
                                 name="data.json"),
    "record_missing_template_field": _data(GOOD_LINE + json.dumps({"instruction": "no output"}) + "\n", " line 2:",
                                           "missing field 'output'"),
    "empty_dataset": _data("\n  \n", " has no records", ""),
    "duplicate_job_names": lambda root, tmp: (
        make_raw(root, jobs=[job(root), job(root)]), ["{cfg}", "jobs[1].name", "duplicate job name 'upper'"]),
    "target_module_the_model_lacks": lambda root, tmp: (
        make_raw(root, jobs=[job(root, target_modules=["q_proj", "qkv_proj"])]),
        ["{cfg}", "jobs[0].target_modules[1]", "'qkv_proj'"]),
    "rank_not_positive": lambda root, tmp: (
        make_raw(root, jobs=[job(root, rank=0)]), ["{cfg}", "jobs[0].rank", "must be a positive integer"]),
    "rank_wider_than_a_targeted_projection": lambda root, tmp: (
        make_raw(root, jobs=[job(root, rank=100, target_modules=["q_proj", "k_proj"])]),
        ["{cfg}", "jobs[0].rank", "larger than the layer width 64", "k_proj"]),
    "micro_batch_size_not_dividing_batch_size": lambda root, tmp: (
        make_raw(root, jobs=[job(root, batch_size=4, micro_batch_size=3)]),
        ["{cfg}", "jobs[0].micro_batch_size", "does not divide batch_size 4"]),
    "max_seq_len_beyond_positions": lambda root, tmp: (
        make_raw(root, jobs=[job(root, max_seq_len=4096)]),
        ["{cfg}", "jobs[0].max_seq_len", "max_position_embeddings 512"]),
    "integer_beyond_64_bits": lambda root, tmp: (
        make_raw(root, seed=2 ** 70), ["{cfg}", "seed", "must fit in 64 bits"]),
    "number_beyond_float_range": lambda root, tmp: (
        make_raw(root, jobs=[job(root, alpha=10 ** 400)]), ["{cfg}", "jobs[0].alpha", "expected a finite number"]),
    "job_name_too_long_for_a_directory": lambda root, tmp: (
        make_raw(root, jobs=[job(root, name="a" * 300)]), ["{cfg}", "jobs[0].name", "at most 100 characters"]),
    "data_line_nested_too_deep": _data("[" * 100_000 + "]" * 100_000 + "\n", " line 1:", "unreadable JSON"),
    "model_weights_of_other_shapes_than_config_json": lambda root, tmp: _broken_model(
        _edited_config_json(intermediate_size=_config_json_field(root / "model", "intermediate_size") + 8),
        "{model}/model.safetensors", "has shape", "{model}/config.json")(root, tmp),
    "model_config_json_transformers_refuses": _broken_model(
        _edited_config_json(num_attention_heads=3), "{model}/config.json", "not a usable model config"),
    "output_dir_is_a_file": lambda root, tmp: (
        make_raw(root, output_dir=str(data_file(tmp, "not a directory", "out"))),
        ["{cfg}", "output_dir", str(tmp / "out"), "is not a directory"]),
}


def expect_one_line(capsys, code: int, parts: list[str], config: Path) -> str:
    """Exit code 2 and exactly one non-empty stderr line naming every part; no traceback."""
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, out.err
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error: "), lines[0]
    for part in parts:
        assert part.replace("{cfg}", str(config)) in lines[0], (part, lines[0])
    assert "Traceback" not in out.err + out.out
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(workspace, tmp_path, capsys, case):
    raw, parts = CASES[case](workspace, tmp_path)
    config = write_config(tmp_path, raw)
    code = main([str(config), "--no-live"])
    expect_one_line(capsys, code, parts, config)


def test_more_stages_than_layers(workspace, tmp_path, capsys, monkeypatch):
    """3 ranks on a 2-layer model: every rank refuses it from the config alone (no group needed here;
    the real 3-rank run joins the group and all ranks print this same line)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(mlora_pp.training, "join_ranks", lambda *a, **k: None)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a, **k: None)
    config = write_config(tmp_path, make_raw(workspace))
    code = main([str(config), "--no-live"])
    expect_one_line(capsys, code, ["{cfg}", "pipeline", "3 ranks", "only 2 layers"], config)


def run_launcher(config: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", str(config), "--no-live", *extra], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=120)


def test_command_line_one_line_and_debug_traceback(workspace, tmp_path):
    config = write_config(tmp_path, make_raw(workspace, jobs=[job(workspace, rank=0)]))
    proc = run_launcher(config)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == [f"error: {config}: jobs[0].rank: must be a positive integer; got 0"]
    debug = run_launcher(config, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize("mistake", ["bad_field", "yaml_syntax", "stop_grace", "no_config_file"])
def test_what_needs_no_torch_is_refused_before_importing_it(workspace, tmp_path, mistake):
    """A config's fields and YAML and the stop-grace variable are checked before the launcher imports
    torch and transformers (4-6 s a rank): a typo is one line and exit 2 at once, as it is after."""
    config = write_config(tmp_path, make_raw(workspace, jobs=[job(workspace, rank=0 if mistake == "bad_field" else 8)]))
    env = dict(os.environ, MLORA_PP_STOP_GRACE_S="soon" if mistake == "stop_grace" else "30")
    if mistake == "yaml_syntax":
        config.write_text(config.read_text() + "jobs: [\n")
    if mistake == "no_config_file":
        config = tmp_path / "missing.yaml"
    probe = ("import runpy, sys\n"
             f"sys.argv = ['launcher', {str(config)!r}, '--no-live']\n"
             "try:\n    runpy.run_module('launcher', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    expected = {"bad_field": "jobs[0].rank: must be a positive integer", "yaml_syntax": "YAML syntax error",
                "stop_grace": "MLORA_PP_STOP_GRACE_S='soon'", "no_config_file": "config file not found"}[mistake]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_stop_grace_is_refused_naming_the_variable(monkeypatch, value):
    from mlora_pp import stopping

    monkeypatch.setenv("MLORA_PP_STOP_GRACE_S", value)
    with pytest.raises(ValueError, match=f"MLORA_PP_STOP_GRACE_S={value!r}: expected a positive number of seconds"):
        stopping.grace_s()
    monkeypatch.setenv("MLORA_PP_STOP_GRACE_S", "45.5")
    assert stopping.grace_s() == 45.5
    monkeypatch.delenv("MLORA_PP_STOP_GRACE_S")
    assert stopping.grace_s() == stopping.GRACE_S


def test_the_launcher_refuses_a_bad_stop_grace_in_one_line_exit_2(workspace, tmp_path):
    config = write_config(tmp_path, make_raw(workspace))
    proc = run_launcher(config, MLORA_PP_STOP_GRACE_S="soon")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        "error: rank 0: MLORA_PP_STOP_GRACE_S='soon': expected a positive number of seconds"], proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mistake", ["malformed_jsonl_line", "output_dir_is_a_file"])
def test_every_rank_prints_the_same_line(workspace, tmp_path, mistake):
    """Two Gloo ranks, started with the variables torchrun sets. A malformed data line is found by
    both ranks; an output_dir that is a file only by rank 0, which shares it before anyone loads weights."""
    if mistake == "malformed_jsonl_line":
        bad = data_file(tmp_path, GOOD_LINE + "{oops\n")
        raw, parts = make_raw(workspace, jobs=[job(workspace, data=str(bad))]), ["jobs[0].data", f"{bad} line 2"]
    else:
        out = data_file(tmp_path, "not a directory", "out")
        raw, parts = make_raw(workspace, output_dir=str(out)), ["output_dir", "is not a directory"]
    config = write_config(tmp_path, raw)
    port = str(free_port())
    ranks = [
        subprocess.Popen([sys.executable, "-m", "launcher", str(config), "--no-live"], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = [(p.communicate(timeout=120), p.returncode) for p in ranks]
    lines = []
    for (_, err), code in results:
        rank_lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(rank_lines) == 1 and "Traceback" not in err, err
        lines.append(rank_lines[0])
    assert lines[0] == lines[1] and lines[0].startswith(f"error: {config}: ")
    assert all(part in lines[0] for part in parts), lines[0]


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Code that could unpickle a file or run a model's remote code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("pickle", "dill") for a in node.names):
            found.append(f"line {node.lineno}: imports pickle")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill"):
            found.append(f"line {node.lineno}: imports from pickle")
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"line {node.lineno}: from torch import load")
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if ast.unparse(node.func).endswith("torch.load"):
            safe = keywords.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"line {node.lineno}: trust_remote_code={ast.unparse(remote)}")
    return found


def test_nothing_is_unpickled_and_no_remote_code():
    """Only safetensors and JSON are read: no torch.load without weights_only=True, no pickle, no
    trust_remote_code, anywhere in mlora_pp/ or launcher/."""
    offenders = []
    for path in sorted([*(ROOT / "mlora_pp").rglob("*.py"), *(ROOT / "launcher").rglob("*.py")]):
        offenders += [f"{path.relative_to(ROOT)} {hit}" for hit in _unsafe_loads(ast.parse(path.read_text()))]
    assert not offenders, offenders
    bad = ("import torch\ntorch.load('x.pt')\ntorch.load('y.pt', weights_only=False)\n"
           "AutoModel.from_pretrained('m', trust_remote_code=True)\n")
    assert len(_unsafe_loads(ast.parse(bad))) == 3  # the scan itself sees each
    assert not _unsafe_loads(ast.parse("torch.load('z.pt', weights_only=True)\nf(trust_remote_code=False)\n"))
