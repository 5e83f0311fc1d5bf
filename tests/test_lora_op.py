"""The batched LoRA operator against an independent plain-autograd reference.

The reference computes, for each adapter's rows separately,
``x_i @ W^T + b + scale_i * (x_i * M_i / (1 - p_i)) @ A_i^T @ B_i^T`` with ordinary autograd, where
M_i comes from `dropout_keep_mask` (the mask function is the definition of dropout; its properties
are tested on their own below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mlora_pp import lora
from mlora_pp.lora import BatchedLoRALinear, LoRABatch, LoRAContext, LoRASegment, dropout_keep_mask

IN, OUT, SEQ, MODULE_ID = 32, 24, 5, 11


@dataclass(frozen=True)
class Spec:
    name: str
    rank: int
    alpha: float
    dropout: float


SPECS = (Spec("a", 4, 8.0, 0.1), Spec("b", 8, 4.0, 0.3), Spec("c", 12, 24.0, 0.0))
# (adapter, rows); "ghost" is a job in the micro-batch that does not target this module.
LAYOUTS = {
    "gap_in_middle": (("a", 2), ("ghost", 1), ("b", 3), ("c", 1)),
    "gap_at_ends": (("ghost", 2), ("c", 2), ("a", 1), ("b", 2), ("ghost", 1)),
    "every_adapter_in_order": (("a", 2), ("b", 1), ("c", 3)),  # the grouped path's stacks as they are
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base(bias: bool, dtype: torch.dtype = torch.float32, in_f: int = IN, out_f: int = OUT) -> nn.Linear:
    base = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=_gen(100)) / math.sqrt(in_f))
        if bias:
            base.bias.copy_(torch.randn(out_f, generator=_gen(101)))
    return base.to(dtype).requires_grad_(False)


def _module(path: str, base: nn.Module, specs=SPECS, in_f: int = IN, out_f: int = OUT) -> BatchedLoRALinear:
    ctx = LoRAContext()
    m = BatchedLoRALinear(base, in_f, out_f, module_id=MODULE_ID, context=ctx, path=path)
    for i, s in enumerate(specs):
        m.add_adapter(s.name, s.rank, s.alpha, s.dropout, init_seed=1000 + i)
        with torch.no_grad():  # B is zero at init; random B exercises every gradient
            m.lora_B[s.name].copy_(torch.randn(out_f, s.rank, generator=_gen(2000 + i)) * 0.5)
    return m


def _batch(layout, training: bool = True, seq: int = SEQ) -> LoRABatch:
    segments, row = [], 0
    for j, (name, rows) in enumerate(layout):
        keys = tuple(10_000 * (j + 1) + k for k in range(rows))
        segments.append(LoRASegment(name, row, row + rows, keys))
        row += rows
    return LoRABatch(tuple(segments), seq_len=seq, training=training)


def _reference(base: nn.Linear, module: BatchedLoRALinear, batch: LoRABatch, x: torch.Tensor, dy: torch.Tensor):
    """Output and grads of x, A's, B's by plain autograd, one adapter's rows at a time (fp32)."""
    specs = {s: module._specs[s] for s in module.adapters()}
    W = base.weight.detach().float()
    b = None if base.bias is None else base.bias.detach().float()
    xr = x.detach().float().clone().requires_grad_(True)
    As = {n: module.lora_A[n].detach().float().clone().requires_grad_(True) for n in specs}
    Bs = {n: module.lora_B[n].detach().float().clone().requires_grad_(True) for n in specs}
    seq, feat = batch.seq_len, xr.shape[-1]
    outs = []
    for seg in batch.segments:
        xi = xr[seg.row_start : seg.row_end].reshape(-1, feat)
        yi = xi @ W.t() + (0 if b is None else b)
        spec = specs.get(seg.adapter)
        if spec is not None:
            p = spec.dropout if batch.training else 0.0
            keep = dropout_keep_mask(torch.tensor(seg.dropout_keys), MODULE_ID, seq, feat, p)
            xd = xi * keep / (1 - p)
            yi = yi + (spec.alpha / spec.rank) * (xd @ As[seg.adapter].t() @ Bs[seg.adapter].t())
        outs.append(yi.reshape(seg.row_end - seg.row_start, seq, -1))
    y = torch.cat(outs)
    y.backward(dy.float())
    return y.detach(), xr.grad, {n: a.grad for n, a in As.items()}, {n: b.grad for n, b in Bs.items()}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol_rel: float = 1e-6) -> None:
    atol = atol_rel * float(expected.detach().abs().max().clamp_min(1e-30))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _run_and_compare(path: str, layout, dropouts: bool, bias: bool, training: bool = True, chunk: int | None = None):
    specs = SPECS if dropouts else tuple(Spec(s.name, s.rank, s.alpha, 0.0) for s in SPECS)
    base = _base(bias)
    module = _module(path, base, specs)
    batch = _batch(layout, training)
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1)).requires_grad_(True)
    dy = torch.randn(batch.rows, SEQ, OUT, generator=_gen(2))
    module.context.batch = batch
    y = module(x)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = _reference(base, module, batch, x, dy)
    _close(y, y_ref)
    _close(x.grad, dx_ref)
    for name in module.adapters():
        _close(module.lora_A[name].grad, dA_ref[name])
        _close(module.lora_B[name].grad, dB_ref[name])
    assert base.weight.grad is None


