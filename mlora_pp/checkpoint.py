"""Checkpoints and exact resume: each stage's slice of each job's state, written atomically.

Layout under ``OUTPUT_DIR`` (every rank writes its own part there, so all ranks must see the same
directory: one machine, or a filesystem shared between the machines)::

    checkpoints/<job>/step-<N>/stage-<r>.safetensors  lora_A/lora_B and their AdamW state, per module of stage r
    checkpoints/<job>/step-<N>/stage-<r>.json         what that file is: job, step, stage, modules, bytes, sha256
    checkpoints/<job>/step-<N>/manifest.json          written last, by rank 0, once every stage's part exists

A job's whole state on a stage is its LoRA slice, its AdamW state (exp_avg, exp_avg_sq, step per
matrix) and its count of steps done. Nothing random needs saving: dropout masks are a pure hash of
(seed, job, step, row), the learning rate is a pure function of the step, and the data order a pure
function of (seed, job, epoch). The seed and the data position (epoch, rows consumed) are recorded
for humans and for validation. Tensors are keyed by module path, so a checkpoint written by S
stages resumes on any number of stages.

A stage's parts are written on a background thread (`PartWriter`): the optimizer step only copies
the job's state and goes on, while serializing, hashing and the fsynced writes overlap the next
actions. Every file goes to a temporary name in its directory, is flushed, fsynced and renamed, then the
directory is fsynced. A step directory is complete only when its manifest exists and every file it
lists has the recorded size and SHA-256; anything else is ignored and, at the next start, deleted.
Pruning deletes a manifest before the files it lists. Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from mlora_pp.config import ConfigError, JobConfig, RunConfig
from mlora_pp.data import DataError, load_template
from mlora_pp.data_cache import file_digest, sha256_file
from mlora_pp.durable import fsync_dir, make_dirs, write_atomic
from mlora_pp.faults import Fault
from mlora_pp.job import AdapterJob
from mlora_pp.model import StageModel
from mlora_pp.peft_format import LoraWeights
from mlora_pp.transport import PipelineError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
RESUME_FIELDS: tuple[str, ...] = (
    "rank", "alpha", "rslora", "target_modules", "data", "template", "batch_size", "micro_batch_size",
    "micro_batch_tokens", "epochs", "max_steps", "max_seq_len", "seed",
)
"""Job fields a checkpoint's state depends on: the LoRA shapes and scale and the data plan. Changing
one breaks the resume. lr, lr_schedule, warmup_steps, weight_decay, max_grad_norm and dropout may
change: they apply from the resumed step on."""
_ADDED_FIELDS: dict[str, Any] = {"rslora": False}
"""Resume fields newer than some manifests, with the value every job had before them."""


class CheckpointError(RuntimeError):
    """A checkpoint file could not be written; the message names this rank and the file."""


def job_root(output_dir: Path, job: str) -> Path:
    return Path(output_dir) / CHECKPOINTS / job


def step_dir(output_dir: Path, job: str, step: int) -> Path:
    return job_root(output_dir, job) / f"step-{step}"


def part_names(stage: int) -> tuple[str, str]:
    """(tensors, description) file names of one stage's part."""
    return f"stage-{stage}.safetensors", f"stage-{stage}.json"


def _step_of(path: Path) -> int | None:
    name = path.name
    if path.is_dir() and name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def step_dirs(output_dir: Path, job: str) -> list[tuple[int, Path]]:
    """The job's step directories, complete or not, oldest first."""
    root = job_root(output_dir, job)
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


def due(job: JobConfig, steps_done: int, total_steps: int) -> bool:
    """Whether a checkpoint is written after `steps_done` steps: every `save_every` and after the last,
    and with early stopping at every evaluation (the best one's weights become the adapter)."""
    if steps_done == total_steps or (job.save_every is not None and steps_done % job.save_every == 0):
        return True
    return job.early_stop_patience is not None and job.eval_every is not None and steps_done % job.eval_every == 0


# ----------------------------------------------------------------------------------------------
# Durable files.

_files_written = 0  # checkpoint files this process wrote (the fault injection counts them)


