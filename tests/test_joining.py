"""Tests of mlora_pp.joining: the ranks of one start agree on a token no earlier start used."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from mlora_pp.joining import INBOX, attempt_token


def _store(timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=True)


def _client(server: dist.TCPStore, timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def _start(server: dist.TCPStore, ranks: list[int], world: int, timeout_s: float = 5.0
           ) -> tuple[list[threading.Thread], dict[int, object]]:
    """Each rank in a thread of its own, on a store client of its own, as separate processes are."""
    got: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            got[rank] = attempt_token(_client(server, timeout_s), rank, world, timeout_s)
        except RuntimeError as exc:
            got[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    return threads, got


def test_a_restarted_attempt_never_takes_the_failed_ones_token() -> None:
    """Attempt 1 joins; attempt 2's ranks start while its messages and keys are still in the store,
    the others before rank 0 (their hellos wait in the queue): every rank of attempt 2 gets one
    token, not attempt 1's."""
    server = _store()
    threads, first = _start(server, [0, 1, 2], 3)
    for t in threads:
        t.join()
    assert len(set(first.values())) == 1 and isinstance(first[0], str)
    old = first[0]
    server.queue_push(INBOX, "hello stale-nonce")  # a rank of attempt 1 that was still joining
    for rank in (1, 2):  # and confirms rank 0 of attempt 1 never popped: counted, they would end
        server.queue_push(INBOX, f"confirm {old} {rank}")  # rank 0's wait before it answers anyone
    threads, second = _start(server, [1, 2], 3)
    time.sleep(0.3)
    more, second_zero = _start(server, [0], 3)
    for t in threads + more:
        t.join()
    tokens = {**second, **second_zero}
    assert all(isinstance(v, str) for v in tokens.values()), tokens
    assert len(set(tokens.values())) == 1 and tokens[0] != old


def test_a_rank_that_never_comes_ends_the_wait_within_the_timeout() -> None:
    server = _store(1.0)
    start = time.monotonic()
    threads, got = _start(server, [0, 1], 3, timeout_s=1.0)
    for t in threads:
        t.join()
    assert time.monotonic() - start < 4
    assert isinstance(got[0], RuntimeError) and "rank(s) [2] did not answer within 1s" in str(got[0])
    assert isinstance(got[1], str)  # answered; its own wait ends in init_process_group's timeout

    threads, got = _start(_store(1.0), [1], 2, timeout_s=1.0)  # no rank 0
    threads[0].join(timeout=5)
    assert isinstance(got[1], RuntimeError)


@pytest.mark.parametrize("world", [1, 2])
def test_each_join_gets_a_new_token(world: int) -> None:
    server = _store()
    tokens = []
    for _ in range(2):
        threads, got = _start(server, list(range(world)), world)
        for t in threads:
            t.join()
        assert len(set(got.values())) == 1
        tokens.append(got[0])
    assert tokens[0] != tokens[1]