# ------------------------------------------------------------------------------ operator vs reference


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dropouts", [False, True], ids=["p0", "p0.1-0.3"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(path, layout, dropouts, bias):
    _run_and_compare(path, LAYOUTS[layout], dropouts, bias)


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_matches_reference_when_mask_is_chunked(path, monkeypatch):
    monkeypatch.setattr(lora, "_ELEMENTS_PER_CHUNK", 3 * IN)  # 3 rows per chunk, uneven split
    _run_and_compare(path, LAYOUTS["gap_in_middle"], dropouts=True, bias=True)


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_same_adapter_in_two_segments(path):
    _run_and_compare(path, (("a", 1), ("b", 2), ("a", 2), ("ghost", 1), ("c", 1)), dropouts=True, bias=False)


def test_grouped_weights_refresh_only_where_a_step_changed_them():
    """Ranks 16 (the padded rank itself) and 8, every adapter in order; after a step of adapter "a"
    alone, "a" computes with its new weights and "b" with its old ones, as the reference does."""
    specs = (Spec("a", 16, 32.0, 0.1), Spec("b", 8, 8.0, 0.0))
    base = _base(False)
    module = _module("grouped", base, specs)
    batch = _batch((("a", 2), ("b", 2)))
    module.context.batch = batch
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1))
    dy = torch.randn(batch.rows, SEQ, OUT, generator=_gen(2))
    for step in range(3):
        y = module(x)
        y.backward(dy)
        y_ref, _, dA_ref, dB_ref = _reference(base, module, batch, x, dy)
        _close(y, y_ref)
        for name in ("a", "b"):
            _close(module.lora_A[name].grad, dA_ref[name])
            _close(module.lora_B[name].grad, dB_ref[name])
        stacked = module._stacked
        assert stacked is not None and stacked.key[0] == ("a", "b") and stacked.key[3] == 16
        torch.optim.SGD([module.lora_A["a"], module.lora_B["a"]], lr=0.1).step()  # bumps a's versions only
        module.zero_grad(set_to_none=True)
        before_b = stacked.b[1].clone()
        module(x)
        assert torch.equal(stacked.b[1], before_b) and module._stacked is stacked  # b's slot kept, in place


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_eval_batch_disables_dropout(path):
    _run_and_compare(path, LAYOUTS["gap_in_middle"], dropouts=True, bias=True, training=False)
    # and the output really differs from the training one (dropout was on there)
    base = _base(False)
    module = _module(path, base)
    x = torch.randn(7, SEQ, IN, generator=_gen(3))
    module.context.batch = _batch(LAYOUTS["gap_in_middle"], training=True)
    train = module(x)
    module.context.batch = _batch(LAYOUTS["gap_in_middle"], training=False)
    assert not torch.allclose(train, module(x))


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_first_layer_input_without_grad(path):
    """Hidden states from a frozen embedding need no grad; A and B still get theirs."""
    base = _base(True)
    module = _module(path, base)
    batch = _batch(LAYOUTS["gap_at_ends"])
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1))
    dy = torch.randn(batch.rows, SEQ, OUT, generator=_gen(2))
    module.context.batch = batch
    module(x).backward(dy)
    _, _, dA_ref, dB_ref = _reference(base, module, batch, x, dy)
    for name in module.adapters():
        _close(module.lora_A[name].grad, dA_ref[name])
        _close(module.lora_B[name].grad, dB_ref[name])


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_no_batch_or_no_participant_is_base_only(path):
    base = _base(True)
    module = _module(path, base)
    x = torch.randn(3, SEQ, IN, generator=_gen(4))
    module.context.batch = None
    assert torch.equal(module(x), base(x))
    module.context.batch = _batch((("ghost", 2), ("other", 1)))
    assert torch.equal(module(x), base(x))


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_autograd(path, mode):
    base = _base(True)
    module = _module(path, base)
    batch = _batch(LAYOUTS["gap_at_ends"])
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1))
    module.context.batch = batch
    with getattr(torch, mode)():
        y = module(x)
    y_ref, *_ = _reference(base, module, batch, x, torch.zeros(batch.rows, SEQ, OUT))
    _close(y, y_ref)


