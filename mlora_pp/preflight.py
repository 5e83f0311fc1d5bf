"""Checks of a run's inputs before any heavy work, and one shared verdict across ranks.

Everything a user can get wrong outside the YAML itself (the model directory, data and template
paths, adapters the model cannot hold, more stages than layers, an output_dir that is a file) is
checked here, before any model weight is read. Each problem is one `ConfigError`, `DataError` or
`ModelError` whose message names the config file and the field (``run.yaml: jobs[0].rank: ...``)
or the data file and its line. `agree` makes every rank raise the same (first) error, so that each
rank prints the same line and none goes on to load weights while another has stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from transformers import AutoTokenizer, PretrainedConfig

from mlora_pp.config import ConfigError, RunConfig
from mlora_pp.data import BUILTIN_TEMPLATES, DataError, load_template
from mlora_pp.model import ModelError, SafetensorsIndex, StageSpec, read_model_config
from mlora_pp.partition import PartitionError, plan_stages
from mlora_pp.transport import PipelineError

BAD_INPUT: tuple[type[Exception], ...] = (ConfigError, DataError, ModelError)
"""The errors that mean "fix your input": one line, exit code 2, no traceback."""

T = TypeVar("T")


def source(cfg: RunConfig) -> str:
    """The config file's name for messages."""
    return str(cfg.source) if cfg.source is not None else "<config>"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (marked "..." if cut), or its type's name."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return exc.__class__.__name__
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _why(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's own tokenizer, offline; `ModelError` naming the directory if it cannot load."""
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{model_dir}: cannot load the tokenizer ({first_line(exc)})") from None


def projection_shapes(hf: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every targetable projection of one decoder layer."""
    d, inter = hf.hidden_size, hf.intermediate_size
    heads = hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or d // heads
    return {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv * head_dim),
        "v_proj": (d, kv * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }


def _check_readable(path: Path) -> None:
    """Raise `OSError` unless `path` can be opened and read."""
    with open(path, "rb") as f:
        f.read(1)


def check_model(cfg: RunConfig) -> tuple[PretrainedConfig, Any]:
    """(HF config, tokenizer) of the model directory, once its config.json, safetensors weights
    (headers only: no tensor is read) and tokenizer are known to be usable."""
    model_dir = Path(cfg.model.path)
    try:
        hf = read_model_config(model_dir)
        index = SafetensorsIndex(model_dir)
        for shard in sorted(set(index.files.values())):
            if not shard.is_file():
                raise ModelError(f"{shard}: listed in model.safetensors.index.json but missing")
            try:
                _check_readable(shard)
            except OSError as exc:
                raise ModelError(f"{shard}: cannot read ({_why(exc)})") from None
        check_weights(hf, index)
        tokenizer = load_tokenizer(model_dir)
    except ModelError as exc:
        raise ModelError(f"{source(cfg)}: model.path: {exc}") from exc
    return hf, tokenizer


def expected_shapes(hf: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every base tensor whose shape config.json determines (the
    embedding, norms, projections and lm_head); biases and extra norms are left to the loader."""
    d = hf.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (hf.vocab_size, d), "model.norm.weight": (d,)}
    projections = projection_shapes(hf)
    for i in range(hf.num_hidden_layers):
        for target, (fan_in, fan_out) in projections.items():
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            shapes[f"model.layers.{i}.{block}.{target}.weight"] = (fan_out, fan_in)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = (d,)
    if not getattr(hf, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (hf.vocab_size, d)
    return shapes


def check_weights(hf: PretrainedConfig, index: SafetensorsIndex) -> None:
    """Every tensor config.json implies is in the checkpoint, with the shape config.json gives, and
    every shard's header is readable (headers only: no tensor is read)."""
    import safetensors

    expected = expected_shapes(hf)
    for name in expected:
        if name not in index.files:
            raise ModelError(f"{index.model_dir}: tensor {name!r} is missing from the checkpoint "
                             f"(config.json: {hf.num_hidden_layers} layers)")
    by_file: dict[Path, list[str]] = {}
    for name, path in index.files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ModelError(f"{path}: has no tensor {name!r} (model.safetensors.index.json puts it there)")
                    want = expected.get(name)
                    if want is not None and tuple(f.get_slice(name).get_shape()) != want:
                        got = tuple(f.get_slice(name).get_shape())
                        raise ModelError(f"{path}: tensor {name!r} has shape {list(got)} but config.json "
                                         f"({index.model_dir / 'config.json'}) implies {list(want)}")
        except (OSError, safetensors.SafetensorError) as exc:
            raise ModelError(f"{path}: cannot read the safetensors header ({exc})") from None


def check_jobs_fit_model(cfg: RunConfig, hf: PretrainedConfig) -> None:
    """Refuse adapters the model cannot hold: a rank wider than a targeted projection, too long rows."""
    shapes = projection_shapes(hf)
    limit = getattr(hf, "max_position_embeddings", None)
    for i, job in enumerate(cfg.jobs):
        at = f"{source(cfg)}: jobs[{i}]"
        for k, target in enumerate(job.target_modules):
            if target not in shapes:
                raise ConfigError(f"{at}.target_modules[{k}]: the model has no {target!r}")
        narrowest = min(job.target_modules, key=lambda t: min(shapes[t]))
        width = min(shapes[narrowest])
        if job.rank > width:
            fan_in, fan_out = shapes[narrowest]
            raise ConfigError(
                f"{at}.rank: {job.rank} is larger than the layer width {width} "
                f"({narrowest} is {fan_in} -> {fan_out}); use at most {width}"
            )
        if limit is not None and job.max_seq_len > limit:
            raise ConfigError(
                f"{at}.max_seq_len: {job.max_seq_len} exceeds the model's max_position_embeddings {limit}"
            )


def check_stages(cfg: RunConfig, hf: PretrainedConfig, world: int) -> list[StageSpec]:
    """One stage per rank: refuse more ranks than layers, or a balance that does not fit."""
    layers = hf.num_hidden_layers
    if world > layers:
        raise ConfigError(
            f"{source(cfg)}: pipeline: {world} ranks need {world} pipeline stages but the model "
            f"({cfg.model.path}) has only {layers} layers; run at most {layers} ranks"
        )
    try:
        return plan_stages(hf, world, cfg.pipeline.balance)
    except PartitionError as exc:
        raise ConfigError(f"{source(cfg)}: pipeline.balance: {exc}") from None


def check_job_files(cfg: RunConfig) -> None:
    """Every job's data file (and template file) exists and can be read."""
    for i, job in enumerate(cfg.jobs):
        at = f"{source(cfg)}: jobs[{i}]"
        for name, value in (("data", job.data), ("eval_data", job.eval_data)):
            if value is None:
                continue
            path = Path(value)
            if not path.exists():
                raise ConfigError(f"{at}.{name}: {path}: data file not found")
            if not path.is_file():
                raise ConfigError(f"{at}.{name}: {path}: not a file")
            try:
                _check_readable(path)
            except OSError as exc:
                raise ConfigError(f"{at}.{name}: {path}: cannot read data file ({_why(exc)})") from None
        if job.template not in BUILTIN_TEMPLATES:
            try:
                load_template(job.template)
            except DataError as exc:
                raise ConfigError(f"{at}.template: {exc}") from None


def check_output_dir(cfg: RunConfig) -> None:
    """Fail before any heavy work if the results could not be written (creates the directory)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{source(cfg)}: output_dir: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{source(cfg)}: output_dir: cannot write to {out} ({_why(exc)})") from None


@dataclass
class CheckedInputs:
    """What the checks learned and the run needs next."""

    hf_config: PretrainedConfig
    specs: list[StageSpec]
    """This run's stages, one per rank."""
    tokenizer: Any


def check_inputs(cfg: RunConfig, rank: int, world: int) -> CheckedInputs:
    """All checks that need no weights, in order: model, adapters vs model, stages, files, output_dir.

    The output directory is checked (and created) on rank 0 only, the rank that writes results.
    """
    hf, tokenizer = check_model(cfg)
    check_jobs_fit_model(cfg, hf)
    specs = check_stages(cfg, hf, world)
    check_job_files(cfg)
    if rank == 0:
        check_output_dir(cfg)
    return CheckedInputs(hf, specs, tokenizer)


def agree(rank: int, world: int, prepare: Callable[[], T]) -> T:
    """Run `prepare` on this rank; if it failed on any rank, raise the same error on every rank.

    Each rank sends None or (error type, message) to all (`all_gather_object` on the default group,
    which must exist when ``world > 1``). The lowest failing rank's bad-input error is raised
    everywhere, so every rank prints the same line. A rank whose own failure is not bad input
    (a bug) raises its own error; a rank that sees another rank's bug raises `PipelineError`.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = prepare()
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = exc
    if world > 1 and dist.is_initialized():
        mine: tuple[str, str] | None = None
        if isinstance(error, BAD_INPUT):
            mine = (next(cls.__name__ for cls in BAD_INPUT if isinstance(error, cls)), str(error))
        elif error is not None:
            mine = ("bug", f"{error.__class__.__name__}: {first_line(error)}")
        verdicts: list[tuple[str, str] | None] = [None] * world
        try:
            dist.all_gather_object(verdicts, mine)
        except RuntimeError as exc:
            raise PipelineError(f"rank {rank}: lost a rank while checking the inputs ({first_line(exc)})") from None
        failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
        if error is not None and (mine[0] == "bug" or failed[0][0] == rank):
            raise error
        if failed:
            first, (kind, message) = failed[0]
            by_name = {cls.__name__: cls for cls in BAD_INPUT}
            if kind in by_name:
                raise by_name[kind](message)
            raise PipelineError(f"rank {rank}: rank {first} failed before training started ({message})")
    if error is not None:
        raise error
    return result
