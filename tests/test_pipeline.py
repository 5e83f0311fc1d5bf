"""The pipeline across processes (Gloo on CPU): same adapters as one rank, clean failures."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from test_evaluation import eval_records
from test_training import JOBS, adapter, assert_adapters_equal, make_raw, make_workspace, write_dataset
from warm_ranks import start_rank

from mlora_pp.config import parse_config
from mlora_pp.data_cache import DATA_CACHE, DIGESTS_DIR, DataCache, job_sources
from mlora_pp.training import load_tokenizer, train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def torchrun(nproc: int, config: Path, timeout: float = 300, restarts: int = 0, **extra_env: str
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", str(restarts),
           "-m", "launcher", str(config), "--no-live"]
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def ranks(nproc: int, config: Path, timeout: float = 300, fresh: bool = False,
          **extra_env: str) -> subprocess.CompletedProcess:
    """The ranks of a one-machine run, started with the variables torchrun gives them but without its
    agent, which costs a run 1-2 s of process start-up and exit (about 30 s over the suite). Each rank
    is forked from a warm interpreter that has imported the launcher already (`warm_ranks`: 5 s of
    imports a rank) unless `fresh`. For runs whose ranks are all meant to finish: what torchrun does
    when one fails (it stops the others) is tested through `torchrun`. The result's stdout and stderr
    are the ranks', rank 0's first; its return code is the first rank's that is not 0."""
    port = str(free_port())
    started: list = []
    codes: list[int | None] = []
    with tempfile.TemporaryDirectory() as logs:
        files = [(Path(logs) / f"{rank}.out", Path(logs) / f"{rank}.err") for rank in range(nproc)]
        try:
            for rank, (out, err) in enumerate(files):
                rank_env = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
                started.append(start_rank([str(config), "--no-live"], rank_env, out, err, fresh=fresh, base_env=env()))
            deadline = time.monotonic() + timeout
            for proc in started:
                codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
                if codes[-1] is None:
                    break
        finally:
            for proc, code in itertools.zip_longest(started, codes):
                if code is None:
                    proc.kill()
        texts = [(out.read_text(), err.read_text()) for out, err in files]
    if None in codes:  # killed: what each rank wrote says where it was
        tails = "\n".join(f"rank {r} stderr: {err[-1500:]}" for r, (_, err) in enumerate(texts))
        raise AssertionError(f"the ranks did not end within {timeout:g} s\n{tails}")
    code = next((c for c in codes if c != 0), 0)
    args = [sys.executable, "-m", "launcher", str(config), "--no-live"]
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("pipe"))


EVAL_EVERY = {"alpha": 1, "beta": None, "gamma": 2}
"""Every pipeline run also evaluates each job on held-out records: alpha after every step, beta
after its last, gamma every other step (forward-only micro-batches on every stage)."""


def write_config(workspace, out: str, timeout_s: float = 60, quantize: str = "none", **pipeline) -> Path:
    heldout = workspace[0] / "heldout.jsonl"
    if not heldout.exists():
        write_dataset(heldout, seed=99, n=5)
    jobs = [dict(job, eval_data=str(heldout), eval_every=EVAL_EVERY[job["name"]]) for job in JOBS]
    raw = make_raw(workspace, jobs, out, model={"quantize": quantize},
                   **{"schedule": "lora", "timeout_s": timeout_s, **pipeline})
    path = workspace[0] / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def single_rank(workspace):
    """The reference: the same config trained on one rank (itself checked against plain PyTorch)."""
    config = write_config(workspace, "single")
    train(parse_config(yaml.safe_load(config.read_text()), config), progress=False)
    return workspace[0] / "single"


