"""Joining the ranks of one start of a run, on keys no earlier start of it wrote.

torchrun keeps one store for every attempt of a run (`--max-restarts`, static and c10d rendezvous
alike), and `init_process_group` publishes each rank's Gloo address (or NCCL's id) under the same
keys at every attempt: a restarted rank could read the address of a rank of the failed attempt and
time out connecting to it, or wait on it past `pipeline.timeout_s` (pytorch issues 135712 and
167288). torchrun's restart count cannot name an attempt either: each agent keeps its own, and an
agent whose ranks still run when another agent re-joins restarts them without counting.

So the ranks agree on a fresh token first, and join under it. Rank 0 draws the token. Every other
rank draws a nonce, appends ``hello NONCE`` to a log in the store, and waits for the key
``ack/NONCE``, which only a live rank 0 of its own attempt can write (nobody else knows the nonce),
holding the token; it then appends ``confirm TOKEN RANK``. Rank 0 reads the log as it grows,
answers every hello and counts the confirms that carry its token. Lines an earlier attempt left
get answers nobody reads, or are not counted. A rank that never comes ends the wait after
`timeout_s`. The log is a key appended to (every store torch has can append; the legacy TCPStore
has no queues), which rank 0 reads every `POLL_S`.
"""

from __future__ import annotations

import datetime
import time
import uuid

import torch.distributed as dist
from torch.distributed import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous

LOG = "mlora_pp/join/log"
POLL_S = 0.02
"""How often rank 0 reads the log while it waits."""


def join_ranks(rank: int, world: int, backend: str, timeout: datetime.timedelta) -> None:
    """`init_process_group` (from torchrun's variables) on keys of this attempt's own."""
    store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
    token = attempt_token(store, rank, world, timeout.total_seconds())
    dist.init_process_group(backend, store=PrefixStore(f"mlora_pp/attempt/{token}", store), rank=rank,
                            world_size=world, timeout=timeout)


def attempt_token(store: Store, rank: int, world: int, timeout_s: float) -> str:
    """A token every rank of this start of the run gets, never one an earlier start used. Raises
    RuntimeError, naming who did not answer, after `timeout_s`."""
    if world == 1:
        return uuid.uuid4().hex
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.append(LOG, f"hello {nonce}\n")
        try:
            store.wait([f"mlora_pp/join/ack/{nonce}"], datetime.timedelta(seconds=timeout_s))
        except dist.DistStoreError:
            raise RuntimeError(f"rank 0 did not answer within {timeout_s:g}s") from None
        token = store.get(f"mlora_pp/join/ack/{nonce}").decode()
        store.append(LOG, f"confirm {token} {rank}\n")
        return token
    deadline = time.monotonic() + timeout_s
    token = uuid.uuid4().hex
    store.append(LOG, f"start {token}\n")  # the log exists from here: reading it never waits
    confirmed: set[int] = set()
    read = 0
    while True:
        log = store.get(LOG).decode()
        for line in log[read:].splitlines():  # every append is one whole line
            kind, *words = line.split() or ["?"]
            if kind == "hello" and len(words) == 1:
                store.set(f"mlora_pp/join/ack/{words[0]}", token)
            elif kind == "confirm" and len(words) == 2 and words[0] == token:
                confirmed.add(int(words[1]))
        read = len(log)
        if len(confirmed) == world - 1:
            return token
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, world)) - confirmed)
            raise RuntimeError(f"rank(s) {missing} did not answer within {timeout_s:g}s")
        time.sleep(POLL_S)
