"""Step records from the last stage (where losses are computed) to rank 0 (progress and metrics).

Rank 0 keeps one receive posted per job and polls between its own actions, so waiting for a loss
never stalls the pipeline (a blocking receive here could deadlock: the last stage may first need an
activation that rank 0 sends later). Messages carry a per-job tag, so jobs that step in different
orders on different stages never mix up.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import torch
import torch.distributed as dist

from mlora_pp.runtime import FAILURES, StepRecord
from mlora_pp.transport import PipelineError

_FIELDS = 6  # step, loss, loss_tokens, tokens, lr, status (0 ok, -1 skipped, k: FAILURES[k - 1])


def _encode(record: StepRecord) -> torch.Tensor:
    status = -1 if record.skipped else (FAILURES.index(record.failure) + 1 if record.failure else 0)
    values = [record.step, record.loss, record.loss_tokens, record.tokens, record.lr, status]
    return torch.tensor(values, dtype=torch.float64)


class RecordSender:
    """On the last stage: ship each finished step's record to rank 0."""

    def __init__(self, job_index: dict[str, int], group: Any, rank: int, dst: int = 0):
        self.job_index = job_index
        self.rank = rank
        self.group = group
        self.dst = dst
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def __call__(self, record: StepRecord) -> None:
        payload = _encode(record)
        try:
            work = dist.isend(payload, self.dst, group=self.group, tag=self.job_index[record.job])
        except RuntimeError as exc:
            raise PipelineError(
                f"rank {self.rank}: lost rank {self.dst} while sending the step records of {record.job!r} ({exc})"
            ) from None
        self._pending.append((work, payload))

    def flush(self, timeout_s: float, rank: int) -> None:
        for work, _ in self._pending:
            try:
                work.wait(datetime.timedelta(seconds=timeout_s))
            except RuntimeError as exc:
                raise PipelineError(f"rank {rank}: lost rank {self.dst} while sending step records ({exc})") from None
        self._pending.clear()


class RecordInbox:
    """On rank 0: receive every job's step records from the last stage, without blocking."""

    def __init__(self, steps: dict[str, int], src: int, group: Any, deliver: Callable[[StepRecord], None]):
        self.names = list(steps)
        self.remaining = dict(steps)
        self.src = src
        self.group = group
        self.deliver = deliver
        self._posted: dict[str, tuple[Any, torch.Tensor]] = {}
        for name in self.names:
            self._post(name)

    def _post(self, name: str) -> None:
        if self.remaining[name] > 0:
            buf = torch.empty(_FIELDS, dtype=torch.float64)
            try:
                work = dist.irecv(buf, self.src, group=self.group, tag=self.names.index(name))
            except RuntimeError as exc:
                raise PipelineError(f"rank 0: lost rank {self.src} while waiting for the step records of {name!r} ({exc})") from None
            self._posted[name] = (work, buf)

    def _take(self, name: str) -> None:
        _, buf = self._posted.pop(name)
        step, loss, loss_tokens, tokens, lr, status = buf.tolist()
        self.remaining[name] -= 1
        failure = FAILURES[int(status) - 1] if status > 0 else None
        self.deliver(StepRecord(name, int(step), loss, int(loss_tokens), int(tokens), lr, failure, status < 0))
        self._post(name)

    def poll(self) -> None:
        for name in list(self._posted):
            if self._posted[name][0].is_completed():
                self._take(name)

    def drain(self, timeout_s: float, rank: int) -> None:
        """Wait for every record still due (the last stage may finish after rank 0)."""
        while self._posted:
            name = next(iter(self._posted))
            try:
                self._posted[name][0].wait(datetime.timedelta(seconds=timeout_s))
            except RuntimeError as exc:
                raise PipelineError(
                    f"rank {rank}: lost rank {self.src} while waiting for the step records of job {name!r} ({exc})"
                ) from None
            self._take(name)
