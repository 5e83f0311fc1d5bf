"""Tests of mlora_pp.data_cache: tokenized rows kept on disk by what they depend on, shared by ranks."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlora_pp import data_cache
from mlora_pp.cache_entries import LEASE_FILE, hold_lease, list_entries, prune
from mlora_pp.config import (RESERVED_NAMES, ConfigError, JobConfig, ModelConfig, RunConfig, human_bytes, parse_config,
                             size_bytes)
from mlora_pp.data import DataError, load_examples, load_template
from mlora_pp.data_cache import DATA_CACHE, DIGESTS_DIR, DataCache, Source, _identity, job_sources
from mlora_pp.tiny import build_tokenizer
from mlora_pp.training import prepare_jobs

ROOT = Path(__file__).resolve().parents[1]
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


def _names(cache: Path) -> list[str]:
    """What a cache directory holds besides its digests' notes (kept for files over 2 s old)."""
    return [p.name for p in cache.iterdir() if p.name != DIGESTS_DIR]


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
    assert _names(tmp_path / "cache") == [first.key(source)]  # no temporary left


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
    assert _names(tmp_path / "cache") == [caches[0].key(source)]
    assert DataCache(tokenizer, tmp_path / "cache").rows(source) == reference


# ------------------------------------------------------------------------------ leases and pruning

DAY = 86400.0
HOLDER = ("import sys; from pathlib import Path; from mlora_pp.cache_entries import hold_lease; "
          "print(hold_lease(Path(sys.argv[1])), flush=True); sys.stdin.read()")


def _entries(tmp_path: Path, tokenizer, ages_days: list[float]) -> tuple[Path, list[Path]]:
    """One stored entry per age (a file each, written by a cache that keeps its rows in memory, so this
    process holds no lease), each last used that many days ago."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cache, now = tmp_path / "cache", time.time()
    paths = []
    for i, age in enumerate(ages_days):
        source = Source(_data(tmp_path / f"d{i}.jsonl", 20 + 10 * i, i), load_template("alpaca"), 32)
        writer = DataCache(tokenizer, cache)
        writer.rows(source)
        entry = cache / writer.key(source)
        os.utime(entry / LEASE_FILE, (now - age * DAY, now - age * DAY))
        paths.append(entry)
    return cache, paths


def test_prune_takes_the_least_recently_used_first_and_spares_what_it_is_told(tmp_path: Path, tokenizer) -> None:
    cache, (old, middle, new) = _entries(tmp_path, tokenizer, [3, 2, 1])
    listed = list_entries(cache)
    assert [e.path for e in listed] == [old, middle, new]
    assert all(e.bytes == sum(p.stat().st_size for p in e.path.iterdir()) and e.rows > 0 for e in listed)
    total = sum(e.bytes for e in listed)
    dry = prune(cache, max_bytes=total - listed[0].bytes, dry_run=True)
    assert [e.path for e in dry.removed] == [old] and old.is_dir()  # said, not done
    assert [e.path for e in prune(cache, unused_for_s=1.5 * DAY).removed] == [old, middle]
    assert old.exists() is False and middle.exists() is False and new.is_dir()
    assert _names(cache) == [new.name]  # nothing left aside
    cache, (a, b, c) = _entries(tmp_path / "again", tokenizer, [3, 2, 1])
    spared = prune(cache, max_bytes=0, spare_used_since=time.time() - 2.5 * DAY)
    assert [e.path for e in spared.removed] == [a] and b.is_dir() and c.is_dir()
    assert spared.kept_bytes == sum(e.bytes for e in list_entries(cache))


def test_an_entry_a_process_maps_is_never_pruned(tmp_path: Path, tokenizer) -> None:
    cache, (held, mine) = _entries(tmp_path, tokenizer, [5, 4])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert hold_lease(mine)  # this process's own lease: kept too (on NFS its lock would not conflict)
        result = prune(cache, unused_for_s=0)
        assert result.removed == [] and {e.path for e in result.in_use} == {held, mine}
        assert time.time() - next(e for e in list_entries(cache) if e.path == held).last_used < DAY  # touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert [e.path for e in prune(cache, unused_for_s=0).removed] == [held]
    assert mine.is_dir()


def test_a_reader_that_meets_a_prune_tokenizes_again(tmp_path: Path, tokenizer, capsys) -> None:
    cache, (entry,) = _entries(tmp_path, tokenizer, [2])
    source = Source(tmp_path / "d0.jsonl", load_template("alpaca"), 32)
    pruner = os.open(entry / LEASE_FILE, os.O_RDWR)
    try:
        fcntl.flock(pruner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a prune holds it, about to remove it
        reader = DataCache(tokenizer, cache, rank=1)
        reader._shares[_identity(source)] = 0
        rows = reader.rows(source)
    finally:
        os.close(pruner)
    assert (reader.hits, reader.misses) == (0, 1)
    assert rows == load_examples(source.path, source.template, tokenizer, 32)
    assert "do not share" not in capsys.readouterr().out  # a prune, not a cache the ranks do not share


def test_the_cache_command_lists_and_prunes(tmp_path: Path, tokenizer) -> None:
    cache, (old, new) = _entries(tmp_path, tokenizer, [10, 0])

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher", "cache", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    listed = command(str(cache))
    assert listed.returncode == 0 and "2 entries" in listed.stdout, listed.stderr
    assert old.name in listed.stdout and "last used 10.0 days ago" in listed.stdout
    dry = command(str(cache), "--unused-days", "7", "--dry-run")
    assert dry.returncode == 0 and f"would remove {old.name}" in dry.stdout and old.is_dir()
    done = command(str(cache), "--unused-days", "7")
    assert done.returncode == 0 and f"removed {old.name}" in done.stdout and not old.exists() and new.is_dir()
    bad = command(str(cache), "--max-gib", "-1")
    assert bad.returncode == 2 and "--max-gib needs a number >= 0" in bad.stderr
    missing = command(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a directory"


@pytest.mark.parametrize("value,ok", [("50GiB", True), (1e6, True), ("lots", False), (0, False), ("0.5B", False)])
def test_data_cache_max_size_reads_a_size(value, ok) -> None:
    raw = {"model": {"path": "m"}, "jobs": [{"name": "a", "data": "d.jsonl"}], "data_cache_max_size": value}
    if ok:
        assert size_bytes(parse_config(raw).data_cache_max_size) == (50 * 2**30 if value == "50GiB" else 10**6)
    else:
        with pytest.raises(ConfigError, match="data_cache_max_size"):
            parse_config(raw)


def test_a_run_with_a_size_limit_prunes_unused_entries_and_keeps_its_own(tmp_path: Path, tokenizer, capsys) -> None:
    """One rank, a shared cache over its limit: another run's entry unused for 30 days goes, this run's
    entry (tokenized in this run) stays although the cache is still over the limit, and both are said."""
    from test_training import JOBS, make_raw, make_workspace

    from mlora_pp.training import train

    workspace = make_workspace(tmp_path, layers=2)
    cache, (old,) = _entries(tmp_path / "other", tokenizer, [30])
    raw = dict(make_raw(workspace, JOBS[:1], "run"), data_cache=str(cache), data_cache_max_size=1)
    result = train(parse_config(raw), progress=False)
    assert result.steps == {"alpha": JOBS[0]["max_steps"]}
    assert not old.exists()
    (kept,) = list_entries(cache)
    assert kept.data == str(workspace[2]["alpha"])
    out = capsys.readouterr().out
    assert f"rank 0: data cache {cache}: removed 1 unused entries" in out
    assert f"warning: rank 0: data cache {cache} holds {human_bytes(kept.bytes)}, over data_cache_max_size 1 B" in out


# ------------------------------------------------------------------------------ digests kept on disk


def _hashes(monkeypatch) -> list[Path]:
    """Forget this process's digests; the files hashed from now on."""
    monkeypatch.setattr(data_cache, "_DIGESTS", {})
    hashed: list[Path] = []
    real = data_cache.sha256_file
    monkeypatch.setattr(data_cache, "sha256_file", lambda path: hashed.append(Path(path)) or real(path))
    return hashed


