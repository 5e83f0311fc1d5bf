"""Generate a small random LLaMA-family model directory (weights + tokenizer).

Tests and the demo need a real Hugging Face checkpoint that loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` without a model hub, so we build
one locally: a byte-level BPE tokenizer trained on a built-in corpus and a
randomly initialised LLaMA / Mistral / Qwen2 model sized for CPU tests.

CLI: ``python -m mlora_pp.tiny OUT_DIR [--layers N --hidden H ...]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# Common short English words; every word, in lower case and in upper case, is
# a single token of the tokenizer built by ``build_tokenizer``.
WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is it you that he was for on are as with his they at be
    this have from or one had by but not what all were we when your can said
    there use an each which she do how their if will up other about out many
    then them these so some her would make like him into time has look two
    more write go see no way could my than first water been call who oil its
    now find long down day did get come made may part over new sound take
    only little work know place year live me back give most very after thing
    our just name good man think say great where help much before line right
    too mean old any same tell boy came want show also set put end does well
    big even turn here why ask went men read need land home us move try kind
    hand again off play air away house point page mother found still learn
    world high every near add food own keep tree never start city eye light
    head under story saw left few open life both paper got run car night walk
    sea grow took river four book hear stop idea eat face far let girl cut
    young talk soon song red blue green cat dog fish bird sun moon star rain
    snow wind fire stone apple bread milk
    """.split()
)

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A small ChatML-like chat template (`template: chat`); its `generation` markers let transformers
report which tokens are the assistant's (`return_assistant_tokens_mask`)."""

DEFAULT_VOCAB_SIZE = 1024
_PUNCTUATION = ".,;:!?'\"()[]{}<>+-*/=%#@&_|\\~^$`"


def _corpus() -> list[str]:
    """Built-in training text: the word list in both cases, digits, punctuation."""
    lines: list[str] = []
    n = len(WORDS)
    for case in (str.lower, str.upper):
        words = [case(w) for w in WORDS]
        # Each word many times, in short "sentences" with varying neighbours.
        for step in (1, 7, 13, 29):
            for i in range(n):
                chunk = [words[(i + k * step) % n] for k in range(5)]
                lines.append(" ".join(chunk) + ".")
    lines.extend(f"{a} + {b} = {a + b}" for a in range(50) for b in range(0, 50, 7))
    lines.append(" ".join(_PUNCTUATION))
    lines.append("Uppercase the words. Reverse the order of the words. Add the two numbers.")
    return lines


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the built-in corpus.

    Whitespace runs are split off as their own pieces before byte-level
    encoding, so a word is the same token at the start of a line or after a
    space; digits are split one per token. No bos/eos is added automatically.
    """
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)


_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int | None = None,
    arch: str = "llama",
    max_positions: int = 512,
    init_std: float = 0.02,
) -> PreTrainedConfig:
    """Model config for ``arch`` whose vocabulary and special ids match ``tokenizer``."""
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    vocab_size = len(tokenizer) if vocab is None else vocab
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab ({vocab_size}) is smaller than the tokenizer's ({len(tokenizer)})")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen3":
        kwargs["head_dim"] = hidden // heads  # Qwen3Config's default is 128 whatever the width
    config = _CONFIG_CLASSES[arch](**kwargs)
    config.dtype = torch.float32
    return config


def make_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int | None = None,
    seed: int = 0,
    arch: str = "llama",
    max_positions: int = 512,
    shard_size: str | None = None,
    init_std: float = 0.02,
) -> Path:
    """Write a random float32 model + tokenizer to ``out_dir`` and return the path.

    ``vocab`` defaults to the tokenizer's size; a larger value pads the
    embedding (as real checkpoints often do). ``shard_size`` (e.g. ``"200KB"``)
    produces a sharded checkpoint with ``model.safetensors.index.json``.
    ``init_std`` is the weights' normal std: with RMSNorm bounding the final hidden
    norm to sqrt(hidden), it caps the largest logit at about init_std * hidden, so a
    model meant to be fine-tuned (the demo) needs more than the default 0.02.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = build_config(
        tokenizer,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        arch=arch,
        max_positions=max_positions,
        init_std=init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict = {"safe_serialization": True}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    model.save_pretrained(out, **save_kwargs)
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m mlora_pp.tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--vocab", type=int, default=None, help="model vocab (>= tokenizer's); default: tokenizer's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=sorted(_CONFIG_CLASSES), default="llama")
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--shard-size", default=None, help='e.g. "200KB" to write a sharded checkpoint')
    a = p.parse_args(argv)
    out = make_tiny_model(
        a.out_dir,
        layers=a.layers,
        hidden=a.hidden,
        heads=a.heads,
        kv_heads=a.kv_heads,
        intermediate=a.intermediate,
        vocab=a.vocab,
        seed=a.seed,
        arch=a.arch,
        max_positions=a.max_positions,
        shard_size=a.shard_size,
        init_std=a.init_std,
    )
    print(out)


if __name__ == "__main__":
    main()
