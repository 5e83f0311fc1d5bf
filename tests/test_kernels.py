"""The frozen base's fused elementwise kernels (`mlora_pp.kernels`) and the modules that call them.

Eagerly (CPU, and wherever compiling is off) the model must give transformers' bits: the
correctness contract against peft rests on it. Compiled, the same formulas must stay within
rounding of the eager ones; that is checked here on CPU (inductor's C++ kernels) and in
`tests/gpu` on CUDA (Triton).
"""

from __future__ import annotations

import collections
import importlib
import shutil
import warnings

import pytest
import torch

from mlora_pp import kernels
from mlora_pp.kernels import FusedKernel
from mlora_pp.model import SelfAttention, _attention_extra
from mlora_pp.tiny import build_config, build_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _attention_pair(arch: str, dtype: torch.dtype):
    """(transformers' attention module, ours over the same projections, rotary embedding)."""
    config = build_config(build_tokenizer(), arch=arch, hidden=64, heads=4, kv_heads=2, layers=1)
    config._attn_implementation = "sdpa"
    m = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    torch.manual_seed(0)
    theirs = getattr(m, prefix + "Attention")(config, 0).to(dtype).requires_grad_(False)
    ours = SelfAttention(theirs, m.eager_attention_forward, _attention_extra(arch, theirs))
    rotary = getattr(m, prefix + "RotaryEmbedding")(config=config)
    return theirs, ours, rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_self_attention_gives_transformers_bits(arch, dtype):
    """Output and input gradient equal transformers' attention bit for bit (Qwen2 with its q/k/v
    biases), so taking the module over changes nothing the contract tests see."""
    theirs, ours, rotary = _attention_pair(arch, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 64, generator=gen).to(dtype)
    grad = torch.randn(3, 11, 64, generator=gen).to(dtype)
    position_ids = torch.arange(11).unsqueeze(0)
    cos_sin = rotary(x, position_ids)
    results = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        out, _ = module(hidden_states=xi, position_embeddings=cos_sin, attention_mask=None, position_ids=position_ids)
        out.backward(grad)
        results.append((out.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    if arch == "qwen2":
        assert ours.q_proj.bias is not None


def test_rotary_backward_is_autograds():
    """The hand-written rotary backward equals autograd's through transformers' formula."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(2, 4, 7, 16, generator=gen).to(dtype), torch.randn(2, 2, 7, 16, generator=gen).to(dtype)
        cos, sin = torch.randn(1, 7, 16, generator=gen).to(dtype), torch.randn(1, 7, 16, generator=gen).to(dtype)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        qi, ki = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        torch.autograd.backward(apply_rotary_pos_emb(qi, ki, cos, sin), (dq, dk))
        ours = kernels.rotary_backward(dq, dk, cos, sin)
        assert torch.equal(ours[0], qi.grad) and torch.equal(ours[1], ki.grad)


# ------------------------------------------------------------------------------ compiled kernels


HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 128, 256, 4, 2, 32  # mlora_pp.tiny's default shape


def _inputs(dtype: torch.dtype, rows: int, length: int, gen: torch.Generator) -> dict[str, tuple]:
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tokens = rows * length
    x, weight = r(tokens, HIDDEN), 1 + 0.1 * r(HIDDEN)
    rstd = kernels.rms_norm_forward(x, weight, 1e-5)[1]
    q = r(rows, length, HEADS, HEAD_DIM).transpose(1, 2)  # as the projections give it: a transposed view
    k = r(rows, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    cos, sin = r(1, length, HEAD_DIM), r(1, length, HEAD_DIM)
    return {
        "rms_norm_forward": (x, weight, 1e-5),
        "rms_norm_backward": (r(tokens, HIDDEN), x, weight, rstd),
        "silu_mul_forward": (r(tokens, INTERMEDIATE), r(tokens, INTERMEDIATE)),
        "silu_mul_backward": (r(tokens, INTERMEDIATE), r(tokens, INTERMEDIATE), r(tokens, INTERMEDIATE)),
        "rotary_forward": (q, k, cos, sin),
        "rotary_backward": (r(rows, HEADS, length, HEAD_DIM), r(rows, KV_HEADS, length, HEAD_DIM), cos, sin),
    }


def _close(got, want, what: str, tol: float = 2 ** -7) -> None:
    """Within one bf16 rounding of the largest value (a relative tolerance of 2^-7)."""
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * float(w.abs().max()),
                                   msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("gcc")),
                    reason="no C++ compiler: torch.compile cannot build CPU kernels here")
def test_compiled_kernels_stay_within_rounding_of_the_eager_ones_alone_and_in_a_stage(monkeypatch, tmp_path):
    """Every layer kernel compiled for CPU (the model compiles on CUDA only; enabled for CPU here),
    in bf16: alone at three shapes (one compile for the first, one symbolic for the rest), then in
    place of the eager ones in a bf16 stage of the tiny model, forward and backward, where the
    autograd Functions call them with the model's own layouts. Both stay within bf16 rounding of
    the eager kernels."""
    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.model import build_stage
    from mlora_pp.tiny import make_tiny_model

    monkeypatch.setenv("MLORA_PP_COMPILE", "1")
    compiled = {name: FusedKernel(k.fn, devices=("cpu",)) for name, k in kernels.LAYER_KERNELS.items()}
    gen = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiling .* failed")  # a fallback to eager: fail on it
        for rows, length in ((2, 6), (3, 10), (4, 9)):
            for name, args in _inputs(torch.bfloat16, rows, length, gen).items():
                _close(compiled[name](*args), kernels.LAYER_KERNELS[name](*args), f"{name} at {rows}x{length}")

        stage = build_stage(make_tiny_model(tmp_path / "m", layers=2, init_std=0.06), dtype="bfloat16")
        stage.add_adapter("a", 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"], seed=0)
        with torch.no_grad():
            for p in stage.adapter_parameters("a"):
                p.normal_(0, 0.05, generator=gen)  # B too, so that every adapter weight has a gradient
        ids = torch.randint(3, stage.config.vocab_size, (3, 10), generator=gen)
        batch = LoRABatch((LoRASegment("a", 0, 3, (0, 1, 2)),), 10, training=True)

        def run():
            stage.zero_grad(set_to_none=True)
            logits = stage(ids, batch)
            logits.float().logsumexp(-1).mean().backward()
            return logits.detach(), tuple(p.grad.clone() for p in stage.adapter_parameters("a"))

        eager = run()
        calls: collections.Counter[str] = collections.Counter()

        def counted(name: str, kernel: FusedKernel):
            def call(*args):
                calls[name] += 1
                return kernel(*args)
            return call

        monkeypatch.setattr("mlora_pp.model.LAYER_KERNELS", {n: counted(n, k) for n, k in compiled.items()})
        fused = run()
        stage.recompute = True  # activation checkpointing replays the compiled forwards in backward
        recomputed = run()
    assert set(calls) == set(compiled), calls  # the stage ran every compiled kernel
    _close(fused[0], eager[0], "stage logits", tol=2 ** -6)
    for got, want in zip(fused[1], eager[1]):
        _close(got, want, "adapter gradient", tol=2 ** -5)
    assert torch.equal(recomputed[0], fused[0])
    assert all(torch.equal(a, b) for a, b in zip(recomputed[1], fused[1]))
    assert all(k.failed is None and k._compiled is not None for k in compiled.values())


def test_a_failed_compile_warns_once_in_one_line_and_runs_eagerly(monkeypatch):
    monkeypatch.setenv("MLORA_PP_COMPILE", "1")
    kernel = FusedKernel(kernels.silu_mul_forward, devices=("cpu",))

    def broken(*args):
        raise RuntimeError("C++ compile error\n" + "compiler output\n" * 50)

    kernel._compiled = broken
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.warns(UserWarning) as caught:
        out = kernel(gate, up)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "silu_mul_forward" in str(caught[0].message)
    assert torch.equal(out, kernels.silu_mul_forward(gate, up))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernel(gate, up), out)  # eager from now on, silently
    assert not kernel.enabled_for(gate.device)


def test_compiling_is_on_for_cuda_only_and_the_switches_turn_it_off(monkeypatch):
    monkeypatch.setenv("MLORA_PP_COMPILE", "1")
    kernel = kernels.LAYER_KERNELS["rms_norm_forward"]
    assert kernel.enabled_for(torch.device("cuda", 0)) and not kernel.enabled_for(torch.device("cpu"))
    assert kernels.warm_up_layer_kernels("cpu", torch.float32, 64, 128, 4, 2, 16, 1e-5) == 0.0
    kernels.set_layer_kernels("eager")
    try:
        assert not kernel.enabled_for(torch.device("cuda", 0))
    finally:
        kernels.set_layer_kernels("fused")
    monkeypatch.setenv("MLORA_PP_COMPILE", "0")
    assert not kernel.enabled_for(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="layer kernels"):
        kernels.set_layer_kernels("triton")


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_warm_up_gives_each_kernel_the_layouts_the_model_gives_it(tmp_path, monkeypatch, arch, fuse):
    """A compiled kernel guards on its inputs' strides as well as their sizes, so a warm-up with
    other layouts than training's would leave the compiles to the first steps. For the same rows
    and length, every call a bf16 decoder layer makes (forward and backward, adapters on, with and
    without fused projections, Qwen3's head norms too) has the sizes, strides and dtypes of one of
    `warm_up_calls`' calls."""
    import mlora_pp.model
    from mlora_pp.lora import LoRABatch, LoRASegment
    from mlora_pp.model import build_stage
    from mlora_pp.profiling import _layers_only
    from mlora_pp.tiny import make_tiny_model

    def layout(args: tuple) -> tuple:
        return tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)

    seen: dict[str, set] = collections.defaultdict(set)
    recording = {name: (lambda name, k: lambda *args: seen[name].add(layout(args)) or k(*args))(name, k)
                 for name, k in kernels.LAYER_KERNELS.items()}
    monkeypatch.setattr(mlora_pp.model, "LAYER_KERNELS", recording)
    stage = build_stage(make_tiny_model(tmp_path / "m", arch=arch, layers=1, seed=0), dtype="bfloat16",
                        fuse_projections=fuse)
    stage.add_adapter("a", 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      seed=0)
    rows, length, c = 2, 9, stage.config
    x = torch.randn(rows, length, c.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with _layers_only(stage):
        stage(x, LoRABatch((LoRASegment("a", 0, rows, (0, 1)),), length, training=True)).float().sum().backward()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    head_norms = arch == "qwen3"
    warm = collections.defaultdict(set)
    for name, args in kernels.warm_up_calls(rows, length, torch.bfloat16, "cpu", c.hidden_size, c.intermediate_size,
                                            c.num_attention_heads, c.num_key_value_heads, head_dim, c.rms_norm_eps,
                                            fused_projections=fuse, head_norms=head_norms):
        warm[name].add(layout(args))
    assert set(seen) == set(warm)
    for name, layouts in seen.items():
        assert layouts <= warm[name], (name, layouts - warm[name], warm[name])
