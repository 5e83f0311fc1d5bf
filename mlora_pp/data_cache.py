"""Tokenized data on disk, keyed by everything it depends on: tokenized once, mapped by every rank.

Every rank needs every job's rows (each stage runs every job's micro-batches), so without this each
rank tokenized every data file at every start and resume: a job of 20,000 records took 14 s of a
2-core machine per rank. Here one rank tokenizes each file (`DataCache.fill` spreads the files over
the ranks), writes its rows as `TokenizedRows` arrays under a key, and every rank memory-maps them.
A later start or a resume finds them by the same key. Jobs of one run that read the same file with
the same template and length share one copy in memory.

A process that maps an entry holds its lease until it exits (`mlora_pp.cache_entries`), so that
pruning the cache (``python -m launcher cache``, or `data_cache_max_size` at start-up) never removes
an entry a run is using.

The key hashes the file's bytes, the template, the tokenizer (its whole serialised definition, its
special ids and chat template) and ``max_seq_len``, with the versions of the code that tokenized:
changing any of these makes a new entry, never a wrong hit. An entry is written to a temporary
directory and renamed into place, so a reader sees a whole entry or none; ranks that race on one
entry write the same bytes, and the first rename wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from mlora_pp.cache_entries import ENTRY_FILE as _ENTRY
from mlora_pp.cache_entries import DIGESTS_DIR, LEASE_FILE, PRUNED_PREFIX, hold_lease, prune, release_lease
from mlora_pp.config import human_bytes
from mlora_pp.data import DataError, Template, load_template, read_rows
from mlora_pp.durable import fsync_dir
from mlora_pp.tokenized import TokenizedRows

log = logging.getLogger(__name__)

DATA_CACHE = "data-cache"
"""The cache's directory under ``output_dir`` unless the config names another (``data_cache``)."""

FORMAT = 1
"""Version of what an entry holds and how rows are made from records; bump it when either changes."""

_REPORT_S = 1.0
"""Tokenizing that takes longer than this is reported on stdout (one line per file)."""
PROGRESS_S = 10.0
"""While a file is tokenized, the records done so far are reported this often (stdout)."""
STALE_S = 3600.0
"""A temporary entry (``.tmp-*``, ``.bad-*``, ``.pruned-*``) untouched this long was left by a killed
writer or prune: removed."""

CLOCK_SKEW_S = 600.0
"""A start-up prune spares entries used this long before the run began as well: on a network file
system the server's clock, not this machine's, stamps an entry's last use."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One data file as a job reads it."""

    path: Path
    template: Template
    max_seq_len: int


_DIGESTS: dict[tuple, str] = {}
RACY_S = 2.0
"""A digest is kept on disk only for a file unmodified this long before hashing began: one written
within the same tick of its clock as its digest was taken could change without its stat showing it."""


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes; remembered for the process while its size, mtime and inode stay, and
    in `memo_dir` (when given) while its size, mtime, ctime and inode stay. ctime cannot be set back
    by a user, so a file rewritten to the same size with its mtime restored is hashed again."""
    path = Path(path)
    stat = path.stat()
    stamp = _stamp(path, stat)
    found = _known(stamp, memo_dir)
    if found is None:
        began = time.time()
        found = sha256_file(path)
        after = path.stat()
        unchanged = (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == (
            stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        note = _note_path(stamp, memo_dir)
        if note is not None and unchanged and stat.st_mtime < began - RACY_S:
            _write_note(note, {**stamp, "sha256": found})
        _DIGESTS[_memo_key(stamp)] = found
    return found


def known_digest(path: Path, memo_dir: Path | None = None) -> str | None:
    """`file_digest` of a file if this process or a note in `memo_dir` knows it already (None: it
    would have to read the file). Raises OSError when the file cannot be stat'ed."""
    path = Path(path)
    return _known(_stamp(path, path.stat()), memo_dir)