def write_file(path: Path, data: bytes, rank: int) -> None:
    """Replace `path` by `data` atomically and durably, or raise `CheckpointError` naming it.

    A failure (disk full, read-only, ...) never leaves a partial file under `path`: the temporary file
    is removed if possible, and one left behind by a killed process is ignored and later deleted.
    """
    def before_rename() -> None:
        global _files_written
        fault = Fault.from_environ()
        if fault is not None:
            fault.maybe_fire(rank, _files_written, "save")
        _files_written += 1

    try:
        write_atomic(path, data, before_rename)
    except OSError as exc:
        raise CheckpointError(f"rank {rank}: cannot write {path} ({exc.strerror or exc})") from None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------
# What a job's checkpoint depends on.


def resume_fields(cfg: RunConfig, job: JobConfig) -> dict[str, Any]:
    """The `RESUME_FIELDS` of a job, as recorded in its manifests (data and template by content)."""
    template = hashlib.sha256(repr(load_template(job.template)).encode()).hexdigest()
    values = {
        "rank": job.rank, "alpha": job.alpha, "rslora": job.rslora, "target_modules": sorted(job.target_modules),
        "data": f"sha256:{file_digest(Path(job.data))}", "template": f"{job.template} sha256:{template}",
        "batch_size": job.batch_size, "micro_batch_size": job.micro_batch_size,
        "micro_batch_tokens": job.micro_batch_tokens, "epochs": job.epochs, "max_steps": job.max_steps,
        "max_seq_len": job.max_seq_len, "seed": cfg.seed,
    }
    return json.loads(json.dumps(values))  # as read back from a manifest


def changed_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human lines for each resume field that differs, e.g. ``rank 8 -> 4``, ``data (file content changed)``."""
    out = []
    for name in RESUME_FIELDS:
        old, new = saved.get(name, _ADDED_FIELDS.get(name)), now.get(name)
        if old == new:
            continue
        if name in ("data", "template"):
            out.append(f"{name} (file content changed)")
        else:
            out.append(f"{name} {json.dumps(old)} -> {json.dumps(new)}")
    return out


# ----------------------------------------------------------------------------------------------
# Saving: every stage writes its part; rank 0 writes manifests and prunes.


def adapter_parameters(stage: StageModel, job: str) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Module path -> (lora_A, lora_B) parameters of `job` on this stage."""
    return {
        path: (m.lora_A[job], m.lora_B[job]) for path, m in stage.lora_modules().items() if job in m.adapters()
    }


def stage_tensors(stage: StageModel, job: AdapterJob) -> dict[str, torch.Tensor]:
    """This stage's part of a job's state: ``<module>.lora_A`` and ``<module>.lora_A.<adamw key>``, ..."""
    assert job.optimizer is not None
    tensors: dict[str, torch.Tensor] = {}
    for path, pair in adapter_parameters(stage, job.name).items():
        for which, param in zip(("lora_A", "lora_B"), pair):
            tensors[f"{path}.{which}"] = param.detach().to("cpu", copy=True).contiguous()
            for key, value in job.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{path}.{which}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def write_part(directory: Path, rank: int, tensors: dict[str, torch.Tensor], description: dict) -> None:
    """One stage's part of a checkpoint: its tensors, then the description that marks it complete."""
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    tensor_name, json_name = part_names(rank)
    description = {**description, "file": tensor_name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_file(directory / tensor_name, data, rank)
    write_file(directory / json_name, _json_bytes(description), rank)


class PartWriter:
    """Writes this stage's checkpoint parts on a daemon thread, one after another in the order given.

    At most `depth` parts wait, so a slow disk slows training instead of filling memory with
    copies. A failed write (disk full, read-only) stops the writer: nothing after it is written, as
    after a crash there, and the error is raised on the training thread at the next `submit` or at
    `flush`. Every wait is bounded by the pipeline timeout.
    """

    def __init__(self, rank: int, timeout_s: float, depth: int = 2):
        self.rank = rank
        self.timeout_s = timeout_s
        self.depth = depth
        self._parts: deque[tuple[Path, dict[str, torch.Tensor], dict]] = deque()
        self._busy: Path | None = None  # the step directory being written
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, directory: Path, tensors: dict[str, torch.Tensor], description: dict) -> None:
        """Queue a part (its tensors already copied off the live state)."""
        with self._changed:
            self._wait(lambda: len(self._parts) < self.depth, "a free place in the checkpoint queue")
            self._parts.append((directory, tensors, description))
            self._changed.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"checkpoints-rank{self.rank}", daemon=True)
            self._thread.start()

    def flush(self) -> None:
        """Wait until every queued part is on disk; raise the writer's error if it had one."""
        with self._changed:
            self._wait(lambda: not self._parts and self._busy is None, "the checkpoint parts to be written")

    def close(self) -> None:
        """Finish what is queued (bounded, errors ignored: the run is ending) and stop the thread.

        The thread is joined: one still ending while the interpreter shuts down aborts the process
        ("terminate called without an active exception", seen after a SIGTERM stop) when freeing a
        tensor needs the GIL there.
        """
        with self._changed:
            idle = self._changed.wait_for(lambda: self._error is not None or (not self._parts and self._busy is None),
                                          timeout=self.timeout_s)
            self._closed = True
            self._changed.notify_all()
        if idle and self._thread is not None:  # it returns at once now; a write still hanging is not waited for again
            self._thread.join(timeout=self.timeout_s)

    def _wait(self, ready, what: str) -> None:
        if self._error is not None:
            raise self._error
        done = self._changed.wait_for(lambda: self._error is not None or ready(), timeout=self.timeout_s)
        if self._error is not None:
            raise self._error
        if not done:
            raise CheckpointError(f"rank {self.rank}: timed out after {self.timeout_s:g}s waiting for {what} "
                                  f"(writing {self._busy})")

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._parts or self._closed)
                if not self._parts:
                    return
                directory, tensors, description = self._parts.popleft()
                self._busy = directory
            error = None
            try:
                write_part(directory, self.rank, tensors, description)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
                error = exc
            del tensors  # the copies go now, not with this frame (see `close`)
            with self._changed:
                self._busy = None
                if error is not None:
                    self._error = error
                    self._parts.clear()
                self._changed.notify_all()
            if error is not None:
                return


