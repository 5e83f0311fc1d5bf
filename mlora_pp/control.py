"""Jobs submitted, cancelled and re-prioritized while a run goes on: requests on disk, decisions
broadcast by rank 0.

``python -m launcher submit OUTPUT_DIR JOB.yaml``, ``python -m launcher cancel OUTPUT_DIR NAME`` and
``python -m launcher priority OUTPUT_DIR NAME N`` write a request file under ``OUTPUT_DIR/control/requests/`` (atomically; the file name orders
them). The run's rank 0 looks for requests at fixed micro-batch ids (every `REQUESTS_EVERY`-th one,
and the plan's end; a request that comes after the last look waits for the next run of this
output_dir), validates each against the run's config exactly like a job of the config file, and
broadcasts the accepted change to every rank (`PlanChannel`). Every rank then switches to a new
plan at that same micro-batch (see `mlora_pp.schedule.cut_actions`). Each request ends in
``control/done/`` with its outcome, and accepted changes are appended to ``control/accepted.jsonl``,
so a restarted run still has the submitted jobs and leaves the cancelled ones alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from mlora_pp.config import ConfigError, RunConfig, parse_config
from mlora_pp.durable import write_atomic
from mlora_pp.run_lock import LOCK_NAME
from mlora_pp.run_lock import holder as lock_holder
from mlora_pp.transport import PendingSends, PipelineError

DECISION_LEAD = 2
"""A decision takes effect this many micro-batches after rank 0 takes it: it decides for micro-batch
q before forwarding q - DECISION_LEAD. Each stage posts the receives of its next DECISION_LEAD
micro-batches ahead of their forwards, and a receive must belong to the plan that runs it, so a
smaller lead would hold those receives back."""
REQUESTS_EVERY = 8
"""Rank 0 reads the control directory for micro-batches REQUESTS_EVERY, 2*REQUESTS_EVERY, ... and the
plan's end. Every other micro-batch (from DECISION_LEAD on) is a decision point too, for a graceful
stop and early stops, which need no disk."""
CONTROL = "control"
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Change:
    """What rank 0 decided at one decision point: new jobs (their config mappings), cancellations, a stop."""

    submit: tuple[dict, ...] = ()
    cancel: tuple[str, ...] = ()
    stop: bool = False
    """A graceful stop (SIGTERM, `mlora_pp.stopping`): every rank checkpoints its unfinished jobs at
    this point and the run ends."""
    early: tuple[str, ...] = ()
    """The jobs of `cancel` that stop early (`mlora_pp.early_stop`), not by request."""
    priority: tuple[tuple[str, int], ...] = ()
    """New priorities, (job, priority) in the order requested (`launcher priority`)."""

    def encode(self) -> bytes:
        return json.dumps({"submit": list(self.submit), "cancel": list(self.cancel), "stop": self.stop,
                           "early": list(self.early), "priority": [list(p) for p in self.priority]}).encode()

    @staticmethod
    def decode(data: bytes) -> "Change":
        raw = json.loads(data.decode())
        return Change(tuple(raw["submit"]), tuple(raw["cancel"]), bool(raw.get("stop", False)),
                      tuple(raw.get("early", ())), tuple((str(n), int(p)) for n, p in raw.get("priority", ())))

    def __bool__(self) -> bool:
        return bool(self.submit or self.cancel or self.stop or self.priority)


@dataclass
class Accepted:
    """What earlier runs of an output_dir accepted (`control/accepted.jsonl`)."""

    submitted: list[dict] = field(default_factory=list)
    cancelled: dict[str, int] = field(default_factory=dict)
    """Job -> steps done when it was cancelled (or stopped early)."""
    early: dict[str, int] = field(default_factory=dict)
    """Job stopped early -> the step of its best evaluation."""
    priority: dict[str, int] = field(default_factory=dict)
    """Job -> the priority it was last given (`launcher priority`)."""


@dataclass(frozen=True)
class Request:
    path: Path
    kind: str  # "submit", "cancel" or "priority"
    body: dict


def config_mapping(cfg: RunConfig) -> dict:
    """The YAML mapping of a parsed config (paths as strings), to validate a submitted job against."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


