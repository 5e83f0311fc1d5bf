"""Run configuration: dataclasses for the model, the pipeline and each adapter job, read from YAML.

Every error is a `ConfigError` whose message names the file and the field (``jobs[1].rank``), so a
user sees one clear line instead of a traceback. Relative paths in the file are resolved against
the current working directory, the way a user types them on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlora_pp.trace import DEFAULT_TRACE_ACTIONS

DEFAULT_PLAN_WINDOW = 1024
"""`pipeline.plan_window`'s default: a segment of 1,024 injections is about 3 x stages x 1,024
actions, a fraction of a second to make on 4 stages (`benchmarks.planning`)."""

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES: tuple[str, ...] = ("lora", "1f1b", "gpipe")
MAX_LR = 1e30
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
QUANTIZE: tuple[str, ...] = ("none", "nf4", "int8")
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
LORA_PATHS: tuple[str, ...] = ("auto", "loop", "grouped")
BALANCE_MODES: tuple[str, ...] = ("auto", "profile")
ADMISSION: tuple[str, ...] = ("fifo", "priority", "shortest-first")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
RESERVED_NAMES: tuple[str, ...] = ("checkpoints", "control", "data-cache")
"""Directories of a run in output_dir, beside each job's adapter directory (`output_dir/<job>`)."""
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no '.': names key parameters and directories
MAX_JOB_NAME = 100
"""A job's name is a directory name (255 bytes at most on most file systems) with room for suffixes."""


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor of an adapter's delta ``x @ A.T @ B.T``, as peft computes it: alpha / rank, or
    alpha / sqrt(rank) for rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class ConfigError(ValueError):
    """A bad configuration; the message names the file and the field."""


@dataclass
class ModelConfig:
    """The frozen base model: a Hugging Face directory with safetensors weights."""

    path: Path
    dtype: str = "float32"
    quantize: str = "none"


@dataclass
class PipelineConfig:
    """How stages are cut and how micro-batches are scheduled."""

    schedule: str = "lora"
    balance: str | list[int] = "auto"
    """auto (estimated FLOPs), profile (layers timed on this machine at start-up) or layer counts per stage."""
    timeout_s: float = 300.0
    trace_actions: int = DEFAULT_TRACE_ACTIONS
    """Actions per stage whose timings OUTPUT_DIR/trace.json keeps: the first and the last half of
    this many (a long run's middle is counted in the totals, not kept). 0: keep none, totals only."""
    plan_window: int = DEFAULT_PLAN_WINDOW
    """Micro-batches a rank plans ahead at a time: the lora plan is made in segments of this many
    injections as the stages reach them (`mlora_pp.stage_plan`), not all at start-up."""
    fuse: bool = True
    """Fuse micro-batches of different jobs into one (the batched LoRA operator runs them together)."""
    lora_path: str = "auto"
    """Batched LoRA operator path: grouped (torch._grouped_mm), loop, or auto."""
    recompute: bool = False
    """Recompute each stage's forward in backward instead of keeping its activations."""
    streams: int | None = None
    """lora: how many independent streams the jobs are fused into (jobs of a stream share micro-batches);
    null: automatic. With more jobs than the fewest streams that keep the pipeline full, every stage
    times two jobs' micro-batches apart and fused at start-up, and the streams predicted fastest
    from that are used (`mlora_pp.schedule.choose_streams`); otherwise jobs are fused only when
    there are more than stages + 1 of them. Fewer, larger micro-batches cost less per token where
    each forward and backward has a large fixed cost, and hold more activations each."""
    hide_latency: bool | str = False
    """lora: keep about twice the micro-batches in flight (2S-1 on stage 0, two fewer per stage) so
    that messages between stages never stretch a slot; costs about twice the activation memory.
    auto (needs `memory_budget`): do so when every job fits the budget at once with 2S-1 micro-batches
    in flight, else keep the default windows."""
    admission: str = "fifo"
    """Who gets the pipeline first: fifo (config order; running jobs share it evenly), priority
    (jobs[].priority, highest first) or shortest-first (fewest tokens left first)."""
    memory_budget: float | str | None = None
    """Cap on every stage's predicted peak memory: bytes (a number above 1 or "12GiB"), or a
    fraction (0 < x <= 1) of the device's memory (on CPU, of the process's memory limit). Jobs
    that do not fit next to the running ones wait. null: every job runs at once."""
    preempt: bool = True
    """With a memory_budget, pause jobs under way (their begun step dropped, their AdamW state
    moved to host memory; they finish with the same adapter): under admission: priority, for a more
    urgent job that cannot start next to them instead of letting it wait; under any admission, for
    a submitted job whose weights would leave them no room together instead of rejecting it."""