def test_empty_participating_segment_is_base_only():
    base = _base(True)
    module = _module("loop", base)
    x = torch.randn(2, SEQ, IN, generator=_gen(4))
    module.context.batch = LoRABatch(
        (LoRASegment("a", 0, 0, ()), LoRASegment("ghost", 0, 2, (1, 2))), seq_len=SEQ, training=True
    )
    assert torch.equal(module(x), base(x))


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_bf16_input_with_fp32_weights(path):
    base = _base(True, torch.bfloat16)
    module = _module(path, base)
    batch = _batch(LAYOUTS["gap_in_middle"])
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1)).bfloat16().requires_grad_(True)
    dy = torch.randn(batch.rows, SEQ, OUT, generator=_gen(2)).bfloat16()
    module.context.batch = batch
    y = module(x)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    y_ref, dx_ref, dA_ref, dB_ref = _reference(base, module, batch, x, dy)
    _close(y, y_ref, rtol=2e-2, atol_rel=2e-2)
    _close(x.grad, dx_ref, rtol=2e-2, atol_rel=2e-2)
    for name in module.adapters():
        assert module.lora_A[name].grad.dtype == torch.float32
        _close(module.lora_A[name].grad, dA_ref[name], rtol=2e-2, atol_rel=2e-2)
        _close(module.lora_B[name].grad, dB_ref[name], rtol=2e-2, atol_rel=2e-2)


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_saves_only_x_and_small_tensors(path):
    """No mask and no dropped copy of x is kept for backward: the only T x in tensor saved is x."""
    base = _base(True)
    module = _module(path, base)
    batch = _batch(LAYOUTS["gap_in_middle"])
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1)).requires_grad_(True)
    module.context.batch = batch
    tokens = batch.rows * SEQ
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        saved.append(t)
        return t.detach()  # a saved output kept as itself would keep its graph alive (a cycle)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    shares_x = [t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved]
    assert any(shares_x), "x itself should be saved"
    assert not any(t.dtype == torch.bool for t in saved)
    # Everything else is a weight or an S (T x padded rank): nothing as large as T x in.
    for t, is_x in zip(saved, shares_x):
        assert is_x or t.numel() < tokens * IN, (t.shape, t.dtype)
    y.sum().backward()


def test_paths_agree_and_auto_picks_loop_on_cpu(monkeypatch):
    calls = {"n": 0}
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    results = {}
    for path in ("loop", "grouped", "auto"):
        calls["n"] = 0
        module = _module(path, _base(True))
        batch = _batch(LAYOUTS["gap_in_middle"])
        module.context.batch = batch
        x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1)).requires_grad_(True)
        y = module(x)
        y.pow(2).sum().backward()
        results[path] = (y, x.grad, module.lora_A["b"].grad)
        assert (calls["n"] > 0) == (path == "grouped")  # fwd: 2 calls, bwd: 4 calls
        if path == "auto":  # grouped_mm works on CPU but is a loop of matmuls there: no gain
            assert lora.grouped_applies(x, IN, OUT)
            assert module.resolve_path(x) == "loop"
    for path in ("grouped", "auto"):
        for got, want in zip(results[path], results["loop"]):
            _close(got, want)


