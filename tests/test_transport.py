"""StageTransport between two Gloo ranks: sent tensors are dropped once their send has gone, a peer
that never takes a message fails `flush` with a message naming both ranks, and every receive a
stage posts to a rank that has died fails with a `PipelineError` naming both ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RANK = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from mlora_pp.transport import ACTIVATION, PipelineError, StageTransport
    torch.set_num_threads(1)
    rank, mode = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    transport = StageTransport(rank, timeout_s=2.0, device=torch.device("cpu"))
    shape = (64, 1024)
    if rank == 0:
        for i in range(20):
            transport.send(torch.full(shape, float(i)), 1, ACTIVATION, i)
        if mode == "taken":
            dist.barrier()  # rank 1 has received all 20
            deadline = time.monotonic() + 10
            while transport.pending_sends() and time.monotonic() < deadline:
                time.sleep(0.01)
            print("pending", transport.pending_sends(), flush=True)
        else:
            try:
                transport.flush()
                print("flushed", flush=True)
            except PipelineError as exc:
                print("error", exc, flush=True)
            dist.barrier()
    else:
        if mode == "taken":
            got = [transport.recv(0, ACTIVATION, i, shape, torch.float32)[0, 0].item() for i in range(20)]
            assert got == [float(i) for i in range(20)], got
        dist.barrier()
    transport.flush()  # nothing left (taken), or rank 1 never posts: only rank 0 raised above
    dist.destroy_process_group()
""")


_GONE = textwrap.dedent("""
    import datetime, os, time
    import torch, torch.distributed as dist
    from mlora_pp.control import PlanChannel
    from mlora_pp.transport import ACTIVATION, PipelineError, StageTransport
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    plans = dist.new_group(backend="gloo")
    dist.barrier()
    if rank == 0:
        os._exit(0)  # gone, as after a SIGKILL: its connections close
    time.sleep(1.0)
    attempts = {
        "activation": lambda: StageTransport(1, 5.0, torch.device("cpu")).recv(0, ACTIVATION, 3, (2, 4), torch.float32),
        "plan": lambda: PlanChannel(1, 2, plans, 5.0).await_decision(8),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            print(name, "no error", flush=True)
        except PipelineError as exc:
            print(name, "error", exc, flush=True)
    os._exit(0)
""")


def test_a_receive_from_a_dead_rank_fails_naming_both():
    """Gloo refuses to post a receive once the peer's connection has closed; that RuntimeError must
    come out as a PipelineError like a failed wait. The plan channel once let it through: the
    launcher printed a traceback and no `error: rank ...` line (a flaky SIGKILL test)."""
    (_, _), (code, out) = _run_two_ranks(_GONE)
    assert code == 0, out
    assert "activation error rank 1: lost rank 0 while posting the receive of the activation of micro-batch 3" in out, out
    assert "plan error rank 1: lost rank 0 while waiting for its plan at micro-batch 8" in out, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(script: str, *args: str) -> list[tuple[int, str]]:
    """(exit code, output) of each of two processes running `script` as ranks 0 and 1 over Gloo."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def _two_ranks(mode: str) -> list[str]:
    (code0, out0), (code1, out1) = _run_two_ranks(_RANK, mode)
    assert code1 == 0, out1
    if mode == "taken":
        assert code0 == 0, out0
    return [out0, out1]


def test_sent_tensors_are_dropped_once_received_without_a_flush():
    """Gloo's is_completed() stays False until wait(): polling it kept all 20 sends (and their
    tensors) until the run's end. Once rank 1 has them all, none may be held."""
    out = _two_ranks("taken")[0]
    assert "pending 0" in out, out


def test_a_send_nobody_takes_fails_flush_naming_the_ranks():
    out = _two_ranks("never")[0]
    assert "error rank 0: timed out after 2s sending the activation of micro-batch 0 to rank 1" in out, out
    assert "(rank 1 did not take it)" in out, out


def test_nccl_tensor_receives_do_not_block_the_host(monkeypatch):
    """On NCCL a tensor's wait with a timeout blocks the host until the transfer is done on the
    device; without one it only orders the compute stream after it. So the header (CPU group) is
    waited with the timeout, and on NCCL the tensor without; on Gloo both with. (Wiring only: the
    GPU effect needs two GPUs to see.)"""
    import datetime

    import torch

    import mlora_pp.transport as transport
    from mlora_pp.transport import ACTIVATION, Header, StageTransport

    for backend, tensor_wait in (("nccl", ()), ("gloo", (datetime.timedelta(seconds=5),))):
        waits = []

        class Work:
            def __init__(self, arrive):
                self.arrive = arrive

            def wait(self, *timeout):
                waits.append(timeout)
                self.arrive()
                return True

        def irecv(tensor, peer, group=None):
            if group == "cpu":  # the header
                return Work(lambda: tensor.copy_(Header(ACTIVATION, 3, (2, 4), torch.float32).encode()))
            return Work(lambda: tensor.fill_(1.0))

        monkeypatch.setattr(transport.dist, "irecv", irecv)
        monkeypatch.setattr(transport, "_completion_polls", lambda group: group == "nccl")
        stage = StageTransport(1, 5.0, torch.device("cpu"), group=backend, header_group="cpu")
        assert torch.equal(stage.recv(0, ACTIVATION, 3, (2, 4), torch.float32), torch.ones(2, 4))
        assert waits == [(datetime.timedelta(seconds=5),), tensor_wait], backend


_EXIT_AFTER_LOSS = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from mlora_pp.transport import ACTIVATION, GRADIENT, PipelineError, StageTransport, settle_send_threads
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    control = dist.new_group(backend="gloo")
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)
        sys.exit(0)  # gone before taking rank 0's send
    transport = StageTransport(0, 5.0, torch.device("cpu"), header_group=control)
    transport.send(torch.zeros(4, 4), 1, ACTIVATION, 0)
    try:
        transport.recv(1, GRADIENT, 0, (4, 4), torch.float32)
    except PipelineError as exc:
        print("error", exc, flush=True)
    settle_send_threads()  # what `train` does on its way out
    dist.destroy_process_group()
""")


def test_a_rank_that_lost_its_peer_exits_without_aborting():
    """The lost peer wakes this rank's send threads as its own receive fails; one still inside its
    Gloo wait while the interpreter exits aborted the process (exit 134, "terminate called without
    an active exception") after the rank had printed its error."""
    (code, out), _ = _run_two_ranks(_EXIT_AFTER_LOSS)
    assert "error rank 0: lost rank 1 while waiting for the gradient of micro-batch 0" in out, out
    assert "terminate called" not in out and code == 0, (code, out)
