"""Greedy generation with trained adapters, so a user can see what each adapter learned.

``python -m mlora_pp.generate --model DIR --adapter OUT/job [--adapter OUT/other] [--template alpaca] "prompt" ...``

Every (prompt, adapter) pair, plus each prompt on the bare base model, is one row of the same
batch: the batched LoRA operator serves all adapters in one forward, as in training.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mlora_pp.data import load_template
from mlora_pp.lora import LoRABatch, LoRASegment
from mlora_pp.model import StageModel, build_stage
from mlora_pp.peft_format import load_adapter

BASE = "(base)"


@dataclass(frozen=True)
class Generation:
    adapter: str
    prompt: str
    text: str


def add_saved_adapter(stage: StageModel, name: str, adapter_dir: Path) -> None:
    """Load a PEFT-format adapter directory into `stage` under `name`."""
    spec, weights = load_adapter(adapter_dir)
    stage.add_adapter(name, spec.r, spec.lora_alpha, 0.0, list(spec.target_modules), seed=0)
    stage.load_adapter_state(name, weights)


@torch.no_grad()
def generate(
    stage: StageModel,
    tokenizer,
    prompts: list[str],
    adapters: list[str],
    max_new_tokens: int = 32,
    include_base: bool = True,
) -> list[Generation]:
    """Greedy-decode every prompt with every adapter (and the base); stops at EOS per row."""
    names = adapters + ([BASE] if include_base else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    has_bos = [bool(tokenizer.bos_token) and p.startswith(tokenizer.bos_token) for p in prompts]  # a chat template's
    prompt_ids = [([] if own else bos) + tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p, own in zip(prompts, has_bos)]
    rows = [list(ids) for _ in names for ids in prompt_ids]
    start_lens = [len(r) for r in rows]
    done = [False] * len(rows)
    segments = tuple(
        LoRASegment(name, k * len(prompts), (k + 1) * len(prompts), tuple(range(len(prompts))))
        for k, name in enumerate(names)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = getattr(stage.config, "max_position_embeddings", None) or 10**9
    for _ in range(max_new_tokens):
        longest = max(len(r) for r in rows)
        if longest >= limit:
            break
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logits = stage(ids, LoRABatch(segments, seq_len=longest, training=False))
        for i, r in enumerate(rows):
            if done[i]:
                continue
            token = int(logits[i, len(r) - 1].argmax())
            if token == tokenizer.eos_token_id:
                done[i] = True
            else:
                r.append(token)
        if all(done):
            break
    out = []
    for i, r in enumerate(rows):
        text = tokenizer.decode(r[start_lens[i]:], skip_special_tokens=True)
        out.append(Generation(names[i // len(prompts)], prompts[i % len(prompts)], text))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlora_pp.generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+", help="prompt text (an instruction when --template alpaca)")
    parser.add_argument("--model", required=True, type=Path, help="base model directory")
    parser.add_argument("--adapter", action="append", default=[], type=Path, help="adapter directory (repeatable)")
    parser.add_argument("--template", default=None,
                        help="render prompts with a template: alpaca, a template file, or chat (each prompt as a "
                             "user message in the tokenizer's chat template)")
    parser.add_argument("--input", default="", help="the alpaca 'input' field for every prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-base", action="store_true", help="skip the base model's generation")
    args = parser.parse_args(argv)

    from mlora_pp.training import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    stage = build_stage(args.model)
    names = []
    for path in args.adapter:
        names.append(path.name)
        add_saved_adapter(stage, path.name, path)
    prompts = args.prompts
    if args.template == "chat":
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": "\n".join(filter(None, (p, args.input)))}],
                                                 add_generation_prompt=True, tokenize=False) for p in prompts]
    elif args.template:
        template = load_template(args.template)
        prompts = [template.render({"instruction": p, "input": args.input, "output": ""})[0] for p in prompts]
    for gen in generate(stage, tokenizer, prompts, names, args.max_new_tokens, include_base=not args.no_base):
        print(f"[{gen.adapter}] {gen.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
