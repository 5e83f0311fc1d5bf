"""A job's gradient norm over every stage, for `max_grad_norm`, without flushing the pipeline.

Clipping needs the norm of the job's whole gradient, and each stage holds only its own layers'
part. Rank 0 (stage 0) is the last to finish a job's backward, so the parts meet there:

- at the job's optimizer step, every later stage sends rank 0 the sum of squares of its part, and
  does not step yet (`StageWorker` defers it);
- rank 0, at its own step, receives every part (already sent: each stage's step comes right after
  its share of the last backward, which precedes rank 0's), steps with the total norm, and sends
  the total back to every stage;
- a later stage applies its deferred step before it forwards the first micro-batch that rank 0
  forwarded after that step (so always before the job's own next forward). Rank 0 sent the total
  before that micro-batch's activation, so waiting for the total never waits longer than for the
  activation itself: no stage stalls.

A non-finite part fails the job on every stage, but only the stage it came from reports the
failure: the total carries that stage's index (`GradNorm.origin`), so rank 0 names the stage where
the gradients went bad, as it does without clipping.

Messages travel on their own Gloo group, as float64 (job index, step, value, origin). Each stage's
steps may come in another order than rank 0's, so a receiver keeps what arrives before the message
it waits for. Every wait has the pipeline timeout and names the rank, the peer and the job.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mlora_pp.transport import PendingSends, PipelineError

_TAG = 0


@dataclass(frozen=True)
class GradNorm:
    """A job's total gradient norm for one step, and where it went non-finite."""

    norm: float
    origin: int = -1
    """The first stage whose part is not finite (-1: every part is)."""


class GradNormChannel:
    """Partial sums of squares from stages > 0 to rank 0; the total norm from rank 0 to the others."""

    def __init__(self, rank: int, world: int, timeout_s: float, group: Any = None, names: list[str] | None = None):
        self.rank = rank
        self.world = world
        self.timeout_s = timeout_s
        self.group = group
        self.names = names if names is not None else []
        """Job names by index, the same on every rank (a job submitted mid-run is appended alike)."""
        self._sends = PendingSends(rank, timeout_s, poll=False)
        self._early: dict[tuple[int, int, int], tuple[float, float]] = {}
        """Messages received before they were waited for: (peer, job index, step) -> (value, origin)."""

    def _index(self, job: str) -> int:
        if job not in self.names:
            raise ValueError(f"GradNormChannel: job {job!r} is not in its job list {self.names}")
        return self.names.index(job)

    def _send(self, values: tuple[float, float, float, float], peer: int, what: str) -> None:
        payload = torch.tensor(values, dtype=torch.float64)
        try:
            work = dist.isend(payload, peer, group=self.group, tag=_TAG)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while {what} ({exc})") from None
        self._sends.add(work, what, peer, payload)

    def _receive(self, peer: int, job: str, step: int, what: str) -> tuple[float, float]:
        """The (value, origin) of (job, step) from `peer`, reading and keeping earlier messages until it comes."""
        key = (peer, self._index(job), step)
        while key not in self._early:
            payload = torch.empty(4, dtype=torch.float64)
            try:
                work = dist.irecv(payload, peer, group=self.group, tag=_TAG)
                ok = work.wait(datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                text = str(exc).lower()
                if "timeout" in text or "timed out" in text:
                    ok = False
                else:
                    raise PipelineError(f"rank {self.rank}: lost rank {peer} while waiting for {what} ({exc})") from None
            if ok is False:
                raise PipelineError(f"rank {self.rank}: timed out after {self.timeout_s:g}s waiting for {what} "
                                    f"from rank {peer} (peer rank {peer} stopped answering)")
            got_key, got_step, value, origin = payload.tolist()
            self._early[(peer, int(got_key), int(got_step))] = (value, origin)
        return self._early.pop(key)

    def send_part(self, job: str, step: int, square_sum: float) -> None:
        """A stage > 0: this stage's sum of squares of `job`'s gradients for `step` (0-based), to rank 0."""
        self._send((float(self._index(job)), float(step), square_sum, -1.0), 0,
                   f"sending the gradient norm of {job!r} step {step + 1} to rank 0")

    def total(self, job: str, step: int, square_sum: float) -> GradNorm:
        """Rank 0: the job's total gradient norm for `step`, from its own sum and every other stage's;
        sent on to every other stage."""
        origin = -1 if math.isfinite(square_sum) else 0
        for peer in range(1, self.world):
            part, _ = self._receive(peer, job, step, f"the gradient norm of {job!r} step {step + 1}")
            if origin < 0 and not math.isfinite(part):
                origin = peer
            square_sum += part
        total = GradNorm(square_sum ** 0.5, origin)
        for peer in range(1, self.world):
            self._send((float(self._index(job)), float(step), total.norm, float(origin)), peer,
                       f"sending the total gradient norm of {job!r} step {step + 1} to rank {peer}")
        return total

    def receive_total(self, job: str, step: int) -> GradNorm:
        """A stage > 0: the job's total gradient norm for `step`, from rank 0."""
        norm, origin = self._receive(0, job, step, f"the total gradient norm of {job!r} step {step + 1}")
        return GradNorm(norm, int(origin))

    def flush(self) -> None:
        """Wait for every posted send."""
        self._sends.flush()
