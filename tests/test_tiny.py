"""Tests for mlora_pp.tiny: the locally generated tiny model + tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mlora_pp.tiny import WORDS, build_tokenizer, main, make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
SAMPLES = [
    "hello world",
    "Uppercase the words.\nthe cat sat",
    "12 + 7 = 19",
    "  two  spaces\tand a tab\n\nnew lines",
    "Ünïcödé — ok? émoji 🙂 & <tags> {json: [1, 2]}",
    "RED GREEN BLUE, red green blue!",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ARCHS}


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    assert 900 <= len(tokenizer) <= 1024


def test_words_are_single_tokens(tokenizer):
    for word in ["the", "water", "apple", "house", "mother", "green"]:
        assert word in WORDS
    for word in WORDS:
        for form in (word, word.upper()):
            assert len(tokenizer(form)["input_ids"]) == 1, form
            # ...also after a space or at the start of a line
            assert tokenizer(f"x {form}\n{form}")["input_ids"].count(tokenizer.convert_tokens_to_ids(form)) == 2


def test_no_automatic_special_tokens_and_round_trip(tokenizer):
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert not {0, 1, 2, 3} & set(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        with_specials = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        assert tokenizer.decode(with_specials, skip_special_tokens=True) == text


def test_digits_split_individually(tokenizer):
    ids = tokenizer("1234")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4"]


def test_tokenizer_is_deterministic(tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_offline(model_dirs, tokenizer, arch):
    d = model_dirs[arch]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / name).is_file(), name
    config = AutoConfig.from_pretrained(d)
    assert config.model_type == arch
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.tie_word_embeddings is False
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 128, 4)
    assert config.num_key_value_heads == 2

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    # transformers 5 picks Qwen2Tokenizer for qwen2 regardless of tokenizer_config.json;
    # it must still encode exactly like ours.
    for text in SAMPLES:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"], (arch, text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)

    q = model.model.layers[0].self_attn.q_proj
    assert (q.bias is not None) == (arch == "qwen2")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    ids = tok(SAMPLES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.05
    # different positions give different predictions
    assert not torch.allclose(logits[0, 0], logits[0, -1])


def test_seed_determinism_and_sharding(tmp_path, model_dirs):
    sharded = make_tiny_model(tmp_path / "sharded", shard_size="300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(sharded / shard))
    single = load_file(model_dirs["llama"] / "model.safetensors")
    assert merged.keys() == single.keys()
    for k, v in single.items():
        assert v.dtype == torch.float32
        assert torch.equal(merged[k], v), k
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert model.config.vocab_size > 0

    other = load_file(make_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[k], single[k])


def test_cli_and_vocab_padding(tmp_path, tokenizer, capsys):
    out = tmp_path / "cli"
    main([str(out), "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "1",
          "--intermediate", "96", "--vocab", "1024", "--arch", "qwen2", "--max-positions", "128"])
    assert str(out) in capsys.readouterr().out
    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 1)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (96, 1024, 128)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1024)
    assert AutoTokenizer.from_pretrained(out).model_max_length == 128

    with pytest.raises(ValueError, match="smaller"):
        make_tiny_model(tmp_path / "bad", vocab=len(tokenizer) - 1)
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path / "bad", arch="gpt2")


def test_demo_data_is_reproducible_and_disjoint(tmp_path, tokenizer):
    import importlib.util

    data = Path(__file__).resolve().parents[1] / "configs" / "data"
    spec = importlib.util.spec_from_file_location("make_demo_data", data / "make_demo_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.write_all(tmp_path)
    for name in ("upper.jsonl", "reverse.jsonl", "increment.jsonl", "heldout.json"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), f"regenerate {name}"
        assert (data / name).stat().st_size < 100_000

    heldout = json.loads((data / "heldout.json").read_text())
    assert sorted(heldout) == ["increment", "reverse", "upper"]
    for task, held in heldout.items():
        train = [json.loads(line) for line in (data / f"{task}.jsonl").read_text().splitlines()]
        assert len(train) == 400 and len(held) == 4
        inputs = {r["input"] for r in train}
        assert len(inputs) > 50  # training inputs may repeat
        assert not inputs & {r["input"] for r in held}
        for r in train[:50] + held:
            assert set(r) == {"instruction", "input", "output"}
            if task == "upper":
                assert r["output"] == r["input"].upper() and set(r["input"].split()) <= set(gen.UPPER_WORDS)
                assert len(r["input"].split()) == 3
            elif task == "reverse":
                assert r["output"].split() == r["input"].split()[::-1] and len(r["input"].split()) == 3
                assert set(r["input"].split()) <= set(gen.REVERSE_WORDS)
            else:
                digits = [int(x) for x in r["input"].split()]
                assert len(digits) == 3 and r["output"].split() == [str((d + 1) % 10) for d in digits]
            # a word is one token, so "upper" is a token-to-token mapping
            n_words = len(r["output"].split())
            if task != "increment":
                assert len(tokenizer(r["output"])["input_ids"]) == 2 * n_words - 1