def _known(stamp: dict, memo_dir: Path | None) -> str | None:
    found = _DIGESTS.get(_memo_key(stamp))
    note = _note_path(stamp, memo_dir)
    if found is None and note is not None:
        try:
            saved = json.loads(note.read_text())
            if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
                found = _DIGESTS[_memo_key(stamp)] = saved["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    return found


def _stamp(path: Path, stat: os.stat_result) -> dict:
    """What a digest is remembered by: the file's resolved path and what its stat says of its content."""
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}


def _memo_key(stamp: dict) -> tuple:
    return (stamp["path"], stamp["size"], stamp["mtime_ns"], stamp["ino"])


def _note_path(stamp: dict, memo_dir: Path | None) -> Path | None:
    return None if memo_dir is None else memo_dir / f"{hashlib.sha256(stamp['path'].encode()).hexdigest()[:32]}.json"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_note(note: Path, content: dict) -> None:
    """Written aside and renamed in; a cache this process cannot write keeps no note."""
    tmp = None
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=note.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.chmod(tmp, 0o644)
        os.rename(tmp, note)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def tokenizer_digest(tokenizer: Any) -> str | None:
    """sha256 of what a tokenizer's output depends on, or None when it cannot be serialised (a slow
    tokenizer: its rows are then kept in memory only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, transformers.__version__, tokenizers.__version__, backend.to_str(),
                 repr(getattr(tokenizer, "bos_token_id", None)), repr(getattr(tokenizer, "eos_token_id", None)),
                 repr(getattr(tokenizer, "chat_template", None))):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class DataCache:
    """Where a run's jobs get their rows: memory, then the cache directory, then tokenizing.

    ``directory`` None keeps rows in memory only (shared by the jobs of this process).
    """

    def __init__(self, tokenizer: Any, directory: Path | None, rank: int = 0):
        self.tokenizer = tokenizer
        self.rank = rank
        self._tokenizer_digest = tokenizer_digest(tokenizer)
        self.directory = Path(directory) if directory is not None and self._tokenizer_digest is not None else None
        self._rows: dict[str, TokenizedRows] = {}
        self._shares: dict[tuple, int] = {}  # a source's `_identity` -> the rank `fill` gave it to
        self._unshared_warned = False
        self._pruned_under_us = False
        self.hits = self.misses = 0

    def key(self, source: Source) -> str:
        """What the rows of `source` depend on, hashed (it names the entry's directory)."""
        return self._key(source, file_digest(source.path, self._memo_dir()))

    def known_key(self, source: Source) -> str | None:
        """`key`, where the file's digest is known without reading the file (see `known_digest`)."""
        digest = known_digest(source.path, self._memo_dir())
        return None if digest is None else self._key(source, digest)

    def _key(self, source: Source, digest: str) -> str:
        tok = self._tokenizer_digest or f"object {id(self.tokenizer)}"
        parts = (FORMAT, digest, repr(source.template), tok, source.max_seq_len)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def _memo_dir(self) -> Path | None:
        return None if self.directory is None else self.directory / DIGESTS_DIR

    def stored(self, key: str) -> bool:
        return self.directory is not None and (self.directory / key / _ENTRY).is_file()

    def rows(self, source: Source) -> TokenizedRows:
        """The rows of `source`; raises `DataError` on bad data (which is never cached)."""
        try:
            key = self.key(source)
        except OSError:  # no such file, or unreadable: reading it says which, as a DataError
            return read_rows(Path(source.path), source.template, self.tokenizer, source.max_seq_len)[0]
        rows = self._rows.get(key)
        if rows is None:
            rows = self._read(key, source)
            if rows is None:
                owner = self._shares.get(_identity(source), self.rank)
                if owner != self.rank and not self._unshared_warned and not self._pruned_under_us:
                    self._unshared_warned = True
                    print(f"warning: rank {self.rank}: the data cache {self.directory} does not hold the rows rank "
                          f"{owner} tokenized for {source.path}: the ranks do not share it (name a data_cache every "
                          f"machine sees) or rank {owner} could not write it (see its warnings), so this rank "
                          "tokenizes what the others did", flush=True)
                rows = self._tokenize(key, source)
            self._rows[key] = rows
        return rows

    def fill(self, sources: list[Source], world: int) -> None:
        """Tokenize and store this rank's share of the sources not stored yet. Every rank must call
        it with the same sources (in any order): the shares are cut from all of them (largest file
        first, each to the rank with the fewest bytes so far), so ranks agree on them whatever the
        others have stored already. Afterwards, once all ranks are done, every rank reads them all.

        Shares are cut by path and size, not by content: only a file's owner reads it here, to hash
        it and, when the cache lacks its rows, to tokenize it. The owner keeps the digest in the
        cache's notes, so the other ranks find it there instead of reading the file (a file modified
        under 2 s before it was hashed keeps no note: every rank hashes it then, as before).

        A file with bad data is skipped here: every rank meets it again when it reads its jobs, and
        reports it there with the job it belongs to."""
        if self.directory is None or world < 1:
            return
        unique: dict[tuple, tuple[int, Source]] = {}
        for source in sources:
            try:
                unique.setdefault(_identity(source), (Path(source.path).stat().st_size, source))
            except OSError:  # reported with its job when the jobs are read
                continue
        loads = [0] * world
        mine: list[Source] = []
        for identity, (size, source) in sorted(unique.items(), key=lambda kv: (-kv[1][0], kv[0])):
            rank = loads.index(min(loads))
            loads[rank] += size
            self._shares[identity] = rank
            if rank == self.rank:
                mine.append(source)
        if self.rank == 0:
            self._remove_stale()
            self._say_what_is_missing(list(unique.values()), world)
        for source in mine:
            try:
                if self.stored(self.key(source)):
                    continue
                self.rows(source)
            except (OSError, DataError):
                continue

    def _say_what_is_missing(self, sources: list[tuple[int, Source]], world: int) -> None:
        """Rank 0's line on what the ranks are about to tokenize: the sources (with their sizes) whose
        rows the cache lacks, or whose file no rank has hashed since it last changed (its owner may
        still find its rows stored once it has hashed it)."""
        missing = []
        for size, source in sources:
            try:
                key = self.known_key(source)
            except OSError:
                continue
            if key is None or not self.stored(key):
                missing.append((size, source))
        if not missing:
            return
        files = len({Path(source.path).resolve() for _, source in missing})
        what = f"{files} data file(s)" + ("" if files == len(missing) else f" for {len(missing)} template and "
                                                                          "length settings")
        print(f"tokenizing {what}, {sum(size for size, _ in missing) / 2**20:.1f} MiB to read, on up to "
              f"{min(world, len(missing))} rank(s); cached in {self.directory}", flush=True)

    def _read(self, key: str, source: Source) -> TokenizedRows | None:
        if not self.stored(key):
            return None
        assert self.directory is not None
        entry = self.directory / key
        if not hold_lease(entry):  # removed by a prune just now: tokenized again
            self._pruned_under_us = True
            return None
        try:
            info = json.loads((entry / _ENTRY).read_text())
            rows = TokenizedRows.load(entry)
            if len(rows) != info["rows"] or rows.tokens != info["tokens"]:
                raise ValueError(f"holds {len(rows)} rows and {rows.tokens} tokens, its entry says "
                                 f"{info['rows']} and {info['tokens']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("rank %d: cannot read cached rows of %s from %s (%s); tokenizing again",
                        self.rank, source.path, entry, exc)
            self._discard(entry)
            return None
        self.hits += 1
        if info.get("skipped"):
            log.warning("%s: skipped %d of %d records left without a loss token at max_seq_len=%d",
                        source.path, info["skipped"], info["records"], source.max_seq_len)
        return rows

    def _tokenize(self, key: str, source: Source) -> TokenizedRows:
        start = last = time.perf_counter()

        def progress(done: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= PROGRESS_S:
                print(f"rank {self.rank}: tokenizing {source.path}: {done:,} records in {now - start:.0f} s",
                      flush=True)
                last = now

        rows, records = read_rows(Path(source.path), source.template, self.tokenizer, source.max_seq_len, progress)
        self.misses += 1
        seconds = time.perf_counter() - start
        if seconds >= _REPORT_S:
            print(f"rank {self.rank}: tokenized {source.path}: {len(rows):,} rows, {rows.tokens:,} tokens "
                  f"in {seconds:.1f} s", flush=True)
        if self.directory is not None:
            self._store(key, source, rows, {"skipped": records - len(rows), "records": records})
        return rows

    def _store(self, key: str, source: Source, rows: TokenizedRows, counts: dict) -> None:
        """Write the entry beside its place and rename it in; a failure costs the cache, not the run."""
        assert self.directory is not None
        final = self.directory / key
        tmp: Path | None = None
        info = {"format": FORMAT, "data": str(source.path), "template": source.template.name,
                "max_seq_len": source.max_seq_len, "rows": len(rows), "tokens": rows.tokens, **counts}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{socket.gethostname()}-", dir=self.directory))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep the entry from other users sharing the cache
            rows.save(tmp)
            (tmp / LEASE_FILE).touch(0o644)
            with open(tmp / _ENTRY, "w") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / _ENTRY).is_file():  # not another rank's entry that won the race
                    raise
            fsync_dir(self.directory)
        except OSError as exc:
            log.warning("rank %d: cannot cache the rows of %s in %s (%s)", self.rank, source.path, final, exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Remove what writers killed mid-write left (an hour old: a live writer's is newer)."""
        assert self.directory is not None
        try:
            leftovers = [p for p in self.directory.iterdir() if p.name.startswith((".tmp-", ".bad-", PRUNED_PREFIX))]
        except OSError:
            return
        now = time.time()
        for path in leftovers:
            try:
                if now - path.stat().st_mtime > STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue

    def limit(self, max_bytes: int, spare_used_since: float) -> None:
        """Remove the least recently used entries no process holds until the cache fits in `max_bytes`,
        sparing those used since `spare_used_since` (this run's, which its other ranks may not hold
        yet); says what it removed, and what it could not."""
        if self.directory is None:
            return
        try:
            result = prune(self.directory, max_bytes=max_bytes, spare_used_since=spare_used_since)
        except OSError as exc:  # the cache costs, never the run
            print(f"warning: rank {self.rank}: cannot prune data cache {self.directory}: {exc.strerror or exc}",
                  flush=True)
            return
        if result.removed:
            print(f"rank {self.rank}: data cache {self.directory}: removed {len(result.removed)} unused "
                  f"entries ({human_bytes(sum(e.bytes for e in result.removed))}) to fit data_cache_max_size "
                  f"{human_bytes(max_bytes)}", flush=True)
        if result.kept_bytes > max_bytes:
            print(f"warning: rank {self.rank}: data cache {self.directory} holds {human_bytes(result.kept_bytes)}, "
                  f"over data_cache_max_size {human_bytes(max_bytes)}: the rest is in use by this or other runs",
                  flush=True)

    @staticmethod
    def _discard(entry: Path) -> None:
        release_lease(entry)
        aside = entry.with_name(f".bad-{entry.name}-{os.getpid()}")
        try:
            os.rename(entry, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def _identity(source: Source) -> tuple[str, str, int]:
    """A source as every rank's config names it: what `fill` shares out, before any file is read."""
    return (str(source.path), repr(source.template), source.max_seq_len)


def cache_dir(data_cache: Path | None, output_dir: Path) -> Path:
    """Where a run keeps its tokenized data: its config's ``data_cache``, or ``output_dir/data-cache``."""
    return Path(data_cache) if data_cache is not None else Path(output_dir) / DATA_CACHE


def job_sources(jobs: list[Any], base_dir: Path | None = None) -> list[Source]:
    """The data and held-out files of the jobs (`JobConfig`s), as `Source`s."""
    sources = []
    for job in jobs:
        template = load_template(job.template, base_dir)
        for path in (job.data, job.eval_data):
            if path is not None:
                sources.append(Source(Path(path), template, job.max_seq_len))
    return sources
