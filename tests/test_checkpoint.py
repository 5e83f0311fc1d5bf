"""Checkpoints, exact resume and failures: a stopped run, restarted, ends where an uninterrupted one does.

Reference runs never stop. In-process runs (one rank) stop by an exception at a chosen action or
inside a checkpoint write; torchrun runs (2 stages, Gloo) stop by SIGKILL (`MLORA_PP_FAULT`). Every
run uses dropout > 0 and fp32; resumed adapters must equal the reference to 1e-6 (relative).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from test_pipeline import ranks, torchrun
from test_training import JOBS, adapter, assert_adapters_equal, make_raw, make_workspace, rel_err

import launcher.__main__ as launcher
import mlora_pp.checkpoint as checkpoint_module
from mlora_pp.checkpoint import (
    CHECKPOINTS, MANIFEST, CheckpointError, PartWriter, checkpoint_weights, newest_checkpoint, read_checkpoint,
    step_dirs,
)
from mlora_pp.config import ConfigError, parse_config
from mlora_pp.control import DECISION_LEAD
from mlora_pp.runtime import StageWorker
from mlora_pp.schedule import build_schedule
from mlora_pp.training import load_tokenizer, prepare_jobs, train

CK_JOBS = [dict(job, save_every=1) for job in JOBS]  # a checkpoint after every step: many kill points
STEPS = {"alpha": 3, "beta": 2, "gamma": 4}


class Stop(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ckpt"))


def raw_config(workspace, out: str, jobs=None, **pipeline) -> dict:
    return make_raw(workspace, jobs or CK_JOBS, out, **{"schedule": "lora", "timeout_s": 10, **pipeline})


def config(workspace, out: str, jobs=None, **pipeline):
    return parse_config(raw_config(workspace, out, jobs, **pipeline), "test.yaml")


def yaml_config(workspace, out: str, jobs=None) -> Path:
    path = workspace[0] / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw_config(workspace, out, jobs)))
    return path


def assert_adapter_same(ours: dict, theirs: dict, tol: float = 1e-6) -> None:
    """Two adapters equal to `tol` relative, per tensor and over the whole adapter."""
    assert set(ours) == set(theirs)
    for path in theirs:
        for k in (0, 1):
            assert rel_err(ours[path][k], theirs[path][k]) <= tol, (path, k)
    flat = [torch.cat([t.flatten() for p in sorted(theirs) for t in d[p]]) for d in (ours, theirs)]
    assert rel_err(*flat) <= tol


def assert_same(out: Path, ref: Path, jobs=JOBS, tol: float = 1e-6) -> None:
    """Every job's adapter in `out` equals the one in `ref` (`assert_adapter_same`)."""
    for job in jobs:
        assert_adapter_same(adapter(out, job["name"]), adapter(ref, job["name"]), tol)


def assert_checkpoints_complete(out: Path) -> None:
    """Every manifest on disk lists parts that exist with the recorded size and hash."""
    root = out / CHECKPOINTS
    for job_dir in (root.iterdir() if root.is_dir() else []):
        for _, directory in step_dirs(out, job_dir.name):
            if (directory / MANIFEST).exists():
                assert read_checkpoint(directory, job_dir.name) is not None, f"{directory}: manifest without its parts"


@pytest.fixture(scope="module")
def reference(workspace):
    """One rank, never stopped."""
    cfg = config(workspace, "reference")
    result = train(cfg, progress=False)
    assert result.steps == STEPS
    return cfg.output_dir


