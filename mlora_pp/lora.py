"""The batched LoRA operator: one frozen base projection, many adapters, one pass.

A micro-batch's rows are grouped contiguously by adapter (job). `BatchedLoRALinear` runs the frozen
base projection once over all rows and adds each adapter's low-rank delta
``scale_i * dropout_i(x_i) @ A_i^T @ B_i^T`` to that adapter's rows only.

The delta is a custom autograd Function so that it keeps only ``x`` and the small ``S_i =
dropout(x_i) @ A_i^T`` for backward: the dropout mask is a pure hash of (row key, module, position,
feature) and is recomputed in backward instead of being stored. The same hash makes the mask
independent of how rows are fused, ordered or padded, so a job trained alone or fused with others
sees the same dropout.

Two implementations give the same results: ``loop`` (plain matmuls per segment) and ``grouped``
(``torch._grouped_mm`` over all segments at once). In the grouped path, rows of segments whose
adapter is not on this module are cut off when they lie before the first or after the last
participating segment, and otherwise form a group with zero weights whose results are never read
(no gather/scatter copies of x). ``auto`` picks grouped on CUDA and loop on CPU, where grouped_mm
is itself a loop of matmuls. The grouped path's host work does not grow with the number of
adapters either: their weights stay stacked between calls (`_Stacked`), and their gradients are
added to ``.grad`` in one batched add rather than through autograd (`_add_to_grads`).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from mlora_pp.config import lora_scale

__all__ = ["LoRASegment", "LoRABatch", "LoRAContext", "dropout_keep_mask", "BatchedLoRALinear", "PATHS"]

PATHS: tuple[str, ...] = ("auto", "loop", "grouped")
_KEY_LIMIT = 1 << 62
_MODULE_LIMIT = 1 << 31

# ----------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class LoRASegment:
    """Rows [row_start, row_end) of a micro-batch that belong to one adapter (job)."""

    adapter: str
    row_start: int
    row_end: int
    dropout_keys: tuple[int, ...]
    """One non-negative int (< 2**62) per row: the row's stable identity for dropout masks."""

    def __post_init__(self) -> None:
        if not (0 <= self.row_start <= self.row_end):
            raise ValueError(f"segment {self.adapter!r}: bad rows [{self.row_start}, {self.row_end})")
        if len(self.dropout_keys) != self.row_end - self.row_start:
            raise ValueError(
                f"segment {self.adapter!r}: {len(self.dropout_keys)} dropout keys for "
                f"{self.row_end - self.row_start} rows"
            )
        for key in self.dropout_keys:
            if not (isinstance(key, int) and 0 <= key < _KEY_LIMIT):
                raise ValueError(f"segment {self.adapter!r}: dropout key {key!r} is not an int in [0, 2**62)")


