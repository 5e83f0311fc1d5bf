"""Early stopping on held-out loss: rank 0 watches each job's evaluations, in step order.

A job with `early_stop_patience: N` stops once N evaluations in a row have not lowered its best
held-out loss; its adapter is then the checkpoint of its best evaluation (a checkpoint is due at
every evaluation of such a job, and pruning keeps the best one, and every evaluated step not heard
of yet, besides the newest). The decision depends only on the losses, which are deterministic, so
the best step and the adapter are the same on any number of stages; only how many steps the job
runs past that point before the stop takes effect (the next decision point) depends on timing.
Evaluations after the decision are logged but no longer change the best.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Watch:
    patience: int
    points: tuple[int, ...]  # the job's evaluation steps
    best_step: int | None = None
    best_loss: float = float("inf")
    worse: int = 0  # evaluations in a row without a new best
    heard: int = 0  # the latest evaluated step
    decided: bool = False


@dataclass
class EarlyStopping:
    """Per-job best held-out loss and patience (rank 0)."""

    _watch: dict[str, _Watch] = field(default_factory=dict)

    def watch(self, job: str, patience: int, points: list[int]) -> None:
        """Follow `job`, evaluated after each of `points` steps."""
        self._watch[job] = _Watch(patience, tuple(points))

    def watches(self, job: str) -> bool:
        return job in self._watch

    def observe(self, job: str, step: int, loss: float) -> bool:
        """The evaluation after `step` steps; True when it exhausts the job's patience (once)."""
        w = self._watch.get(job)
        if w is None or w.decided or step <= w.heard:
            return False
        w.heard = step
        if loss < w.best_loss:  # a NaN is never a new best
            w.best_step, w.best_loss, w.worse = step, loss, 0
            return False
        w.worse += 1
        w.decided = w.worse >= w.patience
        return w.decided

    def best(self, job: str) -> tuple[int, float] | None:
        """(step, loss) of the job's best evaluation so far (up to the decision), None before one."""
        w = self._watch.get(job)
        return None if w is None or w.best_step is None else (w.best_step, w.best_loss)

    def decided(self, job: str) -> bool:
        w = self._watch.get(job)
        return w is not None and w.decided

    def keep(self, job: str) -> set[int]:
        """Checkpoint steps pruning must keep: the best evaluation's, and evaluated steps whose loss
        has not been heard yet (any of them may become the best)."""
        w = self._watch.get(job)
        if w is None:
            return set()
        waiting = set() if w.decided else {p for p in w.points if p > w.heard}
        return waiting | ({w.best_step} if w.best_step is not None else set())
