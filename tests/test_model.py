"""The stage model against independent references: transformers' own model and peft."""

from __future__ import annotations

import math
import warnings

import pytest
import safetensors
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from mlora_pp.lora import LoRABatch, LoRASegment
from mlora_pp.model import RMSNorm, SiluMul, StageSpec, SwiGLU, build_stage
from mlora_pp.peft_format import AdapterSpec, save_adapter
from mlora_pp.tiny import make_tiny_model

ADAPTERS = [  # name, rank, alpha, targets, rslora (scaled by alpha / sqrt(rank))
    ("a", 4, 8.0, ["q_proj", "v_proj"], False),
    # b's rsLoRA scale is 4, the size the 1e-5 tolerances below were set at (plain scaling: 1.41)
    ("b", 8, 4 * math.sqrt(8), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    ("c", 12, 6.0, ["o_proj", "down_proj", "up_proj"], False),
]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, seed=3)


def randomize(stage, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in stage.lora_modules().values():
            for name in module.adapters():
                module.lora_A[name].copy_(torch.randn(module.lora_A[name].shape, generator=gen) * 0.2)
                module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=gen) * 0.2)


def hf_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def peft_with_weights(model_dir, stage, name, rank, alpha, targets, rslora):
    """A peft model on transformers' own LlamaForCausalLM carrying our adapter's weights."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    model = get_peft_model(hf_model(model_dir), config)
    ours = stage.adapter_state(name)
    loaded = 0
    with torch.no_grad():
        for path, (a, b) in ours.items():
            module = model.base_model.model.model.get_submodule(path)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
            loaded += 1
    assert loaded == len(targets) * model.base_model.model.config.num_hidden_layers
    return model.eval()


def test_stage_without_adapters_equals_transformers(model_dir):
    stage = build_stage(model_dir)
    ids = torch.randint(3, stage.config.vocab_size, (2, 11))
    with torch.no_grad():
        ours = stage(ids, None)
        ref = hf_model(model_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse_projections", [False, True])
def test_three_fused_adapters_equal_three_peft_models(model_dir, fuse_projections):
    stage = build_stage(model_dir, fuse_projections=fuse_projections)
    for name, rank, alpha, targets, rslora in ADAPTERS:
        stage.add_adapter(name, rank, alpha, 0.0, targets, seed=1, rslora=rslora)
    randomize(stage)
    gen = torch.Generator().manual_seed(5)
    lengths = {"a": [9, 5], "b": [12, 12, 3], "c": [7]}
    rows, segments, start = [], [], 0
    for name, *_ in ADAPTERS:
        for n in lengths[name]:
            rows.append(torch.randint(3, stage.config.vocab_size, (n,), generator=gen))
        segments.append(LoRASegment(name, start, start + len(lengths[name]), tuple(range(len(lengths[name])))))
        start += len(lengths[name])
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    with torch.no_grad():
        fused = stage(ids, LoRABatch(tuple(segments), longest, training=False))
    for (name, rank, alpha, targets, rslora), seg in zip(ADAPTERS, segments):
        ref_model = peft_with_weights(model_dir, stage, name, rank, alpha, targets, rslora)
        for row in range(seg.row_start, seg.row_end):
            n = len(rows[row])
            with torch.no_grad():
                ref = ref_model(input_ids=rows[row][None], labels=rows[row][None])
            torch.testing.assert_close(fused[row, :n], ref.logits[0], rtol=1e-5, atol=1e-5)
            ours_loss = torch.nn.functional.cross_entropy(fused[row, : n - 1], rows[row][1:])
            torch.testing.assert_close(ours_loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_saved_adapter_loads_in_peft_and_reproduces_logits(model_dir, tmp_path):
    stage = build_stage(model_dir)
    name, rank, alpha, targets, rslora = ADAPTERS[1]
    assert rslora  # peft must read use_rslora from the file
    stage.add_adapter(name, rank, alpha, 0.1, targets, seed=2, rslora=rslora)
    randomize(stage, seed=9)
    spec = AdapterSpec(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.1,
                       base_model_name_or_path=str(model_dir), use_rslora=rslora)
    save_adapter(tmp_path / name, spec, stage.adapter_state(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model(model_dir), str(tmp_path / name)).eval()
        load = peft_model.load_adapter(str(tmp_path / name), adapter_name="again")
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings  # peft warns about missing adapter keys
    assert not load.missing_keys or all("lora" not in k for k in load.missing_keys)
    assert not load.unexpected_keys, load.unexpected_keys
    ids = torch.randint(3, stage.config.vocab_size, (2, 10))
    with torch.no_grad():
        ours = stage(ids, LoRABatch((LoRASegment(name, 0, 2, (0, 1)),), 10, training=False))
        ref = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # and read back as generation reads it: the scale comes from the file too
    from mlora_pp.generate import add_saved_adapter

    again = build_stage(model_dir)
    add_saved_adapter(again, name, tmp_path / name)
    with torch.no_grad():
        reread = again(ids, LoRABatch((LoRASegment(name, 0, 2, (0, 1)),), 10, training=False))
    torch.testing.assert_close(reread, ref, rtol=1e-5, atol=1e-5)


def test_stage_reads_only_its_own_tensors(tmp_path, monkeypatch):
    model_dir = make_tiny_model(tmp_path / "sharded", layers=4, seed=1, shard_size="300KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    stage = build_stage(model_dir, StageSpec(2, 4, has_embedding=False, has_head=False))
    assert read, "nothing was read"
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in read), read
    assert len(read) == sum(1 for _ in stage.parameters())
    # the last stage: layers 2..3 + norm + lm_head, still no embedding and no other layer
    read.clear()
    build_stage(model_dir, StageSpec(2, 4, has_embedding=False, has_head=True))
    assert set(read) - {n for n in read if n.startswith(("model.layers.2.", "model.layers.3."))} == {
        "model.norm.weight", "lm_head.weight"}


def test_two_stages_compose_to_the_whole_model(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", layers=4, seed=4)
    whole = build_stage(model_dir)
    first = build_stage(model_dir, StageSpec(0, 2, True, False))
    last = build_stage(model_dir, StageSpec(2, 4, False, True))
    ids = torch.randint(3, whole.config.vocab_size, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids, None), None), whole(ids, None), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_keeps_two_tensors_and_gives_autograds_gradients_bit_for_bit(dtype):
    """The MLP's middle keeps gate and up for backward, not silu(gate) as well, and its gradients
    are exactly those of plain autograd's silu-then-multiply."""
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(6, 37, generator=gen).to(dtype) for _ in range(3))

    def run(fn):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(g, u)
        out.backward(grad)
        return out.detach(), g.grad, u.grad, {t.untyped_storage().data_ptr() for t in saved}

    ours, reference = run(SiluMul.apply), run(lambda g, u: torch.nn.functional.silu(g) * u)
    for a, b in zip(ours[:3], reference[:3]):
        assert torch.equal(a, b)
    assert len(ours[3]) == 2 and len(reference[3]) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_keeps_x_in_its_dtype_and_matches_transformers(dtype):
    """Same output bit for bit as transformers' RMSNorm; input gradient as close to an fp64
    reference as transformers' own; and for backward it keeps x (2 bytes a value) and one fp32 per
    row, where transformers keeps the fp32 copy of x."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(3, 5, 64, generator=gen).to(dtype) for _ in range(2))
    reference = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(1 + 0.1 * torch.randn(64, generator=gen))
    reference.weight.requires_grad_(False)
    ours = RMSNorm(reference)

    def run(module):
        xi = x.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = module(xi)
        out.backward(grad)
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in (xi.untyped_storage().data_ptr(),
                                                          reference.weight.untyped_storage().data_ptr())}
        return out.detach(), xi.grad, sum(kept.values())

    (ours_out, ours_grad, ours_kept), (ref_out, ref_grad, ref_kept) = run(ours), run(reference)
    assert torch.equal(ours_out, ref_out)
    x64 = x.double().requires_grad_(True)
    (reference.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad.double())
    ours_err, ref_err = ((g.double() - x64.grad).abs().max().item() for g in (ours_grad, ref_grad))
    assert ours_err <= ref_err + 1e-2 * x64.grad.abs().max().item()
    assert ours_kept == 3 * 5 * 4  # beyond x itself: one fp32 rsqrt per row
    assert ref_kept >= x.numel() * 4  # the fp32 copy of x


def test_stage_norms_are_ours_in_bf16_and_transformers_in_fp32(model_dir):
    for dtype, ours in (("bfloat16", True), ("float32", False)):
        stage = build_stage(model_dir, dtype=dtype)
        layer = stage.layers[str(stage.spec.first_layer)]
        norms = [layer.input_layernorm, layer.post_attention_layernorm, stage.norm]
        if stage.config.model_type == "qwen3":  # and its per-head norms of queries and keys
            norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
            assert "layers.0.self_attn.q_norm.weight" in dict(stage.named_parameters())
        for norm in norms:
            assert isinstance(norm, RMSNorm) == ours and type(norm).__name__.endswith("RMSNorm")
            assert not norm.weight.requires_grad
        assert "layers.0.input_layernorm.weight" in dict(stage.named_parameters())


def test_stage_mlp_is_swiglu_under_transformers_module_paths(model_dir):
    stage = build_stage(model_dir)
    layer = stage.layers[str(stage.spec.first_layer)]
    assert isinstance(layer.mlp, SwiGLU)
    assert "layers.0.mlp.down_proj" in stage.lora_modules()


def test_kv_cache_decoding_gives_the_logits_of_the_whole_sequence(model_dir):
    """`StageModel.decode` with a KV cache: right-padded prompts of 3 lengths at once, then one token
    per row per call at each row's own position, with 2 adapters and the base in one batch: every
    row's logits equal a plain forward of its whole sequence so far (fp32, 1e-5)."""
    from mlora_pp.lora import LoRASegment
    from mlora_pp.model import KVCache

    stage = build_stage(model_dir)
    for name, rank, alpha, targets, rslora in ADAPTERS[:2]:
        stage.add_adapter(name, rank, alpha, 0.0, targets, seed=0, rslora=rslora)
    randomize(stage)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, stage.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 8, 3)]
    width, names = 8, ["a", "b", "(base)"]  # no adapter of that name: the base alone
    segments = tuple(LoRASegment(n, i, i + 1, (i,)) for i, n in enumerate(names))
    ids = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    cache = KVCache(width + 3)
    logits = stage.decode(ids, LoRABatch(segments, width, training=False), cache,
                          torch.arange(width).expand(3, width), torch.ones(width, width, dtype=torch.bool).tril().expand(3, -1, -1))
    seqs = [list(p) for p in prompts]
    last = [logits[i, len(p) - 1] for i, p in enumerate(prompts)]
    lengths = torch.tensor([len(p) for p in prompts])
    for step in range(3):
        for i, seq in enumerate(seqs):  # the plain forward of each row's sequence so far
            one = (LoRASegment(names[i], 0, 1, (i,)),)
            with torch.no_grad():
                whole = stage(torch.tensor([seq]), LoRABatch(one, len(seq), training=False))[0, -1]
            torch.testing.assert_close(last[i], whole, rtol=1e-5, atol=1e-5)
        fed = [int(t) for t in torch.randint(3, stage.config.vocab_size, (3,), generator=gen)]
        slots = torch.arange(width + step + 1)
        allowed = (slots[None, :] < lengths[:, None]) | (slots[None, :] >= width)
        logits = stage.decode(torch.tensor(fed)[:, None], LoRABatch(segments, 1, training=False), cache,
                              (lengths + step)[:, None], allowed[:, None, :])
        for i, t in enumerate(fed):
            seqs[i].append(t)
        last = [logits[i, 0] for i in range(3)]


