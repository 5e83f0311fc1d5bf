"""Tests of mlora_pp.joining: the ranks of one start agree on a token no earlier start used."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from mlora_pp.joining import LOG, attempt_token


def _store(timeout_s: float = 5.0, libuv: bool = True) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=True, use_libuv=libuv)


def _client(server: dist.TCPStore, timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, None, False, timeout=datetime.timedelta(seconds=timeout_s),
                         use_libuv=server.libuvBackend)


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


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "legacy-store"])
@pytest.mark.parametrize("first", [[1, 2], [0]], ids=["others-first", "rank0-first"])
def test_a_restarted_attempt_never_takes_the_failed_ones_token(libuv: bool, first: list[int]) -> None:
    """Attempt 1 joins; attempt 2's ranks start while its lines and keys are still in the store,
    some of them 0.3 s before the others (hellos waiting in the log for rank 0, or rank 0 reading
    the earlier attempt's lines alone): every rank of attempt 2 gets one token, not attempt 1's."""
    server = _store(libuv=libuv)
    threads, got = _start(server, [0, 1, 2], 3)
    for t in threads:
        t.join()
    assert len(set(got.values())) == 1 and isinstance(got[0], str)
    old = got[0]
    server.append(LOG, "hello stale-nonce\n")  # a rank of attempt 1 that was still joining
    for rank in (1, 2):  # and confirms rank 0 of attempt 1 never read: counted, they would end
        server.append(LOG, f"confirm {old} {rank}\n")  # rank 0's wait before it answers anyone
    threads, tokens = _start(server, first, 3)
    time.sleep(0.3)
    more, later = _start(server, sorted({0, 1, 2} - set(first)), 3)
    for t in threads + more:
        t.join()
    tokens.update(later)
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