@pytest.mark.parametrize("policy", ["lora", "1f1b", "gpipe"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipeline_equals_single_rank(workspace, single_rank, stages, policy):
    out = f"s{stages}-{policy}"
    proc = ranks(stages, write_config(workspace, out, schedule=policy))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / out, job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(workspace[0] / out, single_rank)
    records = [yaml.safe_load(line) for line in (workspace[0] / out / "metrics.jsonl").read_text().splitlines()]
    stage_records = [r for r in records if r.get("event") == "stage"]
    assert [r["rank"] for r in stage_records] == list(range(stages))
    bounds = [(r["first_layer"], r["last_layer"]) for r in stage_records]
    assert [first for first, _ in bounds] == [0] + [last for _, last in bounds[:-1]]  # contiguous from layer 0
    assert bounds[-1][1] == 4 and all(first < last for first, last in bounds)  # make_workspace's 4 layers
    assert {(r["job"], r["step"]) for r in records if "job" in r and "event" not in r} == {
        ("alpha", s) for s in (1, 2, 3)} | {("beta", s) for s in (1, 2)} | {("gamma", s) for s in (1, 2, 3, 4)}
    assert (workspace[0] / out / "trace.json").is_file()
    # beta clips its gradient (max_grad_norm, from JOBS): its total norm over the stages is the
    # single rank's, and above the bound, so the later stages' steps really waited for rank 0's total
    norms = [r["grad_norm"] for r in records if r.get("job") == "beta" and "loss" in r]
    single = [json.loads(line) for line in (single_rank / "metrics.jsonl").read_text().splitlines()]
    assert norms == pytest.approx([r["grad_norm"] for r in single if r.get("job") == "beta" and "loss" in r], rel=1e-6)
    assert min(norms) > next(j["max_grad_norm"] for j in JOBS if j["name"] == "beta")
    run = next(r for r in records if r.get("event") == "run")
    if policy == "lora" and stages == 2:
        # 3 jobs, more than the 2 streams that keep 2 stages full: each stage timed fusion. 3 jobs
        # do not split into 2 balanced streams, so they stay apart (the rule's choice: None).
        assert [p["stage"] for p in run["fusion_probe"]] == [0, 1]
        assert all(p["apart_s"] > 0 and p["fused_s"] > 0 and p["lone_s"] > 0 for p in run["fusion_probe"])
        assert run["streams"] is None
    else:
        assert run["fusion_probe"] == [] and run["streams"] is None
    # Records reach rank 0 while the pipeline runs, not all at the end: the first is logged well
    # before the last (a polled Gloo receive once delivered them all at the final drain).
    times = [r["time"] for r in records if "loss" in r]
    assert min(times) < 0.8 * max(times), times
    # The ranks tokenized each data file once between them: one cache entry per file as its jobs read it.
    cfg = parse_config(yaml.safe_load((workspace[0] / f"{out}.yaml").read_text()))
    keys = {DataCache(load_tokenizer(Path(cfg.model.path)), None).key(s) for s in job_sources(cfg.jobs)}
    names = [p.name for p in (workspace[0] / out / DATA_CACHE).iterdir()]
    assert sorted(n for n in names if not n.startswith(".")) == sorted(keys) and len(keys) == 4
    assert set(n for n in names if n.startswith(".")) <= {DIGESTS_DIR}  # no temporary left
    assert "do not share it" not in proc.stdout


def assert_same_evaluations(out: Path, reference: Path) -> None:
    """The held-out losses of a pipeline run equal one rank's (which test_evaluation checks against
    peft), at the same steps: alpha 1-3, beta 2, gamma 2 and 4."""
    ours, want = eval_records(out), eval_records(reference)
    assert set(want) == {("alpha", 1), ("alpha", 2), ("alpha", 3), ("beta", 2), ("gamma", 2), ("gamma", 4)}
    assert set(ours) == set(want)
    for key, loss in want.items():
        assert ours[key] == pytest.approx(loss, rel=1e-5), key


def test_recompute_pipeline_equals_single_rank(workspace, single_rank):
    proc = ranks(2, write_config(workspace, "recompute-two", recompute=True))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / "recompute-two", job["name"]), adapter(single_rank, job["name"]))


