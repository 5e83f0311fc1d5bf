"""A graceful stop: SIGTERM asks a training run to stop at its next decision point, every unfinished
job checkpointed at its last finished step, so that running the config again loses nothing.

Schedulers pre-empt with SIGTERM and kill some seconds later (Kubernetes and Slurm: 30 s by
default; torchrun passes SIGTERM on to its workers and kills them 30 s later). Weights and AdamW
state change only at a job's optimizer step, so between steps they are exactly the checkpoint of
its last finished step; what is needed is that every stage saves the same step. Rank 0 therefore
decides the stop at a decision point (`Change.stop`, every 8 micro-batches) and every rank applies
it at the same micro-batch, as it does a cancellation.

Only while the stages train (`accepting`): during set-up there is nothing to save and SIGTERM ends
the rank at once, as before. A second SIGTERM, or a stop not done within `GRACE_S` (no decision
point reached in time, rank 0 gone), also ends the rank at once.
"""

from __future__ import annotations

GRACE_S = 20.0
"""How long a requested stop may take before the rank stops at once: below the usual 30 s between
a scheduler's SIGTERM and its SIGKILL."""

_accepting = False
_requested = False


def set_accepting(flag: bool) -> None:
    """Whether a stop request can be honoured now (the stages are training); leaving clears it."""
    global _accepting, _requested
    _accepting = flag
    if not flag:
        _requested = False


def request() -> bool:
    """Record a stop request. False when it cannot be honoured (not training, or asked before): the
    caller then stops the rank at once."""
    global _requested
    if not _accepting or _requested:
        return False
    _requested = True
    return True


def requested() -> bool:
    return _requested
