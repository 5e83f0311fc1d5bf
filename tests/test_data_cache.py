"""Tests of mlora_pp.data_cache: tokenized rows kept on disk by what they depend on, shared by ranks."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from mlora_pp.config import RESERVED_NAMES, ConfigError, JobConfig, ModelConfig, RunConfig, parse_config
from mlora_pp.data import DataError, load_examples, load_template
from mlora_pp.data_cache import DATA_CACHE, DataCache, Source, job_sources
from mlora_pp.tiny import build_tokenizer
from mlora_pp.training import prepare_jobs

WORDS = "the of and to in is was for on that with as by at from his her are be or".split()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _data(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=rng.randint(2, 9))),
                                        "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 7)))}) + "\n"
                            for _ in range(n)))
    return path


def test_a_second_cache_reads_what_the_first_tokenized(tmp_path: Path, tokenizer) -> None:
    source = Source(_data(tmp_path / "a.jsonl", 40, 0), load_template("alpaca"), 32)
    reference = load_examples(source.path, source.template, tokenizer, source.max_seq_len)
    first = DataCache(tokenizer, tmp_path / "cache")
    assert first.rows(source) == reference and (first.hits, first.misses) == (0, 1)
    assert first.rows(source) is first.rows(source)  # once per process
    second = DataCache(tokenizer, tmp_path / "cache", rank=1)
    rows = second.rows(source)
    assert (second.hits, second.misses) == (1, 0)
    assert isinstance(rows.ids, np.memmap) and rows == reference
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.key(source)]  # no temporary left


def test_the_key_changes_with_everything_rows_depend_on(tmp_path: Path, tokenizer) -> None:
    path = _data(tmp_path / "a.jsonl", 10, 0)
    cache = DataCache(tokenizer, tmp_path / "cache")
    base = Source(path, load_template("alpaca"), 32)
    keys = {cache.key(base), cache.key(Source(path, load_template("alpaca"), 33)),
            cache.key(Source(path, load_template("plain"), 32))}
    other = build_tokenizer()
    other.eos_token = other.bos_token  # same vocabulary, another eos id
    keys.add(DataCache(other, tmp_path / "cache").key(base))
    assert len(keys) == 4
    assert DataCache(build_tokenizer(), tmp_path / "cache").key(base) == cache.key(base)  # equal tokenizers
    copy = tmp_path / "b.jsonl"
    copy.write_bytes(path.read_bytes())
    assert cache.key(Source(copy, base.template, 32)) == cache.key(base)  # by content, not by name
    path.write_text(path.read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert cache.key(base) not in keys


def test_a_damaged_entry_is_tokenized_again(tmp_path: Path, tokenizer, caplog) -> None:
    source = Source(_data(tmp_path / "a.jsonl", 30, 1), load_template("alpaca"), 32)
    DataCache(tokenizer, tmp_path / "cache").rows(source)
    entry = tmp_path / "cache" / DataCache(tokenizer, None).key(source)
    ids = entry / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-8])  # a row's tokens lost
    with caplog.at_level(logging.WARNING):
        cache = DataCache(tokenizer, tmp_path / "cache")
        rows = cache.rows(source)
    assert "cannot read cached rows" in caplog.text and (cache.hits, cache.misses) == (0, 1)
    assert rows == load_examples(source.path, source.template, tokenizer, 32)
    assert DataCache(tokenizer, tmp_path / "cache").rows(source) == rows  # and stored whole again


def test_what_a_killed_writer_left_is_removed_once_it_is_old(tmp_path: Path, tokenizer) -> None:
    import os
    import time

    source = Source(_data(tmp_path / "a.jsonl", 10, 5), load_template("alpaca"), 32)
    cache_dir = tmp_path / "cache"
    old, new = cache_dir / ".tmp-abc-host-1", cache_dir / ".tmp-def-host-2"
    for path in (old, new):
        path.mkdir(parents=True)
        (path / "ids.npy").write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    DataCache(tokenizer, cache_dir, rank=1).fill([source], world=2)  # only rank 0 tidies
    assert old.exists()
    DataCache(tokenizer, cache_dir, rank=0).fill([source], world=2)
    assert not old.exists() and new.exists()  # a writer may still be at work on the recent one


def test_skipped_records_are_reported_again_when_read_back(tmp_path: Path, tokenizer, caplog) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "", "output": ""}) + "\n" + json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (tmp_path / "t.yaml").write_text('prompt: "{instruction}"\nresponse: "{output}"\n')
    tokenizer = build_tokenizer()
    tokenizer.bos_token = None  # the empty record is eos alone at position 0: no loss token
    source = Source(path, load_template("t.yaml", tmp_path), 16)
    with caplog.at_level(logging.WARNING):
        assert len(DataCache(tokenizer, tmp_path / "cache").rows(source)) == 1
        caplog.clear()
        cache = DataCache(tokenizer, tmp_path / "cache")
        assert len(cache.rows(source)) == 1 and cache.hits == 1
    assert "skipped 1 of 2 records" in caplog.text


def test_a_long_tokenization_reports_its_progress(tmp_path: Path, tokenizer, monkeypatch, capsys) -> None:
    import mlora_pp.data
    import mlora_pp.data_cache

    monkeypatch.setattr(mlora_pp.data, "ENCODE_CHUNK", 16)
    monkeypatch.setattr(mlora_pp.data_cache, "PROGRESS_S", 0.0)
    source = Source(_data(tmp_path / "a.jsonl", 40, 4), load_template("alpaca"), 32)
    DataCache(tokenizer, tmp_path / "cache", rank=1).rows(source)
    lines = [line for line in capsys.readouterr().out.splitlines() if "tokenizing" in line]
    assert [line.split(": ")[-1].split(" records")[0] for line in lines] == ["16", "32", "40"]
    assert lines[0].startswith(f"rank 1: tokenizing {source.path}: ")


def test_fill_gives_each_file_to_one_rank_whatever_the_others_did(tmp_path: Path, tokenizer, capsys) -> None:
    """Three ranks, seven jobs over five files (one bad): each good file is tokenized by exactly one
    rank, whichever order the ranks run in, and then every rank reads every file from disk."""
    template = load_template("alpaca")
    paths = [_data(tmp_path / f"d{k}.jsonl", 10 + 15 * k, k) for k in range(4)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"oops": 1}\n')
    sources = [Source(p, template, 24) for p in paths + [bad, paths[0], paths[2]]]
    for order in ([0, 1, 2], [2, 0, 1]):
        directory = tmp_path / f"cache-{order[0]}"
        caches = {r: DataCache(tokenizer, directory, rank=r) for r in range(3)}
        for r in order:
            caches[r].fill(list(reversed(sources)) if r == 1 else sources, world=3)
            if r == 0 and order[0] == 0:  # rank 0 says what is to do (four good files, one bad, nothing stored)
                assert "tokenizing 5 data file(s), " in capsys.readouterr().out
        assert sum(c.misses for c in caches.values()) == 4 and max(c.misses for c in caches.values()) <= 2
        assert len(list(directory.iterdir())) == 4
        reader = DataCache(tokenizer, directory, rank=1)
        for p in paths:
            assert reader.rows(Source(p, template, 24)) == load_examples(p, template, tokenizer, 24)
        assert (reader.hits, reader.misses) == (4, 0)
        with pytest.raises(DataError, match="bad.jsonl line 2: missing field"):
            reader.rows(Source(bad, template, 24))


def test_a_cache_the_ranks_do_not_share_is_named_once(tmp_path: Path, tokenizer, capsys) -> None:
    """Two ranks with a directory each (a node-local data_cache): each tokenizes the other's share
    too, and says once why."""
    template = load_template("alpaca")
    sources = [Source(_data(tmp_path / f"d{k}.jsonl", 20 + k, k), template, 24) for k in range(4)]
    caches = [DataCache(tokenizer, tmp_path / f"node{r}", rank=r) for r in range(2)]
    for cache in caches:
        cache.fill(sources, world=2)
    capsys.readouterr()
    for cache in caches:
        assert [cache.rows(s) for s in sources] == [load_examples(s.path, template, tokenizer, 24) for s in sources]
        assert cache.misses == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "rank 0: the data cache" in warnings[0] and "the ranks do not share it" in warnings[1]


def test_jobs_reading_one_file_share_its_rows(tmp_path: Path, tokenizer, capsys) -> None:
    path = _data(tmp_path / "a.jsonl", 20, 3)
    jobs = [JobConfig(name=f"j{k}", data=str(path), batch_size=4, micro_batch_size=2, max_seq_len=32) for k in range(3)]
    jobs.append(JobConfig(name="other", data=str(path), batch_size=4, micro_batch_size=2, max_seq_len=16))
    cfg = RunConfig(model=ModelConfig(path=tmp_path), jobs=jobs, output_dir=tmp_path / "out")
    loaded = prepare_jobs(cfg, tokenizer)
    assert loaded["j0"].examples is loaded["j1"].examples is loaded["j2"].examples
    DataCache(tokenizer, tmp_path / "cache").fill(job_sources(jobs), world=2)
    assert "tokenizing 1 data file(s) for 2 template and length settings" in capsys.readouterr().out
    assert loaded["other"].examples is not loaded["j0"].examples
    assert len(job_sources(jobs)) == 4


def test_job_names_cannot_be_the_runs_own_directories() -> None:
    from mlora_pp.checkpoint import CHECKPOINTS
    from mlora_pp.control import CONTROL

    assert {CHECKPOINTS, CONTROL, DATA_CACHE} <= set(RESERVED_NAMES)
    for name in RESERVED_NAMES:
        with pytest.raises(ConfigError, match=rf"jobs\[0\]\.name: '{name}' is the name of the run's own directory"):
            parse_config({"model": {"path": "m"}, "jobs": [{"name": name, "data": "d.jsonl"}]}, "x.yaml")


def test_ranks_that_race_on_one_entry_leave_one_whole_entry(tmp_path: Path, tokenizer, caplog) -> None:
    """Ranks that miss one file together (a cache written to by several runs, or a fallback) each
    tokenize and store it; the first rename wins and the others' equal entries are dropped quietly."""
    import threading

    source = Source(_data(tmp_path / "a.jsonl", 200, 6), load_template("alpaca"), 64)
    caches = [DataCache(tokenizer, tmp_path / "cache", rank=r) for r in range(4)]
    start = threading.Barrier(4)
    found: dict[int, object] = {}

    def rank(r: int) -> None:
        start.wait()
        found[r] = caches[r].rows(source)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    with caplog.at_level(logging.WARNING):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert "cannot cache" not in caplog.text
    reference = load_examples(source.path, source.template, tokenizer, 64)
    assert all(found[r] == reference for r in range(4))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [caches[0].key(source)]
    assert DataCache(tokenizer, tmp_path / "cache").rows(source) == reference