@pytest.fixture(scope="module")
def reference_two(workspace):
    """Two stages, never stopped (with 3 jobs on 2 stages nothing is fused, so resumed runs repeat its
    micro-batches exactly)."""
    proc = ranks(2, yaml_config(workspace, "reference-two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workspace[0] / "reference-two"


def stop_after_actions(monkeypatch, count: int) -> None:
    real = StageWorker.run_action
    done = [0]

    def run_action(self, action):
        if done[0] == count:
            raise Stop()
        done[0] += 1
        real(self, action)

    monkeypatch.setattr(StageWorker, "run_action", run_action)


def stop_inside_write(monkeypatch, name: str) -> None:
    """Stop between writing the temporary file of `name` (a path ending) and renaming it."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(name):
            raise Stop()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


# ---------------------------------------------------------------------------------------------- one rank


def test_layout_manifest_and_pruning(reference):
    """keep_last (2) newest complete checkpoints per job; JSON + safetensors only; the final adapter
    is the last checkpoint's; AdamW moments and step counts are in the parts."""
    for name, steps in STEPS.items():
        dirs = step_dirs(reference, name)
        assert [s for s, _ in dirs] == [steps - 1, steps]
        for _, directory in dirs:
            assert sorted(p.name for p in directory.iterdir()) == [MANIFEST, "stage-0.json", "stage-0.safetensors"]
        point, manifest = newest_checkpoint(reference, name)
        assert manifest["step"] == steps and manifest["total_steps"] == steps
        assert manifest["fields"]["rank"] == next(j["rank"] for j in JOBS if j["name"] == name)
        assert manifest["data_position"]["epoch"] == 0 and manifest["data_position"]["index"] > 0
        with safe_open(str(point.files[0]), framework="pt") as f:
            keys = set(f.keys())
            step_key = next(k for k in keys if k.endswith(".lora_A.step"))
            assert float(f.get_tensor(step_key)) == steps
        assert any(k.endswith(".lora_B.exp_avg_sq") for k in keys)
        saved, final = checkpoint_weights(point), adapter(reference, name)
        assert set(saved) == set(final)
        for path in final:
            assert torch.equal(saved[path][0], final[path][0]) and torch.equal(saved[path][1], final[path][1])
    suffixes = {p.suffix for p in (reference / CHECKPOINTS).rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}


@pytest.mark.parametrize("stop_at", [2, 11, 22])
def test_resume_after_a_stop_between_actions_is_exact(workspace, reference, monkeypatch, stop_at):
    """Stopped (of 25 actions) before any checkpoint (2), mid-way (11, mid-step for some jobs), late (22)."""
    cfg = config(workspace, f"stop-{stop_at}")
    stop_after_actions(monkeypatch, stop_at)
    with pytest.raises(Stop):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert_checkpoints_complete(cfg.output_dir)
    result = train(cfg, progress=False)
    assert result.steps == STEPS
    assert sum(result.resumed.values()) > 0 or stop_at == 2
    assert_same(cfg.output_dir, reference)
    records = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    for name, steps in STEPS.items():  # every step logged once across both runs (the log is appended)
        assert sorted(r["step"] for r in records if r.get("job") == name and "loss" in r) == list(range(1, steps + 1))


def test_a_run_stopped_early_completes_the_checkpoints_whose_parts_it_queued(workspace, monkeypatch):
    """Stopped (as by Ctrl-C) right after gamma's second optimizer step, while its part is still being
    written behind training: the way out finishes the write and rank 0 writes its manifest, so the
    next run resumes gamma from step 2, not step 1."""
    cfg = config(workspace, "stop-queued")
    jobs = prepare_jobs(cfg, load_tokenizer(workspace[1]))
    actions = build_schedule([j.job_steps() for j in jobs.values()], 1, "lora", True).stages[0]
    index = next(i for i, a in enumerate(actions) if a.kind == "S" and a.job == "gamma" and a.step == 1)
    slow = checkpoint_module.write_part

    def write_part(directory, *args, **kwargs):
        if directory.name == "step-2" and directory.parent.name == "gamma":
            time.sleep(0.5)  # still writing when the stop comes
        return slow(directory, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_part", write_part)
    stop_after_actions(monkeypatch, index + 1)
    with pytest.raises(Stop):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert_checkpoints_complete(cfg.output_dir)
    assert newest_checkpoint(cfg.output_dir, "gamma")[0].step == 2


@pytest.mark.parametrize("file", ["stage-0.safetensors", "stage-0.json", MANIFEST])
def test_resume_after_a_stop_inside_a_checkpoint_write_is_exact(workspace, reference, monkeypatch, file):
    """Stopped between the temporary file and its rename: no file under the final name, no manifest
    without parts; the restart deletes the leftovers and ends exactly where the reference does."""
    cfg = config(workspace, f"stop-in-{file}")
    stop_inside_write(monkeypatch, f"gamma/step-2/{file}")
    with pytest.raises(Stop):
        train(cfg, progress=False)
    monkeypatch.undo()
    directory = cfg.output_dir / CHECKPOINTS / "gamma" / "step-2"
    assert not (directory / file).exists() and list(directory.glob(f".{file}.*.tmp"))
    assert not (directory / MANIFEST).exists()
    assert_checkpoints_complete(cfg.output_dir)
    assert newest_checkpoint(cfg.output_dir, "gamma")[0].step == 1
    result = train(cfg, progress=False)
    assert result.resumed["gamma"] == 1 and result.steps == STEPS
    assert not list((cfg.output_dir / CHECKPOINTS).rglob("*.tmp"))
    assert_same(cfg.output_dir, reference)


def test_a_stop_before_a_resumed_jobs_next_step_leaves_the_checkpoint_it_resumed_from_as_it_is(
        workspace, monkeypatch):
    """Resumed from each job's step-1 checkpoint under `save_every: null` (it may change between
    runs; step 1 is then not due), and stopped (SIGTERM) at once: a job stopped at the step it
    resumed from has that checkpoint already, and the stop must not write it again. It used to, in
    place: where the new parts differ from the old (a resume on another stage count or balance),
    the old manifest's hashes no longer match them until rank 0 rewrites it, and a SIGKILL meanwhile
    left the job no checkpoint at all."""
    from mlora_pp import stopping

    jobs = [dict(job, batch_size=8, micro_batch_size=1, max_steps=2, keep_last=10) for job in CK_JOBS]  # 8 micro-batches a step
    whole = config(workspace, "resumed-whole", jobs)
    train(whole, progress=False)
    out = workspace[0] / "stop-after-resume"
    shutil.copytree(whole.output_dir, out)
    for job in jobs:
        for step, directory in step_dirs(out, job["name"]):
            if step > 1:
                shutil.rmtree(directory)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / CHECKPOINTS).rglob("*") if p.is_file()}
    cfg = config(workspace, out.name, [dict(job, save_every=None) for job in jobs])
    real = StageWorker.run_action

    def run_action(self, action):
        stopping.request()  # as a scheduler pre-empting the resumed run would, at its first action
        return real(self, action)

    monkeypatch.setattr(StageWorker, "run_action", run_action)
    result = train(cfg, progress=False)
    monkeypatch.undo()
    assert result.resumed == {job["name"]: 1 for job in jobs}
    unmoved = [name for name, step in result.stopped.items() if step == 1]
    assert unmoved, result.stopped  # the stop came before some job's next step
    for path, stamp in files.items():
        if path.parent.parent.name in unmoved:
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{path} written again"
    assert_checkpoints_complete(out)
    result = train(cfg, progress=False)
    assert result.resumed == {job["name"]: result.resumed[job["name"]] for job in jobs}
    assert all(result.resumed[name] == 1 for name in unmoved)
    assert_same(out, whole.output_dir, jobs)


def test_directories_a_write_creates_are_made_durable_in_their_parents(tmp_path, monkeypatch):
    """A checkpoint's first part creates step-N (and, for a job's first, its job directory): each is
    fsynced into its parent, or a crash after `prune` deleted the older steps may keep those
    deletions and lose step-N's own entry. The file's directory is fsynced after each rename."""
    import mlora_pp.durable as durable

    synced: list[Path] = []
    monkeypatch.setattr(durable, "fsync_dir", synced.append)
    step = tmp_path / CHECKPOINTS / "job" / "step-4"
    durable.write_atomic(step / "stage-0.json", b"{}")
    assert synced == [tmp_path, tmp_path / CHECKPOINTS, step.parent, step]
    synced.clear()
    durable.write_atomic(step / "stage-0.safetensors", b"")
    assert synced == [step]


def test_finished_run_trains_nothing_and_fresh_starts_over(workspace, reference, capsys):
    out = workspace[0] / "again"
    shutil.copytree(reference, out)
    cfg = config(workspace, "again")
    result = train(cfg, progress=False)
    assert result.resumed == STEPS and result.steps == STEPS and not result.schedule.micro_batches
    assert_same(out, reference, tol=0)
    capsys.readouterr()
    assert launcher.main([str(yaml_config(workspace, "again")), "--no-live"]) == 0
    printed = capsys.readouterr().out
    for name, steps in STEPS.items():  # no loss this run to report (it printed "final loss nan")
        assert f"{name}: {steps} steps, finished in an earlier run -> {out / name}" in printed, printed
    train(config(workspace, "again", memory_budget="1GiB"), progress=False)  # nothing left to measure memory on
    assert "jobs submitted to this run are admitted without checking pipeline.memory_budget" in capsys.readouterr().out
    result = train(cfg, progress=False, fresh=True)
    assert result.resumed == {} and result.steps == STEPS and len(result.schedule.micro_batches) > 0
    assert_same(out, reference)


def test_changed_job_fields_are_refused_with_the_list(workspace, reference, capsys):
    out = workspace[0] / "changed"
    shutil.copytree(reference, out)
    jobs = [dict(CK_JOBS[0], rank=8, batch_size=2, lr=1.0), dict(CK_JOBS[1], lr=5.0), dict(CK_JOBS[2], rslora=False)]
    with pytest.raises(ConfigError) as err:
        train(config(workspace, "changed", jobs), progress=False)
    message = str(err.value)
    assert ("jobs[0] (alpha, checkpoint step 3): rank 4 -> 8, batch_size 4 -> 2; "
            "jobs[2] (gamma, checkpoint step 4): rslora true -> false. Restore") in message, message  # gamma's scale
    assert "beta" not in message and "--fresh" in message  # lr may change
    config_path = yaml_config(workspace, "changed", jobs)
    assert launcher.main([str(config_path), "--no-live"]) == launcher.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rank 4 -> 8" in lines[0]
    assert launcher.main([str(config_path), "--no-live", "--fresh"]) == 0
    assert newest_checkpoint(out, "alpha")[1]["fields"]["rank"] == 8  # started over


def test_a_manifest_from_before_rslora_resumes_as_plain_lora(workspace, reference):
    """Manifests written before `rslora` was a job field lack it: they were all plain LoRA, so a
    plain job resumes from them and an rsLoRA job is refused."""
    out = workspace[0] / "old-manifests"
    shutil.copytree(reference, out)
    for manifest in out.glob(f"{CHECKPOINTS}/*/step-*/{MANIFEST}"):
        data = json.loads(manifest.read_text())
        data["fields"].pop("rslora")
        manifest.write_text(json.dumps(data))
    plain = [dict(job, rslora=False) for job in CK_JOBS]
    result = train(config(workspace, "old-manifests", plain), progress=False)
    assert result.resumed == STEPS and not result.schedule.micro_batches
    with pytest.raises(ConfigError, match=r"jobs\[2\] \(gamma, checkpoint step 4\): rslora false -> true\."):
        train(config(workspace, "old-manifests", CK_JOBS), progress=False)


def test_disk_full_at_a_checkpoint_write_is_one_line_and_leaves_no_partial_file(workspace, reference, monkeypatch,
                                                                                  capsys):
    config_path = yaml_config(workspace, "disk-full")
    out = workspace[0] / "disk-full"
    real = os.fsync

    def fsync(fd):
        if "alpha/step-2/.stage-0.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):  # its temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert launcher.main([str(config_path), "--no-live"]) == launcher.EXIT_PIPELINE_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    target = out / CHECKPOINTS / "alpha" / "step-2" / "stage-0.safetensors"
    assert [l for l in err.splitlines() if l.startswith("error")] == [
        f"error: rank 0: cannot write {target} (No space left on device)"]
    monkeypatch.undo()
    directory = out / CHECKPOINTS / "alpha" / "step-2"
    assert not directory.exists() or not any(directory.iterdir())  # no partial file, no temporary file
    assert_checkpoints_complete(out)
    assert newest_checkpoint(out, "alpha")[0].step == 1
    assert train(config(workspace, "disk-full"), progress=False).steps == STEPS
    assert_same(out, reference)


def test_unwritable_or_too_small_output_dir_is_refused_before_training(workspace, monkeypatch):
    real = os.fsync

    def read_only(fd):
        if ".write-test" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(fd)

    monkeypatch.setattr(os, "fsync", read_only)
    with pytest.raises(ConfigError, match=r"output_dir: rank 0 cannot write checkpoints to .*Read-only file system"):
        train(config(workspace, "read-only"), progress=False)
    monkeypatch.undo()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"output_dir: rank 0 needs about .* MiB for checkpoints"):
        train(config(workspace, "too-small"), progress=False)
    assert not (workspace[0] / "too-small" / "metrics.jsonl").exists()