@dataclass
class StageSaver:
    """On every rank: after a job's good optimizer step, queue this stage's part if a checkpoint is due.

    Used as `StageWorker.after_step`: returns False, writing nothing, when the updated weights are
    not finite, so a failed job's last checkpoint is always a good one. The state is copied here;
    `writer` writes it in the background.
    """

    output_dir: Path
    stage: StageModel
    rank: int
    seed: int
    writer: PartWriter

    def __call__(self, job: AdapterJob) -> bool:
        if not due(job.config, job.steps_done, job.total_steps):
            return True
        if not job.weights_finite():
            return False
        self.save(job)
        return True

    def save(self, job: AdapterJob) -> None:
        tensors = stage_tensors(self.stage, job)
        epoch, index = job.data_position()
        description = {
            "format": FORMAT, "job": job.name, "step": job.steps_done, "total_steps": job.total_steps,
            "stage": self.rank, "modules": sorted({key.split(".lora_")[0] for key in tensors}), "seed": self.seed,
            "data_position": {"epoch": epoch, "index": index}, "time": time.time(),
        }
        self.writer.submit(step_dir(self.output_dir, job.name, job.steps_done), tensors, description)


class ManifestWriter:
    """On rank 0: once every stage's part of a due checkpoint exists, write its manifest, then prune.

    Polled after each of rank 0's actions and drained at the end. A poll looks at the files of a
    job's next due checkpoint only once rank 0 has taken that step: stage 0 steps last, and its own
    part follows its step, so before that the checkpoint cannot be complete (looking anyway cost
    about 10 us a job at every action: 1.2 ms an action with 128 jobs). A failed job gets no manifest after
    its last good step; its checkpoints up to there are kept.
    """

    def __init__(self, output_dir: Path, jobs: dict[str, AdapterJob], num_stages: int, fields: dict[str, dict],
                 seed: int, rank: int = 0):
        self.output_dir = Path(output_dir)
        self.jobs = jobs
        self.num_stages = num_stages
        self.fields = fields
        self.seed = seed
        self.rank = rank
        self.keep: Callable[[str], set[int]] | None = None
        """Steps of a job whose checkpoints pruning must keep besides the newest (early stopping's
        best evaluation, and evaluations not heard of yet)."""
        self.pending: dict[str, deque[int]] = {
            name: deque(s for s in range(job.steps_done + 1, job.total_steps + 1)
                        if due(job.config, s, job.total_steps))
            for name, job in jobs.items()
        }

    def add(self, job: AdapterJob, fields: dict) -> None:
        """A job submitted mid-run: its checkpoints get manifests like the others'."""
        self.jobs[job.name] = job
        self.fields[job.name] = fields
        self.pending[job.name] = deque(s for s in range(job.steps_done + 1, job.total_steps + 1)
                                       if due(job.config, s, job.total_steps))

    def stop_at(self, job: str, steps_done: int, saved: bool) -> None:
        """`job` was cancelled or the run stopped after `steps_done` steps: no later manifest;
        `saved`: every stage wrote a part at `steps_done` (its last finished step) that needs its manifest."""
        steps = self.pending[job]
        while steps and steps[-1] > steps_done:
            steps.pop()
        if saved and (not steps or steps[-1] < steps_done):
            steps.append(steps_done)

    def fail(self, job: str, good_steps: int) -> None:
        """`job` failed after `good_steps` good steps: no manifest for any later step."""
        steps = self.pending[job]
        while steps and steps[-1] > good_steps:
            steps.pop()

    def _missing(self, job: str, step: int) -> int | None:
        """The first stage whose part of (job, step) is not there yet, or None."""
        directory = step_dir(self.output_dir, job, step)
        for r in range(self.num_stages):
            if not (directory / part_names(r)[1]).is_file():
                return r
        return None

    def poll(self) -> None:
        for job, steps in self.pending.items():
            if steps and steps[0] > self.jobs[job].steps_done:
                continue  # not taken on rank 0 yet
            while steps and self._missing(job, steps[0]) is None:
                self._write(job, steps.popleft())

    def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for every due part; they were all written before the final gather."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            late = [(job, steps[0]) for job, steps in self.pending.items() if steps]
            if not late:
                return
            if time.monotonic() > deadline:
                job, step = late[0]
                r = self._missing(job, step)
                path = step_dir(self.output_dir, job, step) / part_names(r if r is not None else 0)[1]
                raise PipelineError(
                    f"rank {self.rank}: timed out after {timeout_s:.0f}s waiting for rank {r}'s checkpoint "
                    f"part of job {job!r} step {step} ({path}; is output_dir shared by every rank?)"
                )
            time.sleep(0.05)

    def _write(self, job: str, step: int) -> None:
        directory = step_dir(self.output_dir, job, step)
        stages, position = [], None
        for r in range(self.num_stages):
            description = _read_json(directory / part_names(r)[1])
            if description is None or description.get("job") != job or description.get("step") != step:
                where = directory / part_names(r)[1]
                raise CheckpointError(f"rank {self.rank}: {where} is not a valid part description")
            stages.append({key: description.get(key) for key in ("stage", "file", "bytes", "sha256", "modules")})
            position = description.get("data_position")
        manifest = {
            "format": FORMAT, "job": job, "step": step, "total_steps": self.jobs[job].total_steps,
            "stages": stages, "fields": self.fields[job], "seed": self.seed, "data_position": position,
            "time": time.time(),
        }
        write_file(directory / MANIFEST, _json_bytes(manifest), self.rank)
        prune(self.output_dir, job, self.jobs[job].config.keep_last, self.keep(job) if self.keep is not None else set())


