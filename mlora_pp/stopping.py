"""A graceful stop: SIGTERM asks a training run to stop at its next decision point, every unfinished
job checkpointed at its last finished step, so that running the config again loses nothing.

Schedulers pre-empt with SIGTERM and kill some seconds later (Kubernetes and Slurm: 30 s by
default; torchrun passes SIGTERM on to its workers and kills them 30 s later). Weights and AdamW
state change only at a job's optimizer step, so between steps they are exactly the checkpoint of
its last finished step; what is needed is that every stage saves the same step. Rank 0 therefore
decides the stop at its next decision point (`Change.stop`; one comes before each forward rank 0
runs) and every rank applies it at the same micro-batch, `control.DECISION_LEAD` forwards later, as
it does a cancellation. The stop thus waits for about DECISION_LEAD micro-batches plus the
backwards and steps still due below its point, not for a fixed count of micro-batches.

Only while the stages train (`accepting`): during set-up there is nothing to save and SIGTERM ends
the rank at once, as before. A second SIGTERM, or training not over within `grace_s()` (no decision
point reached in time, rank 0 gone), also ends the rank at once. Once training is over (stopped or
finished), the run's last writes are left to finish: the deadline (`arm`) is cancelled.
"""

from __future__ import annotations

import math
import os
import threading
import time

GRACE_S = 20.0
"""How long a requested stop may take before the rank stops at once: below the usual 30 s between
a scheduler's SIGTERM and its SIGKILL."""
GRACE_ENV = "MLORA_PP_STOP_GRACE_S"
"""Overrides `GRACE_S`: for a scheduler that waits longer (Kubernetes' terminationGracePeriodSeconds,
Slurm's KillWait) or shorter before its SIGKILL."""


def grace_s() -> float:
    """`GRACE_S`, or the seconds in MLORA_PP_STOP_GRACE_S where set (ValueError naming it if not a
    positive number)."""
    raw = os.environ.get(GRACE_ENV)
    if raw is None:
        return GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{GRACE_ENV}={raw!r}: expected a positive number of seconds")
    return value

_accepting = False
_requested = False
_requested_at: float | None = None
_deadline: threading.Timer | None = None


def set_accepting(flag: bool) -> None:
    """Whether a stop request can be honoured now (the stages are training); leaving clears the
    request and cancels its deadline (entering forgets the time of an earlier run's request)."""
    global _accepting, _requested, _requested_at, _deadline
    _accepting = flag
    if flag:
        _requested_at = None
    else:
        _requested = False
        if _deadline is not None:
            _deadline.cancel()
            _deadline = None


def arm(deadline: threading.Timer) -> None:
    """Start the requested stop's deadline (what ends the rank if training is not over by then)."""
    global _deadline
    _deadline = deadline
    deadline.daemon = True
    deadline.start()


def request() -> bool:
    """Record a stop request. False when it cannot be honoured (not training, or asked before): the
    caller then stops the rank at once."""
    global _requested, _requested_at
    if not _accepting or _requested:
        return False
    _requested, _requested_at = True, time.monotonic()
    return True


def requested() -> bool:
    return _requested


def requested_at() -> float | None:
    """`time.monotonic()` when the last honoured stop request came (None: none came)."""
    return _requested_at
