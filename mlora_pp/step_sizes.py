"""A job's micro-batch sizes, step by step, in three flat arrays: what the scheduler reads of a job.

As nested tuples of (rows, padded tokens) a planned micro-batch cost about 97 bytes (a tuple, an
int object, pointers): 128 jobs of 52,000 records over 3 epochs in micro-batches of 2 rows held
928 MiB on every rank, made again (4 s) at every change of plan. Here one costs 16 bytes, usually
as views of the arrays a job keeps of its plan, and a job's sizes are sliced, summed and compared
in numpy (`benchmarks/planning.py --from-data-only`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

Size = tuple[int, int]
"""(rows, padded tokens) of one micro-batch."""

CHUNK = 4096
"""Micro-batches turned into Python ints at a time when iterating (bounds what an iterator holds)."""


class StepSizes(Sequence[tuple[Size, ...]]):
    """``sizes[k]`` is step ``k``'s micro-batches as a tuple of (rows, padded tokens), made on demand
    from ``rows[a:b]`` and ``tokens[a:b]``, ``a, b = starts[k], ends[k]``. A step may be empty."""

    __slots__ = ("rows", "tokens", "ends")

    def __init__(self, rows: np.ndarray, tokens: np.ndarray, ends: np.ndarray) -> None:
        rows, tokens, ends = (np.asarray(a, dtype=np.int64) for a in (rows, tokens, ends))
        if rows.ndim != 1 or tokens.shape != rows.shape or ends.ndim != 1:
            raise ValueError(f"bad shapes: rows {rows.shape}, tokens {tokens.shape}, ends {ends.shape}")
        if (len(ends) and int(ends[-1]) != len(rows)) or (not len(ends) and len(rows)):
            raise ValueError(f"step ends must finish at the {len(rows)} micro-batches")
        if len(ends) and (int(ends[0]) < 0 or (np.diff(ends) < 0).any()):
            raise ValueError("step ends must not decrease")
        self.rows = rows
        self.tokens = tokens
        self.ends = ends

    @classmethod
    def of(cls, steps: Sequence[Sequence[Size]]) -> "StepSizes":
        """From nested sequences: ``steps[k][micro] = (rows, padded tokens)``."""
        if isinstance(steps, StepSizes):
            return steps
        counts = [len(micros) for micros in steps]
        flat = np.array([size for micros in steps for size in micros], dtype=np.int64).reshape(-1, 2)
        return cls(flat[:, 0], flat[:, 1], np.cumsum(np.asarray(counts, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.ends)

    def start(self, k: int) -> int:
        """Micro-batches before step ``k``."""
        return int(self.ends[k - 1]) if k > 0 else 0

    def micros_in(self, k: int) -> int:
        """Micro-batches of step ``k``."""
        return int(self.ends[k]) - self.start(k)

    @property
    def micro_count(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> np.ndarray:
        """Micro-batches of each step."""
        return np.diff(self.ends, prepend=0)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            first, stop, stride = k.indices(len(self))
            if stride != 1:
                return tuple(self[i] for i in range(first, stop, stride))
            stop = max(first, stop)
            a, b = self.start(first), self.start(stop)
            return StepSizes(self.rows[a:b], self.tokens[a:b], self.ends[first:stop] - a)
        if not isinstance(k, (int, np.integer)):
            raise TypeError(f"steps are indexed by int or slice, not {type(k).__name__}")
        if not -len(self) <= k < len(self):
            raise IndexError(f"step {k} of {len(self)}")
        k = int(k) % len(self)
        a, b = self.start(k), int(self.ends[k])
        return tuple(zip(self.rows[a:b].tolist(), self.tokens[a:b].tolist()))

    def __iter__(self) -> Iterator[tuple[Size, ...]]:
        counts = self.counts
        for k, (rows, tokens) in enumerate(self.chunks()):
            yield from _cut(rows, tokens, counts[k * CHUNK : (k + 1) * CHUNK].tolist())

    def chunks(self) -> Iterator[tuple[list[int], list[int]]]:
        """(rows, tokens) as lists of Python ints, `CHUNK` steps at a time."""
        for k in range(0, len(self), CHUNK):
            a, b = self.start(k), self.start(min(k + CHUNK, len(self)))
            yield self.rows[a:b].tolist(), self.tokens[a:b].tolist()

    def without_first(self, count: int) -> "StepSizes":
        """These sizes less the first ``count`` micro-batches: from the step the cut falls in (the
        first that ends after it), with what is left of that step."""
        if not 0 <= count <= self.micro_count:
            raise ValueError(f"cannot drop {count} of {self.micro_count} micro-batches")
        first = int(np.searchsorted(self.ends, count, side="right"))
        return StepSizes(self.rows[count:], self.tokens[count:], self.ends[first:] - count)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StepSizes):
            return (np.array_equal(self.rows, other.rows) and np.array_equal(self.tokens, other.tokens)
                    and np.array_equal(self.ends, other.ends))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(tuple(map(tuple, b)) == a for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.rows.tobytes(), self.tokens.tobytes(), self.ends.tobytes()))

    def __repr__(self) -> str:
        return f"StepSizes({len(self)} steps, {self.micro_count} micro-batches)"

    def __reduce__(self):
        return StepSizes, (self.rows, self.tokens, self.ends)


def _cut(rows: list[int], tokens: list[int], counts: list[int]) -> Iterator[tuple[Size, ...]]:
    at = 0
    for n in counts:
        yield tuple(zip(rows[at : at + n], tokens[at : at + n]))
        at += n
