"""The data cache's entries on disk: leases held by the runs that map them, and pruning the rest.

A run memory-maps the tokenized rows of each entry it reads (`mlora_pp.data_cache`) for as long as
it trains. Removing a mapped entry is harmless on a local disk (the files live on until unmapped)
but not on a network file system, where the run that maps it can fail on its next page fault. So a
process that maps an entry first takes a shared lock on the entry's ``lease`` file and keeps it
until it exits, and touches the file: its modification time is the entry's last use. A prune takes
the lease's exclusive lock without waiting: an entry some process holds is in use and stays; one
it gets is renamed aside (new readers miss it from then on) and removed. flock is what Linux's NFS
client turns into a lock the server sees, so this holds across the machines that share a cache.

``python -m launcher cache DIR`` lists the entries; ``--unused-days N`` removes those unused for N
days, ``--max-gib X`` removes the least recently used until the rest fit in X GiB, ``--dry-run``
only says what would go. `data_cache_max_gib` in a run's config prunes the same way at start-up,
sparing what that run uses.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENTRY_FILE = "entry.json"
LEASE_FILE = "lease"
DIGESTS_DIR = ".digests"
"""Under the cache directory: each data file's digest with the stat it was taken at (`data_cache.
file_digest`), so that a later start does not read every file again to hash it."""
PRUNED_PREFIX = ".pruned-"
"""An entry being removed: renamed aside first. A prune killed mid-removal leaves one behind, which
the next start removes with the other leftovers (`DataCache`)."""
EXIT_OK = 0
EXIT_BAD_INPUT = 2

_HELD: dict[str, int] = {}
"""Lease path -> the descriptor holding its shared lock, for this process's lifetime."""
_WARNED: list[bool] = []
_LIMIT: list[int] = []
"""How many leases this process holds at most (found once): a quarter of its open-file limit."""


def lease_limit() -> int:
    """A lease is an open file. A process holds at most a quarter of its open-file limit in leases,
    after raising its soft limit to the hard one (1024 by default on many systems, often far more
    allowed): past that, entries are read unleased, as before leases, and a warning says so."""
    if not _LIMIT:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
        _LIMIT.append(max(64, soft // 4))
    return _LIMIT[0]


def hold_lease(entry: Path) -> bool:
    """Take (or keep) this process's shared lock on `entry`'s lease and mark its use. False when the
    entry is being pruned or is gone: read it as a miss. An entry with no lease file that this user
    cannot add one to (a cache made before leases, written by another user) is read unleased."""
    path = entry / LEASE_FILE
    if str(path) in _HELD:
        return True
    if len(_HELD) >= lease_limit():
        if not _WARNED:
            _WARNED.append(True)
            print(f"warning: this process maps more than {lease_limit()} data cache entries; the others are read "
                  "without a lease, so a prune of the cache while it runs could remove them", flush=True)
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return False  # the entry itself is gone
    except OSError:
        return (entry / ENTRY_FILE).is_file()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a prune holds it
        os.close(fd)
        return False
    except OSError:  # a file system without locks: read unleased (and no prune can lock it either)
        os.close(fd)
        return (entry / ENTRY_FILE).is_file()
    try:
        # Renamed aside between our open and our lock: the lock is on the removed entry's file.
        same = os.fstat(fd).st_ino == os.stat(path).st_ino and (entry / ENTRY_FILE).is_file()
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return False
    _HELD[str(path)] = fd
    try:
        os.utime(fd)
    except OSError:  # another user's cache: its last use stays as that user left it
        pass
    return True


def release_lease(entry: Path) -> None:
    """Let go of `entry`'s lease (an entry this process found damaged and removed)."""
    fd = _HELD.pop(str(entry / LEASE_FILE), None)
    if fd is not None:
        os.close(fd)


@dataclass(frozen=True)
class CacheEntry:
    """One stored entry: what it was made from, its size and its last use."""

    key: str
    path: Path
    data: str
    template: str
    max_seq_len: int
    rows: int
    tokens: int
    bytes: int
    last_used: float


def list_entries(directory: Path) -> list[CacheEntry]:
    """The cache's whole entries, least recently used first (a missing directory holds none)."""
    found = []
    try:
        children = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    # PermissionError goes to the caller: an unreadable cache is not an empty one
    for path in children:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            info = json.loads((path / ENTRY_FILE).read_text())
            files = [p for p in path.iterdir() if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            lease = path / LEASE_FILE
            last = (lease if lease.exists() else path / ENTRY_FILE).stat().st_mtime
            found.append(CacheEntry(path.name, path, str(info.get("data", "?")), str(info.get("template", "?")),
                                    int(info.get("max_seq_len", 0)), int(info.get("rows", 0)),
                                    int(info.get("tokens", 0)), size, last))
        except (OSError, ValueError, TypeError):
            continue  # being written, removed or damaged: not a whole entry
    return sorted(found, key=lambda e: (e.last_used, e.key))


@dataclass
class PruneResult:
    removed: list[CacheEntry]
    in_use: list[CacheEntry]
    """Entries the policy picked that a process holds (or that this process could not lock)."""
    kept_bytes: int


def prune(directory: Path, max_bytes: int | None = None, unused_for_s: float | None = None,
          spare_used_since: float | None = None, dry_run: bool = False, now: float | None = None) -> PruneResult:
    """Remove the entries unused for `unused_for_s` seconds, then the least recently used until the
    rest fit in `max_bytes`; never one in use, nor one used since `spare_used_since` (a run's start:
    its own entries, which other ranks of it may not have mapped yet)."""
    now = time.time() if now is None else now
    entries = list_entries(directory)
    total = sum(e.bytes for e in entries)
    removed, in_use = [], []
    for entry in entries:
        stale = unused_for_s is not None and now - entry.last_used > unused_for_s
        over = max_bytes is not None and total > max_bytes
        if not (stale or over):
            continue
        if spare_used_since is not None and entry.last_used >= spare_used_since:
            continue
        if _remove(entry, dry_run):
            removed.append(entry)
            total -= entry.bytes
        else:
            in_use.append(entry)
    return PruneResult(removed, in_use, total)


def _remove(entry: CacheEntry, dry_run: bool) -> bool:
    """Remove one entry if no process holds its lease; False if one does (or it cannot be locked)."""
    lease = entry.path / LEASE_FILE
    if str(lease) in _HELD:  # ours: on NFS a second lock by this process would not even conflict
        return False
    try:
        fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o644)  # NFS locks exclusively only what is open for writing
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        if dry_run:
            return True
        aside = entry.path.with_name(f"{PRUNED_PREFIX}{entry.key}-{os.getpid()}")
        try:
            os.rename(entry.path, aside)
        except OSError:
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def drop_orphan_notes(directory: Path, dry_run: bool = False) -> int:
    """Remove the digest notes of data files that no longer exist here; how many. A note of a file
    on another machine's disk goes too: that machine hashes its file once more and writes it again."""
    dropped = 0
    for note in (Path(directory) / DIGESTS_DIR).glob("*.json"):
        try:
            gone = not Path(json.loads(note.read_text())["path"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            gone = True  # unreadable: no start can use it either
        if gone:
            dropped += 1
            if not dry_run:
                with contextlib.suppress(OSError):
                    note.unlink()
    return dropped


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main(argv: list[str]) -> int:
    """``python -m launcher cache DIR [--unused-days N] [--max-gib X] [--dry-run]``: the exit code."""
    parser = argparse.ArgumentParser(prog="python -m launcher cache",
                                     description="List a data cache's entries, or remove the unused ones.")
    parser.add_argument("directory", type=Path,
                        help="the data cache (a run's OUTPUT_DIR/data-cache, or its data_cache)")
    parser.add_argument("--unused-days", type=float, metavar="N", help="remove entries no run has used for N days")
    parser.add_argument("--max-gib", type=float, metavar="X",
                        help="remove the least recently used entries until the rest fit in X GiB")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    args = parser.parse_args(argv)
    for flag, value in (("--unused-days", args.unused_days), ("--max-gib", args.max_gib)):
        if value is not None and not value >= 0:
            parser.error(f"{flag} needs a number >= 0; got {value}")
    if not args.directory.is_dir():
        print(f"error: {args.directory}: not a directory", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        return _list_or_prune(args)
    except OSError as exc:  # a directory this user cannot read or change
        print(f"error: {args.directory}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _list_or_prune(args: argparse.Namespace) -> int:
    now = time.time()
    if args.unused_days is None and args.max_gib is None:
        entries = list_entries(args.directory)
        for e in entries:
            print(f"{e.key}  {_gib(e.bytes):>10}  last used {_age(now - e.last_used)} ago  {e.rows:,} rows  "
                  f"{e.tokens:,} tokens  {e.data} ({e.template}, max_seq_len {e.max_seq_len})")
        print(f"{len(entries)} entries, {_gib(sum(e.bytes for e in entries))} in {args.directory}")
        return EXIT_OK
    max_bytes = None if args.max_gib is None else int(args.max_gib * 2**30)
    unused = None if args.unused_days is None else args.unused_days * 86400
    result = prune(args.directory, max_bytes, unused, dry_run=args.dry_run, now=now)
    verb = "would remove" if args.dry_run else "removed"
    for e in result.removed:
        print(f"{verb} {e.key}  {_gib(e.bytes)}  last used {_age(now - e.last_used)} ago  {e.data}")
    for e in result.in_use:
        print(f"kept {e.key}  {_gib(e.bytes)}: in use by a run (or its lease cannot be locked: another user's, "
              f"or a file system without locks)  {e.data}")
    notes = drop_orphan_notes(args.directory, args.dry_run)
    print(f"{verb} {len(result.removed)} entries ({_gib(sum(e.bytes for e in result.removed))}) and {notes} digest "
          f"notes of data files gone; {_gib(result.kept_bytes)} left in {args.directory}")
    return EXIT_OK