def _remove_step(directory: Path) -> None:
    """Delete a step directory, its manifest first: a crash halfway leaves an incomplete one, never a
    manifest without its parts."""
    manifest = directory / MANIFEST
    if manifest.exists():
        try:
            manifest.unlink()
        except OSError:
            return
        fsync_dir(directory)
    shutil.rmtree(directory, ignore_errors=True)


def prune(output_dir: Path, job: str, keep_last: int, also: set[int] | frozenset[int] = frozenset()) -> None:
    """Keep the `keep_last` newest complete checkpoints of a job, and those of the steps in `also`;
    delete older and abandoned ones."""
    dirs = step_dirs(output_dir, job)
    complete = [s for s, p in dirs if (p / MANIFEST).is_file()]
    if not complete:
        return
    keep = set(complete[-keep_last:]) | set(also)
    for s, p in dirs:
        if s not in keep and s < complete[-1]:
            _remove_step(p)


# ----------------------------------------------------------------------------------------------
# Resuming.


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint of one job: its step and the stage files that hold its state."""

    job: str
    step: int
    directory: Path
    files: tuple[Path, ...]
    data_position: tuple[int, int] = (0, 0)


def read_checkpoint(directory: Path, job: str) -> tuple[ResumePoint, dict] | None:
    """(resume point, manifest) if `directory` holds a complete, intact checkpoint of `job`, else None."""
    step = _step_of(directory)
    manifest = _read_json(directory / MANIFEST)
    if step is None or manifest is None:
        return None
    if manifest.get("format") != FORMAT or manifest.get("job") != job or manifest.get("step") != step:
        return None
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        return None
    files = []
    for part in stages:
        if not isinstance(part, dict) or not isinstance(part.get("file"), str) or "/" in part["file"]:
            return None
        path = directory / part["file"]
        try:
            if path.stat().st_size != part.get("bytes") or sha256_file(path) != part.get("sha256"):
                return None
        except OSError:
            return None
        files.append(path)
    position = manifest.get("data_position") or {}
    point = ResumePoint(job, step, directory, tuple(files), (position.get("epoch", 0), position.get("index", 0)))
    return point, manifest


def newest_checkpoint(output_dir: Path, job: str) -> tuple[ResumePoint, dict] | None:
    """The newest complete checkpoint of `job` (older ones are tried when a newer one is damaged)."""
    for _, directory in reversed(step_dirs(output_dir, job)):
        found = read_checkpoint(directory, job)
        if found is not None:
            return found
    return None


@dataclass
class ResumePlan:
    """Rank 0's decision at start: where each job resumes (absent: from scratch)."""

    points: dict[str, ResumePoint] = field(default_factory=dict)
    fields: dict[str, dict] = field(default_factory=dict)
    """Each job's `resume_fields` now (recorded in its manifests)."""