@pytest.mark.parametrize("hide_latency", [False, True])
def test_a_plan_made_in_segments_equals_single_rank(workspace, single_rank, hide_latency):
    """3 stages with `plan_window: 2`: every rank makes the plan 2 micro-batches at a time as its
    stage reaches the end of what it has (beta's clipped steps on later stages wait for rank 0's
    total across segments, evaluations straddle them; with hide_latency the later stages' counted
    orders wait for what they cannot tell yet); same adapters and evaluations. (That the segments
    joined are the whole plan is checked in tests/test_stage_plan.py.)"""
    out = f"s3-window-2{'-hide' * hide_latency}"
    proc = ranks(3, write_config(workspace, out, plan_window=2, hide_latency=hide_latency))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / out, job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(workspace[0] / out, single_rank)
    records = [json.loads(line) for line in (workspace[0] / out / "metrics.jsonl").read_text().splitlines()]
    segments = [r["plan_segments"] for r in records if r.get("event") == "stage"]
    assert len(segments) == 3 and min(segments) > 10, segments  # the same plan on every rank, in many pieces
    assert len(set(segments)) == 1, segments


def test_hide_latency_pipeline_equals_single_rank(workspace, single_rank):
    """3 stages with twice the micro-batches in flight and counted stage orders: same adapters."""
    proc = ranks(3, write_config(workspace, "hide-latency-three", hide_latency=True))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / "hide-latency-three", job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(workspace[0] / "hide-latency-three", single_rank)


def test_one_fused_stream_pipeline_equals_single_rank(workspace, single_rank):
    """pipeline.streams: 1 fuses all three jobs into every micro-batch on 2 stages: same adapters."""
    proc = ranks(2, write_config(workspace, "one-stream", streams=1))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / "one-stream", job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(workspace[0] / "one-stream", single_rank)


def test_one_stage_keeps_the_streams_asked_for(workspace, single_rank):
    """pipeline.streams: 2 on one stage runs two streams, as on more stages (it fused every job into
    each slot before, unless a memory budget was set): same adapters as every job fused."""
    config = write_config(workspace, "one-stage-two-streams", streams=2)
    train(parse_config(yaml.safe_load(config.read_text()), config), progress=False)
    out = workspace[0] / "one-stage-two-streams"
    for job in JOBS:
        assert_adapters_equal(adapter(out, job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(out, single_rank)
    forwards = [e["name"] for e in json.loads((out / "trace.json").read_text())["traceEvents"] if e.get("cat") == "F"]
    fused = [{part.split(":")[0] for part in name.split(" ", 1)[1].split("+")} for name in forwards]
    assert forwards and max(map(len, fused)) == 2  # two streams: no micro-batch holds all three jobs


def test_nf4_pipeline_equals_single_rank(workspace):
    """QLoRA: each stage quantizes its own layers; 2 stages give the 1-rank nf4 adapters."""
    single = write_config(workspace, "nf4-single", quantize="nf4")
    train(parse_config(yaml.safe_load(single.read_text()), single), progress=False)
    proc = ranks(2, write_config(workspace, "nf4-two", quantize="nf4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / "nf4-two", job["name"]), adapter(workspace[0] / "nf4-single", job["name"]))
    assert_same_evaluations(workspace[0] / "nf4-two", workspace[0] / "nf4-single")


def test_two_torchrun_agents_multi_node(workspace, single_rank):
    """--nnodes 2 on one machine, loopback rendezvous: one agent per 'node'."""
    config = write_config(workspace, "multinode")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mlora-test",
           "-m", "launcher", str(config), "--no-live"]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-3000:] for o in outputs)
    for job in JOBS:
        assert_adapters_equal(adapter(workspace[0] / "multinode", job["name"]), adapter(single_rank, job["name"]))
    assert_same_evaluations(workspace[0] / "multinode", single_rank)


def test_killed_stage_ends_every_rank_naming_the_lost_rank(workspace):
    """SIGKILL rank 1 mid-run. Rank 0 either notices first and names rank 1 itself, or torchrun
    (which watches its workers) stops it first: then rank 0 says so in one line and torchrun's
    failure report names rank 1 and its SIGKILL. Either way nothing hangs."""
    config = write_config(workspace, "fault-kill", timeout_s=8)
    start = time.monotonic()
    proc = torchrun(2, config, timeout=120, MLORA_PP_FAULT="1:4:kill")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("error: rank 0:")]
    assert len(ours) == 1, proc.stderr[-4000:]
    if "lost rank 1" not in ours[0]:
        assert "stopped by the launcher because another rank failed" in ours[0]
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", proc.stderr), proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr, proc.stderr[-4000:]  # no abort after the line (send threads)
    assert elapsed < 8 + 60, elapsed


