"""Tests of mlora_pp.data: templates, records, tokenization and loss masks, step plans, collation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlora_pp.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    StepPlan,
    collate,
    epoch_order,
    load_examples,
    load_records,
    load_template,
    padding_waste,
    plan_steps,
    tokenize_record,
)

REPO = Path(__file__).resolve().parents[1]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
    "The quick brown fox jumps over the lazy dog. Add the two numbers: 2 + 3 = 5.",
    "Q: what is the capital of France? A: Paris is the capital of France.",
    "hello world, hello tokenizer; goodbye world!",
]


def _train_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return _train_bpe()


@pytest.fixture(scope="module")
def tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer_no_bos(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _dec(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _fake(length: int, loss: int, start: int = 10) -> Example:
    """An example of `length` tokens whose last `loss` labels carry loss."""
    ids = tuple(range(start, start + length))
    labels = (IGNORE_INDEX,) * (length - loss) + ids[length - loss :]
    return Example(ids, labels)


# ------------------------------------------------------------------------------------------
# Templates.


def test_alpaca_with_input_renders_exactly() -> None:
    t = load_template("alpaca")
    assert t.name == "alpaca" and t.required == ("instruction", "output")
    prompt, response = t.render({"instruction": "Add the numbers.", "input": "2 3", "output": "5"})
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n"
    )
    assert response == "5"


@pytest.mark.parametrize("record", [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "input": "", "output": "hi"}])
def test_alpaca_without_input_renders_exactly(record: dict) -> None:
    prompt, response = load_template("alpaca").render(record)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert response == "hi"


def test_alpaca_does_not_interpret_braces_in_values() -> None:
    prompt, response = load_template("alpaca").render({"instruction": "print {x}", "output": "{y}"})
    assert "print {x}" in prompt and response == "{y}"


def test_plain_template() -> None:
    t = load_template("plain")
    assert t.required == ("text",)
    assert t.render({"text": "hello world"}) == ("", "hello world")


def test_custom_template_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "qa.yaml").write_text('prompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n')
    (tmp_path / "qa.json").write_text(json.dumps({"prompt": "Q: {question}\nA: ", "response": "{answer} ({source})"}))
    y = load_template("qa.yaml", base_dir=tmp_path)
    assert y.required == ("question", "answer")
    assert y.render({"question": "why?", "answer": "because", "extra": 1}) == ("Q: why?\nA: ", "because")
    j = load_template(str(tmp_path / "qa.json"))
    assert j.required == ("question", "answer", "source")
    assert j.render({"question": "q", "answer": "a", "source": "s"}) == ("Q: q\nA: ", "a (s)")


def test_custom_template_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown template 'nope'"):
        load_template("nope", base_dir=tmp_path)
    (tmp_path / "bad.yaml").write_text("prompt: 'Q: {question'\nresponse: '{answer}'\n")
    with pytest.raises(DataError, match="bad.yaml"):
        load_template("bad.yaml", base_dir=tmp_path)
    (tmp_path / "pos.yaml").write_text("prompt: 'Q: {}'\nresponse: '{answer}'\n")
    with pytest.raises(DataError, match="positional"):
        load_template("pos.yaml", base_dir=tmp_path)
    (tmp_path / "noresp.json").write_text('{"prompt": "x"}')
    with pytest.raises(DataError, match="noresp.json: 'response' must be a string"):
        load_template("noresp.json", base_dir=tmp_path)
    # {x.y} reads an attribute of the field's string ({instruction.upper}: "<built-in method ...>")
    (tmp_path / "attr.yaml").write_text("prompt: '{instruction.upper}'\nresponse: '{output}'\n")
    with pytest.raises(DataError, match=r"attr.yaml.*\{instruction.upper\} reads an attribute"):
        load_template("attr.yaml", base_dir=tmp_path)
    (tmp_path / "item.yaml").write_text("prompt: '{meta[q].strip}'\nresponse: '{output}'\n")
    with pytest.raises(DataError, match="reads an attribute"):
        load_template("item.yaml", base_dir=tmp_path)
    (tmp_path / "nested.yaml").write_text("prompt: '{meta[q]}'\nresponse: '{output}'\n")
    assert load_template("nested.yaml", base_dir=tmp_path).render({"meta": {"q": "x"}, "output": "y"}) == ("x", "y")


# ------------------------------------------------------------------------------------------
# Tokenization and loss masks.


def test_loss_mask_covers_response_and_eos(tokenizer) -> None:
    t = load_template("alpaca")
    record = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "The answer is 5."}
    ex = tokenize_record(tokenizer, t, record, max_seq_len=512)
    prompt, response = t.render(record)
    p_ids, r_ids = _enc(tokenizer, prompt), _enc(tokenizer, response)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ex.input_ids == tuple([bos] + p_ids + r_ids + [eos])
    assert ex.labels == tuple([IGNORE_INDEX] * (1 + len(p_ids)) + r_ids + [eos])
    labelled = [label for label in ex.labels if label != IGNORE_INDEX]
    assert _dec(tokenizer, labelled) == response + "</s>"
    assert _dec(tokenizer, [i for i, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX]) == "<s>" + prompt
    assert ex.loss_tokens == len(r_ids) + 1


def test_plain_masks_only_bos(tokenizer) -> None:
    ex = tokenize_record(tokenizer, load_template("plain"), {"text": "hello world"}, max_seq_len=64)
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.labels[0] == IGNORE_INDEX
    assert ex.labels[1:] == ex.input_ids[1:]
    assert ex.loss_tokens == len(ex.input_ids) - 1


def test_no_bos_tokenizer(tokenizer_no_bos) -> None:
    ex = tokenize_record(tokenizer_no_bos, load_template("plain"), {"text": "hello world"}, max_seq_len=64)
    assert ex.input_ids == tuple(_enc(tokenizer_no_bos, "hello world") + [tokenizer_no_bos.eos_token_id])
    assert ex.labels[0] == IGNORE_INDEX  # position 0 is never predicted
    assert ex.labels[1:] == ex.input_ids[1:]


def test_truncation_left_truncates_prompt_and_keeps_response(tokenizer) -> None:
    t = load_template("alpaca")
    record = {"instruction": "Write a response.", "input": "hello world " * 20, "output": "goodbye world!"}
    prompt, response = t.render(record)
    p_ids, r_ids = _enc(tokenizer, prompt), _enc(tokenizer, response)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    max_len = 1 + len(r_ids) + 1 + 5
    ex = tokenize_record(tokenizer, t, record, max_seq_len=max_len)
    assert len(ex.input_ids) == max_len
    assert ex.input_ids == tuple([bos] + p_ids[-5:] + r_ids + [eos])
    assert _dec(tokenizer, [lab for lab in ex.labels if lab != IGNORE_INDEX]) == response + "</s>"
    # Prompt gone entirely, then the response is cut from the right (eos goes first).
    ex = tokenize_record(tokenizer, t, record, max_seq_len=3)
    assert ex.input_ids == (bos, r_ids[0], r_ids[1])
    assert ex.labels == (IGNORE_INDEX, r_ids[0], r_ids[1])


def test_over_long_examples_are_skipped(tmp_path: Path, tokenizer, tokenizer_no_bos, caplog) -> None:
    t = load_template("plain")
    assert tokenize_record(tokenizer, t, {"text": "hello"}, max_seq_len=1) is None
    # Without eos, an empty response has no loss token at any length.
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "bye"}])
    no_eos = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(), bos_token="<s>", pad_token="<pad>")
    with caplog.at_level("WARNING", logger="mlora_pp.data"):
        examples = load_examples(path, t, no_eos, max_seq_len=64)
    assert len(examples) == 2
    assert "skipped 1 of 3" in caplog.text
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(path, t, tokenizer, max_seq_len=1)


def test_load_examples_matches_tokenize_record(tmp_path: Path, tokenizer) -> None:
    records = [
        {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Say hello.", "output": "hello world"},
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    t = load_template("alpaca")
    got = load_examples(path, t, tokenizer, max_seq_len=40)
    assert got == [tokenize_record(tokenizer, t, r, max_seq_len=40) for r in records]


# ------------------------------------------------------------------------------------------
# Records and their errors.


def test_load_records_jsonl_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n  \n{"text": "b\u2028c"}\n')
    assert load_records(tmp_path / "a.jsonl") == [{"text": "a"}, {"text": "b\u2028c"}]
    (tmp_path / "b.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_records(tmp_path / "b.json") == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"text": "c"}]}))
    assert load_records(tmp_path / "c.json") == [{"text": "c"}]


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 3: invalid JSON"):
        load_records(path)


def test_missing_field_names_file_line_and_template(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(DataError) as info:
        load_examples(path, load_template("alpaca"), tokenizer, max_seq_len=64)
    assert str(info.value) == f"{path} line 3: missing field 'output' (template alpaca needs instruction, output)"


def test_bad_field_type_names_file_and_line(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": ["not", "text"]}])
    with pytest.raises(DataError, match=r"x\.jsonl line 2: field 'text' must be a string"):
        load_examples(path, load_template("plain"), tokenizer, max_seq_len=64)


def test_non_object_record(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2: expected a JSON object"):
        load_records(path)
    path = tmp_path / "y.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, "c"]')
    with pytest.raises(DataError, match=r"y\.json record 3: expected a JSON object"):
        load_records(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"e\.jsonl has no records"):
        load_records(tmp_path / "e.jsonl")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError, match=r"e\.json has no records"):
        load_records(tmp_path / "e.json")
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported data file type"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_records(tmp_path / "d.csv")


# ------------------------------------------------------------------------------------------
# Shuffling.


def test_epoch_order_is_a_deterministic_permutation() -> None:
    order = epoch_order(50, seed=1, job="a", epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=1, job="a", epoch=0)
    assert order != epoch_order(50, seed=1, job="a", epoch=1)
    assert order != epoch_order(50, seed=1, job="b", epoch=0)
    assert order != epoch_order(50, seed=2, job="a", epoch=0)
    assert epoch_order(0, seed=1, job="a", epoch=0) == []


def test_epoch_order_is_stable_across_processes() -> None:
    code = "from mlora_pp.data import epoch_order; print(epoch_order(30, 7, 'job-x', 3))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    assert out.stdout.strip() == str(epoch_order(30, 7, "job-x", 3))


# ------------------------------------------------------------------------------------------
# Step plans.


def _mixed(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [_fake(rng.randint(4, 60), rng.randint(1, 3)) for _ in range(n)]


def test_plan_steps_counts_and_sizes() -> None:
    examples = _mixed(10)
    plans = plan_steps(examples, batch_size=4, micro_batch_size=2, epochs=2, max_steps=None, seed=0, job="j")
    assert [p.step for p in plans] == list(range(6))
    assert [p.epoch for p in plans] == [0, 0, 0, 1, 1, 1]
    assert [p.rows for p in plans] == [4, 4, 2, 4, 4, 2]
    assert [[len(mb) for mb in p.micro_batches] for p in plans] == [[2, 2], [2, 2], [2]] * 2
    for epoch in (0, 1):
        seen = [i for p in plans if p.epoch == epoch for mb in p.micro_batches for i in mb]
        assert sorted(seen) == list(range(10))
        # The step's rows are the epoch_order chunk.
        order = epoch_order(10, 0, "j", epoch)
        steps = [p for p in plans if p.epoch == epoch]
        for k, p in enumerate(steps):
            assert sorted(i for mb in p.micro_batches for i in mb) == sorted(order[4 * k : 4 * k + 4])


def test_plan_steps_max_steps_caps() -> None:
    examples = _mixed(10)
    plans = plan_steps(examples, batch_size=4, micro_batch_size=2, epochs=5, max_steps=4, seed=0, job="j")
    assert len(plans) == 4 and plans[-1].epoch == 1
    full = plan_steps(examples, batch_size=4, micro_batch_size=2, epochs=5, max_steps=None, seed=0, job="j")
    assert plans == full[:4]
    assert len(plan_steps(examples, batch_size=4, micro_batch_size=2, epochs=1, max_steps=100, seed=0, job="j")) == 3


def test_plan_steps_sorted_by_length_and_loss_tokens() -> None:
    examples = _mixed(23, seed=3) + [_fake(20, 2), _fake(20, 2)]  # ties
    plans = plan_steps(examples, batch_size=8, micro_batch_size=3, epochs=2, max_steps=None, seed=5, job="j")
    for p in plans:
        rows = [i for mb in p.micro_batches for i in mb]
        assert rows == sorted(rows, key=lambda i: (-len(examples[i].input_ids), i))
        assert [len(mb) for mb in p.micro_batches][:-1] == [3] * (len(p.micro_batches) - 1)
        assert 1 <= len(p.micro_batches[-1]) <= 3
        assert p.loss_tokens == sum(examples[i].loss_tokens for i in rows)


def test_plan_steps_micro_batch_tokens_budget() -> None:
    examples = _mixed(40, seed=1) + [_fake(100, 1)]  # one row longer than the budget
    budget = 90
    plans = plan_steps(
        examples, batch_size=16, micro_batch_size=4, epochs=2, max_steps=None, seed=0, job="j", micro_batch_tokens=budget
    )
    for p in plans:
        for mb in p.micro_batches:
            assert 1 <= len(mb) <= 4
            longest = max(len(examples[i].input_ids) for i in mb)
            assert len(mb) * longest <= budget or len(mb) == 1
    for epoch in (0, 1):
        seen = [i for p in plans if p.epoch == epoch for mb in p.micro_batches for i in mb]
        assert sorted(seen) == list(range(len(examples)))
    # A generous budget is still capped at micro_batch_size rows; a tight one splits further.
    short = [_fake(5, 1) for _ in range(8)]
    plans = plan_steps(short, batch_size=8, micro_batch_size=4, epochs=1, max_steps=None, seed=0, job="j", micro_batch_tokens=1000)
    assert [len(mb) for mb in plans[0].micro_batches] == [4, 4]
    plans = plan_steps(short, batch_size=8, micro_batch_size=4, epochs=1, max_steps=None, seed=0, job="j", micro_batch_tokens=10)
    assert [len(mb) for mb in plans[0].micro_batches] == [2, 2, 2, 2]


def test_plan_steps_deterministic_and_job_dependent() -> None:
    examples = _mixed(20)
    kw = dict(batch_size=4, micro_batch_size=2, epochs=1, max_steps=None, seed=0)
    assert plan_steps(examples, job="a", **kw) == plan_steps(examples, job="a", **kw)
    assert plan_steps(examples, job="a", **kw) != plan_steps(examples, job="b", **kw)


def test_padding_waste_lower_with_sorting() -> None:
    examples = _mixed(64, seed=2)
    kw = dict(batch_size=16, micro_batch_size=4, epochs=2, max_steps=None, seed=0, job="j")
    sorted_waste = padding_waste(plan_steps(examples, **kw), examples)
    unsorted_waste = padding_waste(plan_steps(examples, sort_by_length=False, **kw), examples)
    assert 0.0 <= sorted_waste < unsorted_waste < 1.0
    assert padding_waste([], examples) == 0.0
    same = [_fake(7, 1) for _ in range(4)]
    plan = StepPlan(step=0, epoch=0, micro_batches=((0, 1), (2, 3)), loss_tokens=4)
    assert padding_waste([plan], same) == 0.0


# ------------------------------------------------------------------------------------------
# Collation.


def test_collate_pads_right() -> None:
    a, b = _fake(5, 2, start=10), _fake(3, 1, start=20)
    ids, labels = collate([a, b], pad_id=0)
    assert ids.dtype == torch.int64 and labels.dtype == torch.int64
    assert ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 13, 14], [-100, -100, 22, -100, -100]]
    ids, labels = collate([a, b], pad_id=1, pad_to=8)
    assert ids.shape == labels.shape == (2, 8)
    assert ids[1].tolist() == [20, 21, 22, 1, 1, 1, 1, 1]
    assert labels[0, 5:].tolist() == [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="pad_to"):
        collate([a, b], pad_id=0, pad_to=4)
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_encoding_errors_and_marks_name_the_line(tmp_path: Path) -> None:
    """A JSONL file is read a line at a time: a byte-order mark, CRLF endings and a bad byte on a
    late line are handled as when the file was decoded whole."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert load_records(path) == [{"text": "a"}, {"text": "b"}]
    path.write_bytes(b'{"text": "a"}\n\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl line 3: not valid UTF-8"):
        load_records(path)
    json_path = tmp_path / "b.json"
    json_path.write_bytes(b'[{"text": "a"},\n {"text": "\xff"}]')
    with pytest.raises(DataError, match=r"b\.json line 2: not valid UTF-8"):
        load_records(json_path)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="has no records"):
        load_records(tmp_path / "empty.jsonl")


