"""Greedy generation with trained adapters, so a user can see what each adapter learned.

``python -m mlora_pp.generate --model DIR --adapter OUT/job [--adapter OUT/other] [--template alpaca]
[--device cuda --dtype bfloat16] "prompt" ...``

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
from mlora_pp.model import KVCache, StageModel, build_stage
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
    stage.add_adapter(name, spec.r, spec.lora_alpha, 0.0, list(spec.target_modules), seed=0, rslora=spec.use_rslora)
    stage.load_adapter_state(name, weights)


@torch.no_grad()
def generate(
    stage: StageModel,
    tokenizer,
    prompts: list[str],
    adapters: list[str],
    max_new_tokens: int = 32,
    include_base: bool = True,
    use_cache: bool = True,
) -> list[Generation]:
    """Greedy-decode every prompt with every adapter (and the base); stops at EOS per row.

    The prompts run through the model once, then each new token attends to the cached keys and
    values of its row (`StageModel.decode`), so a token costs one position's forward rather than
    the whole sequence's. Without `use_cache`, and where sliding-window layers would cut the
    sequence, each token is a forward of the whole sequence so far."""
    names = adapters + ([BASE] if include_base else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    has_bos = [bool(tokenizer.bos_token) and p.startswith(tokenizer.bos_token) for p in prompts]  # a chat template's
    prompt_ids = [([] if own else bos) + tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p, own in zip(prompts, has_bos)]
    rows = [list(ids) for _ in names for ids in prompt_ids]
    start_lens = [len(r) for r in rows]
    segments = tuple(
        LoRASegment(name, k * len(prompts), (k + 1) * len(prompts), tuple(range(len(prompts))))
        for k, name in enumerate(names)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = getattr(stage.config, "max_position_embeddings", None) or 10**9
    steps = max(0, min(max_new_tokens, limit - max(start_lens)))
    decode = _decode_cached if use_cache and stage.decodes_within(max(start_lens) + steps) else _decode_whole
    for i, token in decode(stage, rows, segments, pad, steps, tokenizer.eos_token_id):
        rows[i].append(token)
    out = []
    for i, r in enumerate(rows):
        text = tokenizer.decode(r[start_lens[i]:], skip_special_tokens=True)
        out.append(Generation(names[i // len(prompts)], prompts[i % len(prompts)], text))
    return out


def _next_tokens(logits: torch.Tensor, at: list[int], done: list[bool], eos: int | None):
    """(row, token) of every row still going, from its logits at position `at[row]`; marks EOS rows done."""
    tokens = logits[torch.arange(len(at)), torch.tensor(at, device=logits.device)].argmax(-1).tolist()
    for i, token in enumerate(tokens):
        if done[i]:
            continue
        if token == eos:
            done[i] = True
        else:
            yield i, token


def _decode_cached(stage: StageModel, rows: list[list[int]], segments: tuple[LoRASegment, ...], pad: int,
                   steps: int, eos: int | None):
    """The new tokens, (row, token) in order, decoded with a KV cache: the padded prompts at once,
    then one token per row per call, each row's at its own next position."""
    device = next(stage.parameters()).device
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    cache = KVCache(width + steps)
    prompt_len = torch.tensor(lengths, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    logits = stage.decode(ids.to(device), LoRABatch(segments, seq_len=width, training=False), cache,
                          torch.arange(width, device=device).expand(len(rows), width),
                          causal.expand(len(rows), width, width))
    done = [False] * len(rows)
    at = [n - 1 for n in lengths]
    for step in range(steps):
        new = dict(_next_tokens(logits, at, done, eos))
        yield from new.items()
        if all(done) or step == steps - 1:
            return
        slots = torch.arange(width + step + 1, device=device)
        # a row sees its own prompt (not the padding after it) and every token generated since
        allowed = (slots[None, :] < prompt_len[:, None]) | (slots[None, :] >= width)
        feed = torch.tensor([[new.get(i, pad)] for i in range(len(rows))], device=device)
        logits = stage.decode(feed, LoRABatch(segments, seq_len=1, training=False), cache,
                              (prompt_len + step)[:, None], allowed[:, None, :])
        at = [0] * len(rows)


def _decode_whole(stage: StageModel, rows: list[list[int]], segments: tuple[LoRASegment, ...], pad: int,
                  steps: int, eos: int | None):
    """The new tokens, (row, token) in order, each from a forward of the whole sequence so far."""
    device = next(stage.parameters()).device
    rows = [list(r) for r in rows]
    done = [False] * len(rows)
    for _ in range(steps):
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logits = stage(ids.to(device), LoRABatch(segments, seq_len=longest, training=False))
        new = list(_next_tokens(logits, [len(r) - 1 for r in rows], done, eos))
        for i, token in new:
            rows[i].append(token)
        yield from new
        if all(done):
            return


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
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-cache", action="store_true",
                        help="run the whole sequence for every token instead of caching keys and values")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")

    try:
        return _run(args)
    except (ValueError, OSError) as exc:  # a bad model or adapter directory, template or data: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from mlora_pp.training import load_tokenizer

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    stage = build_stage(args.model, dtype=args.dtype, device=device)
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
    for gen in generate(stage, tokenizer, prompts, names, args.max_new_tokens, include_base=not args.no_base,
                        use_cache=not args.no_cache):
        print(f"[{gen.adapter}] {gen.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