def plan_resume(cfg: RunConfig, fresh: bool, source: str) -> ResumePlan:
    """Find each job's newest complete checkpoint and refuse one whose resume fields changed.

    Raises `ConfigError` naming the job and listing every changed field. With `fresh`, nothing resumes.
    """
    plan = ResumePlan()
    refused = []
    for i, job in enumerate(cfg.jobs):
        try:
            plan.fields[job.name] = resume_fields(cfg, job)
        except (OSError, DataError) as exc:  # preflight checked the files; a race is still one clear line
            raise ConfigError(f"{source}: jobs[{i}].data: cannot read ({exc})") from None
        if fresh:
            continue
        found = newest_checkpoint(cfg.output_dir, job.name)
        if found is None:
            continue
        point, manifest = found
        changes = changed_fields(manifest.get("fields") or {}, plan.fields[job.name])
        if changes:
            refused.append(f"jobs[{i}] ({job.name}, checkpoint step {point.step}): {', '.join(changes)}")
        plan.points[job.name] = point
    if refused:
        raise ConfigError(
            f"{source}: cannot resume from the checkpoints in {Path(cfg.output_dir) / CHECKPOINTS}: changed since "
            f"they were written: {'; '.join(refused)}. Restore those fields, or start over with --fresh "
            "(deletes these jobs' checkpoints) or another output_dir"
        )
    return plan


