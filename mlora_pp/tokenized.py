"""Tokenized rows: one as an `Example`, a job's all as three flat arrays that every rank can map.

Tuples of Python ints cost about 32 bytes a token (an int object and two pointers); a job of 50,000
records of 300 tokens held 0.5 GB on every rank. Here a token costs 5 bytes (an int32 id and a
bool that says whether it carries loss), rows are slices of one array, and arrays loaded from disk
are memory-mapped, so ranks on one machine share one copy in the page cache.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label of a position that carries no loss (PyTorch's cross-entropy default ``ignore_index``)."""

_FILES = ("ids.npy", "trained.npy", "offsets.npy")


@dataclass(frozen=True)
class Example:
    """One tokenized training row.

    ``labels`` has the length of ``input_ids`` and is `IGNORE_INDEX` where there is no loss. HF
    convention: the model predicts ``labels[t + 1]`` from positions ``<= t``, so the loss pairs
    ``logits[:, :-1]`` with ``labels[:, 1:]`` and ``labels[0]`` never counts.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    @functools.cached_property
    def loss_tokens(self) -> int:
        """Number of positions that carry loss (``labels[1:] != IGNORE_INDEX``); computed once."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


class TokenizedRows(Sequence[Example]):
    """Rows ``i`` is ``ids[offsets[i]:offsets[i + 1]]``; its labels are the ids where ``trained``
    and `IGNORE_INDEX` elsewhere. Indexing gives an `Example` (made on demand); `collate_rows` pads
    rows straight from the arrays."""

    def __init__(self, ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray):
        if ids.ndim != 1 or trained.shape != ids.shape or offsets.ndim != 1 or len(offsets) < 1:
            raise ValueError(f"bad shapes: ids {ids.shape}, trained {trained.shape}, offsets {offsets.shape}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(ids):
            raise ValueError(f"offsets must run from 0 to {len(ids)}, got {int(offsets[0])}..{int(offsets[-1])}")
        self.ids = ids
        self.trained = trained
        self.offsets = offsets

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "TokenizedRows":
        builder = RowsBuilder()
        for ex in examples:
            builder.add(ex.input_ids, [label != IGNORE_INDEX for label in ex.labels])
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"rows are indexed by int, not {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        i = int(i) % n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        labels = np.where(self.trained[a:b], ids, IGNORE_INDEX)
        return Example(tuple(ids.tolist()), tuple(labels.tolist()))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to rows with the same ids and labels: other `TokenizedRows`, or a list of `Example`s."""
        if isinstance(other, TokenizedRows):
            return (np.array_equal(self.offsets, other.offsets) and np.array_equal(self.ids, other.ids)
                    and np.array_equal(self.trained, other.trained))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenizedRows({len(self)} rows, {self.tokens} tokens)"

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Tokens of each row (int64)."""
        return np.diff(self.offsets).astype(np.int64)

    @functools.cached_property
    def length_list(self) -> list[int]:
        """`lengths` as Python ints, for loops that look up one row at a time (do not modify)."""
        return self.lengths.tolist()

    @functools.cached_property
    def loss_tokens(self) -> np.ndarray:
        """Positions after the first that carry loss in each row (int64): `Example.loss_tokens` of
        every row, found without a temporary the size of the tokens."""
        sums = np.zeros(len(self), dtype=np.int64)
        full = np.flatnonzero(self.lengths > 0)
        if len(full):
            starts = self.offsets[full]  # the empty rows between two full ones hold no token
            sums[full] = np.add.reduceat(self.trained, starts, dtype=np.int64) - self.trained[starts]
        return sums

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.trained.nbytes + self.offsets.nbytes

    def save(self, directory: Path) -> None:
        """The three arrays as ``.npy`` files in ``directory`` (which must exist)."""
        for name, array in zip(_FILES, (self.ids, self.trained, self.offsets)):
            with open(Path(directory) / name, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> "TokenizedRows":
        """Arrays written by `save`, memory-mapped read-only unless ``mmap`` is False."""
        mode = "r" if mmap else None
        ids, trained, offsets = (np.load(Path(directory) / name, mmap_mode=mode, allow_pickle=False) for name in _FILES)
        if ids.dtype != np.int32 or trained.dtype != np.bool_ or offsets.dtype != np.int64:
            raise ValueError(f"{directory}: unexpected dtypes {ids.dtype}, {trained.dtype}, {offsets.dtype}")
        return cls(ids, trained, offsets)


def collate_rows(sources: Sequence[tuple[TokenizedRows, Sequence[int]]], pad_id: int, width: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) int64 ``[rows, width]`` of the rows of several sources in order:
    right-padded with ``pad_id`` / `IGNORE_INDEX`, as `mlora_pp.data.collate` pads `Example`s."""
    spans = [(src, int(src.offsets[i]), int(src.offsets[i + 1])) for src, rows in sources for i in rows]
    if not spans:
        raise ValueError("collate_rows needs at least one row")
    longest = max(b - a for _, a, b in spans)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest row ({longest})")
    input_ids = np.full((len(spans), width), pad_id, dtype=np.int64)
    labels = np.full((len(spans), width), IGNORE_INDEX, dtype=np.int64)
    for r, (src, a, b) in enumerate(spans):
        ids = src.ids[a:b]
        input_ids[r, : b - a] = ids
        labels[r, : b - a] = np.where(src.trained[a:b], ids, IGNORE_INDEX)
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


class RowsBuilder:
    """Collects rows one by one (ids and which positions carry loss) into a `TokenizedRows`.

    Rows are moved into arrays every `FLUSH_TOKENS` tokens, so Python ints are held for a bounded
    number of tokens, whatever the size of the data."""

    FLUSH_TOKENS = 1 << 20

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._trained: list[bool] = []
        self._lengths: list[int] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, ids: Sequence[int], trained: Sequence[bool]) -> None:
        if len(ids) != len(trained):
            raise ValueError(f"ids ({len(ids)}) and trained ({len(trained)}) differ in length")
        self._ids.extend(ids)
        self._trained.extend(trained)
        self._lengths.append(len(ids))
        if len(self._ids) >= self.FLUSH_TOKENS:
            self._flush()

    def __len__(self) -> int:
        return len(self._lengths)

    def _flush(self) -> None:
        ids = np.array(self._ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError(f"token ids must lie in [0, 2**31), got {ids.min()}..{ids.max()}")
        self._parts.append((ids.astype(np.int32), np.array(self._trained, dtype=np.bool_)))
        self._ids, self._trained = [], []

    def build(self) -> TokenizedRows:
        self._flush()
        ids = np.concatenate([p[0] for p in self._parts])
        trained = np.concatenate([p[1] for p in self._parts])
        self._parts = []
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        return TokenizedRows(ids, trained, offsets)