@pytest.mark.parametrize("path", ["auto", "grouped"])
def test_unaligned_features_fall_back_to_loop(path):
    in_f, out_f = 30, 22  # rows not 16-byte aligned: grouped_mm refuses them
    base = _base(False, in_f=in_f, out_f=out_f)
    module = _module(path, base, in_f=in_f, out_f=out_f)
    batch = _batch(LAYOUTS["gap_in_middle"])
    x = torch.randn(batch.rows, SEQ, in_f, generator=_gen(1)).requires_grad_(True)
    assert not lora.grouped_applies(x, in_f, out_f)
    module.context.batch = batch
    dy = torch.randn(batch.rows, SEQ, out_f, generator=_gen(2))
    if path == "grouped":
        with pytest.warns(UserWarning, match="loop path"):
            y = module(x)
    else:
        y = module(x)
    y.backward(dy)
    _, dx_ref, dA_ref, _ = _reference(base, module, batch, x, dy)
    _close(x.grad, dx_ref)
    _close(module.lora_A["a"].grad, dA_ref["a"])


def test_wrong_input_shape_is_rejected():
    module = _module("loop", _base(False))
    module.context.batch = _batch(LAYOUTS["gap_in_middle"])
    with pytest.raises(ValueError, match="does not match"):
        module(torch.randn(3, SEQ, IN))


# ------------------------------------------------------------------------------------- adapters


def test_adapter_init_is_peft_like_and_seeded():
    module = _module("loop", _base(False), specs=())
    module.add_adapter("x", 8, 16.0, 0.0, init_seed=7)
    module.add_adapter("y", 4, 8.0, 0.0, init_seed=8)
    other = _module("loop", _base(False), specs=())
    other.add_adapter("x", 8, 16.0, 0.0, init_seed=7)  # alone, no "y": same A
    a = module.lora_A["x"]
    assert a.shape == (8, IN) and a.dtype == torch.float32 and a.requires_grad
    assert torch.equal(a, other.lora_A["x"])
    assert not torch.equal(module.lora_A["x"][:4], module.lora_A["y"])
    assert a.abs().max() <= 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert a.abs().max() > 0.8 / math.sqrt(IN)
    assert torch.equal(module.lora_B["x"], torch.zeros(OUT, 8))
    names = {n for n, _ in module.named_parameters()}
    assert {"lora_A.x", "lora_B.x", "lora_A.y", "lora_B.y"} <= names
    assert module.adapters() == ["x", "y"]
    module.remove_adapter("x")
    assert module.adapters() == ["y"] and "lora_A.x" not in dict(module.named_parameters())
    with pytest.raises(KeyError):
        module.remove_adapter("x")
    with pytest.raises(ValueError):
        module.add_adapter("y", 4, 8.0, 0.0, init_seed=1)
    with pytest.raises(ValueError):
        module.add_adapter("z", 4, 8.0, 1.0, init_seed=1)


def test_batch_validation():
    with pytest.raises(ValueError, match="cover"):
        LoRABatch((LoRASegment("a", 1, 2, (1,)),), seq_len=4, training=True)
    with pytest.raises(ValueError, match="cover"):
        LoRABatch((LoRASegment("a", 0, 2, (1, 2)), LoRASegment("b", 1, 3, (3, 4))), seq_len=4, training=True)
    with pytest.raises(ValueError, match="dropout keys"):
        LoRASegment("a", 0, 2, (1,))
    with pytest.raises(ValueError, match="2\\*\\*62"):
        LoRASegment("a", 0, 1, (1 << 62,))
    with pytest.raises(ValueError, match="2\\*\\*62"):
        LoRASegment("a", 0, 1, (-1,))
    assert _batch(LAYOUTS["gap_at_ends"]).rows == 8


# ------------------------------------------------------------------------------ the dropout mask


def _fraction_within(mask: torch.Tensor, p: float, sigmas: float = 5.0) -> None:
    n = mask.numel()
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) <= sigmas * math.sqrt(p * (1 - p) / n), (keep, 1 - p)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_mask_keep_fraction(p):
    keys = torch.arange(16, dtype=torch.int64) * 7919 + 3
    mask = dropout_keep_mask(keys, 5, 16, 512, p)
    assert mask.shape == (16 * 16, 512) and mask.dtype == torch.bool
    _fraction_within(mask, p)
    _fraction_within(mask[:, 0], p)  # per feature column and per position row too
    _fraction_within(mask[0], p)


def test_mask_zero_p_keeps_everything():
    mask = dropout_keep_mask(torch.tensor([1, 2]), 0, 3, 8, 0.0)
    assert mask.shape == (6, 8) and bool(mask.all())


