"""Tests for mlora_pp.peft_format: adapters that peft loads, and peft adapters we load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mlora_pp.peft_format import AdapterSpec, load_adapter, save_adapter
from mlora_pp.tiny import make_tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    return {
        "llama": make_tiny_model(root / "llama", layers=2),
        "qwen2": make_tiny_model(root / "qwen2", layers=2, arch="qwen2"),
        "qwen3": make_tiny_model(root / "qwen3", layers=2, arch="qwen3"),
        "llama4": make_tiny_model(root / "llama4", layers=4),
    }


def _base(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _random_weights(model, layers, targets=TARGETS, r=R, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) for every target linear of the given decoder layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        if int(name.split(".")[1]) not in layers:
            continue
        a = torch.randn(r, mod.in_features, generator=g) * 0.2
        b = torch.randn(mod.out_features, r, generator=g) * 0.2
        out[name] = (a, b)
    return out


def _spec(base: Path, **kw) -> AdapterSpec:
    return AdapterSpec(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.05,
                       base_model_name_or_path=str(base), **kw)


def _reference_logits(base: Path, weights, scaling: float, ids: torch.Tensor) -> torch.Tensor:
    """Logits with LoRA added by plain forward hooks (independent of peft)."""
    model = _base(base)
    modules = dict(model.model.named_modules())
    for name, (a, b) in weights.items():
        def hook(mod, args, output, a=a, b=b):
            return output + scaling * (args[0] @ a.T @ b.T)
        modules[name].register_forward_hook(hook)
    with torch.no_grad():
        return model(ids).logits


def _load_with_peft(base: Path, adapter_dir: Path):
    """PeftModel.from_pretrained, failing on any warning raised from inside peft."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_base(base), adapter_dir)
    peft_root = str(Path(peft.__file__).parent)
    peft_warnings = [str(w.message) for w in caught if w.filename.startswith(peft_root)]
    peft_warnings += [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    assert not peft_warnings, peft_warnings
    # load_adapter returns the load result that from_pretrained only warns about
    result = pm.load_adapter(adapter_dir, adapter_name="check")
    assert result.missing_keys == [] and result.unexpected_keys == []
    pm.set_adapter("default")
    return pm.eval()


def _peft_lora_weights(pm, adapter="default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, mod in pm.base_model.model.model.named_modules():
        if hasattr(mod, "lora_A") and adapter in mod.lora_A:
            out[name] = (mod.lora_A[adapter].weight.detach(), mod.lora_B[adapter].weight.detach())
    return out


IDS = torch.tensor([[1, 40, 300, 224, 17, 5, 900, 2, 64]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_peft_loads_our_adapter(tmp_path, tiny_dirs, arch):
    base = tiny_dirs[arch]
    weights = _random_weights(_base(base), layers={0, 1})
    assert len(weights) == 6
    adapter = tmp_path / "nested" / "adapter"
    save_adapter(adapter, _spec(base), weights)

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["bias"], cfg["inference_mode"]) == (R, 8, "none", True)
    assert cfg["layers_to_transform"] is None
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 12
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]  # no temp files

    pm = _load_with_peft(base, adapter)
    loaded = _peft_lora_weights(pm)
    assert loaded.keys() == weights.keys()
    for name, (a, b) in weights.items():
        assert torch.equal(loaded[name][0], a) and torch.equal(loaded[name][1], b), name

    with torch.no_grad():
        got = pm(input_ids=IDS).logits
        plain = _base(base)(IDS).logits
    want = _reference_logits(base, weights, ALPHA / R, IDS)
    assert (want - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_partial_layers(tmp_path, tiny_dirs):
    base = tiny_dirs["llama4"]
    model = _base(base)
    # non-contiguous layers: recorded automatically as layers_to_transform
    weights = _random_weights(model, layers={1, 3}, seed=1)
    save_adapter(tmp_path / "a", _spec(base), weights)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers_to_transform"] == [1, 3]
    pm = _load_with_peft(base, tmp_path / "a")
    assert _peft_lora_weights(pm).keys() == weights.keys()
    with torch.no_grad():
        got = pm(input_ids=IDS).logits
    torch.testing.assert_close(got, _reference_logits(base, weights, ALPHA / R, IDS), atol=1e-5, rtol=1e-5)

    # a prefix of the layers needs an explicit layers_to_transform
    weights = _random_weights(model, layers={0, 1}, seed=2)
    save_adapter(tmp_path / "b", _spec(base, layers_to_transform=[0, 1]), weights)
    pm = _load_with_peft(base, tmp_path / "b")
    assert _peft_lora_weights(pm).keys() == weights.keys()
    spec, _ = load_adapter(tmp_path / "b")
    assert spec.layers_to_transform == [0, 1]


def test_round_trip(tmp_path, tiny_dirs):
    base = tiny_dirs["llama"]
    weights = _random_weights(_base(base), layers={0, 1})
    spec = _spec(base)
    save_adapter(tmp_path, spec, weights)
    spec2, weights2 = load_adapter(tmp_path)
    assert spec2 == AdapterSpec(r=R, lora_alpha=ALPHA, target_modules=sorted(TARGETS), lora_dropout=0.05,
                                base_model_name_or_path=str(base))
    assert weights2.keys() == weights.keys()
    for k, (a, b) in weights.items():
        assert weights2[k][0].dtype == torch.float32
        assert torch.equal(weights2[k][0], a) and torch.equal(weights2[k][1], b)

    # overwrite in place with another dtype; accepts "model."-prefixed paths and non-contiguous tensors
    prefixed = {f"model.{k}": (a.T.contiguous().T, b.T.contiguous().T) for k, (a, b) in weights.items()}
    save_adapter(tmp_path, spec, prefixed, dtype=torch.bfloat16)
    _, weights3 = load_adapter(tmp_path)
    assert weights3.keys() == weights.keys()
    for k, (a, b) in weights.items():
        assert weights3[k][0].dtype == torch.bfloat16
        assert torch.equal(weights3[k][0], a.to(torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_load_peft_saved_adapter(tmp_path, tiny_dirs):
    base = tiny_dirs["qwen2"]
    config = peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, use_rslora=True,
                             task_type="CAUSAL_LM", init_lora_weights=False)
    pm = peft.get_peft_model(_base(base), config)
    pm.save_pretrained(tmp_path / "peft")
    spec, weights = load_adapter(tmp_path / "peft")
    assert (spec.r, spec.lora_alpha, sorted(spec.target_modules)) == (R, 16.0, sorted(TARGETS))
    assert spec.use_rslora and spec.scaling == 16.0 / 2  # alpha / sqrt(r), peft's rank-stabilized scale
    theirs = _peft_lora_weights(pm)
    assert weights.keys() == theirs.keys() and len(weights) == 6
    assert "layers.1.self_attn.v_proj" in weights
    for k, (a, b) in theirs.items():
        assert torch.equal(weights[k][0], a) and torch.equal(weights[k][1], b)

    # older / hand-made files: adapter name in the key, no base_model.model. prefix
    renamed = {k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v
               for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    save_file(renamed, tmp_path / "peft" / "adapter_model.safetensors")
    _, weights2 = load_adapter(tmp_path / "peft")
    assert weights2.keys() == weights.keys()
    assert all(torch.equal(weights2[k][1], weights[k][1]) for k in weights)


def test_malformed_directories(tmp_path, tiny_dirs):
    base = tiny_dirs["llama"]
    weights = _random_weights(_base(base), layers={0})
    good = tmp_path / "good"
    save_adapter(good, _spec(base), weights)

    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(tmp_path / "missing")

    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (d / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="adapter_model.safetensors.*pickle"):
        load_adapter(d)

    d = tmp_path / "bad_json"
    d.mkdir()
    (d / "adapter_config.json").write_text("{")
    (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(d)

    tensors = load_file(good / "adapter_model.safetensors")
    d = tmp_path / "a_without_b"
    d.mkdir()
    (d / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*q_proj has lora_A but no lora_B"):
        load_adapter(d)

    d = tmp_path / "rank"
    d.mkdir()
    cfg = json.loads((good / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*rank mismatch"):
        load_adapter(d)

    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(d)

    d = tmp_path / "extra"
    d.mkdir()
    (d / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head"):
        load_adapter(d)


def test_save_validates_and_is_atomic(tmp_path, tiny_dirs, monkeypatch):
    base = tiny_dirs["llama"]
    weights = _random_weights(_base(base), layers={0})
    with pytest.raises(ValueError, match="rank mismatch"):
        save_adapter(tmp_path / "x", AdapterSpec(8, 16, TARGETS, 0.0, str(base)), weights)
    with pytest.raises(ValueError, match="target_modules"):
        save_adapter(tmp_path / "x", AdapterSpec(R, ALPHA, ["q_proj"], 0.0, str(base)), weights)

    save_adapter(tmp_path, _spec(base), weights)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mlora_pp.durable.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path, _spec(base), _random_weights(_base(base), layers={0}, seed=5))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old adapter intact, no temp files


def test_a_crash_while_overwriting_an_adapter_never_pairs_new_weights_with_the_old_config(tmp_path, tiny_dirs,
                                                                                        monkeypatch):
    """Overwriting an adapter of another alpha (a `--fresh` run after a change), killed between the
    weights' rename and the config's: the directory must not load as the new weights under the old
    scale (peft would, without a word); it is incomplete instead. Under the same config, the same
    crash leaves a complete adapter: the new weights (the config is not deleted needlessly)."""
    base = tiny_dirs["llama"]
    save_adapter(tmp_path, _spec(base), _random_weights(_base(base), layers={0}))
    real = os.replace

    def crash_before_the_config(src, dst, *args, **kwargs):
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt  # not an Exception: the temporary file stays, as after a kill
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr("mlora_pp.durable.os.replace", crash_before_the_config)
    doubled = AdapterSpec(r=R, lora_alpha=2 * ALPHA, target_modules=list(TARGETS), lora_dropout=0.05,
                          base_model_name_or_path=str(base))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(tmp_path, doubled, _random_weights(_base(base), layers={0}, seed=5))
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(tmp_path)

    monkeypatch.undo()
    save_adapter(tmp_path, _spec(base), _random_weights(_base(base), layers={0}, seed=6))
    monkeypatch.setattr("mlora_pp.durable.os.replace", crash_before_the_config)
    new = _random_weights(_base(base), layers={0}, seed=7)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(tmp_path, _spec(base), new)
    spec, loaded = load_adapter(tmp_path)
    assert spec.lora_alpha == ALPHA
    assert all(torch.equal(loaded[m][0], new[m][0]) and torch.equal(loaded[m][1], new[m][1]) for m in new)