def test_frozen_stage_times_out_with_a_message(workspace):
    """Rank 1 stays alive but stops answering: rank 0 gives up after pipeline.timeout_s."""
    config = write_config(workspace, "fault-hang", timeout_s=8)
    start = time.monotonic()
    proc = torchrun(2, config, timeout=120, MLORA_PP_FAULT="1:4:hang", MLORA_PP_STOP_GRACE_S="4")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    line = next((l for l in proc.stderr.splitlines() if "timed out after 8s" in l), None)
    assert line is not None, proc.stderr[-4000:]
    assert line.startswith("error: rank 0:") and "from rank 1" in line
    # rank 1, still hung, gets torchrun's SIGTERM; the graceful stop's deadline (4 s here) then ends it
    # with its own line, before torchrun's SIGKILL 30 s later (the deadline once only marked the
    # handler due, which a thread blocked in a sleep never ran)
    assert "error: rank 1: stopped by the launcher because another rank failed" in proc.stderr, proc.stderr[-4000:]
    assert elapsed < 8 + 4 + 30, elapsed


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_ends_within_the_timeout(workspace, rank):
    """`python -m launcher` told it is one of 2 ranks, alone: rank 0 (the store's host) waits for the
    other, rank 1 for the store's address. Each gives up after pipeline.timeout_s with one line
    naming itself and what it waited for, not a torch.distributed traceback."""
    config = write_config(workspace, f"alone-{rank}", timeout_s=3)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launcher", str(config), "--no-live"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2",
                                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank {rank}: could not join the other 1 rank(s) within 3s ("), proc.stderr
    assert time.monotonic() - start < 3 + 30


def test_an_output_dir_not_shared_by_the_ranks_is_refused_at_start(workspace, tmp_path):
    """Two agents ('nodes') started in different directories with a relative output_dir: each rank
    writes to its own copy, so rank 0 would never see rank 1's parts (it used to find out only when
    waiting for the first manifest's parts, or at the end). Now every rank ends at start-up with the
    same line naming both places, exit code 2, before any weight is read."""
    raw = make_raw(workspace, JOBS, "unused", schedule="lora", timeout_s=30)
    raw["output_dir"] = "out"  # relative: resolved against each agent's directory
    config = workspace[0] / "not-shared.yaml"
    config.write_text(yaml.safe_dump(raw))
    homes = [tmp_path / "node0", tmp_path / "node1"]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mlora-not-shared",
           "-m", "launcher", str(config), "--no-live"]
    agents = []
    for home in homes:
        home.mkdir()
        agents.append(subprocess.Popen(cmd, cwd=home, env=env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    lines = [[l for l in out.splitlines() if l.startswith("error:")] for out in outputs]
    assert all(len(found) == 1 for found in lines) and lines[0] == lines[1], "\n".join(o[-3000:] for o in outputs)
    assert f"output_dir: rank 0 does not see rank 1's files in {homes[0] / 'out'} (rank 1 is " in lines[0][0]
    assert f"{homes[1] / 'out'}): every rank must see the same output_dir" in lines[0][0]
    assert all(a.returncode != 0 for a in agents)
    for home in homes:  # markers removed; no checkpoint written
        assert [p.name for p in (home / "out" / "checkpoints").iterdir()] == []