def test_generation_with_the_cache_picks_the_tokens_of_whole_forwards(tmp_path):
    from mlora_pp import generate as g
    from mlora_pp.training import load_tokenizer

    model = make_tiny_model(tmp_path / "m", layers=2, init_std=0.1, seed=7)
    stage = build_stage(model)
    stage.add_adapter("a", 4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
    randomize(stage, seed=3)
    tokenizer = load_tokenizer(model)
    prompts = ["the cat", "a dog and the", "you"]
    cached = g.generate(stage, tokenizer, prompts, ["a"], max_new_tokens=6)
    whole = g.generate(stage, tokenizer, prompts, ["a"], max_new_tokens=6, use_cache=False)
    assert [c.text for c in cached] == [w.text for w in whole]
    assert any(c.text for c in cached)


def test_kv_cache_decoding_serves_sliding_window_layers_within_their_window(tmp_path):
    """Mistral with a sliding window: sequences within the window decode with the cache, exactly as
    a whole forward (which builds its sliding-window mask); longer ones are refused."""
    from mlora_pp.model import KVCache, ModelError

    stage = build_stage(make_tiny_model(tmp_path / "m", layers=2, arch="mistral", seed=2))
    stage.config.sliding_window = 12
    stage._sliding = stage._sliding_layers()
    assert stage._sliding and stage.decodes_within(12) and not stage.decodes_within(13)
    ids = torch.randint(3, stage.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = LoRABatch((), 10, training=False)
    logits = stage.decode(ids, batch, KVCache(12), torch.arange(10).expand(2, 10),
                          torch.ones(10, 10, dtype=torch.bool).tril().expand(2, -1, -1))
    with torch.no_grad():
        torch.testing.assert_close(logits, stage(ids, batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="sliding-window layers see fewer than the 13 slots"):
        stage.decode(ids, batch, KVCache(13), torch.arange(10).expand(2, 10),
                     torch.ones(10, 10, dtype=torch.bool).tril().expand(2, -1, -1))
