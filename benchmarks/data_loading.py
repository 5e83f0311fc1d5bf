"""Start-up cost of a run's data: tokenizing, sharing the work among ranks, reading it back.

    python -m benchmarks.data_loading                       # 8 files x 5,000 records, 2 ranks
    python -m benchmarks.data_loading --files 4 --records 500 --ranks 2 --quick

Every rank needs every job's rows. Measured here, side by side on the same files:
- ``every rank tokenizes``: R processes started together, each tokenizing every file (what the
  ranks did before `DataCache`), the wall time of the slowest (a run's start-up waits for it).
- ``ranks share``: R processes started together, each tokenizing its share (`DataCache.fill`),
  then each reading all rows, the slowest likewise.
- ``read back``: a fresh process reading every file's rows from the cache (a resume, a later run),
  with each file's digest read from the cache's notes, and without them (hashing every file, as
  every start did before the notes).
- digests: one large file (``--digest-mib``) hashed, against its digest read from the note a start
  before left: what a later start saves per file that size, on every rank.
- memory: the rows held as `TokenizedRows` arrays against the same rows as `Example` tuples
  (how they were held before), measured with tracemalloc on one file.

The files are synthetic Alpaca records (seeded) tokenized by the tiny tokenizer of `mlora_pp.tiny`,
whose small vocabulary makes several tokens of a word: tokens per second, not records per second,
is what carries over to a real tokenizer. Writes benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks import RESULTS, write_result

WORDS = ("the of and to in is was for on that with as by at from his her are be or have this which one all were "
         "when there can an their more if out so said what up its about into than them some could time these two "
         "may then do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too").split()


def write_files(directory: Path, files: int, records: int, seed: int = 0) -> list[Path]:
    """``files`` JSONL files of ``records`` Alpaca records each, of 10-160 words."""
    paths = []
    for k in range(files):
        rng = random.Random(seed * 1000 + k)
        path = directory / f"data-{k}.jsonl"
        with path.open("w") as f:
            for _ in range(records):
                words = rng.randint(10, 160)
                f.write(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=12)),
                                    "input": " ".join(rng.choices(WORDS, k=words // 2)),
                                    "output": " ".join(rng.choices(WORDS, k=words))}) + "\n")
        paths.append(path)
    return paths


def _sources(paths: list[Path], max_seq_len: int):
    from mlora_pp.data import load_template
    from mlora_pp.data_cache import Source

    template = load_template("alpaca")
    return [Source(p, template, max_seq_len) for p in paths]


def _rank(rank: int, world: int, paths: list[Path], cache_dir: Path | None, max_seq_len: int, start, out) -> None:
    """One rank of a run's start-up: its share of tokenizing, a barrier, then every file's rows
    (without a cache directory: every file tokenized by this rank)."""
    import torch

    from mlora_pp.data_cache import DataCache
    from mlora_pp.tiny import build_tokenizer

    torch.set_num_threads(1)
    cache = DataCache(build_tokenizer(), cache_dir, rank)
    sources = _sources(paths, max_seq_len)
    start.wait()
    t0 = time.perf_counter()
    cache.fill(sources, world)  # nothing without a cache directory
    filled = time.perf_counter() - t0
    start.wait()  # what `agree` is in a run: every rank's share is stored before anyone reads
    tokens = sum(cache.rows(s).tokens for s in sources)
    out.put({"rank": rank, "fill_s": filled, "total_s": time.perf_counter() - t0, "misses": cache.misses,
             "tokens": tokens})


def on_ranks(paths: list[Path], world: int, cache_dir: Path | None, max_seq_len: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, paths, cache_dir, max_seq_len, start, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    return results


def read_back(paths: list[Path], cache_dir: Path, max_seq_len: int, notes: bool = True) -> dict:
    """As a fresh process: nothing remembered in memory; `notes` False removes the digests' notes."""
    from mlora_pp import data_cache
    from mlora_pp.data_cache import DIGESTS_DIR, DataCache
    from mlora_pp.tiny import build_tokenizer

    data_cache._DIGESTS.clear()
    if not notes:
        shutil.rmtree(cache_dir / DIGESTS_DIR, ignore_errors=True)
    cache = DataCache(build_tokenizer(), cache_dir)
    sources = _sources(paths, max_seq_len)
    t0 = time.perf_counter()
    for source in sources:
        cache.key(source)
    keys_s = time.perf_counter() - t0
    rows = [cache.rows(s) for s in sources]
    # a run looks at every row's length while planning: include it
    tokens = sum(int(r.lengths.sum()) for r in rows)
    return {"seconds": time.perf_counter() - t0, "keys_s": keys_s, "tokens": tokens, "hits": cache.hits,
            "misses": cache.misses}