@dataclass(frozen=True)
class LoRABatch:
    """How a micro-batch's rows map to adapters; segments are ordered, disjoint and cover every row."""

    segments: tuple[LoRASegment, ...]
    seq_len: int
    training: bool
    """Dropout is active only when True."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        expected = 0
        for seg in self.segments:
            if seg.row_start != expected:
                raise ValueError(
                    f"segments must be ordered, disjoint and cover rows from 0: segment {seg.adapter!r} "
                    f"starts at row {seg.row_start}, expected {expected}"
                )
            expected = seg.row_end

    @property
    def rows(self) -> int:
        return self.segments[-1].row_end if self.segments else 0


def host_to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Host tensor to `device` without making the host wait for the device's queue (pinned, async).

    A plain ``.to("cuda")`` of pageable memory synchronizes the stream: the host would wait for
    every kernel it queued before, and could not run ahead of the GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class LoRAContext:
    """Shared by all `BatchedLoRALinear` of one stage: the runner sets `.batch` before each forward."""

    def __init__(self) -> None:
        self._batch: LoRABatch | None = None
        self._seeds: dict[torch.device, Tensor] = {}
        self._tables: dict[tuple, object] = {}
        self._module_ids: list[int] = []
        self._row_of: dict[int, int] = {}

    def register(self, module_id: int) -> None:
        """Each module of the stage registers once, so per-module row seeds are made in one go per batch."""
        if module_id not in self._row_of:
            self._row_of[module_id] = len(self._module_ids)
            self._module_ids.append(module_id)

    def position_seeds(self, device: torch.device, module_id: int) -> Tensor:
        """int32 [rows * seq_len] dropout seeds of `module_id`; the table for every registered module is
        built once per batch (a dozen small kernels instead of a dozen per module)."""
        self.register(module_id)
        ids = tuple(self._module_ids)

        def build() -> Tensor:
            mods = torch.tensor([_module_seed(m) for m in ids], dtype=torch.int64)
            return _as_int32(_mix32(self.key_seeds(device)[None, :] ^ host_to_device(mods, device)[:, None]))

        table = self.cached(("positions", device, ids), build)
        return table[self._row_of[module_id]]

    @property
    def batch(self) -> LoRABatch | None:
        return self._batch

    @batch.setter
    def batch(self, batch: LoRABatch | None) -> None:
        if batch is self._batch:  # activation checkpointing sets the same batch again for every layer
            return
        self._batch = batch
        self._seeds = {}
        self._tables = {}

    def cached(self, key: tuple, build: Callable[[], object]) -> object:
        """A value derived from the current batch only (per-row tables shared by the stage's modules)."""
        value = self._tables.get(key)
        if value is None:
            value = self._tables[key] = build()
        return value

    def key_seeds(self, device: torch.device) -> Tensor:
        """Module-independent dropout seeds [rows * seq_len] of the batch, built once per batch and device."""
        seeds = self._seeds.get(device)
        if seeds is None:
            assert self._batch is not None
            flat = [k for seg in self._batch.segments for k in seg.dropout_keys]
            keys = host_to_device(torch.tensor(flat, dtype=torch.int64), device)
            seeds = self._seeds[device] = _key_seeds(keys, self._batch.seq_len)
        return seeds


# -------------------------------------------------------------------------------- dropout hash
# Everything is int64 holding values < 2**32, multiplied only by constants < 2**31, so no
# intermediate overflows and CPU and CUDA agree bit for bit.

_M32 = 0xFFFFFFFF
_C1 = 0x21F0AAAD
_C2 = 0x735A2D97
_GOLD = 0x61C88647
# Mask elements hashed at a time: small on CPU so the int64 temporaries stay in cache, large on
# accelerators where every chunk costs kernel launches.
_ELEMENTS_PER_CHUNK = 1 << 17
_ELEMENTS_PER_CHUNK_ACCEL = 1 << 23
_IntLike = TypeVar("_IntLike", Tensor, int)


def _mix32(h: _IntLike) -> _IntLike:
    """A lowbias32-style avalanche of 32-bit values held in int64 (tensors or Python ints)."""
    h = h ^ (h >> 16)
    h = (h * _C1) & _M32
    h = h ^ (h >> 15)
    h = (h * _C2) & _M32
    return h ^ (h >> 15)


def _key_seeds(row_keys: Tensor, seq_len: int) -> Tensor:
    """int64 [rows * seq_len] seeds, one per (row key, position); shared by all modules."""
    keys = row_keys.to(torch.int64).reshape(-1)
    row = _mix32(_mix32((keys >> 32) ^ 0x3C6EF372) ^ (keys & _M32))
    pos = _mix32((torch.arange(seq_len, dtype=torch.int64, device=keys.device) * _GOLD + 0x27D4EB2F) & _M32)
    return _mix32(row[:, None] ^ pos[None, :]).reshape(-1)


def _module_seed(module_id: int) -> int:
    return int(_mix32((module_id * _GOLD + 0x1B873593) & _M32))  # _mix32 works on Python ints too


def _position_seeds(key_seeds: Tensor, module_id: int) -> Tensor:
    """int64 [rows * seq_len] seeds, one per (row key, module, position)."""
    return _mix32(key_seeds ^ _module_seed(module_id))


def _feature_seeds(features: int, device: torch.device | str | None) -> Tensor:
    """int64 [features] seeds, one per feature index."""
    f = torch.arange(features, dtype=torch.int64, device=device)
    return _mix32((f * _C2 + 0x165667B1) & _M32)


_I32_MIN = -(1 << 31)


def _as_int32(t: Tensor) -> Tensor:
    """int64 values in [0, 2**32) -> int32 with the same 32 bits (int32 input is returned as is)."""
    if t.dtype == torch.int32:
        return t
    return torch.where(t >= (1 << 31), t - (1 << 32), t).to(torch.int32)


def _element_hash(pos_seeds: Tensor, feat_seeds: Tensor) -> Tensor:
    """int32 [len(pos_seeds), len(feat_seeds)]: the 32-bit element hash with its top bit flipped.

    Computed in int32, whose multiplies wrap and so keep exactly the low 32 bits an exact int64
    product would (4x faster than int64 on CPU, half the memory); ``(h >> 15) & 0x1FFFF`` is the
    logical shift. Flipping the top bit makes signed order equal the hash's unsigned order, which
    is what `_threshold` compares against.
    """
    h = _as_int32(pos_seeds)[:, None] ^ _as_int32(feat_seeds)[None, :]
    h.mul_(_C1)
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    h.mul_(_C2)
    return h.bitwise_xor_(_I32_MIN)


def _threshold(p: float) -> int:
    """keep = hash / 2**32 >= p  <=>  hash >= ceil(p * 2**32), in `_element_hash`'s flipped int32 order."""
    return min(math.ceil(p * 2.0**32), (1 << 32) - 1) + _I32_MIN


def dropout_keep_mask(
    row_keys: Tensor,
    module_id: int,
    seq_len: int,
    features: int,
    p: float,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool mask [len(row_keys) * seq_len, features]: True = keep.

    A pure function of (row key, module_id, position t, feature f): it never depends on how rows are
    fused, ordered or padded, so a row padded to a longer seq_len gets the same mask on its first
    positions. keep = hash / 2**32 >= p.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    device = row_keys.device if device is None else torch.device(device)
    rows = row_keys.numel()
    if p == 0.0:
        return torch.ones(rows * seq_len, features, dtype=torch.bool, device=device)
    pos = _position_seeds(_key_seeds(row_keys.to(device), seq_len), module_id)
    return _element_hash(pos, _feature_seeds(features, device)) >= _threshold(p)


def _chunk_rows(features: int, device: torch.device) -> int:
    per_chunk = _ELEMENTS_PER_CHUNK if device.type == "cpu" else _ELEMENTS_PER_CHUNK_ACCEL
    return max(1, per_chunk // max(features, 1))


def _drop_span(v: Tensor, pos_seeds: Tensor, feat_seeds: Tensor, thresh: Tensor) -> Tensor:
    """v [T, F] with every element whose hash is under its row's threshold zeroed (no 1/(1-p) scaling).

    pos_seeds [T] int32 (`_position_seeds` as int32), feat_seeds [F], thresh [T] int32 in
    `_threshold`'s order; `_I32_MIN` keeps a whole row. The same hash as `dropout_keep_mask`, so the
    paths agree bit for bit. Per-row seeds come in precomputed: inside the kernel they would be
    recomputed for every element, in emulated 64-bit arithmetic.
    """
    h = _element_hash(pos_seeds, feat_seeds)
    return torch.where(h < thresh[:, None], torch.zeros((), dtype=v.dtype, device=v.device), v)


def _drop_span_pair(a: Tensor, b: Tensor, pos_seeds: Tensor, feat_seeds: Tensor, thresh: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """`_drop_span` of two tensors of one shape under one mask, the hash computed once: backward
    needs both the input and the input gradient masked."""
    drop = _element_hash(pos_seeds, feat_seeds) < thresh[:, None]
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(drop, zero, a), torch.where(drop, zero, b)


_compiled_drop_span: list[Callable[..., Tensor] | None] = []
_compiled_drop_span_pair: list[Callable[..., tuple[Tensor, Tensor]] | None] = []


def _drop_span_compiled() -> Callable[..., Tensor] | None:
    """`_drop_span` compiled into one kernel (torch.compile), or None where that is off or failed
    (`_drop_span_pair` likewise, in `_compiled_drop_span_pair`).

    Eager, the hash is a dozen passes over a T x F int32 tensor (on CPU, 4.5x the time of the
    compiled kernel at 132 x 512); compiled it is one pass that reads v and writes the result.
    MLORA_PP_COMPILE=0 turns it off. On CPU it needs a C++ compiler; without one the first call
    warns and every later call runs eagerly, with the same bits.
    """
    enabled = os.environ.get("MLORA_PP_COMPILE", "1") != "0"
    for kernels, fn in ((_compiled_drop_span, _drop_span), (_compiled_drop_span_pair, _drop_span_pair)):
        if not kernels:
            kernels.append(torch.compile(fn, dynamic=True, fullgraph=True) if enabled else None)
    return _compiled_drop_span[0]


def _compile_failed(exc: Exception) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:200]  # compiler errors run to pages
    warnings.warn(f"compiling the dropout hash failed ({type(exc).__name__}: {first}); running it eagerly")
    _compiled_drop_span[0] = None
    _compiled_drop_span_pair[0] = None


def _dropped(v: Tensor, pos_seeds: Tensor, feat_seeds: Tensor, thresh: Tensor) -> Tensor:
    """`_drop_span` of v: one compiled kernel where torch.compile works, else chunk by chunk (the
    eager hash's temporaries kept in cache)."""
    fn = _drop_span_compiled()
    if fn is not None:
        try:
            # One grad mode and no requires_grad flags: else each combination is its own compile.
            with torch.no_grad():
                return fn(v.detach(), pos_seeds, feat_seeds, thresh)
        except Exception as exc:  # no compiler, no Triton, or a compiler bug: the eager hash gives the same bits
            _compile_failed(exc)
    out = torch.empty_like(v)
    step = _chunk_rows(v.shape[1], v.device)
    for c in range(0, v.shape[0], step):
        out[c : c + step] = _drop_span(v[c : c + step], pos_seeds[c : c + step], feat_seeds, thresh[c : c + step])
    return out


def _dropped_pair(a: Tensor, b: Tensor, pos_seeds: Tensor, feat_seeds: Tensor, thresh: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """(`_dropped` of a, of b) under one mask: one compiled kernel and one call, not two."""
    _drop_span_compiled()
    fn = _compiled_drop_span_pair[0]
    if fn is not None:
        try:
            with torch.no_grad():
                return fn(a.detach(), b.detach(), pos_seeds, feat_seeds, thresh)
        except Exception as exc:  # as in `_dropped`
            _compile_failed(exc)
    return _dropped(a, pos_seeds, feat_seeds, thresh), _dropped(b, pos_seeds, feat_seeds, thresh)


def warm_up_dropout(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Compile the dropout kernel for `device` and `dtype` now (seconds spent), so that the first
    training step does not pay for it. Shapes are dynamic: one compile serves every batch."""
    start = time.perf_counter()
    if _drop_span_compiled() is not None:
        v = torch.ones(3, 16, dtype=dtype, device=device)
        rows = torch.arange(3, dtype=torch.int32, device=device)
        features = torch.arange(16, dtype=torch.int32, device=device)
        _dropped(v, rows, features, rows.clone())  # aliases would guard
        _dropped_pair(v, v.clone(), rows, features, rows.clone())
    return time.perf_counter() - start


# --------------------------------------------------------------------------- grouped_mm support


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype) whether the grouped_mm forms we use run and give right results.

    Uneven group sizes on purpose: segments are arbitrary multiples of seq_len.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(21, 16, generator=g).to(device, dtype)
        b = torch.randn(2, 16, 8, generator=g).to(device, dtype)
        c = torch.randn(21, 8, generator=g).to(device, dtype)
        offs = torch.tensor([5, 21], dtype=torch.int32, device=device)
        y3 = torch._grouped_mm(a, b, offs=offs).float().cpu()
        y2 = torch._grouped_mm(c.t(), a, offs=offs).float().cpu()
        a, b, c = a.float().cpu(), b.float().cpu(), c.float().cpu()
        ref3 = torch.cat([a[:5] @ b[0], a[5:] @ b[1]])
        ref2 = torch.stack([c[:5].t() @ a[:5], c[5:].t() @ a[5:]])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return torch.allclose(y3, ref3, rtol=tol, atol=tol * 16) and torch.allclose(y2, ref2, rtol=tol, atol=tol * 16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_applies(x: Tensor, in_features: int, out_features: int) -> bool:
    """Whether the grouped path can run for x: grouped_mm works for its device and dtype, rows are 16-byte aligned."""
    align = max(1, 16 // x.element_size())
    if in_features % align or out_features % align:
        return False
    return _grouped_mm_works(x.device.type, x.device.index, x.dtype)


# ------------------------------------------------------------------------------- the Function


@dataclass
class _Group:
    """Flat rows [start, end) of x [T, in] computed with participating adapter `slot` (-1: a gap)."""

    start: int
    end: int
    slot: int
    pos_seeds: Tensor | None = None
    """loop path: int32 dropout seeds per flat row, only when this group's dropout is active."""
    drops: bool = False
    """Whether this group's dropout is active."""
    thresh: Tensor | None = None
    """loop path, with pos_seeds: int32 [rows] `_threshold` of the group's dropout, for `_dropped`."""


@dataclass
class _Stacked:
    """grouped path: every adapter of a module in the compute dtype, its rank zero-padded to R,
    stacked in the module's adapter order plus a last all-zero slot (for gap groups), in the four
    layouts the grouped path multiplies by; B carries each adapter's scale. A slot is refreshed in
    place when its A or B changed (optimizer step, load), all of them with a few batched copies:
    per-adapter casts cost a dozen operators per adapter and module, each a host dispatch and a
    kernel launch."""

    key: tuple  # (adapter names, dtype, device, R)
    versions: list[tuple | None]  # per slot: what its weights were refreshed from
    a_t: Tensor  # [n + 1, in, R]
    a: Tensor  # [n + 1, R, in]
    b_t: Tensor  # [n + 1, R, out] * scale
    b: Tensor  # [n + 1, out, R] * scale
    index: dict[str, int] = field(default_factory=dict)
    """Each adapter's slot."""
    adapters: dict[str, Tensor] = field(default_factory=dict)
    """Each layout's first n slots (a view): the stack of a batch whose groups are the module's
    adapters in order, without gaps, as when every job of a micro-batch trains this module."""


@dataclass(frozen=True)
class _SpanRows:
    """grouped path: per-row and per-group tables over the span, on the device; shared by every module
    with the same row layout in a batch."""

    offs: Tensor  # int32 [groups]: group ends relative to the span's start
    scales: Tensor  # float32 [groups, 1, 1]: each group's scale (0 for gaps)
    thresh: Tensor | None  # int32 [span]: dropout threshold per row (_I32_MIN keeps the row); None: no dropout
    inv_keep: Tensor | None  # float32 [span, 1]: 1 / (1 - p) per row
    pos_seeds: Tensor | None  # int32 [span]: this module's dropout seed per row


@dataclass
class _Plan:
    """Everything about one call that is not a tensor autograd must track."""

    path: str
    groups: list[_Group]
    ranks: list[int]
    scales: list[float]
    dropouts: list[float]
    feat_seeds: Tensor | None
    rows: _SpanRows | None = None
    """grouped path only."""
    stacked: _Stacked | None = None
    """grouped path only: the module's weights, every adapter's."""
    slots: Tensor | None = None
    """grouped path only: each group's slot in `stacked` (None: the groups are its adapters in order)."""

    def active_p(self, g: _Group) -> float:
        return self.dropouts[g.slot] if g.drops else 0.0

    @property
    def span(self) -> tuple[int, int]:
        return self.groups[0].start, self.groups[-1].end

    @property
    def has_gaps(self) -> bool:
        return any(g.slot < 0 for g in self.groups)

    def stack(self, layout: str) -> Tensor:
        """[groups, ...] stack of each group's weights in `layout` (a `_Stacked` field): a view, or
        one gather when the groups are not the module's adapters in order."""
        assert self.stacked is not None
        if self.slots is None:
            return self.stacked.adapters[layout]
        return getattr(self.stacked, layout).index_select(0, self.slots)

    def dropped_rows(self, v: Tensor, g: _Group) -> Tensor:
        """loop path: v [rows of g, F] with g's dropout mask applied (no 1/(1-p))."""
        assert self.feat_seeds is not None and g.pos_seeds is not None and g.thresh is not None
        return _dropped(v, g.pos_seeds, self.feat_seeds, g.thresh)

    def dropped_rows_pair(self, a: Tensor, b: Tensor, g: _Group) -> tuple[Tensor, Tensor]:
        """loop path: `dropped_rows` of a and of b (same shape), the mask computed once."""
        assert self.feat_seeds is not None and g.pos_seeds is not None and g.thresh is not None
        return _dropped_pair(a, b, g.pos_seeds, self.feat_seeds, g.thresh)

    def dropped_pair(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """`dropped` of a and of b (same shape), the mask computed once."""
        r = self.rows
        assert r is not None
        if r.thresh is None:
            return a, b
        assert self.feat_seeds is not None and r.pos_seeds is not None
        return _dropped_pair(a, b, r.pos_seeds, self.feat_seeds, r.thresh)

    def dropped(self, v: Tensor) -> Tensor:
        """v over the span with each row's dropout mask applied (no 1/(1-p)); v itself without dropout."""
        r = self.rows
        assert r is not None
        if r.thresh is None:
            return v
        assert self.feat_seeds is not None and r.pos_seeds is not None
        return _dropped(v, r.pos_seeds, self.feat_seeds, r.thresh)


class _LoRADelta(torch.autograd.Function):
    """Adds every participating adapter's delta to the base output in place.

    Inputs: plan, x [T, in], base_out [T, out] (modified in place and returned), A_1..A_n, B_1..B_n.
    Saves x, the S's and the weights; the dropout mask is recomputed in backward. The grouped path
    adds the weights' gradients to their `.grad` itself, with one batched add for all adapters,
    and gives autograd none: per-adapter gradients through autograd cost a handful of operators and
    an accumulation node per matrix, each a host dispatch (a kernel launch on a GPU).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, x: Tensor, base_out: Tensor, *weights: Tensor) -> Tensor:  # type: ignore[override]
        n = len(plan.ranks)
        if plan.path == "grouped":
            saved = _grouped_forward(plan, x, base_out)
        else:
            As = [w.to(x.dtype) for w in weights[:n]]
            Bs = [w.to(x.dtype) for w in weights[n:]]
            saved = _loop_forward(plan, x, base_out, As, Bs)
        ctx.mark_dirty(base_out)
        ctx.plan = plan
        ctx.save_for_backward(x, *saved, *weights)
        ctx.n_saved = len(saved)
        if plan.path == "grouped":
            ctx.weights = weights  # the parameters themselves: their .grad is accumulated here
        return base_out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        plan: _Plan = ctx.plan
        n = len(plan.ranks)
        x, *rest = ctx.saved_tensors
        saved, weights = rest[: ctx.n_saved], rest[ctx.n_saved :]
        need = ctx.needs_input_grad
        need_x, need_a, need_b = need[1], any(need[3 : 3 + n]), any(need[3 + n :])
        dy = grad_out.contiguous().to(x.dtype)
        if plan.path == "grouped":
            params = ctx.weights
            dx = _grouped_backward(plan, x, saved, dy, need_x, params[:n] if need_a else None,
                                   params[n:] if need_b else None)
            return (None, dx, dy if need[2] else None) + (None,) * (2 * n)
        As = [w.to(x.dtype) for w in weights[:n]]
        Bs = [w.to(x.dtype) for w in weights[n:]]
        dx, dA, dB = _loop_backward(plan, x, saved, dy, As, Bs, need_x, need_a, need_b)
        grads_a = [None if g is None else g.to(w.dtype) for g, w in zip(dA, weights[:n])]
        grads_b = [None if g is None else g.to(w.dtype) for g, w in zip(dB, weights[n:])]
        return (None, dx, dy if need[2] else None, *grads_a, *grads_b)


def _add_to_grads(params: list[Tensor], per_group: Tensor, plan: _Plan, rank_dim: int) -> None:
    """Add each participating group's block of `per_group` [groups, ...] (fp32; along `rank_dim` of
    a block, the entries past its adapter's rank are padding) to its adapter's `.grad`, with one
    batched add; a gradient not there yet (after `zero_grad(set_to_none=True)`) starts as a copy."""
    blocks = per_group.unbind(0)
    pieces: dict[int, Tensor] = {}
    for i, g in enumerate(plan.groups):
        if g.slot < 0:
            continue
        rank, block = plan.ranks[g.slot], blocks[i]
        if block.shape[rank_dim] != rank:
            block = block.narrow(rank_dim, 0, rank)
        pieces[g.slot] = block if g.slot not in pieces else pieces[g.slot] + block  # one adapter, two segments
    add_to, add = [], []
    for slot, piece in pieces.items():
        param = params[slot]
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = piece.clone()
        else:
            add_to.append(param.grad)
            add.append(piece)
    if add_to:
        torch._foreach_add_(add_to, add)


def _accumulate(store: list[Tensor | None], slot: int, value: Tensor) -> None:
    """Sum per-slot gradients (an adapter may own several segments)."""
    store[slot] = value if store[slot] is None else store[slot] + value


def _add_rows(out: Tensor, start: int, delta: Tensor) -> None:
    out[start : start + delta.shape[0]].add_(delta)


def _zeros_outside(dx: Tensor, groups: list[_Group]) -> None:
    """Zero the rows of dx that no participating group writes (groups are ordered)."""
    covered = 0
    for g in groups:
        if g.slot >= 0:
            dx[covered : g.start].zero_()
            covered = g.end
    dx[covered:].zero_()


# loop path: plain matmuls on each segment's rows.


def _loop_forward(plan: _Plan, x: Tensor, out: Tensor, As: list[Tensor], Bs: list[Tensor]) -> list[Tensor]:
    saved = []
    for g in plan.groups:
        xs = x[g.start : g.end]
        a_t = As[g.slot].t()
        if g.pos_seeds is not None:
            s = torch.mm(plan.dropped_rows(xs, g), a_t).mul_(1.0 / (1.0 - plan.dropouts[g.slot]))
        else:
            s = xs @ a_t
        b_t, scale = Bs[g.slot].t(), plan.scales[g.slot]
        if out.dtype == x.dtype:
            out[g.start : g.end].addmm_(s, b_t, alpha=scale)
        else:
            _add_rows(out, g.start, (s @ b_t).mul_(scale))
        saved.append(s)
    return saved


_Grads = tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]


def _loop_backward(
    plan: _Plan, x: Tensor, saved: list[Tensor], dy: Tensor, As: list[Tensor], Bs: list[Tensor],
    need_x: bool, need_a: bool, need_b: bool,
) -> _Grads:
    n = len(plan.ranks)
    dA: list[Tensor | None] = [None] * n
    dB: list[Tensor | None] = [None] * n
    dx = None
    if need_x:
        dx = torch.empty_like(x)
        _zeros_outside(dx, plan.groups)
    for g, s in zip(plan.groups, saved):
        dys = dy[g.start : g.end]
        scale, p = plan.scales[g.slot], plan.active_p(g)
        if need_b:  # (S^T dY)^T: about twice as fast as dY^T S for a skinny S
            _accumulate(dB, g.slot, torch.mm(s.t(), dys).mul_(scale).t())
        if not (need_a or need_x):
            continue
        dsq = torch.mm(dys, Bs[g.slot]).mul_(scale / (1.0 - p))  # dS / (1 - p)
        xs = x[g.start : g.end]
        if g.pos_seeds is None:
            if need_a:
                _accumulate(dA, g.slot, torch.mm(dsq.t(), xs))
            if dx is not None:
                torch.mm(dsq, As[g.slot], out=dx[g.start : g.end])
        elif need_a and dx is not None:  # both masked: one hash
            x_kept, dx_kept = plan.dropped_rows_pair(xs, torch.mm(dsq, As[g.slot]), g)
            _accumulate(dA, g.slot, torch.mm(dsq.t(), x_kept))
            dx[g.start : g.end] = dx_kept
        elif need_a:
            _accumulate(dA, g.slot, torch.mm(dsq.t(), plan.dropped_rows(xs, g)))
        elif dx is not None:
            dx[g.start : g.end] = plan.dropped_rows(torch.mm(dsq, As[g.slot]), g)
    return dx, dA, dB


# grouped path: torch._grouped_mm over the span from the first to the last participating row.
# A constant number of kernels whatever the number of adapters: the weights come stacked (kept
# stacked across calls, refreshed in place after a step; a gather at most), dropout is one pass over the span
# with a per-row threshold, the 1/(1-p) factors one multiply by a per-row table, and gap rows
# (segments not on this module) meet zero weights, so their delta is zero and is added as is.


def _grouped_forward(plan: _Plan, x: Tensor, out: Tensor) -> list[Tensor]:
    lo, hi = plan.span
    rows = plan.rows
    assert rows is not None
    s = torch._grouped_mm(plan.dropped(x[lo:hi]), plan.stack("a_t"), offs=rows.offs)  # [span, R]
    if rows.inv_keep is not None:
        s.mul_(rows.inv_keep)
    delta = torch._grouped_mm(s, plan.stack("b_t"), offs=rows.offs)  # scale folded into b_t
    out[lo:hi].add_(delta)
    return [s]


def _grouped_backward(
    plan: _Plan, x: Tensor, saved: list[Tensor], dy: Tensor, need_x: bool, params_a: list[Tensor] | None,
    params_b: list[Tensor] | None,
) -> Tensor | None:
    """dx (None unless `need_x`); the adapters' gradients are added to `params_a` (the A's) and
    `params_b` (the B's) where given (`_add_to_grads`)."""
    (s,) = saved
    lo, hi = plan.span
    rows = plan.rows
    assert rows is not None
    dys = dy[lo:hi]
    if params_b is not None:  # dB = scale * (S^T dY)^T per group: [groups, out, R]
        per_group = torch._grouped_mm(s.t(), dys, offs=rows.offs)  # [groups, R, out]
        d_b = per_group.new_empty((per_group.shape[0], per_group.shape[2], per_group.shape[1]), dtype=torch.float32)
        torch.mul(per_group.transpose(1, 2), rows.scales, out=d_b)  # scaled, in fp32 and laid out as B: one pass
        _add_to_grads(params_b, d_b, plan, rank_dim=1)
    dx = None
    if params_a is not None or need_x:
        dsq = torch._grouped_mm(dys, plan.stack("b"), offs=rows.offs)  # scale * dY B, [span, R]
        if rows.inv_keep is not None:
            dsq.mul_(rows.inv_keep)
        x_kept = None
        if need_x:
            dxs = torch._grouped_mm(dsq, plan.stack("a"), offs=rows.offs)  # [span, in]
            if params_a is not None:  # x and dx under one mask: one hash
                x_kept, dxs = plan.dropped_pair(x[lo:hi], dxs)
            else:
                dxs = plan.dropped(dxs)
            if lo == 0 and hi == x.shape[0]:
                dx = dxs
            else:
                dx = torch.empty_like(x)
                dx[:lo].zero_()
                dx[lo:hi].copy_(dxs)
                dx[hi:].zero_()
        if params_a is not None:
            x_kept = plan.dropped(x[lo:hi]) if x_kept is None else x_kept
            _add_to_grads(params_a, torch._grouped_mm(dsq.t(), x_kept, offs=rows.offs).float(), plan, rank_dim=0)
    return dx


# --------------------------------------------------------------------------------- the module


@dataclass(frozen=True)
class _AdapterSpec:
    rank: int
    alpha: float
    dropout: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


class BatchedLoRALinear(nn.Module):
    """A frozen base projection plus any number of LoRA adapters, each applied to its own rows."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        module_id: int,
        context: LoRAContext,
        path: str = "auto",
    ):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not 0 <= module_id < _MODULE_LIMIT:
            raise ValueError(f"module_id must be in [0, 2**31), got {module_id}")
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.module_id = module_id
        self.path = path
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._specs: dict[str, _AdapterSpec] = {}
        self._weights: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        """(A, B) per adapter, the same objects as in lora_A / lora_B: a ParameterDict lookup costs a
        few microseconds of host time, and every call needs every participating adapter's pair."""
        self._feat_seeds: dict[torch.device, Tensor] = {}
        self._stacked: _Stacked | None = None  # grouped path
        self._warned_fallback = False
        self.context = context  # shared by the stage; a plain object, so not a submodule
        context.register(module_id)

    def _device(self) -> torch.device:
        for t in list(self.base.parameters()) + list(self.base.buffers()):
            return t.device
        return torch.device("cpu")

    def add_adapter(
        self, name: str, rank: int, alpha: float, dropout: float, init_seed: int, rslora: bool = False
    ) -> None:
        """Add adapter `name`: A [rank, in] kaiming-uniform (as peft) from `init_seed`, B [out, rank] zeros,
        fp32; its delta is scaled by alpha / rank, or alpha / sqrt(rank) with `rslora`."""
        if name in self._specs:
            raise ValueError(f"adapter {name!r} already exists")
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.' (parameter key)")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        gen = torch.Generator().manual_seed(init_seed)
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        device = self._device()
        self.lora_A[name] = nn.Parameter(a.to(device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        self._specs[name] = _AdapterSpec(rank, float(alpha), float(dropout), bool(rslora))
        self._weights[name] = (self.lora_A[name], self.lora_B[name])

    def remove_adapter(self, name: str) -> None:
        if name not in self._specs:
            raise KeyError(f"adapter {name!r} is not on this module")
        del self._specs[name]
        del self._weights[name]
        self._stacked = None
        del self.lora_A[name]
        del self.lora_B[name]

    def adapters(self) -> list[str]:
        return list(self._specs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, module_id={self.module_id}, adapters={self.adapters()}"

    def _feature_seeds(self, device: torch.device) -> Tensor:
        seeds = self._feat_seeds.get(device)
        if seeds is None:
            seeds = self._feat_seeds[device] = _as_int32(_feature_seeds(self.in_features, device))
        return seeds

    def resolve_path(self, x: Tensor) -> str:
        """The path used for input x. "auto": grouped on CUDA where grouped_mm applies, else loop.

        On CPU, torch's grouped_mm is itself a loop of matmuls, so it only adds the cost of
        stacking the weights (measured in benchmarks/lora_op.py); "auto" uses the loop path there.
        An explicit "grouped" where grouped_mm cannot run falls back to loop with a warning.
        """
        if self.path == "loop":
            return "loop"
        applies = grouped_applies(x, self.in_features, self.out_features)
        if self.path == "grouped":
            if not applies and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"torch._grouped_mm cannot run for {x.dtype} on {x.device} with in={self.in_features}, "
                    f"out={self.out_features}; using the loop path",
                    stacklevel=2,
                )
            return "grouped" if applies else "loop"
        return "grouped" if applies and x.device.type == "cuda" else "loop"

    def forward(self, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """The base projection of x [rows, L, in] plus each adapter's delta on its rows.

        `base_out`, where given, is the base projection already computed by the caller as
        [rows * L, out] (`FusedBase`: one GEMM for the projections that read the same input); the
        deltas are added to it in place.
        """
        batch = self.context.batch
        if batch is None or not any(seg.adapter in self._specs for seg in batch.segments):
            return self.base(x) if base_out is None else base_out.view(*x.shape[:-1], -1)
        if x.dim() != 3 or x.shape[0] != batch.rows or x.shape[1] != batch.seq_len:
            raise ValueError(
                f"input {tuple(x.shape)} does not match the batch: {batch.rows} rows of {batch.seq_len} tokens"
            )
        plan, names = self._plan(batch, x)
        if not plan.groups:  # the participating segments are all empty
            return self.base(x) if base_out is None else base_out.view(*x.shape[:-1], -1)
        x2d = x.reshape(-1, self.in_features).contiguous()
        out = self.base(x2d) if base_out is None else base_out
        pairs = [self._weights[n] for n in names]
        weights = [a for a, _ in pairs] + [b for _, b in pairs]
        out = _LoRADelta.apply(plan, x2d, out, *weights)
        return out.view(x.shape[0], x.shape[1], -1)

    def _plan(self, batch: LoRABatch, x: Tensor) -> tuple[_Plan, list[str]]:
        seq = batch.seq_len
        path = self.resolve_path(x)
        names: list[str] = []
        slot_of: dict[str, int] = {}
        groups: list[_Group] = []
        pos_all: Tensor | None = None
        for seg in batch.segments:
            if seg.row_end == seg.row_start:
                continue
            spec = self._specs.get(seg.adapter)
            if spec is None:
                groups.append(_Group(seg.row_start * seq, seg.row_end * seq, -1))
                continue
            slot = slot_of.get(seg.adapter)
            if slot is None:
                slot = slot_of[seg.adapter] = len(names)
                names.append(seg.adapter)
            start, end = seg.row_start * seq, seg.row_end * seq
            drops = batch.training and spec.dropout > 0.0
            pos = thresh = None
            if drops and path == "loop":
                if pos_all is None:
                    pos_all = self.context.position_seeds(x.device, self.module_id)
                pos = pos_all[start:end]
                thresh = self.context.cached(
                    ("thresh", x.device, end - start, spec.dropout),
                    lambda: torch.full((end - start,), _threshold(spec.dropout), dtype=torch.int32, device=x.device))
            groups.append(_Group(start, end, slot, pos, drops, thresh))
        # Gaps before the first and after the last participating segment are simply left out.
        while groups and groups[0].slot < 0:
            groups.pop(0)
        while groups and groups[-1].slot < 0:
            groups.pop()
        specs = [self._specs[n] for n in names]
        if path == "loop":
            groups = [g for g in groups if g.slot >= 0]
        else:
            groups = _merge_gaps(groups)
        has_dropout = any(g.drops for g in groups)
        plan = _Plan(
            path=path,
            groups=groups,
            ranks=[s.rank for s in specs],
            scales=[s.scale for s in specs],
            dropouts=[s.dropout for s in specs],
            feat_seeds=self._feature_seeds(x.device) if has_dropout else None,
        )
        if path == "grouped" and groups:
            self._prepare_grouped(plan, names, x)
        return plan, names

    def _padded_rank(self) -> int:
        """The largest rank on this module rounded up to a multiple of 8 (grouped_mm alignment)."""
        return -(-max(s.rank for s in self._specs.values()) // 8) * 8

    def _stacked_weights(self, dtype: torch.dtype, device: torch.device) -> _Stacked:
        """Every adapter's weights for the grouped path, refreshed where A or B changed."""
        names = tuple(self._specs)
        rank_pad = self._padded_rank()
        key = (names, dtype, device, rank_pad)
        st = self._stacked
        if st is None or st.key != key:
            n, zeros = len(names), functools.partial(torch.zeros, dtype=dtype, device=device)
            st = _Stacked(key, [None] * n, a_t=zeros(n + 1, self.in_features, rank_pad),
                          a=zeros(n + 1, rank_pad, self.in_features), b_t=zeros(n + 1, rank_pad, self.out_features),
                          b=zeros(n + 1, self.out_features, rank_pad))
            st.adapters = {layout: getattr(st, layout).narrow(0, 0, n) for layout in ("a_t", "a", "b_t", "b")}
            st.index = {name: i for i, name in enumerate(names)}
            self._stacked = st
        pairs = [self._weights[n] for n in names]
        As, Bs = [a for a, _ in pairs], [b for _, b in pairs]
        versions = [(a._version, b._version, a.data_ptr(), b.data_ptr()) for a, b in zip(As, Bs)]
        stale = [i for i, v in enumerate(versions) if st.versions[i] != v]
        if stale:
            specs = [self._specs[names[i]] for i in stale]
            with torch.no_grad():
                a_slots, b_slots = st.a.unbind(0), st.b.unbind(0)
                torch._foreach_copy_([a_slots[i] if sp.rank == rank_pad else a_slots[i][: sp.rank]
                                      for i, sp in zip(stale, specs)], [As[i] for i in stale])
                scaled = torch._foreach_mul([Bs[i] for i in stale], [sp.scale for sp in specs])
                torch._foreach_copy_([b_slots[i] if sp.rank == rank_pad else b_slots[i][:, : sp.rank]
                                      for i, sp in zip(stale, specs)], scaled)
                st.a_t.copy_(st.a.transpose(1, 2))
                st.b_t.copy_(st.b.transpose(1, 2))
            for i in stale:
                st.versions[i] = versions[i]
        return st

    def _prepare_grouped(self, plan: _Plan, names: list[str], x: Tensor) -> None:
        """The grouped path's stacked weights (refreshed where they changed) and per-row tables
        (cached per batch)."""
        plan.stacked = self._stacked_weights(x.dtype, x.device)
        index = plan.stacked.index
        slots = tuple(index[names[g.slot]] if g.slot >= 0 else len(index) for g in plan.groups)
        if slots != tuple(range(len(index))):
            plan.slots = self.context.cached(("slots", x.device, slots),
                                             lambda: host_to_device(torch.tensor(slots, dtype=torch.int64), x.device))
        lo, hi = plan.span
        layout = tuple((g.start, g.end, plan.scales[g.slot] if g.slot >= 0 else 0.0, plan.active_p(g), g.drops)
                       for g in plan.groups)
        offs, scales, thresh, inv_keep = self.context.cached(("grouped", x.device, layout),
                                                             lambda: _span_tables(plan, x.device))
        pos_seeds = None
        if thresh is not None:
            pos_seeds = self.context.position_seeds(x.device, self.module_id)[lo:hi]
        plan.rows = _SpanRows(offs, scales, thresh, inv_keep, pos_seeds)


def _span_tables(plan: _Plan, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The grouped path's offsets, per-group scales and per-row dropout tables, on `device`."""
    lo = plan.groups[0].start
    lengths = torch.tensor([g.end - g.start for g in plan.groups])
    offs = torch.tensor([g.end - lo for g in plan.groups], dtype=torch.int32)
    scales = torch.tensor([plan.scales[g.slot] if g.slot >= 0 else 0.0 for g in plan.groups], dtype=torch.float32)
    thresh = inv_keep = None
    if any(g.drops for g in plan.groups):
        per_group = [_threshold(plan.dropouts[g.slot]) if g.drops else _I32_MIN for g in plan.groups]
        thresh = host_to_device(torch.repeat_interleave(torch.tensor(per_group, dtype=torch.int32), lengths), device)
        keep = torch.tensor([1.0 / (1.0 - plan.active_p(g)) for g in plan.groups], dtype=torch.float32)
        inv_keep = host_to_device(torch.repeat_interleave(keep, lengths), device)[:, None]
    return host_to_device(offs, device), host_to_device(scales, device).view(-1, 1, 1), thresh, inv_keep


def _merge_gaps(groups: list[_Group]) -> list[_Group]:
    merged: list[_Group] = []
    for g in groups:
        if merged and g.slot < 0 and merged[-1].slot < 0:
            merged[-1] = _Group(merged[-1].start, g.end, -1)
        else:
            merged.append(g)
    return merged
