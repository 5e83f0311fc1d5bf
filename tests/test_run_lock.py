"""One run per output_dir: a second run is refused with one line before it writes anything; the
lock goes with the process that held it, however that process ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline import env, free_port
from test_training import JOBS, make_raw, make_workspace

from mlora_pp.config import ConfigError, parse_config
from mlora_pp.run_lock import LOCK_NAME, RunLock
from mlora_pp.training import train

ROOT = Path(__file__).resolve().parents[1]

_HOLDER = textwrap.dedent("""
    import sys, time
    from mlora_pp.run_lock import RunLock
    RunLock(sys.argv[1]).acquire("holder")
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("lock"), layers=2)


def config(workspace, out: str):
    return parse_config(make_raw(workspace, [dict(JOBS[0], max_steps=1)], out), "test.yaml")


def hold(directory: Path) -> subprocess.Popen:
    """Another process holding the lock on `directory` until killed."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_the_lock_dies_with_it(workspace):
    cfg = config(workspace, "taken")
    holder = hold(cfg.output_dir)
    try:
        with pytest.raises(ConfigError, match=rf"output_dir: .*taken is in use by another run \(pid {holder.pid} on "):
            train(cfg, progress=False)
        assert sorted(p.name for p in cfg.output_dir.iterdir()) == [LOCK_NAME], "the refused run wrote something"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = train(cfg, progress=False)  # killed: no stale lock
    assert result.steps == {"alpha": 1}
    again = RunLock(cfg.output_dir)  # and released at the end of a run: taken at once
    again.acquire("test")
    again.release()


def test_two_ranks_refused_alike_under_torchrun(workspace):
    """Every rank ends with the same line and exit code 2, before any weight is read."""
    cfg_raw = make_raw(workspace, [dict(JOBS[0], max_steps=1)], "taken-two", schedule="lora")
    path = workspace[0] / "taken-two.yaml"
    path.write_text(yaml.safe_dump(cfg_raw))
    holder = hold(workspace[0] / "taken-two")
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port()), "-m", "launcher", str(path), "--no-live"],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert f"is in use by another run (pid {holder.pid} on " in lines[0]
    assert not re.search(r"^\[rank\d+\]: Traceback", proc.stderr, re.M), proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert not (workspace[0] / "taken-two" / "checkpoints").exists()
    assert os.path.exists(workspace[0] / "taken-two" / LOCK_NAME)
