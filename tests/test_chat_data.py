"""`template: chat`: conversations rendered by the tokenizer's chat template, loss on the
assistant's turns only, checked against transformers' own assistant-token mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora_pp.data import IGNORE_INDEX, DataError, chat_example, load_examples, load_template
from mlora_pp.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "the of"},
    {"role": "assistant", "content": "THE OF"},
    {"role": "user", "content": "cat dog and fish"},
    {"role": "assistant", "content": "CAT DOG AND FISH"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_loss_covers_exactly_the_assistant_tokens_transformers_marks(tokenizer):
    """transformers renders the same ids and marks the assistant's tokens from the template's
    `generation` blocks; our labels carry the loss on exactly those (position 0 never counts)."""
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:]):
        ours = chat_example(tokenizer, messages, max_seq_len=512)
        ref = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(ours.input_ids) == list(ref["input_ids"])
        trained = [label != IGNORE_INDEX for label in ours.labels]
        assert trained[1:] == [bool(m) for m in ref["assistant_masks"]][1:]
        assert all(label == tok for label, tok in zip(ours.labels, ours.input_ids) if label != IGNORE_INDEX)
        assert ours.loss_tokens == sum(ref["assistant_masks"]) > 0
    # each assistant turn ends with eos inside its loss: the adapter learns to stop
    ours = chat_example(tokenizer, CONVERSATION, max_seq_len=512)
    assert sum(1 for i, label in zip(ours.input_ids, ours.labels)
               if label != IGNORE_INDEX and i == tokenizer.eos_token_id) == 2


def test_long_conversations_keep_their_start_and_are_skipped_without_a_loss_token(tokenizer, tmp_path):
    full = chat_example(tokenizer, CONVERSATION, max_seq_len=512)
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = chat_example(tokenizer, CONVERSATION, max_seq_len=first_answer + 2)
    assert cut.input_ids == full.input_ids[: first_answer + 2] and cut.loss_tokens == 2
    assert chat_example(tokenizer, CONVERSATION, max_seq_len=first_answer) is None
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}])
    assert len(load_examples(data, load_template("chat"), tokenizer, max_seq_len=512)) == 2


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "missing field 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role must be one of"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.content must be a string"),
])
def test_bad_conversations_name_the_file_and_line(tokenizer, tmp_path, record, message):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, record])
    with pytest.raises(DataError, match=rf"c\.jsonl line 2: .*{message}"):
        load_examples(data, load_template("chat"), tokenizer, max_seq_len=512)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer, tmp_path):
    bare = build_tokenizer()
    bare.chat_template = None
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="template chat needs a tokenizer with a chat template"):
        load_examples(data, load_template("chat"), bare, max_seq_len=512)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """The mask takes each assistant turn as what the template adds to the conversation before it;
    a template whose rendering of a turn depends on what follows cannot be masked that way."""
    counting = build_tokenizer()
    counting.chat_template = ("{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: "
                              "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"renders messages\[2\] differently once more messages follow"):
        chat_example(counting, CONVERSATION, max_seq_len=512)


def test_a_chat_job_trains_and_generates(tmp_path, capsys):
    """Chat data through the real entry point on one rank, then `generate --template chat`."""
    import random

    from mlora_pp.config import parse_config
    from mlora_pp.generate import main as generate_main
    from mlora_pp.tiny import WORDS, make_tiny_model
    from mlora_pp.training import train

    rnd = random.Random(0)
    records = []
    for _ in range(16):
        words = " ".join(rnd.choice(WORDS[:12]) for _ in range(3))
        records.append({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": words.upper()}]})
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    model = make_tiny_model(tmp_path / "model", layers=2, seed=3)
    cfg = parse_config({"model": {"path": str(model)}, "output_dir": str(tmp_path / "out"), "jobs": [
        {"name": "shout", "data": str(data), "template": "chat", "rank": 4, "alpha": 8, "lr": 1e-2, "batch_size": 4,
         "micro_batch_size": 2, "max_steps": 3, "eval_data": str(data)}]}, "t.yaml")
    result = train(cfg, progress=False)
    assert result.steps == {"shout": 3} and result.eval_loss["shout"][3] > 0
    capsys.readouterr()
    assert generate_main(["--model", str(model), "--adapter", str(tmp_path / "out" / "shout"), "--template", "chat",
                          "--max-new-tokens", "3", "the of and"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[shout]") == 1 and printed.count("[(base)]") == 1
