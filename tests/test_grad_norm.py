"""GradNormChannel on three Gloo ranks: parts and totals matched by (job, step) whatever the order
they come in, the first non-finite stage named, and a part that never comes ends the wait within
the timeout with a message naming both ranks and the job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RANK = textwrap.dedent("""
    import datetime, math, os
    import torch, torch.distributed as dist
    from mlora_pp.grad_norm import GradNormChannel
    from mlora_pp.transport import PipelineError
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    channel = GradNormChannel(rank, 3, timeout_s=2.0, group=dist.new_group(backend="gloo"), names=["a", "b", "c", "d"])
    parts = {("a", 0): [4.0, 9.0, 36.0], ("b", 0): [1.0, 16.0, 8.0], ("c", 3): [1.0, math.nan, math.inf]}
    if rank == 0:
        for key in [("b", 0), ("a", 0), ("c", 3)]:  # not the order rank 1 sends in
            total = channel.total(*key, parts[key][0])
            print("total", key[0], total.norm, total.origin, flush=True)
        try:
            channel.total("d", 0, 1.0)  # nobody sends d's parts
        except PipelineError as exc:
            print("error", exc, flush=True)
    else:
        order = [("a", 0), ("b", 0), ("c", 3)] if rank == 1 else [("c", 3), ("b", 0), ("a", 0)]
        for key in order:
            channel.send_part(*key, parts[key][rank])
        for key in [("c", 3), ("a", 0), ("b", 0)]:  # not the order rank 0 sends in
            total = channel.receive_total(*key)
            print("got", key[0], total.norm, total.origin, flush=True)
    channel.flush()
    dist.barrier()
    os._exit(0)  # rank 0's receive of d's part is still posted
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_norms_meet_on_rank_0_in_any_order_and_a_missing_part_times_out():
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="3",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK], cwd=ROOT, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [[line.split() for line in out.splitlines() if line.startswith(("total", "got"))] for out in outs]
    assert lines[0] == [["total", "b", "5.0", "-1"], ["total", "a", "7.0", "-1"], ["total", "c", "nan", "1"]], outs[0]
    for out in lines[1:]:  # each stage gets rank 0's totals, the first non-finite stage named
        assert out == [["got", "c", "nan", "1"], ["got", "a", "7.0", "-1"], ["got", "b", "5.0", "-1"]], outs
    error = next(line for line in outs[0].splitlines() if line.startswith("error"))
    assert error == ("error rank 0: timed out after 2s waiting for the gradient norm of 'd' step 1 from rank 1 "
                     "(peer rank 1 stopped answering)"), outs[0]
