"""Step and evaluation records from every other stage to rank 0 (progress, metrics, failures).

Every stage but rank 0 sends each finished step's record as soon as it has it: the last stage's
carries the loss, every stage's says whether that stage failed the job there (non-finite gradients
can show on one stage only). Rank 0 receives them on a background thread and delivers them
between its own actions, so waiting for a loss never stalls the pipeline (a blocking receive on
the main thread could deadlock: the last stage may first need an activation that rank 0 sends
later). A thread, not a polled receive: Gloo's `is_completed()`
stays false until `wait()` is called, so a polled receive only delivered everything at the end
(metrics times all equal, a frozen progress table). Records travel on their own group, received
from any source, in send order per sender; each carries its job's index and its stage. Every
sender ends its stream with an end marker, so the number of records need not be known in advance
(jobs can be submitted and cancelled mid-run).
"""

from __future__ import annotations

import datetime
import math
import queue
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from mlora_pp.runtime import FAILURES, EvalRecord, StepRecord
from mlora_pp.transport import PendingSends, PipelineError

# job index, step, loss, loss_tokens, tokens, lr, status (0 ok, -1 skipped, -2 eval, k: FAILURES[k - 1]),
# stage, grad_norm (NaN: none)
_FIELDS = 9
_STAGE = 7  # the field that names the sender (also in the end marker)
_EVAL = -2  # status of an evaluation's record
_TAG = 0
_END = -1  # job index of the end marker
_RECORD_WAIT = datetime.timedelta(days=7)
"""The receiving thread's wait for one record. Steps can legitimately take longer than the pipeline
timeout; a lost last stage shows up as an error here or in the pipeline's own waits, and `drain`
bounds the final wait by the pipeline timeout."""


def _encode(job: int, record: StepRecord | EvalRecord, stage: int) -> torch.Tensor:
    if isinstance(record, EvalRecord):
        values = [job, record.step, record.loss, record.loss_tokens, 0, 0.0, _EVAL, stage, math.nan]
        return torch.tensor(values, dtype=torch.float64)
    status = -1 if record.skipped else (FAILURES.index(record.failure) + 1 if record.failure else 0)
    grad_norm = math.nan if record.grad_norm is None else record.grad_norm
    values = [job, record.step, record.loss, record.loss_tokens, record.tokens, record.lr, status, stage, grad_norm]
    return torch.tensor(values, dtype=torch.float64)


class RecordSender:
    """On every stage but rank 0: ship each finished step's record to rank 0."""

    def __init__(self, names: list[str], group: Any, rank: int, dst: int = 0):
        self.names = names
        """Job names by index (a job submitted mid-run is appended on every rank alike)."""
        self.rank = rank
        self.group = group
        self.dst = dst
        self._pending = PendingSends(rank, timeout_s=_RECORD_WAIT.total_seconds(), poll=False)

    def __call__(self, record: StepRecord | EvalRecord) -> None:
        payload = _encode(self.names.index(record.job), record, self.rank)
        what = f"sending the step records of {record.job!r} to rank {self.dst}"
        try:
            work = dist.isend(payload, self.dst, group=self.group, tag=_TAG)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {self.dst} while {what} ({exc})") from None
        self._pending.add(work, what, self.dst, payload)

    def finish(self, timeout_s: float) -> None:
        """Send the end marker, then wait (at most `timeout_s`) for every send."""
        end = torch.full((_FIELDS,), float(_END), dtype=torch.float64)
        end[_STAGE] = self.rank
        what = f"ending the step records to rank {self.dst}"
        try:
            self._pending.add(dist.isend(end, self.dst, group=self.group, tag=_TAG), what, self.dst, end)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {self.dst} while {what} ({exc})") from None
        self._pending.flush(timeout_s)


class RecordInbox:
    """On rank 0: receive every job's step records from the other stages on a background thread."""

    def __init__(self, names: list[str], sources: list[int], group: Any,
                 deliver: Callable[[StepRecord | EvalRecord, int], None]):
        self.names = names
        """Job names by index (a job submitted mid-run is appended on every rank alike)."""
        self.delivered = 0
        self.sources = sources
        self.open = set(sources)
        """Senders whose end marker has not arrived yet."""
        self.group = group
        self.deliver = deliver
        self._queue: queue.Queue[torch.Tensor | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._receive, name="step-records", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        ends = 0
        try:
            while ends < len(self.sources):
                buf = torch.empty(_FIELDS, dtype=torch.float64)
                dist.irecv(buf, None, group=self.group, tag=_TAG).wait(_RECORD_WAIT)  # from any sender
                self._queue.put(buf)
                ends += int(buf[0] == _END)
        except BaseException as exc:  # handed to the main thread, which raises it as a PipelineError
            self._queue.put(exc)

    def _handle(self, item: torch.Tensor | BaseException, rank: int) -> None:
        if isinstance(item, BaseException):
            raise PipelineError(f"rank {rank}: lost {self._waiting()} while waiting for step records "
                                f"({item})") from None
        job, step, loss, loss_tokens, tokens, lr, status, stage, grad_norm = item.tolist()
        if job == _END:
            self.open.discard(int(stage))
            return
        self.delivered += 1
        if status == _EVAL:
            self.deliver(EvalRecord(self.names[int(job)], int(step), loss, int(loss_tokens)), int(stage))
            return
        failure = FAILURES[int(status) - 1] if status > 0 else None
        self.deliver(StepRecord(self.names[int(job)], int(step), loss, int(loss_tokens), int(tokens), lr, failure,
                                status < 0, None if math.isnan(grad_norm) else grad_norm), int(stage))

    @property
    def ended(self) -> bool:
        return not self.open

    def _waiting(self) -> str:
        ranks = sorted(self.open)
        return f"rank {ranks[0]}" if len(ranks) == 1 else "one of ranks " + ", ".join(map(str, ranks))

    def poll(self, rank: int = 0) -> None:
        """Deliver every record that has arrived; never blocks."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._handle(item, rank)

    def drain(self, timeout_s: float, rank: int) -> None:
        """Wait for every record still due (the other stages may finish after rank 0)."""
        deadline = time.monotonic() + timeout_s
        while not self.ended:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PipelineError(
                    f"rank {rank}: timed out after {timeout_s:g}s waiting for the step records from {self._waiting()} "
                    f"({self.delivered} received, no end marker yet)"
                ) from None
            self._handle(item, rank)
