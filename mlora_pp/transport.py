"""Point-to-point tensors between neighbouring stages, with headers and timeouts.

Every tensor is preceded by a fixed-size header (kind, micro-batch id, shape, dtype), so a receiver
checks what it got instead of reading garbage or hanging on a size mismatch. Messages between two
ranks are matched in issue order (as NCCL does), which the schedule guarantees. Every wait has a
timeout; a lost or silent peer becomes a `PipelineError` that names this rank, the peer and what
was awaited. A sent tensor is kept until its send has gone (`PendingSends`), then dropped.
"""

from __future__ import annotations

import collections
import datetime
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ACTIVATION = 0
GRADIENT = 1
METRICS = 2
_KIND_NAMES = {ACTIVATION: "activation", GRADIENT: "gradient", METRICS: "metrics"}
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER_LEN = 8
_SEND_WAIT = datetime.timedelta(days=7)
"""How long the send thread waits for one send. It only frees memory: a silent peer is found by the
receives' own timeouts and by `PendingSends.flush`."""
_SEND_THREADS: "weakref.WeakSet[PendingSends]" = weakref.WeakSet()
"""Every `PendingSends` whose thread was started (`settle_send_threads`)."""


class PipelineError(RuntimeError):
    """A distributed wait that failed or timed out; the message says who waited for what."""


@dataclass(frozen=True)
class Header:
    kind: int
    micro_batch: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def encode(self) -> torch.Tensor:
        if len(self.shape) > _HEADER_LEN - 3:
            raise ValueError(f"tensor rank {len(self.shape)} too high for the header")
        values = [self.kind, self.micro_batch, _DTYPES.index(self.dtype), *self.shape]
        values += [-1] * (_HEADER_LEN - len(values))
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def decode(t: torch.Tensor) -> "Header":
        values = t.tolist()
        shape = tuple(v for v in values[3:] if v >= 0)
        return Header(int(values[0]), int(values[1]), shape, _DTYPES[int(values[2])])


def describe(kind: int, micro_batch: int) -> str:
    return f"the {_KIND_NAMES.get(kind, kind)} of micro-batch {micro_batch}"


class PendingSends:
    """Posted sends, each kept with its tensor until it has gone, then dropped.

    NCCL's works report completion when polled. Gloo's `is_completed()` stays False until `wait()`
    is called, so polling dropped nothing there: every tensor a stage sent stayed alive until the
    run's end (34 MiB on stage 0 of the 8-step benchmark, growing with every micro-batch). Where
    polling cannot see completion, a daemon thread waits on the sends in order instead.
    """

    def __init__(self, rank: int, timeout_s: float, poll: bool):
        self.rank = rank
        self.timeout_s = timeout_s
        self._items: collections.deque[tuple[Any, str, int, torch.Tensor]] = collections.deque()
        self._changed = threading.Condition()
        self._error: PipelineError | None = None
        self._poll_only = poll
        self._closed = False
        self._thread: threading.Thread | None = None  # started with the first send

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def add(self, work: Any, what: str, peer: int, tensor: torch.Tensor) -> None:
        """Keep `tensor` until `work` (its send) has completed."""
        self._raise_failure()
        with self._changed:
            self._items.append((work, what, peer, tensor))
            self._changed.notify_all()
        if self._poll_only:
            self._poll()
        elif self._thread is None:
            self._thread = threading.Thread(target=self._drain, name=f"sends-rank{self.rank}", daemon=True)
            self._thread.start()
            _SEND_THREADS.add(self)

    def _poll(self) -> None:
        while self._items and self._items[0][0].is_completed():
            work, what, peer, _ = self._items.popleft()
            self._wait(work, peer, what, datetime.timedelta(seconds=self.timeout_s))  # raises if the send failed

    def _drain(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._items) or self._closed)
                if self._closed:
                    return
                work, what, peer = self._items[0][:3]
            try:
                self._wait(work, peer, what, _SEND_WAIT)
            except PipelineError as exc:
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                return
            del work  # it holds the tensor too
            with self._changed:
                self._items.popleft()
                self._changed.notify_all()

    def _wait(self, work: Any, peer: int, what: str, timeout: datetime.timedelta) -> None:
        try:
            ok = work.wait(timeout)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while {what} ({exc})") from None
        if ok is False:
            raise PipelineError(f"rank {self.rank}: timed out after {timeout.total_seconds():g}s {what}")

    def close(self, timeout_s: float) -> bool:
        """Stop the thread: at once when idle, else once its current wait returns. True if it has
        ended within `timeout_s`."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait (at most `timeout_s`, by default the one given at construction) until every posted
        send has gone."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self._poll_only:
            while self._items:
                work, what, peer, _ = self._items.popleft()
                self._wait(work, peer, what, datetime.timedelta(seconds=timeout_s))
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._items or self._error is not None, timeout=timeout_s)
            self._raise_failure()
            if self._items:
                _, what, peer, _ = self._items[0]
                raise PipelineError(f"rank {self.rank}: timed out after {timeout_s:g}s {what} "
                                    f"(rank {peer} did not take it)")


def settle_send_threads(timeout_s: float = 2.0) -> None:
    """Stop every send thread of this process, waiting at most `timeout_s` in all, before it exits.

    A lost peer wakes every send still waiting for it, on its thread, at the moment the main thread's
    own wait fails; a thread still inside that Gloo call while the interpreter shuts down aborts the
    process ("terminate called without an active exception", exit code 134) after the rank has
    reported its error. A send to a peer that is alive but silent stays blocked: not waited for."""
    deadline = time.monotonic() + timeout_s
    for sends in list(_SEND_THREADS):
        sends.close(max(0.0, deadline - time.monotonic()))


def _completion_polls(group: Any) -> bool:
    """Whether the group's works report completion without a `wait()` (NCCL's do, Gloo's do not)."""
    return dist.is_initialized() and "nccl" in str(dist.get_backend(group))  # "nccl", or "cpu:gloo,cuda:nccl"


