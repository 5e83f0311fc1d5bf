"""Stable seeds derived from names and counters.

Python's `hash()` is salted per process, so every seed that must agree across ranks, restarts
and fusion choices comes from here instead: a SHA-256 of the parts, cut to 62 bits.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A non-negative 62-bit integer that depends only on `parts` (their `repr`s, in order)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