@dataclass
class JobConfig:
    """One adapter: its data, LoRA shape and optimisation settings."""

    name: str
    data: Path
    template: str = "alpaca"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    """Rank-stabilized LoRA (peft's `use_rslora`): scale the adapter's delta by alpha / sqrt(rank)
    instead of alpha / rank, so that its size does not shrink as the rank grows."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 3.0e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    """Clip the job's gradient to this global L2 norm before each step, over all its LoRA weights on
    every stage (as `torch.nn.utils.clip_grad_norm_`); null: no clipping."""
    batch_size: int = 8
    micro_batch_size: int = 2
    micro_batch_tokens: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    max_seq_len: int = 256
    save_every: int | None = 100
    """Checkpoint every this many optimizer steps (and always after the last); null: only the last."""
    keep_last: int = 2
    """Complete checkpoints kept per job; older ones are deleted once a newer one is complete."""
    priority: int = 0
    """With `pipeline.admission: priority`, higher runs first (ties: config order)."""
    eval_data: Path | None = None
    """Held-out records (same format and template as `data`): their token-mean loss is reported after
    every `eval_every` steps and after the last step, without dropout and without a gradient."""
    eval_every: int | None = None
    """Evaluate after every this many optimizer steps (null: only after the last); needs `eval_data`."""
    early_stop_patience: int | None = None
    """Stop the job once this many evaluations in a row have not lowered its best held-out loss; its
    adapter is then the best evaluation's step (finished or not). Needs `eval_every`."""

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def grad_accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass
class RunConfig:
    """A whole run: one base model, one pipeline, many jobs."""

    model: ModelConfig
    jobs: list[JobConfig]
    output_dir: Path = Path("runs/out")
    seed: int = 0
    data_cache: Path | None = None
    """Where tokenized data is kept (`mlora_pp.data_cache`); None: ``output_dir/data-cache``. Runs that
    name one directory share it: a file is tokenized once for all of them."""
    data_cache_max_size: float | str | None = None
    """At start-up, remove the data cache's least recently used entries that no run holds until it fits
    in this size (bytes, or like 50GiB); this run's own entries are spared. None: no limit
    (`python -m launcher cache DIR` lists and prunes by hand)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    log_every: int = 1
    source: Path | None = None
    """The YAML file this came from (not a YAML field)."""

    def job(self, name: str) -> JobConfig:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Generic dataclass reading with precise error locations.


def _type_name(tp: Any) -> str:
    if tp is Path:
        return "a path"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(value: Any, tp: Any, where: str, err: typing.Callable[[str, str], ConfigError]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where, err)
            except ConfigError:
                continue
        raise err(where, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise err(where, f"expected a mapping, got {value!r}")
        return _read_dataclass(value, tp, where, err)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise err(where, f"expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, inner, f"{where}[{i}]", err) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise err(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise err(where, f"expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # torch seeds, deque lengths, numpy plans: all 64-bit
            raise err(where, f"integer out of range (must fit in 64 bits); got {value}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            value = float(value)  # PyYAML reads 5e-4 and 1.0e37 (YAML 1.1) as strings; YAML 1.2 and users say float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise err(where, f"expected a number, got {value!r}")
        try:
            value = float(value)  # an integer beyond float's range overflows here
        except OverflowError:
            raise err(where, f"expected a finite number, got an integer of {len(str(value))} digits") from None
        if not math.isfinite(value):
            raise err(where, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise err(where, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise err(where, f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported config type {tp}")


def _read_dataclass(raw: dict, cls: type, where: str, err: typing.Callable[[str, str], ConfigError]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in raw.items():
        if key not in fields:
            guess = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known fields: {', '.join(fields)})"
            raise err(f"{prefix}{key}", f"unknown field{hint}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}", err)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise err(f"{prefix}{name}", "missing required field")
    return cls(**kwargs)


def _validate(cfg: RunConfig, err: typing.Callable[[str, str], ConfigError]) -> None:
    def choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            guess = difflib.get_close_matches(value, allowed, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise err(where, f"must be one of {', '.join(allowed)}; got {value!r}{hint}")

    choice("model.dtype", cfg.model.dtype, DTYPES)
    choice("model.quantize", cfg.model.quantize, QUANTIZE)
    choice("pipeline.schedule", cfg.pipeline.schedule, SCHEDULES)
    choice("pipeline.lora_path", cfg.pipeline.lora_path, LORA_PATHS)
    if isinstance(cfg.pipeline.balance, str) and cfg.pipeline.balance not in BALANCE_MODES:
        raise err("pipeline.balance", f"must be 'auto', 'profile' or a list of layer counts; got {cfg.pipeline.balance!r}")
    if isinstance(cfg.pipeline.balance, list) and any(n < 1 for n in cfg.pipeline.balance):
        raise err("pipeline.balance", "every stage needs at least one layer")
    if cfg.pipeline.timeout_s <= 0:
        raise err("pipeline.timeout_s", "must be positive")
    if cfg.pipeline.trace_actions < 0:
        raise err("pipeline.trace_actions", f"must be 0 or more; got {cfg.pipeline.trace_actions}")
    if cfg.pipeline.plan_window < 1:
        raise err("pipeline.plan_window", f"must be at least 1; got {cfg.pipeline.plan_window}")
    choice("pipeline.admission", cfg.pipeline.admission, ADMISSION)
    if cfg.pipeline.streams is not None and cfg.pipeline.streams < 1:
        raise err("pipeline.streams", f"must be at least 1 or null; got {cfg.pipeline.streams}")
    if cfg.pipeline.memory_budget is not None:
        try:
            budget_spec(cfg.pipeline.memory_budget)
        except ValueError as exc:
            raise err("pipeline.memory_budget", str(exc)) from None
    if isinstance(cfg.pipeline.hide_latency, str):
        if cfg.pipeline.hide_latency != "auto":
            raise err("pipeline.hide_latency", f"must be true, false or auto; got {cfg.pipeline.hide_latency!r}")
        if cfg.pipeline.memory_budget is None:
            raise err("pipeline.hide_latency", "auto needs pipeline.memory_budget: it hides latency only when "
                                               "every job fits the budget with twice the micro-batches in flight")
    if cfg.data_cache_max_size is not None:
        try:
            size_bytes(cfg.data_cache_max_size)
        except ValueError as exc:
            raise err("data_cache_max_size", str(exc)) from None
    if cfg.log_every < 1:
        raise err("log_every", "must be at least 1")
    if not cfg.jobs:
        raise err("jobs", "needs at least one job")
    seen: set[str] = set()
    for i, job in enumerate(cfg.jobs):
        at = f"jobs[{i}]"
        if not _JOB_NAME.match(job.name):
            raise err(f"{at}.name", f"{job.name!r} must be letters, digits, '_' or '-', starting with a letter or digit")
        if len(job.name) > MAX_JOB_NAME:
            raise err(f"{at}.name", f"must be at most {MAX_JOB_NAME} characters (it names directories); "
                                    f"got {len(job.name)}")
        if job.name in RESERVED_NAMES:
            raise err(f"{at}.name", f"{job.name!r} is the name of the run's own directory in output_dir "
                                    f"(reserved: {', '.join(RESERVED_NAMES)})")
        if job.name in seen:
            raise err(f"{at}.name", f"duplicate job name {job.name!r}")
        seen.add(job.name)
        if job.rank < 1:
            raise err(f"{at}.rank", f"must be a positive integer; got {job.rank}")
        if job.alpha <= 0:
            raise err(f"{at}.alpha", f"must be positive; got {job.alpha}")
        if not 0.0 <= job.dropout < 1.0:
            raise err(f"{at}.dropout", f"must be in [0, 1); got {job.dropout}")
        if not job.target_modules:
            raise err(f"{at}.target_modules", "needs at least one module")
        for k, module in enumerate(job.target_modules):
            choice(f"{at}.target_modules[{k}]", module, LORA_TARGETS)
        if len(set(job.target_modules)) != len(job.target_modules):
            raise err(f"{at}.target_modules", "lists a module twice")
        if job.lr <= 0:
            raise err(f"{at}.lr", f"must be positive; got {job.lr}")
        if job.lr > MAX_LR:
            raise err(f"{at}.lr", f"must be at most {MAX_LR:g} (AdamW's step size would overflow float32); got {job.lr}")
        choice(f"{at}.lr_schedule", job.lr_schedule, LR_SCHEDULES)
        if job.warmup_steps < 0:
            raise err(f"{at}.warmup_steps", "must be >= 0")
        if job.weight_decay < 0:
            raise err(f"{at}.weight_decay", "must be >= 0")
        if job.max_grad_norm is not None and job.max_grad_norm <= 0:
            raise err(f"{at}.max_grad_norm", f"must be positive (or null: no clipping); got {job.max_grad_norm}")
        if job.batch_size < 1:
            raise err(f"{at}.batch_size", f"must be a positive integer; got {job.batch_size}")
        if job.micro_batch_size < 1:
            raise err(f"{at}.micro_batch_size", f"must be a positive integer; got {job.micro_batch_size}")
        if job.batch_size % job.micro_batch_size:
            raise err(
                f"{at}.micro_batch_size",
                f"{job.micro_batch_size} does not divide batch_size {job.batch_size}",
            )
        if job.micro_batch_tokens is not None and job.micro_batch_tokens < 1:
            raise err(f"{at}.micro_batch_tokens", "must be positive")
        if job.epochs < 1:
            raise err(f"{at}.epochs", f"must be at least 1; got {job.epochs}")
        if job.max_steps is not None and job.max_steps < 1:
            raise err(f"{at}.max_steps", f"must be at least 1 or null; got {job.max_steps}")
        if job.max_seq_len < 2:
            raise err(f"{at}.max_seq_len", f"must be at least 2; got {job.max_seq_len}")
        if job.save_every is not None and job.save_every < 1:
            raise err(f"{at}.save_every", f"must be at least 1 or null; got {job.save_every}")
        if job.keep_last < 1:
            raise err(f"{at}.keep_last", f"must be at least 1; got {job.keep_last}")
        if job.eval_every is not None and job.eval_every < 1:
            raise err(f"{at}.eval_every", f"must be at least 1 or null; got {job.eval_every}")
        if job.eval_every is not None and job.eval_data is None:
            raise err(f"{at}.eval_every", "needs eval_data (the held-out records to evaluate on)")
        if job.early_stop_patience is not None:
            if job.early_stop_patience < 1:
                raise err(f"{at}.early_stop_patience", f"must be at least 1 or null; got {job.early_stop_patience}")
            if job.eval_every is None:
                raise err(f"{at}.early_stop_patience", "needs eval_every and eval_data (evaluations to compare)")


def human_bytes(n: float) -> str:
    """Bytes as people read them: 23.3 MiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _sized(text: str) -> float | None:
    """Bytes written like 50GiB, 800MB or 1000B; None if not so written."""
    match = _SIZE.match(text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def size_bytes(value: float | str) -> int:
    """Bytes from a size: a number of bytes, or like 50GiB or 800MB; ValueError if neither."""
    if isinstance(value, str):
        sized = _sized(value)
        if sized is None:
            raise ValueError(f"expected bytes (a number, or like 50GiB, 800MB); got {value!r}")
        value = sized
    if not value >= 1:
        raise ValueError(f"must be at least 1 byte; got {value!r}")
    return int(value)


def budget_spec(value: float | str) -> tuple[str, float]:
    """("bytes", n) or ("fraction", x) from a `pipeline.memory_budget` value; ValueError if neither."""
    if isinstance(value, str):
        sized = _sized(value)
        if sized is None:
            raise ValueError(f"expected bytes (a number, or like 12GiB, 800MB) or a fraction in (0, 1]; got {value!r}")
        if sized < 1:
            raise ValueError("must be at least 1 byte")
        return "bytes", sized
    if value <= 0:
        raise ValueError(f"must be positive; got {value!r}")
    return ("fraction", float(value)) if value <= 1 else ("bytes", float(value))


def parse_config(raw: Any, source: str | Path = "<config>") -> RunConfig:
    """Build and validate a `RunConfig` from already-parsed YAML."""
    source_name = str(source)

    def err(where: str, message: str) -> ConfigError:
        return ConfigError(f"{source_name}: {where}: {message}" if where else f"{source_name}: {message}")

    if not isinstance(raw, dict):
        raise err("", "the file must be a mapping with model, jobs, ... at the top level")
    cfg = _read_dataclass(raw, RunConfig, "", err)
    cfg.source = Path(source) if source_name != "<config>" else None
    _validate(cfg, err)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config; raises `ConfigError` naming the file and field on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}YAML syntax error: {problem}") from None
    return parse_config(raw, path)