@dataclass
class ControlDir:
    """`OUTPUT_DIR/control`: requests, their outcomes, the accepted log and the run's config."""

    output_dir: Path

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / CONTROL

    def write_config(self, cfg: RunConfig) -> None:
        """The run's current config (jobs submitted so far included): what `submit` validates against."""
        write_atomic(self.root / "config.yaml", yaml.safe_dump(config_mapping(cfg)).encode())

    def read_config(self) -> RunConfig:
        path = self.root / "config.yaml"
        try:
            raw = yaml.safe_load(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"{self.output_dir}: not a run directory (no {CONTROL}/config.yaml; has the run started?)"
                              ) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the run's config ({exc.__class__.__name__})") from None
        return parse_config(raw, path)

    def request(self, kind: str, body: dict) -> Path:
        path = self.root / "requests" / f"{time.time_ns():020d}-{os.getpid()}-{kind}.json"
        write_atomic(path, json.dumps({"kind": kind, **body}).encode())
        return path

    def pending(self) -> list[Request]:
        directory = self.root / "requests"
        if not directory.is_dir():
            return []
        out = []
        for path in sorted(directory.glob("*.json")):
            try:
                body = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError):  # half-visible or broken: answered as rejected
                body = {"kind": "broken"}
            if not isinstance(body, dict):  # valid JSON written by hand, but not a request
                body = {"kind": "broken"}
            out.append(Request(path, str(body.pop("kind", "broken")), body))
        return out

    def finish(self, request: Request, outcome: str) -> None:
        """Move a request to control/done with its outcome (accepted, or why not)."""
        done = self.root / "done" / request.path.name
        write_atomic(done, json.dumps({"kind": request.kind, **request.body, "outcome": outcome}).encode())
        request.path.unlink(missing_ok=True)

    def log_accepted(self, change: Change, steps_done: dict[str, int], best: dict[str, int] | None = None) -> None:
        """Append an accepted change (durably) for a restart: submitted jobs, cancel points, and for
        jobs stopped early the step of their best evaluation (their adapter)."""
        path = self.root / "accepted.jsonl"
        old = path.read_bytes() if path.exists() else b""
        entry = {"submit": list(change.submit), "cancel": {name: steps_done.get(name, 0) for name in change.cancel},
                 "time": time.time()}
        if change.early:
            entry["early_stop"] = {name: (best or {})[name] for name in change.early}
        if change.priority:
            entry["priority"] = dict(change.priority)
        write_atomic(path, old + json.dumps(entry).encode() + b"\n")

    def accepted(self) -> Accepted:
        """Every job submitted so far (config mappings), every cancelled job with its steps then, and
        the best evaluation's step of every job stopped early."""
        path = self.root / "accepted.jsonl"
        found = Accepted()
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    found.submitted += list(entry["submit"])
                    found.cancelled.update({str(k): int(v) for k, v in entry["cancel"].items()})
                    found.early.update({str(k): int(v) for k, v in entry.get("early_stop", {}).items()})
                    found.priority.update({str(k): int(v) for k, v in entry.get("priority", {}).items()})
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ConfigError(f"{path} line {number}: not an accepted change (edited by hand?); "
                                      "fix it, or start over with --fresh") from None
        return found


def validate_submission(cfg: RunConfig, job: Any, where: str) -> RunConfig:
    """`cfg` with `job` appended, checked exactly as a config file's job is (ConfigError if not)."""
    if not isinstance(job, dict):
        raise ConfigError(f"{where}: a job must be a mapping (name, data, rank, ...); got {job!r}")
    from mlora_pp.preflight import check_job_files

    raw = config_mapping(cfg)
    raw["jobs"].append(job)
    try:
        checked = parse_config(raw, where)
        check_job_files(checked)
    except ConfigError as exc:  # name the job file's own fields, not the merged config's list
        raise ConfigError(str(exc).replace(f"jobs[{len(raw['jobs']) - 1}].", "")) from None
    return checked


# ------------------------------------------------------------------------------------------ broadcast


