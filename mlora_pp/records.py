"""Step records from the last stage (where losses are computed) to rank 0 (progress and metrics).

The last stage sends each finished step's record as soon as it has it. Rank 0 receives them on a
background thread and delivers them between its own actions, so waiting for a loss never stalls
the pipeline (a blocking receive on the main thread could deadlock: the last stage may first need
an activation that rank 0 sends later). A thread, not a polled receive: Gloo's `is_completed()`
stays false until `wait()` is called, so a polled receive only delivered everything at the end
(metrics times all equal, a frozen progress table). Records travel in send order on their own
group and carry their job's index; the last stage ends the stream with an end marker, so the
number of records need not be known in advance (jobs can be submitted and cancelled mid-run).
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from mlora_pp.runtime import FAILURES, StepRecord
from mlora_pp.transport import PipelineError

_FIELDS = 7  # job index, step, loss, loss_tokens, tokens, lr, status (0 ok, -1 skipped, k: FAILURES[k - 1])
_TAG = 0
_END = -1  # job index of the end marker
_RECORD_WAIT = datetime.timedelta(days=7)
"""The receiving thread's wait for one record. Steps can legitimately take longer than the pipeline
timeout; a lost last stage shows up as an error here or in the pipeline's own waits, and `drain`
bounds the final wait by the pipeline timeout."""


def _encode(job: int, record: StepRecord) -> torch.Tensor:
    status = -1 if record.skipped else (FAILURES.index(record.failure) + 1 if record.failure else 0)
    values = [job, record.step, record.loss, record.loss_tokens, record.tokens, record.lr, status]
    return torch.tensor(values, dtype=torch.float64)


class RecordSender:
    """On the last stage: ship each finished step's record to rank 0."""

    def __init__(self, names: list[str], group: Any, rank: int, dst: int = 0):
        self.names = names
        """Job names by index (a job submitted mid-run is appended on every rank alike)."""
        self.rank = rank
        self.group = group
        self.dst = dst
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def __call__(self, record: StepRecord) -> None:
        payload = _encode(self.names.index(record.job), record)
        try:
            work = dist.isend(payload, self.dst, group=self.group, tag=_TAG)
        except RuntimeError as exc:
            raise PipelineError(
                f"rank {self.rank}: lost rank {self.dst} while sending the step records of {record.job!r} ({exc})"
            ) from None
        self._pending.append((work, payload))

    def finish(self, timeout_s: float, rank: int) -> None:
        """Send the end marker, then wait for every send."""
        end = torch.full((_FIELDS,), float(_END), dtype=torch.float64)
        try:
            self._pending.append((dist.isend(end, self.dst, group=self.group, tag=_TAG), end))
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {self.dst} while ending the step records ({exc})") from None
        self.flush(timeout_s, rank)

    def flush(self, timeout_s: float, rank: int) -> None:
        for work, _ in self._pending:
            try:
                work.wait(datetime.timedelta(seconds=timeout_s))
            except RuntimeError as exc:
                raise PipelineError(f"rank {rank}: lost rank {self.dst} while sending step records ({exc})") from None
        self._pending.clear()


class RecordInbox:
    """On rank 0: receive every job's step records from the last stage on a background thread."""

    def __init__(self, names: list[str], src: int, group: Any, deliver: Callable[[StepRecord], None]):
        self.names = names
        """Job names by index (a job submitted mid-run is appended on every rank alike)."""
        self.delivered = 0
        self.ended = False
        self.src = src
        self.group = group
        self.deliver = deliver
        self._queue: queue.Queue[torch.Tensor | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._receive, name="step-records", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            while True:
                buf = torch.empty(_FIELDS, dtype=torch.float64)
                dist.irecv(buf, self.src, group=self.group, tag=_TAG).wait(_RECORD_WAIT)
                self._queue.put(buf)
                if buf[0] == _END:
                    return
        except BaseException as exc:  # handed to the main thread, which raises it as a PipelineError
            self._queue.put(exc)

    def _handle(self, item: torch.Tensor | BaseException, rank: int) -> None:
        if isinstance(item, BaseException):
            raise PipelineError(f"rank {rank}: lost rank {self.src} while waiting for step records ({item})") from None
        job, step, loss, loss_tokens, tokens, lr, status = item.tolist()
        if job == _END:
            self.ended = True
            return
        failure = FAILURES[int(status) - 1] if status > 0 else None
        self.delivered += 1
        self.deliver(StepRecord(self.names[int(job)], int(step), loss, int(loss_tokens), int(tokens), lr, failure,
                                status < 0))

    def poll(self, rank: int = 0) -> None:
        """Deliver every record that has arrived; never blocks."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._handle(item, rank)

    def drain(self, timeout_s: float, rank: int) -> None:
        """Wait for every record still due (the last stage may finish after rank 0)."""
        deadline = time.monotonic() + timeout_s
        while not self.ended:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PipelineError(
                    f"rank {rank}: timed out after {timeout_s:g}s waiting for the step records from rank {self.src} "
                    f"({self.delivered} received, no end marker yet)"
                ) from None
            self._handle(item, rank)