def clear_stale(cfg: RunConfig, plan: ResumePlan, fresh: bool) -> None:
    """On rank 0 before any rank trains: with `fresh` delete the jobs' checkpoints; otherwise delete
    step directories after each resume point (unfinished, or damaged) and leftover temporary files,
    so that no part of an earlier run can ever be mixed into a new manifest."""
    for job in cfg.jobs:
        root = job_root(cfg.output_dir, job.name)
        if fresh:
            for _, directory in step_dirs(cfg.output_dir, job.name):
                _remove_step(directory)
            continue
        point = plan.points.get(job.name)
        for step, directory in step_dirs(cfg.output_dir, job.name):
            if point is None or step > point.step:
                _remove_step(directory)
            else:
                for tmp in directory.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        if root.is_dir():
            for tmp in root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def restore(stage: StageModel, job: AdapterJob, point: ResumePoint, source: str) -> None:
    """Load this stage's slice of `job` (weights and AdamW state) from a checkpoint written by any
    number of stages, and set its step count. Raises `ConfigError` if it does not fit the model."""
    assert job.optimizer is not None
    params = adapter_parameters(stage, job.name)
    found: dict[str, torch.Tensor] = {}
    try:
        for path in point.files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.split(".lora_")[0] in params:
                        found[key] = f.get_tensor(key)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{source}: output_dir: cannot read checkpoint {point.directory} ({exc})") from None
    index = {id(p): i for i, p in enumerate(job.optimizer.param_groups[0]["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for path, pair in params.items():
            for which, param in zip(("lora_A", "lora_B"), pair):
                key = f"{path}.{which}"
                if key not in found or found[key].shape != param.shape:
                    what = "has no" if key not in found else f"has shape {tuple(found[key].shape)} for"
                    raise ConfigError(
                        f"{source}: output_dir: checkpoint {point.directory} {what} {key} "
                        f"(the model has {tuple(param.shape)}); use --fresh to start over"
                    )
                param.copy_(found[key])
                moments = {k[len(key) + 1:]: v for k, v in found.items() if k.startswith(key + ".")}
                if moments:
                    state[index[id(param)]] = moments
    groups = job.optimizer.state_dict()["param_groups"]
    job.optimizer.load_state_dict({"state": state, "param_groups": groups})
    job.steps_done = point.step


def checkpoint_weights(point: ResumePoint) -> LoraWeights:
    """Module path -> (lora_A, lora_B) of a whole checkpoint (every stage), for a failed job's output."""
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for path in point.files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                module, _, rest = key.partition(".lora_")
                if rest in ("A", "B"):
                    weights.setdefault(module, {})[rest] = f.get_tensor(key)
    return {m: (ab["A"], ab["B"]) for m, ab in sorted(weights.items())}


# ----------------------------------------------------------------------------------------------
# Up-front checks.


def check_writable(cfg: RunConfig, rank: int, source: str) -> None:
    """Every rank writes checkpoint parts: fail before training if it cannot (write, fsync, remove)."""
    directory = Path(cfg.output_dir) / CHECKPOINTS
    probe = directory / f".write-test-{rank}-{os.getpid()}"
    try:
        make_dirs(directory)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{source}: output_dir: rank {rank} cannot write checkpoints to {directory} ({exc.strerror or exc})"
        ) from None


def write_share_marker(cfg: RunConfig, rank: int, token: str) -> Path:
    """This rank's marker under output_dir/checkpoints, holding `token` (host, pid, path), for
    `unseen_markers`; the caller removes it."""
    marker = Path(cfg.output_dir) / CHECKPOINTS / f".shared-test-rank{rank}"
    marker.write_text(token)
    return marker


def unseen_markers(cfg: RunConfig, tokens: list[str], wait_s: float = 5.0) -> list[int]:
    """The ranks whose marker (with their own token) rank 0 does not see in its output_dir within
    `wait_s`: they write their parts somewhere rank 0, which writes the manifests, cannot read."""
    directory = Path(cfg.output_dir) / CHECKPOINTS
    deadline = time.monotonic() + wait_s

    def seen(rank: int) -> bool:
        try:
            return (directory / f".shared-test-rank{rank}").read_text() == tokens[rank]
        except OSError:
            return False

    while True:
        unseen = [r for r in range(1, len(tokens)) if not seen(r)]
        if not unseen or time.monotonic() >= deadline:
            return unseen
        time.sleep(0.2)


def check_space(cfg: RunConfig, stage: StageModel, jobs: dict[str, AdapterJob], rank: int, source: str) -> None:
    """Refuse to start when the disk cannot hold this stage's checkpoints (keep_last + 1 of each job,
    the most that exist at once); the final adapters are small next to them."""
    need = 0
    for name, job in jobs.items():
        size = sum(p.numel() * 4 for pair in adapter_parameters(stage, name).values() for p in pair)
        kept = job.config.keep_last + 1 + (job.config.early_stop_patience is not None)  # + the best evaluation's
        need += 3 * size * kept  # weights, exp_avg, exp_avg_sq (fp32)
    directory = Path(cfg.output_dir) / CHECKPOINTS
    free = shutil.disk_usage(directory).free
    if free < need:
        raise ConfigError(
            f"{source}: output_dir: rank {rank} needs about {need / 2**20:.1f} MiB for checkpoints in "
            f"{directory} but only {free / 2**20:.1f} MiB are free"
        )