def test_mask_differs_across_modules_rows_positions_features():
    p = 0.5
    keys = torch.tensor([1, 2], dtype=torch.int64)
    m1 = dropout_keep_mask(keys, 1, 8, 256, p)
    m2 = dropout_keep_mask(keys, 2, 8, 256, p)

    def agree(a, b):
        return (a == b).float().mean().item()

    # independent masks with p = 0.5 agree on about half the elements
    assert abs(agree(m1, m2) - 0.5) < 0.05
    assert abs(agree(m1[:8], m1[8:]) - 0.5) < 0.05  # row 1 vs row 2
    assert abs(agree(m1[0], m1[1]) - 0.5) < 0.1  # position 0 vs 1
    assert abs(agree(m1[:, :128], m1[:, 128:]) - 0.5) < 0.05  # feature halves
    assert abs(agree(m1[:, :-1], m1[:, 1:]) - 0.5) < 0.05  # neighbouring features
    # keys that differ only in their high 32 bits, and a key near 2**62, work and differ
    hi = dropout_keep_mask(torch.tensor([1 + (1 << 32), (1 << 62) - 1]), 1, 8, 256, p)
    assert abs(agree(hi[:8], m1[:8]) - 0.5) < 0.05
    _fraction_within(hi, p)


def test_mask_is_invariant_to_padding_fusion_and_order():
    keys = torch.tensor([5, 99, 123456789012], dtype=torch.int64)
    short = dropout_keep_mask(keys, 3, 7, 64, 0.3).reshape(3, 7, 64)
    long = dropout_keep_mask(keys, 3, 12, 64, 0.3).reshape(3, 12, 64)
    assert torch.equal(short, long[:, :7])
    alone = [dropout_keep_mask(keys[i : i + 1], 3, 7, 64, 0.3).reshape(7, 64) for i in range(3)]
    assert torch.equal(short, torch.stack(alone))
    flipped = dropout_keep_mask(keys.flip(0), 3, 7, 64, 0.3).reshape(3, 7, 64)
    assert torch.equal(flipped, short.flip(0))


def test_mask_is_deterministic_and_pinned():
    keys = torch.tensor([0, 1, (1 << 62) - 1], dtype=torch.int64)
    a = dropout_keep_mask(keys, 7, 4, 32, 0.25)
    b = dropout_keep_mask(keys.clone(), 7, 4, 32, 0.25)
    assert torch.equal(a, b)
    # Pinned so an accidental change of the hash (which would change every run's dropout) is caught.
    weights = torch.arange(a.numel(), dtype=torch.int64).reshape(a.shape) % 9973
    assert (int(a.sum()), int((a * weights).sum())) == PINNED_MASK


PINNED_MASK = (291, 56120)


def test_grouped_weight_casts_follow_optimizer_updates():
    """The grouped path caches compute-dtype copies of A and B; every optimizer kind must invalidate them."""
    from mlora_pp.config import JobConfig
    from mlora_pp.job import AdapterJob

    torch.manual_seed(0)
    module = _module("grouped", _base(False))
    batch = _batch(LAYOUTS["gap_in_middle"])
    module.context.batch = batch
    x = torch.randn(batch.rows, SEQ, IN, generator=_gen(1))
    for fused in (False, True):
        params = list(module.parameters())
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=0.1, fused=fused)
        job = AdapterJob(config=JobConfig(name="j", data="d.jsonl"), examples=[], plans=[], seed=0, optimizer=opt)
        module(x).square().sum().backward()
        job.optimizer_step()
        y_ref, *_ = _reference(_base(False), module, batch, x, torch.zeros(batch.rows, SEQ, OUT))
        _close(module(x), y_ref)


# ----------------------------------------------------------------------- compiled dropout kernel


