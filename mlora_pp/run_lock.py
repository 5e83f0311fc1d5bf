"""One run per output_dir: rank 0 holds an exclusive lock on ``OUTPUT_DIR/.lock`` while it runs.

Two runs started on one output_dir (a command run twice, a scheduler retrying a job that is still
alive) would write the same checkpoints and manifests, prune each other's steps and resume from
whichever wrote last. The second run is refused instead, before it writes anything, with one line
naming the holder. The lock is flock(2): the kernel releases it when the holding process ends,
however it ends, so a killed run leaves no stale lock to clean up. Linux's NFS client maps flock
to byte-range locks, which hold across hosts that share the directory.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from mlora_pp.config import ConfigError

LOCK_NAME = ".lock"
_RETRY_S = 1.0


class RunLock:
    """The exclusive lock on one output_dir, held from `acquire` until `release` (or process end)."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, where: str) -> None:
        """Take the lock, or raise ConfigError naming the run that holds it; `where` prefixes the
        message (the config file). The directory must exist."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + _RETRY_S
        try:
            while True:  # `holder` (launcher status) takes a shared lock for an instant: retry past it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise ConfigError(f"{where}: output_dir: {self.path.parent} is in use by another run ({holder}); "
                              "wait for it to end, or choose another output_dir") from None
        except OSError as exc:  # a filesystem without locks (ENOLCK): run, but say so
            os.close(fd)
            warnings.warn(f"{where}: output_dir: cannot lock {self.path} ({exc.strerror or exc}); "
                          "nothing stops a second run on this output_dir")
            return
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


def holder(output_dir: Path) -> dict | None:
    """Who holds `output_dir`'s lock now (their record; {} where it cannot be read or locks do not
    work there), or None when no run does. Takes a shared lock for an instant to find out."""
    try:
        fd = os.open(Path(output_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        found = _read(fd)
        os.close(fd)
        return found
    except OSError:
        os.close(fd)
        return {}
    os.close(fd)  # releases the shared lock
    return None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        found = json.loads(raw.decode()) if raw else {}
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}  # the holder is between taking the lock and recording itself


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a run that has just started"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
