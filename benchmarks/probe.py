"""Memory of one process, measured the same way whatever it runs: ``python -m benchmarks.probe OUT MODULE ARGS...``.

Runs ``python -m MODULE ARGS...`` in this process (under torchrun: one probe per rank) and, when it
ends, writes ``OUT/probe-rank<RANK>.json`` with
- ``peak_rss_bytes``: the process's resident-set high-water mark (``getrusage`` ``ru_maxrss``);
- ``peak_heap_bytes``: the most bytes glibc's malloc had handed out at once (``mallinfo2``: arena
  chunks in use plus mmapped chunks), sampled every 20 ms by a thread. On CPU every tensor's storage
  comes from malloc, so this is the tensor bytes plus the interpreter's own malloc'd objects.
  Every 2 ms (as before 2026-11-25) slowed a 1-thread rank by about 17%: mallinfo2 walks the
  arenas on the rank's only core. At 20 ms the cost is within run-to-run noise, and the peak of
  an 8-layer fp32 run agreed with the 2 ms one within 5%.
The exit code is the module's. Whatever it runs, its imports are made with the garbage collector
off and then frozen out of later collections, as the launcher does for itself: `process_s` then
compares methods on equal terms.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import json
import os
import resource
import runpy
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_S = 0.02


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_reader():
    """A function returning malloc's bytes in use, or None where glibc's mallinfo2 is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        call = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2

    def read() -> int:
        info = call()
        return int(info.uordblks + info.hblkhd)

    return read


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class HeapSampler:
    """Tracks the peak of malloc's bytes in use from a daemon thread."""

    interval_s: float = SAMPLE_S
    peak: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "HeapSampler":
        read = _heap_reader()
        if read is None:
            return self
        self.peak = read()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                value = read()
                if value > self.peak:
                    self.peak = value

        self._thread = threading.Thread(target=loop, name="heap-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak


def import_quietly(module: str) -> None:
    """Import what ``python -m module`` runs, without running it, with the collector off, then freeze
    what the imports made (see `launcher.__main__`): about 1 s less start-up and exit a process."""
    spec = importlib.util.find_spec(module)
    name = f"{module}.__main__" if spec is not None and spec.submodule_search_locations is not None else module
    gc.disable()
    try:
        importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()
    del sys.modules[name]  # runpy runs it afresh as __main__ (and warns of a module imported before)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m benchmarks.probe OUT_DIR MODULE [ARGS...]", file=sys.stderr)
        return 2
    out, module, args = Path(argv[0]), argv[1], argv[2:]
    sampler = HeapSampler().start()
    start = time.perf_counter()
    code = 0
    sys.argv = [module, *args]
    try:
        import_quietly(module)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        heap = sampler.stop()
        out.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "peak_rss_bytes": peak_rss_bytes(), "peak_heap_bytes": heap,
                  "process_s": time.perf_counter() - start}
        (out / f"probe-rank{rank}.json").write_text(json.dumps(record) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