class PlanChannel:
    """Rank 0's decision at each decision point, on every rank, in order.

    Rank 0 sends every other rank one message per decision point (a header [point, payload bytes],
    then the payload when there is one), whether or not anything changed, before it forwards
    micro-batch point - DECISION_LEAD; the others wait for it just before their own forward of that
    micro-batch, which comes after rank 0's, so the wait is normally over before it starts. Its own
    Gloo group, CPU tensors.
    """

    def __init__(self, rank: int, world: int, group: Any, timeout_s: float):
        self.rank, self.world, self.group = rank, world, group
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._sends = PendingSends(rank, timeout_s, poll=False)
        self._next: tuple[torch.Tensor, Any] | None = None
        """The receive of the next header, posted ahead (ranks > 0)."""

    def announce(self, point: int, change: Change | None) -> None:
        payload = change.encode() if change else b""
        header = torch.tensor([point, len(payload)], dtype=torch.int64)
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        for peer in range(1, self.world):
            what = f"sending the plan at micro-batch {point} to rank {peer}"
            try:
                self._sends.add(dist.isend(header, peer, group=self.group), what, peer, header)
                if body is not None:
                    self._sends.add(dist.isend(body, peer, group=self.group), what, peer, body)
            except RuntimeError as exc:
                raise PipelineError(f"rank 0: lost rank {peer} while {what} ({exc})") from None

    def await_decision(self, point: int, more: bool = False) -> Change | None:
        """Rank 0's decision for `point`. With `more` (another point follows in this plan), the
        receive of the next header is posted as soon as this one says "go on": Gloo moves a message
        only once its receive is posted, so a receive posted at the wait would cost a round trip
        there (about 0.2 ms a point on loopback) where a posted one finds the message arrived."""
        if self._next is not None:
            header, work = self._next
            self._next = None
        else:
            header = torch.empty(2, dtype=torch.int64)
            work = self._post(header, point)
        self._wait(work, point)
        got, size = (int(v) for v in header.tolist())
        if got != point:
            raise PipelineError(f"rank {self.rank}: expected rank 0's plan at micro-batch {point}, got it for "
                                f"{got}: the ranks run different schedules")
        if size:
            body = torch.empty(size, dtype=torch.uint8)
            self._wait(self._post(body, point), point)
            return Change.decode(bytes(body.tolist()))
        if more:  # never past a change or a plan's end: the run may end there, and no receive may outlive it
            following = torch.empty(2, dtype=torch.int64)
            self._next = (following, self._post(following, point + 1))
        return None

    def _post(self, buffer: torch.Tensor, point: int) -> Any:
        """Post the receive of part of rank 0's plan. Gloo refuses the post itself once rank 0's
        connection has closed, before any wait could time out."""
        try:
            return dist.irecv(buffer, 0, group=self.group)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank 0 while waiting for its plan at micro-batch {point} "
                                f"({exc})") from None

    def _wait(self, work: Any, point: int) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank 0 while waiting for its plan at micro-batch {point} "
                                f"({exc})") from None
        if ok is False:
            raise PipelineError(f"rank {self.rank}: timed out after {self.timeout_s:g}s waiting for rank 0's plan "
                                f"at micro-batch {point}")

    def flush(self) -> None:
        self._sends.flush()


# ------------------------------------------------------------------------------------------ the CLI


