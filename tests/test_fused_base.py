"""One base GEMM for q/k/v and one for gate/up (`mlora_pp.model.FusedBase`).

Against a stage with one GEMM a projection, built from the same files: the forward is the same
dot products, so the same bits; the input gradient is one GEMM over the concatenated weights
instead of a sum of three (or two), so equal within rounding. (Against transformers and peft the
fused stage is checked in test_model.py, where `build_stage` fuses by default.)
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlora_pp.lora import LoRABatch, LoRASegment
from mlora_pp.model import build_stage
from mlora_pp.tiny import make_tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [("a", 4, 8.0, 0.1, ["q_proj", "v_proj"]), ("b", 8, 16.0, 0.0, ALL), ("c", 6, 6.0, 0.05, ["k_proj", "up_proj"])]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, layers=2, seed=7)


def _stage(model_dir, fuse: bool, dtype: str = "float32"):
    stage = build_stage(model_dir, dtype=dtype, fuse_projections=fuse)
    for name, rank, alpha, dropout, targets in ADAPTERS:
        stage.add_adapter(name, rank, alpha, dropout, targets, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in stage.lora_modules().values():
            for name in module.adapters():
                module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=gen) * 0.1)
    return stage


def _batch(rows_per_adapter: int = 2, seq: int = 9) -> LoRABatch:
    segments = tuple(LoRASegment(name, i * rows_per_adapter, (i + 1) * rows_per_adapter,
                                 tuple(range(i * rows_per_adapter, (i + 1) * rows_per_adapter)))
                     for i, (name, *_) in enumerate(ADAPTERS))
    return LoRABatch(segments, seq_len=seq, training=True)


def _run(stage, hidden: torch.Tensor, batch: LoRABatch, recompute: bool = False):
    """Last-layer hidden states, the input's gradient and every adapter weight's gradient."""
    from mlora_pp.profiling import _layers_only

    stage.recompute = recompute
    stage.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(True)
    with _layers_only(stage):
        out = stage(x, batch)
    out.float().pow(2).mean().backward()
    grads = {f"{path}.{kind}.{name}": getattr(module, kind)[name].grad.clone()
             for path, module in stage.lora_modules().items() for kind in ("lora_A", "lora_B")
             for name in module.adapters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_projections_give_the_unfused_results(model_dir, recompute):
    """fp32, three adapters on different targets (two with dropout): same output bits, input and
    adapter gradients within fp32 rounding, with and without recomputation."""
    fused, plain = _stage(model_dir, True), _stage(model_dir, False)
    assert fused.fused_projections and not plain.fused_projections
    batch = _batch()
    hidden = torch.randn(batch.rows, batch.seq_len, fused.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out_f, dx_f, grads_f = _run(fused, hidden, batch, recompute)
    out_p, dx_p, grads_p = _run(plain, hidden, batch, recompute)
    assert torch.equal(out_f, out_p)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 0
    for key in grads_f:
        torch.testing.assert_close(grads_f[key], grads_p[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fused_projections_in_bf16_are_no_further_from_fp32_than_unfused(model_dir):
    """bf16: the fused input gradient rounds once where the unfused one rounds each projection's
    part and their sum, so it must be at least as close to the fp32 stage's."""
    reference = _stage(model_dir, False)
    batch = _batch()
    hidden = torch.randn(batch.rows, batch.seq_len, reference.config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, dx_ref, grads_ref = _run(reference, hidden, batch)
    errors = {}
    for fuse in (True, False):
        _, dx, grads = _run(_stage(model_dir, fuse, "bfloat16"), hidden.bfloat16(), batch)
        worst = max((grads[k].float() - grads_ref[k]).abs().max().item() / grads_ref[k].abs().max().item()
                    for k in grads_ref)
        errors[fuse] = ((dx.float() - dx_ref).abs().max().item() / dx_ref.abs().max().item(), worst)
    assert errors[True][0] < 2e-2 and errors[True][1] < 5e-2, errors
    assert errors[True][0] <= 1.25 * errors[False][0], errors


def test_fused_weights_share_the_projections_storage_and_follow_new_storage(model_dir):
    """Fusing allocates no second copy of the weights: each projection's weight (and Qwen2's bias)
    is a view of the concatenation. Weights given new storage afterwards are concatenated again at
    the next call, so the stage computes with them."""
    fused, plain = _stage(model_dir, True), _stage(model_dir, False)

    def stored(stage) -> int:
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in stage.parameters()}.values())

    assert stored(fused) == stored(plain)
    attn = fused.layers["0"].self_attn
    q, k = attn.q_proj.base.weight, attn.k_proj.base.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == attn.fused.weight.data_ptr()
    if attn.q_proj.base.bias is not None:
        assert attn.q_proj.base.bias.untyped_storage().data_ptr() == attn.fused.bias.data_ptr()

    gen = torch.Generator().manual_seed(4)
    for stage in (fused, plain):
        for layer in stage.layers.values():
            for proj in (layer.self_attn.k_proj, layer.mlp.up_proj):
                proj.base.weight.data = torch.randn(proj.base.weight.shape, generator=gen)
        gen.manual_seed(4)
    batch = _batch()
    hidden = torch.randn(batch.rows, batch.seq_len, fused.config.hidden_size, generator=torch.Generator().manual_seed(5))
    out_f, _, _ = _run(fused, hidden, batch)
    out_p, _, _ = _run(plain, hidden, batch)
    assert torch.equal(out_f, out_p)
    assert attn.k_proj.base.weight.untyped_storage().data_ptr() == attn.fused.weight.data_ptr()


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_fused_layer_runs_four_base_gemms_and_keeps_the_same_bytes_for_backward(tmp_path):
    """Frozen base, no adapters: q/k/v, o, gate/up and down are 4 GEMMs a layer forward (7
    unfused). The fused stage keeps exactly as many bytes for backward: v is copied out of the
    q/k/v result, or attention would keep all of it alive to keep v."""
    model_dir = make_tiny_model(tmp_path / "m", layers=2, seed=1)
    results = {}
    for fuse in (True, False):
        stage = build_stage(model_dir, fuse_projections=fuse)
        from mlora_pp.profiling import _layers_only

        x = torch.randn(2, 9, stage.config.hidden_size, requires_grad=True)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t.detach()  # a saved output kept as itself would keep its graph alive (a cycle)

        with _layers_only(stage), _Count() as count, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stage(x, None)
        weights = {p.untyped_storage().data_ptr() for p in stage.parameters()}
        results[fuse] = (count.counts["mm"] + count.counts["addmm"],
                         sum(n for ptr, n in saved.items() if ptr not in weights))
    assert results[True][0] == 4 * 2 and results[False][0] == 7 * 2, results
    assert results[True][1] == results[False][1], results