def _age_file(path: Path, seconds: float = 60) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_later_start_reads_each_files_digest_instead_of_hashing_it(tmp_path: Path, tokenizer, monkeypatch) -> None:
    source = Source(_data(tmp_path / "a.jsonl", 30, 3), load_template("alpaca"), 32)
    _age_file(source.path)
    hashed = _hashes(monkeypatch)
    key = DataCache(tokenizer, tmp_path / "cache").key(source)
    assert hashed == [source.path]
    hashed = _hashes(monkeypatch)  # a new process
    assert DataCache(tokenizer, tmp_path / "cache").key(source) == key and hashed == []
    assert DataCache(tokenizer, None).key(source) == key and hashed == []  # this process remembers it
    assert list_entries(tmp_path / "cache") == []  # notes are not entries


def test_on_a_first_start_each_file_is_read_by_its_owner_alone(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """Three ranks (each with a fresh process memory), five files never seen: each file is hashed
    and tokenized by the one rank whose share it is; the others read its digest from the note its
    owner left and its rows from the entry, without opening the file."""
    template = load_template("alpaca")
    sources = [Source(_data(tmp_path / f"d{k}.jsonl", 10 + 12 * k, k), template, 24) for k in range(5)]
    for source in sources:
        _age_file(source.path)
    directory = tmp_path / "cache"
    hashed_by: dict[int, list[Path]] = {}
    caches = {}
    hashes = _hashes(monkeypatch)
    for r in (2, 0, 1):
        monkeypatch.setattr(data_cache, "_DIGESTS", {})  # a process of its own
        caches[r] = DataCache(tokenizer, directory, rank=r)
        caches[r].fill(sources, world=3)
        hashed_by[r] = hashes[:]
        hashes.clear()
    owners = [[r for r in hashed_by if s.path in hashed_by[r]] for s in sources]
    assert all(len(o) == 1 for o in owners), owners
    assert sorted(len(h) for h in hashed_by.values()) == [1, 2, 2]
    assert sum(c.misses for c in caches.values()) == 5
    expected = [load_examples(s.path, template, tokenizer, 24) for s in sources]
    for r, cache in caches.items():  # the jobs' rows, as `prepare_jobs` reads them after `fill`
        monkeypatch.setattr(data_cache, "_DIGESTS", {})
        monkeypatch.setattr(cache, "_tokenize", None)  # reading a file's rows would fail here
        assert [cache.rows(s) for s in sources] == expected
        assert hashes == [], (r, hashes)


def test_a_changed_file_is_hashed_again_even_with_its_mtime_set_back(tmp_path: Path, tokenizer, monkeypatch) -> None:
    path = _data(tmp_path / "a.jsonl", 30, 4)
    source = Source(path, load_template("alpaca"), 32)
    _age_file(path)
    before = path.stat()
    key = DataCache(tokenizer, tmp_path / "cache").key(source)
    text = path.read_text()
    path.write_text(text.replace("the", "and", 1) if "the" in text else text.replace("of", "to", 1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only ctime differs
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    hashed = _hashes(monkeypatch)
    changed = DataCache(tokenizer, tmp_path / "cache").key(source)
    assert hashed == [path] and changed != key
    assert changed == DataCache(tokenizer, None).key(source)


def test_a_file_modified_just_before_hashing_keeps_no_digest_on_disk(tmp_path: Path, tokenizer, monkeypatch) -> None:
    source = Source(_data(tmp_path / "a.jsonl", 30, 5), load_template("alpaca"), 32)  # written just now
    DataCache(tokenizer, tmp_path / "cache").key(source)
    hashed = _hashes(monkeypatch)
    DataCache(tokenizer, tmp_path / "cache").key(source)
    assert hashed == [source.path]


def test_leases_stop_at_the_processes_limit_and_say_so(tmp_path: Path, tokenizer, monkeypatch, capsys) -> None:
    from mlora_pp import cache_entries

    cache, paths = _entries(tmp_path, tokenizer, [3, 2, 1])
    monkeypatch.setattr(cache_entries, "_HELD", {})
    monkeypatch.setattr(cache_entries, "_LIMIT", [2])
    monkeypatch.setattr(cache_entries, "_WARNED", [])
    assert all(hold_lease(p) for p in paths)
    assert set(cache_entries._HELD) == {str(p / LEASE_FILE) for p in paths[:2]}
    assert "maps more than 2 data cache entries" in capsys.readouterr().out
    for fd in cache_entries._HELD.values():
        os.close(fd)


def test_on_a_file_system_without_locks_entries_are_read_and_never_pruned(tmp_path: Path, tokenizer,
                                                                          monkeypatch) -> None:
    import errno

    from mlora_pp import cache_entries

    cache, (entry,) = _entries(tmp_path, tokenizer, [9])
    source = Source(tmp_path / "d0.jsonl", load_template("alpaca"), 32)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache_entries.fcntl, "flock", no_locks)
    reader = DataCache(tokenizer, cache)
    assert reader.rows(source) == load_examples(source.path, source.template, tokenizer, 32)
    assert (reader.hits, reader.misses) == (1, 0)
    result = prune(cache, unused_for_s=0)
    assert result.removed == [] and [e.path for e in result.in_use] == [entry] and entry.is_dir()


def test_a_prune_drops_the_digest_notes_of_files_that_are_gone(tmp_path: Path, tokenizer) -> None:
    from mlora_pp.cache_entries import drop_orphan_notes
    from mlora_pp.data_cache import file_digest

    memo = tmp_path / "cache" / DIGESTS_DIR
    kept, gone = _data(tmp_path / "kept.jsonl", 5, 1), _data(tmp_path / "gone.jsonl", 5, 2)
    for path in (kept, gone):
        _age_file(path)
        file_digest(path, memo)
    assert len(list(memo.glob("*.json"))) == 2
    gone.unlink()
    assert drop_orphan_notes(tmp_path / "cache", dry_run=True) == 1 and len(list(memo.glob("*.json"))) == 2
    assert drop_orphan_notes(tmp_path / "cache") == 1
    (note,) = memo.glob("*.json")
    assert json.loads(note.read_text())["path"] == str(kept.resolve())
    done = subprocess.run([sys.executable, "-m", "launcher", "cache", str(tmp_path / "cache"), "--unused-days", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "removed 0 entries (0.0 MiB) and 0 digest notes" in done.stdout, done.stdout


def test_the_cache_command_names_a_directory_it_cannot_read(tmp_path: Path, monkeypatch, capsys) -> None:
    from mlora_pp import cache_entries

    def denied(directory):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_entries, "list_entries", denied)  # root reads every directory: deny it here
    assert cache_entries.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: Permission denied"
