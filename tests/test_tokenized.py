"""Tests of mlora_pp.tokenized: rows in flat arrays against the same rows as `Example`s."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import mlora_pp.data as data
from mlora_pp.data import IGNORE_INDEX, Example, collate, load_examples, load_template, tokenize_record
from mlora_pp.tiny import build_tokenizer
from mlora_pp.tokenized import RowsBuilder, TokenizedRows, collate_rows


def _random_examples(rng: random.Random, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        length = rng.randint(1, 30)
        ids = tuple(rng.randrange(0, 50_000) for _ in range(length))
        labels = tuple(IGNORE_INDEX if k == 0 or rng.random() < 0.4 else t for k, t in enumerate(ids))
        examples.append(Example(ids, labels))
    return examples


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def test_rows_hold_the_examples_and_their_sizes(monkeypatch) -> None:
    monkeypatch.setattr(RowsBuilder, "FLUSH_TOKENS", 37)  # many flushes, rows split across none of them
    rng = random.Random(0)
    examples = _random_examples(rng, 200)
    rows = TokenizedRows.from_examples(examples)
    assert len(rows) == 200 and rows.tokens == sum(len(ex.input_ids) for ex in examples)
    assert list(rows) == examples and rows == examples and rows[-1] == examples[-1]
    assert rows.lengths.tolist() == [len(ex.input_ids) for ex in examples]
    assert rows.loss_tokens.tolist() == [ex.loss_tokens for ex in examples]
    assert rows.ids.dtype == np.int32 and rows.nbytes == 5 * rows.tokens + 8 * 201
    with pytest.raises(IndexError):
        rows[200]


def test_collate_rows_pads_like_collate_across_sources() -> None:
    rng = random.Random(1)
    a, b = _random_examples(rng, 40), _random_examples(rng, 25)
    ra, rb = TokenizedRows.from_examples(a), TokenizedRows.from_examples(b)
    for _ in range(30):
        pick_a = rng.sample(range(40), rng.randint(0, 6))
        pick_b = rng.sample(range(25), rng.randint(1, 6))
        expected = collate([a[i] for i in pick_a] + [b[i] for i in pick_b], pad_id=7)
        got = collate_rows([(ra, pick_a), (rb, pick_b)], pad_id=7)
        assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(got, expected))
        width = int(expected[0].shape[1]) + 3
        got = data.collate_sources([(ra, pick_a), (b, pick_b)], pad_id=7, pad_to=width)  # a list: via Examples
        assert torch.equal(got[1], collate([a[i] for i in pick_a] + [b[i] for i in pick_b], 7, width)[1])
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate_rows([(ra, [0, 1, 2])], pad_id=0, width=0)


def test_saved_rows_load_memory_mapped_and_equal(tmp_path: Path) -> None:
    rows = TokenizedRows.from_examples(_random_examples(random.Random(2), 50))
    rows.save(tmp_path)
    back = TokenizedRows.load(tmp_path)
    assert isinstance(back.ids, np.memmap) and not back.ids.flags.writeable
    assert back == rows and list(back) == list(rows)
    assert TokenizedRows.load(tmp_path, mmap=False) == rows


def test_ids_outside_int32_are_refused() -> None:
    builder = RowsBuilder()
    builder.add([1, 2**31], [False, True])
    with pytest.raises(ValueError, match="token ids"):
        builder.build()


def test_load_examples_over_many_chunks_matches_each_record_alone(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """Records tokenized in chunks and rows moved to arrays in pieces give what tokenizing each
    record alone gives, skipped records (no loss token left after truncation) included."""
    monkeypatch.setattr(data, "ENCODE_CHUNK", 7)
    monkeypatch.setattr(RowsBuilder, "FLUSH_TOKENS", 50)
    rng = random.Random(3)
    words = "the of and to in is was for on that with as by at from".split()
    records = [{"instruction": " ".join(rng.choices(words, k=rng.randint(1, 12))),
                "input": " ".join(rng.choices(words, k=rng.randint(0, 6))),
                "output": " ".join(rng.choices(words, k=rng.randint(1, 8)))} for _ in range(60)]
    for k in range(0, 60, 9):  # empty prompt and response: eos alone at position 0, no loss: skipped
        records[k] = {"instruction": "", "output": ""}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "t.yaml").write_text('prompt: "{instruction}"\nresponse: "{output}"\n')
    template = load_template("t.yaml", tmp_path)
    tokenizer.bos_token = None
    for max_seq_len in (5, 64):
        expected = [tokenize_record(tokenizer, template, r, max_seq_len) for r in records]
        assert expected.count(None) == 7
        expected = [ex for ex in expected if ex is not None]
        assert load_examples(path, template, tokenizer, max_seq_len) == expected


def test_loss_tokens_of_rows_empty_or_trained_at_position_0_match_examples() -> None:
    """`Example.loss_tokens` never counts position 0; nor do the rows' sums, empty rows included."""
    rng = random.Random(4)
    for _ in range(500):
        examples = []
        for _ in range(rng.randint(0, 8)):
            ids = tuple(rng.randrange(9) for _ in range(rng.choice([0, 0, 1, 2, 5])))
            examples.append(Example(ids, tuple(IGNORE_INDEX if rng.random() < 0.5 else t for t in ids)))
        rows = TokenizedRows.from_examples(examples)
        assert rows.loss_tokens.tolist() == [ex.loss_tokens for ex in examples]


def test_a_jobs_micro_batch_sizes_equal_plain_loops_over_its_rows() -> None:
    """`AdapterJob`'s sizes for the scheduler and the memory model, found with arrays, against the
    plain definitions over each micro-batch's rows: random data, token budgets, held-out rows,
    resumed starts and re-planned (halved) micro-batches."""
    from mlora_pp.config import JobConfig
    from mlora_pp.data import plan_steps
    from mlora_pp.job import AdapterJob, eval_batches

    rng = random.Random(5)
    for trial in range(60):
        examples = _random_examples(rng, rng.randint(1, 60))
        rows = TokenizedRows.from_examples(examples)
        tokens = rng.choice([None, 40, 90])
        config = JobConfig(name=f"j{trial}", data="unused.jsonl", batch_size=rng.randint(1, 9),
                           micro_batch_size=rng.randint(1, 4), micro_batch_tokens=tokens, epochs=rng.randint(1, 3))
        plans = plan_steps(rows, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                           epochs=config.epochs, max_steps=None, seed=0, job=config.name, micro_batch_tokens=tokens)
        source = rows if trial % 2 else examples  # arrays, or a plain list of Examples
        job = AdapterJob(config=config, examples=source, plans=plans, seed=0)
        if trial % 3 == 0:
            job.eval_examples = examples[:7]
            job.eval_batches = eval_batches(job.eval_examples, 2, None)
        for _ in range(2):
            job.steps_done = rng.randint(0, len(job.plans))
            steps = job.job_steps()
            want = tuple(tuple((len(m), len(m) * max(len(examples[i].input_ids) for i in m)) for m in p.micro_batches)
                         for p in job.plans[job.steps_done:])
            assert steps.micro_batches == want and steps.first_step == job.steps_done
            micros = [m for p in job.plans for m in p.micro_batches]
            padded = [len(m) * max(len(examples[i].input_ids) for i in m) for m in micros]
            shares = [sum(examples[i].loss_tokens for i in m) / n for m, n in zip(micros, padded)]
            assert job.loss_share() == max(shares, default=0.0)
            assert job.token_counts() == (sum(p.loss_tokens for p in job.plans), sum(padded))
            assert job.largest_micro_rows() == max(len(m) for m in micros)
            job.halve_micro_batches()  # the sizes follow the new plans