def test_step_plans_in_arrays_equal_each_step_made_one_by_one() -> None:
    """`plan_steps` plans in arrays, every step at once: read back in any order, slices included,
    its steps equal each step made the plain way (sorted longest first or not, cut greedily), and
    so do the rows before a step and a resumed job's place in its epoch."""
    from mlora_pp.config import JobConfig
    from mlora_pp.data import StepPlans, cut_micro_batches
    from mlora_pp.job import AdapterJob

    rng = random.Random(7)
    for trial in range(400):
        n = rng.randint(1, 60)
        examples = [Example(tuple(range(k)), tuple([IGNORE_INDEX] + list(range(1, k)))) for k in
                    (rng.randint(1, 50) for _ in range(n))]
        kw = dict(batch_size=rng.randint(1, 12), micro_batch_size=rng.randint(1, 5), epochs=rng.randint(1, 3),
                  max_steps=rng.choice([None, None, rng.randint(0, 20)]), seed=rng.randint(0, 3), job=f"j{trial}",
                  micro_batch_tokens=rng.choice([None, rng.randint(1, 120)]), sort_by_length=rng.random() < 0.75)
        lengths = [len(ex.input_ids) for ex in examples]
        want: list[StepPlan] = []
        for epoch in range(kw["epochs"]):
            order = epoch_order(n, kw["seed"], kw["job"], epoch)
            for start in range(0, n, kw["batch_size"]):
                if kw["max_steps"] is None or len(want) < kw["max_steps"]:
                    rows = order[start : start + kw["batch_size"]]
                    if kw["sort_by_length"]:
                        rows = sorted(rows, key=lambda i: (-lengths[i], i))
                    micro = cut_micro_batches(rows, lengths, kw["micro_batch_size"], kw["micro_batch_tokens"])
                    want.append(StepPlan(len(want), epoch, micro, sum(examples[i].loss_tokens for i in rows)))
        plans = plan_steps(examples, **kw)
        assert isinstance(plans, StepPlans) and len(plans) == len(want)
        for k in rng.sample(range(len(want)), len(want)) + list(range(len(want))):
            assert plans[k] == want[k]
        assert plans == want and plans[1:3] == want[1:3] and (not want or plans[-1] == want[-1])
        for k in range(len(want) + 1):
            assert plans.rows_before(k) == sum(p.rows for p in want[:k])
            job = AdapterJob(JobConfig(name="a", data="unused.jsonl"), examples, plans, 0, steps_done=k)
            reference = AdapterJob(JobConfig(name="a", data="unused.jsonl"), examples, want, 0, steps_done=k)
            assert job.data_position() == reference.data_position()