@pytest.fixture
def compiled(monkeypatch):
    """The compiled dropout kernel on (the suite turns it off, see conftest.py); fails on fallback."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("gcc")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    monkeypatch.setenv("MLORA_PP_COMPILE", "1")
    monkeypatch.setattr(lora, "_compiled_drop_span", [])
    monkeypatch.setattr(lora, "_compiled_drop_span_pair", [])
    yield
    assert lora._compiled_drop_span and lora._compiled_drop_span[0] is not None, "fell back to the eager hash"
    assert lora._compiled_drop_span_pair and lora._compiled_drop_span_pair[0] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_dropout_kernel_gives_the_eager_bits(compiled, dtype):
    g = _gen(5)
    for rows, feats in ((7, 32), (130, 512), (3, 1024)):
        v = torch.randn(rows, feats, generator=g).to(dtype)
        pos = torch.randint(-(2**31), 2**31 - 1, (rows,), generator=g, dtype=torch.int32)
        feat = lora._as_int32(lora._feature_seeds(feats, "cpu"))
        thresh = torch.tensor([lora._threshold(0.3)] * (rows - 1) + [lora._I32_MIN], dtype=torch.int32)
        got = lora._dropped(v, pos, feat, thresh)
        assert torch.equal(got, lora._drop_span(v, pos, feat, thresh))
        assert torch.equal(got[-1], v[-1])  # _I32_MIN keeps the whole row
        w = torch.randn(rows, feats, generator=g).to(dtype)
        pair = lora._dropped_pair(v, w, pos, feat, thresh)  # backward's input and input gradient
        assert torch.equal(pair[0], got) and torch.equal(pair[1], lora._drop_span(w, pos, feat, thresh))
    assert lora.warm_up_dropout("cpu", dtype) < 60


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_matches_reference_with_compiled_dropout(compiled, path):
    _run_and_compare(path, LAYOUTS["gap_in_middle"], dropouts=True, bias=True)


def test_a_failed_compile_warns_in_one_line_and_gives_the_eager_bits(monkeypatch):
    def broken(*args):
        raise RuntimeError("C++ compile error\n" + "compiler output\n" * 50)

    monkeypatch.setattr(lora, "_compiled_drop_span", [broken])
    monkeypatch.setattr(lora, "_compiled_drop_span_pair", [broken])
    g = _gen(6)
    v = torch.randn(9, 32, generator=g)
    pos = torch.randint(-(2**31), 2**31 - 1, (9,), generator=g, dtype=torch.int32)
    feat = lora._as_int32(lora._feature_seeds(32, "cpu"))
    thresh = torch.full((9,), lora._threshold(0.3), dtype=torch.int32)
    with pytest.warns(UserWarning) as caught:
        got = lora._dropped(v, pos, feat, thresh)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "C++ compile error" in str(caught[0].message)
    assert torch.equal(got, lora._drop_span(v, pos, feat, thresh))
    assert lora._compiled_drop_span == [None] and lora._compiled_drop_span_pair == [None]  # eager from now on
    pair = lora._dropped_pair(v, v + 1, pos, feat, thresh)
    assert torch.equal(pair[0], got) and torch.equal(pair[1], lora._drop_span(v + 1, pos, feat, thresh))


def test_grouped_path_on_a_stage_adds_micro_batches_gradients_like_the_loop_path(tmp_path):
    """A whole stage, two micro-batches into the same gradients (the grouped path adds them to
    `.grad` itself), with and without recomputation in backward; ranks 16/8/4, one adapter in two
    segments, adapters on fewer projections. The loop path, checked against plain autograd above,
    is the reference."""
    from mlora_pp.model import build_stage
    from mlora_pp.profiling import _layers_only
    from mlora_pp.tiny import make_tiny_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
    segments = (LoRASegment("j0", 0, 2, (1, 2)), LoRASegment("j1", 2, 3, (3,)), LoRASegment("j0", 3, 4, (4,)),
                LoRASegment("j2", 4, 6, (5, 6)))
    batch = LoRABatch(segments, seq_len=8, training=True)
    grads = {}
    for path, recompute in (("loop", False), ("grouped", False), ("grouped", True)):
        stage = build_stage(model, lora_path=path)
        stage.recompute = recompute
        for j, rank in enumerate((16, 8, 4)):
            stage.add_adapter(f"j{j}", rank, 2 * rank, 0.1, targets[: 7 - 2 * j], seed=j)
        with torch.no_grad():  # B is zero at init; random B exercises every gradient
            for i, p in enumerate(stage.adapter_parameters(n) for n in ("j0", "j1", "j2")):
                for k, q in enumerate(p):
                    q.copy_(torch.randn(q.shape, generator=_gen(100 * i + k)) * 0.1)
        hidden = torch.randn(6, 8, 64, generator=_gen(1)).requires_grad_(True)
        for _ in range(2):
            with _layers_only(stage):
                stage(hidden, batch).square().sum().backward()
        grads[(path, recompute)] = {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}
        grads[(path, recompute)]["input"] = hidden.grad
    want = grads[("loop", False)]
    assert len(want) == 1 + 2 * 2 * (7 + 5 + 3)
    for key in (("grouped", False), ("grouped", True)):
        assert set(grads[key]) == set(want), key
        for name, g in want.items():
            _close(grads[key][name], g)