def digests(directory: Path, mib: int) -> dict:
    """One file of `mib` MiB (an hour old, as data files are): hashed, then its digest read from the note."""
    from mlora_pp import data_cache
    from mlora_pp.data_cache import DIGESTS_DIR, file_digest

    path = directory / "large.jsonl"
    line = (json.dumps({"instruction": " ".join(WORDS[:40]), "output": " ".join(WORDS[40:80])}) + "\n").encode()
    with open(path, "wb") as f:
        for _ in range(mib * 2**20 // len(line) + 1):
            f.write(line)
    then = time.time() - 3600
    os.utime(path, (then, then))
    memo = directory / DIGESTS_DIR
    timings = {}
    for name in ("hashed_s", "from_note_s"):
        data_cache._DIGESTS.clear()
        t0 = time.perf_counter()
        file_digest(path, memo)
        timings[name] = time.perf_counter() - t0
    return {"bytes": path.stat().st_size, **timings}


def memory(path: Path, max_seq_len: int) -> dict:
    """Bytes held by one file's rows as arrays and as `Example` tuples (tracemalloc, after loading)."""
    from mlora_pp.data import _example, load_examples, load_template
    from mlora_pp.tiny import build_tokenizer

    tokenizer, template = build_tokenizer(), load_template("alpaca")
    tracemalloc.start()
    rows = load_examples(path, template, tokenizer, max_seq_len)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    # as the tokenizer's lists became Examples before: labels share the ids' int objects
    examples = [_example(rows.ids[a:b].tolist(), rows.trained[a:b].tolist())
                for a, b in zip(rows.offsets[:-1].tolist(), rows.offsets[1:].tolist())]
    as_tuples, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del examples
    return {"tokens": rows.tokens, "arrays_bytes": held, "arrays_peak_bytes": peak, "tuples_bytes": as_tuples,
            "arrays_bytes_per_token": held / rows.tokens, "tuples_bytes_per_token": as_tuples / rows.tokens}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--digest-mib", type=int, default=None,
                   help="size of the file whose digest is timed (0: none; default 512, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="no memory measurement; do not write the result")
    p.add_argument("--out", type=Path, default=RESULTS / "data_loading.json")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="data-loading-"))
    try:
        paths = write_files(work, a.files, a.records)
        for path in paths:  # an hour old, as data files are: their digests are kept (`data_cache.RACY_S`)
            os.utime(path, (time.time() - 3600,) * 2)
        size = sum(p.stat().st_size for p in paths)
        each = on_ranks(paths, a.ranks, None, a.max_seq_len)
        ranks = on_ranks(paths, a.ranks, work / "cache", a.max_seq_len)
        back = read_back(paths, work / "cache", a.max_seq_len)
        hashing = read_back(paths, work / "cache", a.max_seq_len, notes=False)
        mem = None if a.quick else memory(paths[0], a.max_seq_len)
        mib = a.digest_mib if a.digest_mib is not None else (1 if a.quick else 512)
        large = digests(work, mib) if mib > 0 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = max(r["total_s"] for r in each)
    slowest = max(r["total_s"] for r in ranks)
    tokens = each[0]["tokens"]
    result = {"files": a.files, "records_per_file": a.records, "bytes": size, "ranks": a.ranks,
              "max_seq_len": a.max_seq_len, "tokens": tokens, "every_rank_tokenizes": each,
              "every_rank_tokenizes_wall_s": before, "shared": ranks, "shared_wall_s": slowest, "read_back": back,
              "read_back_hashing": hashing, "digests": large,
              "memory": mem, "speedup_start": before / slowest, "speedup_resume": before / back["seconds"]}
    print(f"| {a.files} files x {a.records:,} records, {tokens:,} tokens, {size / 2**20:.1f} MiB, {a.ranks} ranks "
          f"| seconds | |")
    print("|---|---|---|")
    print(f"| every rank tokenizes every file (before) | {before:.2f} | 1.00x |")
    print(f"| the ranks share it through the cache (first start) | {slowest:.2f} | "
          f"{result['speedup_start']:.2f}x faster |")
    print(f"| read back from the cache (resume, later runs) | {back['seconds']:.3f} | "
          f"{result['speedup_resume']:.0f}x faster |")
    print(f"| of which the files' digests, read from notes | {back['keys_s']:.4f} | |")
    print(f"| read back, every file hashed (no notes, as before them) | {hashing['seconds']:.3f} | |")
    print(f"| of which hashing the files | {hashing['keys_s']:.4f} | |")
    if large is not None:
        print(f"\none file of {large['bytes'] / 2**20:.0f} MiB: hashed in {large['hashed_s']:.3f} s, its digest read "
              f"from the note in {large['from_note_s'] * 1e3:.2f} ms (every rank, every start)")
    if mem is not None:
        print(f"\nrows of one file ({mem['tokens']:,} tokens): {mem['arrays_bytes'] / 2**20:.1f} MiB as arrays "
              f"({mem['arrays_bytes_per_token']:.1f} B/token, peak while loading {mem['arrays_peak_bytes'] / 2**20:.1f} "
              f"MiB) against {mem['tuples_bytes'] / 2**20:.1f} MiB as Example tuples "
              f"({mem['tuples_bytes_per_token']:.1f} B/token)")
    assert back["misses"] == 0 and hashing["misses"] == 0 and sum(r["misses"] for r in ranks) == a.files
    assert all(r["tokens"] == tokens for r in each + ranks) and back["tokens"] == tokens
    if not a.quick:
        print(f"wrote {write_result(a.out, result)}")
    return result


if __name__ == "__main__":
    main()
