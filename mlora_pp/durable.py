"""Durable file replacement: what both PEFT adapters and checkpoints are written with.

A file is written to a hidden temporary name beside its target (``.NAME.XXXX.tmp``), flushed and
fsynced, then renamed over the target; the directory is fsynced after the rename, and a directory
created for it is fsynced into its parent (else a crash may keep a later deletion elsewhere, such as
an older checkpoint's, but lose the new directory). A reader thus sees the old file or the new one,
never a part, and a temporary file left by a killed process is recognisable by its name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p path`, each directory it creates made durable in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def write_atomic(path: Path, data: bytes, before_rename: Callable[[], None] | None = None) -> None:
    """Replace `path` by `data`; on an error the temporary file is removed and `path` is untouched.

    `before_rename` runs after the data is durable and before it becomes visible (fault injection);
    if it raises, the temporary file stays behind, as it would after a crash at that point.
    """
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except Exception:  # an error cleans up; an interrupt leaves the file, like a crash
        _remove(tmp)
        raise
    if before_rename is not None:
        before_rename()  # a crash here leaves the temporary file, as a killed process would
    try:
        os.replace(tmp, path)
    except Exception:  # an error cleans up; an interrupt leaves the file, like a crash
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
