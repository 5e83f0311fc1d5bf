"""Quantized frozen base (nf4 / int8 through bitsandbytes) under the batched LoRA operator, on CPU.

References are independent of our code path: bitsandbytes' own dequantization followed by a plain
matmul, and transformers + peft loading the saved adapter on a bitsandbytes 4-bit base.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from mlora_pp import model as model_mod  # noqa: E402
from mlora_pp.config import LORA_TARGETS, parse_config  # noqa: E402
from mlora_pp.lora import LoRABatch, LoRASegment  # noqa: E402
from mlora_pp.model import ModelError, SafetensorsIndex, build_stage, module_path  # noqa: E402
from mlora_pp.peft_format import load_adapter  # noqa: E402
from mlora_pp.quantize import dequantized_weight, measure_peak_rss, quantize_linear  # noqa: E402
from mlora_pp.tiny import WORDS, make_tiny_model  # noqa: E402
from mlora_pp.training import train  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qmodel") / "model", layers=2, hidden=128, init_std=0.06)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def one_batch(name: str, rows: int, seq: int, training: bool) -> LoRABatch:
    return LoRABatch((LoRASegment(name, 0, rows, tuple(range(1, rows + 1))),), seq, training)


def projection_check(stage, mode: str, tol: float) -> None:
    """Wrapped projection (base + one adapter, no dropout) vs dequantize-then-matmul, output and dx."""
    stage.add_adapter("job", 4, 8, 0.0, TARGETS, seed=3)
    gen = torch.Generator().manual_seed(0)
    for module in stage.lora_modules(TARGETS).values():
        with torch.no_grad():
            module.lora_B["job"].copy_(torch.randn(module.lora_B["job"].shape, generator=gen) * 0.1)
    wrapped = stage.lora_modules(TARGETS)[module_path(1, "down_proj")]
    base = wrapped.base
    assert base.weight.requires_grad is False
    w = dequantized_weight(base)
    a, b = wrapped.lora_A["job"].detach(), wrapped.lora_B["job"].detach()
    x = (torch.randn(2, 5, wrapped.in_features, generator=gen) * 2.0).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 5, wrapped.out_features, generator=gen)
    stage.context.batch = one_batch("job", 2, 5, training=True)
    try:
        y = wrapped(x)
    finally:
        stage.context.batch = None
    y_ref = x_ref @ w.t() + 2.0 * (x_ref @ a.t() @ b.t())
    y.backward(dy)
    y_ref.backward(dy)
    assert rel_err(y.detach(), y_ref.detach()) < tol, mode
    assert rel_err(x.grad, x_ref.grad) < tol, mode
    assert wrapped.lora_B["job"].grad is not None and wrapped.lora_B["job"].grad.abs().sum() > 0


def test_nf4_stage_structure_and_projection(tiny):
    fp = build_stage(tiny)
    stage = build_stage(tiny, quantize="nf4")
    for i in range(2):
        for target in LORA_TARGETS:
            base = stage.lora_modules()[module_path(i, target)].base
            assert isinstance(base, bnb.nn.Linear4bit)
            assert base.weight.quant_type == "nf4" and base.weight.compress_statistics
            assert base.weight.quant_state.nested  # double quantization of the absmax statistics
            assert base.compute_dtype == torch.float32
            w_fp = fp.lora_modules()[module_path(i, target)].base.weight
            assert base.weight.numel() * 2 == w_fp.numel()  # 4 bits per weight
            # 4-bit NormalFloat keeps the weight up to ~10% relative error, not more
            assert rel_err(dequantized_weight(base), w_fp) < 0.15
    assert type(stage.embed_tokens) is torch.nn.Embedding and stage.embed_tokens.weight.dtype == torch.float32
    assert type(stage.lm_head) is torch.nn.Linear and stage.lm_head.weight.dtype == torch.float32
    assert torch.equal(stage.lm_head.weight, fp.lm_head.weight)
    # fp32 compute on the same dequantized weights: only summation order differs
    projection_check(stage, "nf4", 1e-5)


def test_int8_projection(tiny):
    stage = build_stage(tiny, quantize="int8")
    for target in LORA_TARGETS:
        base = stage.lora_modules()[module_path(0, target)].base
        assert isinstance(base, bnb.nn.Linear8bitLt) and base.weight.dtype == torch.int8
        assert base.state.threshold == 6.0 and not base.state.has_fp16_weights
    # On CPU bitsandbytes 0.50 computes int8 layers as x @ dequant(W)^T in the compute dtype
    # (no activation quantization), so the match is fp32-tight.
    projection_check(stage, "int8", 1e-5)


def test_quantize_layer_by_layer(tiny, monkeypatch):
    events: list[tuple[str, object]] = []
    real_read, real_quant = SafetensorsIndex.read, model_mod.quantize_linear

    def read(self, names):
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        events.append(("read", tuple(sorted(layers))))
        return real_read(self, names)

    def quant(linear, mode, dtype, device="cpu"):
        events.append(("quant", mode))
        return real_quant(linear, mode, dtype, device)

    monkeypatch.setattr(SafetensorsIndex, "read", read)
    monkeypatch.setattr(model_mod, "quantize_linear", quant)
    build_stage(tiny, quantize="nf4")
    n = len(LORA_TARGETS)
    assert events == [("read", ())] + [("read", (0,))] + [("quant", "nf4")] * n + [("read", (1,))] + [("quant", "nf4")] * n


def test_peak_rss_and_bad_mode(tiny):
    stage, peak, before = measure_peak_rss(lambda: build_stage(tiny, quantize="nf4"))
    assert peak >= before > 0 and stage is not None
    with pytest.raises(ModelError, match="quantize"):
        build_stage(tiny, quantize="fp8")
    with pytest.raises(Exception, match="nf4"):
        quantize_linear(torch.nn.Linear(4, 4), "fp8", torch.float32)


def write_dataset(path: Path, n: int = 16) -> Path:
    rnd = random.Random(5)
    with path.open("w") as f:
        for _ in range(n):
            words = [rnd.choice(WORDS[:40]) for _ in range(rnd.randint(2, 5))]
            f.write(json.dumps({"instruction": "Uppercase the words.", "input": " ".join(words),
                                "output": " ".join(w.upper() for w in words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("qtrain")
    raw = {
        "model": {"path": str(tiny), "quantize": "nf4"},
        "output_dir": str(root / "out"),
        "seed": 11,
        "pipeline": {"schedule": "lora"},
        "jobs": [dict(name="qjob", rank=8, alpha=16, dropout=0.05, target_modules=list(LORA_TARGETS), lr=1e-2,
                      batch_size=4, micro_batch_size=2, max_steps=20, epochs=5, data=str(write_dataset(root / "d.jsonl")),
                      max_seq_len=48)],
    }
    cfg = parse_config(raw, "test.yaml")
    train(cfg, progress=False)
    return cfg.output_dir


def test_nf4_training_loss_falls(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("job") == "qjob" and "event" not in r]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_nf4_adapter_loads_with_peft_on_bnb_4bit_base(tiny, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(tiny), quantization_config=qcfg, device_map="cpu",
                                                  dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, str(trained / "qjob")).eval()

    spec, weights = load_adapter(trained / "qjob")
    ours = build_stage(tiny, quantize="nf4").eval()
    ours.add_adapter("qjob", spec.r, spec.lora_alpha, 0.0, spec.target_modules, seed=0)
    ours.load_adapter_state("qjob", weights)
    # Both sides quantize the same fp32 checkpoint with the same bitsandbytes routine: identical codes.
    for i in range(2):
        for target in LORA_TARGETS:
            theirs = getattr(getattr(hf.model.layers[i], "self_attn" if target[0] in "qkvo" else "mlp"), target)
            assert isinstance(theirs.base_layer, bnb.nn.Linear4bit)
            assert torch.equal(dequantized_weight(theirs.base_layer),
                               dequantized_weight(ours.lora_modules()[module_path(i, target)].base))

    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits.float()
        got = ours(ids, one_batch("qjob", 2, 12, training=False))
    # Same quantized weights and fp32 compute everywhere: differences are fp32 summation order
    # (LoRA applied as one fused addmm vs peft's separate matmuls), ~1e-6 of the logit scale.
    assert rel_err(got, ref) < 1e-4
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # and the adapter actually changes the output
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits.float()
    assert rel_err(plain, ref) > 1e-3