def submit_main(argv: list[str]) -> int:
    """``python -m launcher submit OUTPUT_DIR JOB.yaml``: queue a new job for a running run."""
    if len(argv) != 2:
        print("usage: python -m launcher submit OUTPUT_DIR JOB.yaml", file=sys.stderr)
        return EXIT_BAD_INPUT
    output_dir, job_file = Path(argv[0]), Path(argv[1])
    control = ControlDir(output_dir)
    try:
        cfg = control.read_config()
        try:
            job = yaml.safe_load(job_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{job_file}: job file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{job_file}: cannot read job file ({getattr(exc, 'strerror', None) or exc.__class__.__name__})"
                              ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{job_file}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None
        pending = [_submitted_name(r) for r in control.pending() if r.kind == "submit"]
        if isinstance(job, dict) and job.get("name") in pending:
            raise ConfigError(f"{job_file}: name: a job named {job['name']!r} is already submitted and waiting")
        checked = validate_submission(cfg, job, str(job_file))
        tokenize_submission(checked, output_dir, str(job_file))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    path = control.request("submit", {"job": job})
    within = REQUESTS_EVERY + DECISION_LEAD
    print(f"submitted {job['name']!r}: {_who_acts(output_dir)} picks it up within {within} micro-batches ({path})")
    return 0


def tokenize_submission(checked: RunConfig, output_dir: Path, where: str) -> None:
    """Tokenize a submitted job's data into the run's data cache here, so that rank 0 reads it at
    its decision point instead of tokenizing it there while every stage waits. Bad data is refused
    now (ConfigError); a tokenizer that cannot be loaded from here only leaves the work to the run."""
    from mlora_pp.data import DataError
    from mlora_pp.data_cache import DataCache, cache_dir
    from mlora_pp.job import EvalDataError, load_job
    from mlora_pp.preflight import load_tokenizer

    job = checked.jobs[-1]
    try:
        tokenizer = load_tokenizer(Path(checked.model.path))
    except Exception as exc:  # noqa: BLE001 - the run loads it itself and says what is wrong
        print(f"note: not tokenized here ({exc.__class__.__name__}: {exc}); the run tokenizes {job.name}'s data")
        return
    cache = DataCache(tokenizer, cache_dir(checked.data_cache, output_dir))
    try:
        loaded = load_job(job, tokenizer, checked.seed, cache=cache)
    except DataError as exc:
        field = "eval_data" if isinstance(exc, EvalDataError) else "data"
        raise ConfigError(f"{where}: {field}: {exc}") from None
    if cache.directory is not None:
        print(f"tokenized {job.name}'s data: {len(loaded.examples):,} rows, {loaded.examples.tokens:,} tokens "
              f"(cached in {cache.directory})")


def _submitted_name(request: Request) -> Any:
    """The name of a pending submission's job (None if the request is not a well-formed one)."""
    job = request.body.get("job")
    return job.get("name") if isinstance(job, dict) else None


def _who_acts(output_dir: Path) -> str:
    """The run that will see a request: the live one, or the next one when none holds the lock."""
    if (output_dir / LOCK_NAME).exists() and lock_holder(output_dir) is None:
        return "no run is using this output_dir now: the next run of its config"
    return "the run"


def _run_with_job(output_dir: Path, name: str) -> tuple[ControlDir, RunConfig] | None:
    """The run's control directory and config, where `name` is one of its jobs (or a submission
    not yet taken); None after printing why not."""
    control = ControlDir(output_dir)
    try:
        cfg = control.read_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    names = [j.name for j in cfg.jobs] + [_submitted_name(r) for r in control.pending() if r.kind == "submit"]
    if name not in names:
        print(f"error: {output_dir}: no job named {name!r} in this run (jobs: {', '.join(map(str, names))})",
              file=sys.stderr)
        return None
    return control, cfg


def priority_main(argv: list[str]) -> int:
    """``python -m launcher priority OUTPUT_DIR NAME N``: give a job a new priority (integer; higher
    runs first under `pipeline.admission: priority`, where it may pause less urgent jobs)."""
    usage = "usage: python -m launcher priority OUTPUT_DIR NAME PRIORITY"
    if len(argv) != 3:
        print(usage, file=sys.stderr)
        return EXIT_BAD_INPUT
    output_dir, name = Path(argv[0]), argv[1]
    try:
        priority = int(argv[2])
    except ValueError:
        print(f"error: priority must be an integer; got {argv[2]!r}\n{usage}", file=sys.stderr)
        return EXIT_BAD_INPUT
    found = _run_with_job(output_dir, name)
    if found is None:
        return EXIT_BAD_INPUT
    control, cfg = found
    path = control.request("priority", {"name": name, "priority": priority})
    note = "" if cfg.pipeline.admission == "priority" else (
        f" (pipeline.admission is {cfg.pipeline.admission}: priorities order nothing until it is priority)")
    within = REQUESTS_EVERY + DECISION_LEAD
    print(f"priority {priority} for {name!r} requested: {_who_acts(output_dir)} applies it within {within} "
          f"micro-batches{note} ({path})")
    return 0


def cancel_main(argv: list[str]) -> int:
    """``python -m launcher cancel OUTPUT_DIR NAME``: stop a job; it keeps its last adapter."""
    if len(argv) != 2:
        print("usage: python -m launcher cancel OUTPUT_DIR NAME", file=sys.stderr)
        return EXIT_BAD_INPUT
    output_dir, name = Path(argv[0]), argv[1]
    found = _run_with_job(output_dir, name)
    if found is None:
        return EXIT_BAD_INPUT
    control, _ = found
    path = control.request("cancel", {"name": name})
    within = REQUESTS_EVERY + DECISION_LEAD
    print(f"cancel {name!r} requested: {_who_acts(output_dir)} stops it within {within} micro-batches ({path})")
    return 0