def failed_run_checks(out: Path, reference: Path, same=assert_adapter_same, reason: str = "non-finite") -> list[dict]:
    """beta failed alone at step 2: alpha and gamma equal the reference, where beta's lr is sane
    (rows of different jobs never mix, so beta's NaNs cannot reach them); beta's output is its
    step-1 checkpoint, and no checkpoint after that exists. Returns the metrics records."""
    for job in (JOBS[0], JOBS[2]):
        same(adapter(out, job["name"]), adapter(reference, job["name"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    failed = [r for r in records if r.get("event") == "failed"]
    assert len(failed) == 1 and failed[0]["job"] == "beta" and failed[0]["step"] == 2, failed
    assert reason in failed[0]["reason"], failed[0]
    assert [r["step"] for r in records if r.get("job") == "beta" and "loss" in r] == [1]
    for name in ("alpha", "gamma"):
        losses = [r["loss"] for r in records if r.get("job") == name and "loss" in r]
        assert len(losses) == STEPS[name] and all(map(lambda x: x == x and abs(x) < 1e3, losses))
    assert [s for s, d in step_dirs(out, "beta") if (d / MANIFEST).exists()] == [1]
    point, _ = newest_checkpoint(out, "beta")
    saved, final = checkpoint_weights(point), adapter(out, "beta")
    assert all(torch.equal(saved[p][k], final[p][k]) for p in final for k in (0, 1))
    assert json.loads((out / "beta" / "failed.json").read_text())["good_steps"] == 1
    return records


BAD_LR = [CK_JOBS[0], dict(CK_JOBS[1], lr=1e10), CK_JOBS[2]]


def assert_jobs_failed_exit(proc) -> None:
    """torchrun fails when a rank does: rank 0 exited EXIT_JOBS_FAILED and no other rank failed."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    failures = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert failures and set(failures) == {("0", str(launcher.EXIT_JOBS_FAILED))}, proc.stderr[-4000:]
    assert "error:" not in proc.stderr, proc.stderr[-4000:]


def test_non_finite_job_fails_alone(workspace, reference, capsys):
    """Through the launcher: the other jobs finish, and the run exits EXIT_JOBS_FAILED (3)."""
    config_path = yaml_config(workspace, "bad-lr", BAD_LR)
    assert launcher.main([str(config_path), "--no-live"]) == launcher.EXIT_JOBS_FAILED
    out = capsys.readouterr().out
    assert "beta: FAILED (non-finite" in out and "; 1 job(s) failed" in out, out[-2000:]
    failed_run_checks(workspace[0] / "bad-lr", reference)


# ---------------------------------------------------------------------------------------------- 2 stages


def remaining_actions(workspace, out: str) -> tuple[tuple, ...]:
    """The per-stage actions a restart in `out` will run (rank 0's resume decision, recomputed here)."""
    cfg = config(workspace, out)
    jobs = prepare_jobs(cfg, load_tokenizer(workspace[1]))
    for name, job in jobs.items():
        found = newest_checkpoint(cfg.output_dir, name)
        job.steps_done = found[0].step if found else 0
    return build_schedule([j.job_steps() for j in jobs.values()], 2, "lora", True).stages


def test_sigkill_at_several_points_then_resume_is_exact(workspace, reference, reference_two):
    """Five runs of one config on 2 stages, each SIGKILLed (early, inside a stage part's write, just after
    a save, inside a write on rank 0, at a random action of a random rank): every killed run ends every
    rank within the timeout and leaves only complete checkpoints. The last one runs under torchrun's
    `--max-restarts 1`, which starts the ranks again after the kill (the fault fires in the first
    attempt only): they resume and finish, and the final adapters equal an uninterrupted 2-stage
    run's. A copy taken mid-way also resumes on one rank."""
    out = "killed"
    path = yaml_config(workspace, out)
    rng = random.Random(6)

    def just_after_a_save() -> str:
        stage1 = remaining_actions(workspace, out)[1]
        first_s = next(i for i, a in enumerate(stage1) if a.kind == "S")
        return f"1:{first_s + 1}:kill"

    def at_random() -> str:
        stages = remaining_actions(workspace, out)
        rank = rng.randrange(2)
        return f"{rank}:{rng.randrange(1, len(stages[rank]) - 1)}:kill"

    faults = ["1:3:kill", "1:save:4:kill", just_after_a_save, "0:save:2:kill", at_random]
    for k, fault in enumerate(faults):
        spec = fault() if callable(fault) else fault
        restarts = int(k == len(faults) - 1)
        start = time.monotonic()
        proc = torchrun(2, path, timeout=120 + 60 * restarts, restarts=restarts, MLORA_PP_FAULT=spec)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
        assert errors, (spec, proc.stderr[-3000:])
        assert not re.search(r"^\[rank\d+\]: Traceback", proc.stderr, re.M), (spec, proc.stderr[-3000:])
        assert_checkpoints_complete(workspace[0] / out)
        if restarts:
            # torchrun keeps one store for both attempts: before each attempt's keys were kept apart,
            # the second attempt's ranks read the first's addresses and could not join
            assert proc.returncode == 0, (spec, proc.stderr[-4000:])
            assert "resuming after step" in proc.stdout and not any("could not join" in e for e in errors)
            assert time.monotonic() - start < 10 + 2 * 60, spec
            break
        assert proc.returncode != 0, (spec, proc.stderr[-3000:])
        assert time.monotonic() - start < 10 + 60, spec
        if spec == "1:save:4:kill":  # a checkpoint of 2 stages resumes on 1 rank too (modules keyed by path)
            shutil.copytree(workspace[0] / out, workspace[0] / "one-rank")
            result = train(config(workspace, "one-rank"), progress=False)
            assert result.resumed and result.steps == STEPS
            for job in JOBS:  # steps done unfused on 2 stages, then fused on 1: fp32 summation-order noise
                assert_adapters_equal(adapter(workspace[0] / "one-rank", job["name"]), adapter(reference, job["name"]))
    assert_same(workspace[0] / out, reference_two)


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_sigterm_is_ignored_once_a_rank_has_its_outcome(monkeypatch, capsys, outcome):
    """While training, SIGTERM (torchrun stopping the ranks because one failed) ends the rank with
    one line. Once `train` has returned or raised, the rank has its own outcome to report: a later
    SIGTERM once raised from an interpreter-exit finalizer, a traceback after the rank's own line
    (4 in 37 random SIGKILLs)."""
    import signal

    import mlora_pp.training as training

    in_force = []

    def fake_train(cfg, **_):
        in_force.append(signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL))
        if outcome == "failed":
            raise launcher.PipelineError("rank 1: lost rank 0 while waiting for the activation of micro-batch 3")
        return SimpleNamespace(stopped={})  # rank 1 reports nothing

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(launcher, "load_config", lambda path: None)
    monkeypatch.setattr(training, "train", fake_train)
    try:
        code = launcher.main(["unused.yaml", "--no-live"])
        assert in_force == [True]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # harmless now
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    if outcome == "failed":
        assert code == launcher.EXIT_PIPELINE_FAILED
        assert err.splitlines() == ["error: rank 1: lost rank 0 while waiting for the activation of micro-batch 3"]
    else:
        assert code == 0 and err == ""


def test_a_stop_request_is_honoured_only_while_training_and_its_deadline_ends_with_training():
    """SIGTERM during set-up, or a second one, stops the rank at once (request refused); a request
    while training is kept, and leaving training clears it and cancels its deadline, so the run's
    last writes are not cut short."""
    from mlora_pp import stopping

    fired = []
    stopping.set_accepting(False)
    assert not stopping.request()
    stopping.set_accepting(True)
    try:
        assert stopping.request() and stopping.requested()
        assert not stopping.request()
        stopping.arm(threading.Timer(0.2, fired.append, args=(1,)))
    finally:
        stopping.set_accepting(False)
    time.sleep(0.4)
    assert fired == [] and not stopping.requested()


def test_sigterm_stops_with_every_job_checkpointed_and_the_next_run_resumes_exactly(workspace, reference_two):
    """SIGTERM to torchrun mid-run, as a scheduler pre-empting it sends: torchrun passes it on, rank 0
    stops at its next decision point and every rank saves every unfinished job at its last finished
    step (no checkpoint was due: save_every 100). Exit non-zero with one line, no adapter for the
    stopped jobs, status "stopped". Run again: each job resumes from that step and ends where an
    uninterrupted 2-stage run does."""
    import signal
    import subprocess
    import sys

    from test_pipeline import ROOT, env, free_port

    from mlora_pp.status import read_status

    out = "preempted"
    path = yaml_config(workspace, out, JOBS)
    jobs = prepare_jobs(config(workspace, out, JOBS), load_tokenizer(workspace[1]))
    stage0 = build_schedule([j.job_steps() for j in jobs.values()], 2, "lora", True).stages[0]
    pause = next(i for i, a in enumerate(stage0) if a.kind == "S") + 1  # rank 0 waits 3 s after a first step
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "launcher", str(path), "--no-live"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(MLORA_PP_FAULT=f"0:{pause}:delay", MLORA_PP_STOP_GRACE_S="15"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = workspace[0] / out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and '"admitted"' in metrics.read_text()):
        time.sleep(0.1)
    time.sleep(1.0)  # inside rank 0's pause
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-3000:]
    assert any(l.startswith("error: rank 0: stopped by SIGTERM after ") for l in stderr.splitlines()), stderr[-3000:]
    assert not re.search(r"^\[rank\d+\]: Traceback", stderr, re.M), stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped = {r["job"]: r["step"] for r in records if r.get("event") == "stopped"}
    assert set(stopped) == set(STEPS) and any(0 < stopped[n] < STEPS[n] for n in STEPS), stopped
    # decided before rank 0's first forward after its pause (the pause comes after the decisions
    # before action `pause`), for DECISION_LEAD micro-batches later, or before, had the signal come
    # before the pause: not at a fixed cadence of micro-batches
    after_pause = next(a.micro_batch for a in stage0[pause + 1:] if a.kind == "F")
    at = {r["micro_batch"] for r in records if r.get("event") == "stopped"}
    assert len(at) == 1 and at.pop() <= after_pause + DECISION_LEAD, (at, after_pause)
    assert re.search(r"the stop took \d+\.\ds of its 15s", stderr), stderr[-3000:]  # MLORA_PP_STOP_GRACE_S
    assert not any(r.get("event") == "done" for r in records)
    assert read_status(workspace[0] / out).state == "stopped"
    for name, step in stopped.items():
        found = newest_checkpoint(workspace[0] / out, name)
        assert (found[0].step if found else 0) == step, (name, step)
        assert not (workspace[0] / out / name / "adapter_model.safetensors").exists()
    assert_checkpoints_complete(workspace[0] / out)
    again = ranks(2, path)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = [json.loads(line) for line in metrics.read_text().splitlines() if '"resumed"' in line]
    assert {r["job"]: r["step"] for r in resumed} == {n: s for n, s in stopped.items() if s > 0}
    assert_same(workspace[0] / out, reference_two)


@pytest.mark.parametrize("rank0_late", [False, True], ids=["free", "rank0-late"])
def test_non_finite_job_fails_alone_on_two_stages(workspace, reference_two, rank0_late):
    """With `rank0_late`, rank 0 pauses before beta's second step, so the last stage's record of that
    step (finite loss there) reaches rank 0 before rank 0 finds beta's gradients non-finite: the order
    that once slipped a failed step's loss into metrics.jsonl, and that a free run picks only sometimes."""
    out = f"bad-lr-two-{rank0_late}"
    env = {}
    if rank0_late:
        cfg = config(workspace, out, BAD_LR)
        jobs = prepare_jobs(cfg, load_tokenizer(workspace[1]))
        stage0 = build_schedule([j.job_steps() for j in jobs.values()], 2, "lora", True).stages[0]
        index = next(i for i, a in enumerate(stage0) if a.kind == "S" and a.job == "beta" and a.step == 1)
        env["MLORA_PP_FAULT"] = f"0:{index}:delay"
    proc = torchrun(2, yaml_config(workspace, out, BAD_LR), **env)
    assert_jobs_failed_exit(proc)
    assert "beta: FAILED (non-finite" in proc.stdout, proc.stdout[-2000:]
    failed_run_checks(workspace[0] / out, reference_two)


@pytest.mark.parametrize("field, value", [("save_every", 0), ("keep_last", 0)])
def test_checkpoint_fields_are_validated(workspace, field, value):
    with pytest.raises(ConfigError, match=rf"jobs\[0\]\.{field}: must be at least 1"):
        config(workspace, "never", [dict(CK_JOBS[0], **{field: value})])


def test_a_middle_stage_failure_is_heard_mid_run_on_three_stages(workspace, reference):
    """Only stage 1 of 3 finds beta's step-2 gradients non-finite (fault `nan`); stages 0 and 2 see
    nothing wrong. Rank 0 must hold the last stage's loss of that step until stage 1 reports it: the
    job fails there, mid-run (before gamma ends), with no loss logged for any later beta step."""
    out = "middle-fails"
    cfg = config(workspace, out)
    jobs = prepare_jobs(cfg, load_tokenizer(workspace[1]))
    stage1 = build_schedule([j.job_steps() for j in jobs.values()], 3, "lora", True).stages[1]
    index = next(i for i, a in enumerate(stage1) if a.kind == "S" and a.job == "beta" and a.step == 1)
    proc = torchrun(3, yaml_config(workspace, out), MLORA_PP_FAULT=f"1:{index}:nan")
    assert_jobs_failed_exit(proc)
    assert "beta: FAILED (non-finite gradients at step 2 on stage 1" in proc.stdout, proc.stdout[-2000:]
    records = failed_run_checks(workspace[0] / out, reference, assert_adapters_equal,
                                "non-finite gradients at step 2 on stage 1")
    failed_at = next(i for i, r in enumerate(records) if r.get("event") == "failed")
    gamma_end = next(i for i, r in enumerate(records) if r.get("job") == "gamma" and r.get("step") == STEPS["gamma"])
    assert failed_at < gamma_end, "the failure was heard only at the end of the run"


# ---------------------------------------------------------------------------------------------- the part writer


def test_part_writer_writes_behind_training_in_order_and_bounds_its_queue(tmp_path, monkeypatch):
    """submit returns while the disk is still busy; parts land in order; a full queue waits, bounded
    by the timeout, with a message naming the rank and what is being written."""
    release, written = threading.Event(), []

    def slow_write(directory, rank, tensors, description):
        assert release.wait(30)
        written.append(description["step"])

    monkeypatch.setattr(checkpoint_module, "write_part", slow_write)
    writer = PartWriter(rank=1, timeout_s=0.5, depth=2)
    for step in (1, 2, 3):  # one being written, two waiting
        writer.submit(tmp_path / f"step-{step}", {}, {"step": step})
    assert written == []
    with pytest.raises(CheckpointError, match=r"rank 1: timed out after 0.5s waiting for a free place in the "
                                              r"checkpoint queue \(writing .*step-1\)"):
        writer.submit(tmp_path / "step-4", {}, {"step": 4})
    release.set()
    writer.flush()
    assert written == [1, 2, 3]
    writer.close()


def test_part_writer_failure_stops_it_and_is_raised_on_the_training_thread(tmp_path, monkeypatch):
    written = []

    def failing_write(directory, rank, tensors, description):
        if description["step"] == 2:
            raise CheckpointError(f"rank {rank}: cannot write {directory} (No space left on device)")
        written.append(description["step"])

    monkeypatch.setattr(checkpoint_module, "write_part", failing_write)
    writer = PartWriter(rank=0, timeout_s=5)
    writer.submit(tmp_path / "a", {}, {"step": 1})
    writer.submit(tmp_path / "b", {}, {"step": 2})
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.flush()
    with pytest.raises(CheckpointError, match="No space left on device"):  # and at the next part
        writer.submit(tmp_path / "c", {}, {"step": 3})
    writer.close()
    assert written == [1]


def test_manifests_look_only_at_checkpoints_rank_0_has_stepped_to(tmp_path, monkeypatch):
    """Rank 0 polls for complete checkpoints after every action. It looks at a job's files only once
    it has taken the job's next due step itself (stage 0 steps last, its part follows): with 100
    jobs and none due, a poll reads no file; once one is, only that job's, and its manifest follows."""
    from mlora_pp.checkpoint import ManifestWriter, step_dir, write_part

    def stand_in(name: str) -> SimpleNamespace:
        config = SimpleNamespace(save_every=1, keep_last=2, early_stop_patience=None, eval_every=None)
        return SimpleNamespace(name=name, steps_done=0, total_steps=4, config=config)

    jobs = {f"j{i}": stand_in(f"j{i}") for i in range(100)}
    writer = ManifestWriter(tmp_path, jobs, num_stages=2, fields={name: {} for name in jobs}, seed=0)
    for stage in range(2):
        write_part(step_dir(tmp_path, "j7", 1), stage, {"w": torch.zeros(2)},
                   {"job": "j7", "step": 1, "stage": stage, "modules": [], "data_position": {"epoch": 0, "index": 1}})
    looked: list[str] = []
    missing = writer._missing
    monkeypatch.setattr(writer, "_missing", lambda job, step: looked.append(job) or missing(job, step))
    writer.poll()
    assert looked == [] and not (step_dir(tmp_path, "j7", 1) / MANIFEST).exists()  # j7's parts: ahead of rank 0
    jobs["j7"].steps_done = 1
    jobs["j3"].steps_done = 1  # stepped, its parts not written yet
    writer.poll()
    assert sorted(set(looked)) == ["j3", "j7"] and (step_dir(tmp_path, "j7", 1) / MANIFEST).exists()
    assert list(writer.pending["j7"]) == [2, 3, 4] and list(writer.pending["j3"]) == [1, 2, 3, 4]