class StageTransport:
    """Sends to and receives from neighbour ranks; tensors travel on `device`, headers on the CPU group."""

    def __init__(self, rank: int, timeout_s: float, device: torch.device, group: Any = None, header_group: Any = None):
        self.rank = rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.device = device
        self.group = group
        self.header_group = header_group
        # one per group: a Gloo header send that never reports completion must not hold up NCCL's
        self._header_sends = PendingSends(rank, timeout_s, poll=_completion_polls(header_group))
        self._tensor_sends = PendingSends(rank, timeout_s, poll=_completion_polls(group))
        self._stream_ordered = _completion_polls(group)
        """NCCL tensors: a receive's wait orders the compute stream after it, without blocking the host."""
        self._posted: dict[tuple[int, int, int], tuple[Any, torch.Tensor, Any, torch.Tensor]] = {}
        self.waited_s = 0.0
        """Total time spent blocked on peers (not computing)."""
        self.bytes_sent = 0
        """Bytes of every header and tensor this rank has posted to a peer."""

    def _post(self, op: Any, tensor: torch.Tensor, peer: int, group: Any, what: str) -> Any:
        """Issue an isend/irecv; a peer already gone fails here, not only in the wait."""
        try:
            return op(tensor, peer, group=group)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while {what} ({exc})") from None

    def _wait(self, work: Any, peer: int, what: str, host: bool = True) -> None:
        """Wait for a receive; `host=False` (NCCL) only orders the current stream after it.

        NCCL's wait with a timeout blocks the host until the transfer has completed on the device,
        so the host could not queue the next kernels while the GPU worked through the ones before
        it. Without one, a peer that stopped answering is still found in time: its header (on the
        CPU group, waited with the timeout) comes first, and NCCL's watchdog ends a transfer that
        outlives the process group's timeout (`pipeline.timeout_s`).
        """
        start = time.perf_counter()
        try:
            ok = work.wait(self.timeout) if host else work.wait()
        except RuntimeError as exc:
            text = str(exc).lower()
            if "timeout" in text or "timed out" in text:
                raise PipelineError(
                    f"rank {self.rank}: timed out after {self.timeout_s:.0f}s waiting for {what} "
                    f"(peer rank {peer} stopped answering)"
                ) from None
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while waiting for {what} ({exc})") from None
        finally:
            self.waited_s += time.perf_counter() - start
        if ok is False:
            raise PipelineError(f"rank {self.rank}: timed out after {self.timeout_s:.0f}s waiting for {what} from rank {peer}")

    def send(self, tensor: torch.Tensor, peer: int, kind: int, micro_batch: int) -> None:
        """Post the header and the tensor; completion is checked later (`flush`) so compute overlaps."""
        tensor = tensor.detach().contiguous()
        header = Header(kind, micro_batch, tuple(tensor.shape), tensor.dtype).encode()
        what = f"sending {describe(kind, micro_batch)} to rank {peer}"
        self._header_sends.add(self._post(dist.isend, header, peer, self.header_group, what), what, peer, header)
        self._tensor_sends.add(self._post(dist.isend, tensor, peer, self.group, what), what, peer, tensor)
        self.bytes_sent += header.numel() * header.element_size() + tensor.numel() * tensor.element_size()

    def post(self, peer: int, kind: int, micro_batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Post the receives of an expected message now, so it lands while this rank computes.

        Must be called in the order the peer sends (the schedule guarantees it); `recv` then
        only waits.
        """
        key = (peer, kind, micro_batch)
        if key in self._posted:
            return
        raw = torch.empty(_HEADER_LEN, dtype=torch.int64)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        what = f"posting the receive of {describe(kind, micro_batch)} from rank {peer}"
        header_work = self._post(dist.irecv, raw, peer, self.header_group, what)
        tensor_work = self._post(dist.irecv, out, peer, self.group, what)
        self._posted[key] = (header_work, raw, tensor_work, out)

    def recv(self, peer: int, kind: int, micro_batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Receive `kind` of `micro_batch` from `peer` (posted earlier or now), checking its header."""
        self.post(peer, kind, micro_batch, shape, dtype)
        header_work, raw, tensor_work, out = self._posted.pop((peer, kind, micro_batch))
        what = describe(kind, micro_batch)
        self._wait(header_work, peer, f"{what} from rank {peer}")
        header = Header.decode(raw)
        if header.kind != kind or header.micro_batch != micro_batch or header.shape != tuple(shape) or header.dtype != dtype:
            raise PipelineError(
                f"rank {self.rank}: expected {what} {tuple(shape)} from rank {peer}, got "
                f"{describe(header.kind, header.micro_batch)} {header.shape}: the ranks run different schedules"
            )
        self._wait(tensor_work, peer, f"{what} from rank {peer}", host=not self._stream_ordered)
        return out

    def pending_sends(self) -> int:
        """Sends posted and not yet known to have gone (each holds its tensor)."""
        return len(self._header_sends) + len(self._tensor_sends)

    def flush(self) -> None:
        """Wait for every posted send."""
        self._header_sends.flush()
        self._tensor_sends.flush()
