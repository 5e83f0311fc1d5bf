"""Generate the demo fine-tuning data: three tiny Alpaca-style tasks.

Writes ``upper.jsonl``, ``reverse.jsonl``, ``add.jsonl`` (one
``{"instruction", "input", "output"}`` record per line) and ``heldout.json``
(task -> 4 records whose inputs appear in no training file) next to this
script, or into ``--out``. Deterministic: a fixed seed, so re-running
reproduces the committed files byte for byte.

Usage: ``python configs/data/make_demo_data.py [--out DIR] [--n N]``
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from mlora_pp.tiny import WORDS

SEED = 1234
N_TRAIN = 400
N_HELDOUT = 4

Record = dict[str, str]


def _upper(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return {
        "instruction": "Uppercase the words.",
        "input": " ".join(words),
        "output": " ".join(w.upper() for w in words),
    }


def _reverse(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


TASKS: dict[str, Callable[[random.Random], Record]] = {"upper": _upper, "reverse": _reverse, "add": _add}


def make_task(name: str, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> tuple[list[Record], list[Record]]:
    """Distinct records for one task: (train, heldout), no input shared between them."""
    rng = random.Random(f"{SEED}-{name}")
    seen: set[str] = set()
    records: list[Record] = []
    while len(records) < n_train + n_heldout:
        rec = TASKS[name](rng)
        if rec["input"] not in seen:
            seen.add(rec["input"])
            records.append(rec)
    return records[:n_train], records[n_train:]


def write_all(out_dir: Path, n_train: int = N_TRAIN) -> None:
    """Write every task's jsonl file and the combined heldout.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout: dict[str, list[Record]] = {}
    for name in TASKS:
        train, heldout[name] = make_task(name, n_train)
        lines = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in train)
        (out_dir / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    (out_dir / "heldout.json").write_text(json.dumps(heldout, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--n", type=int, default=N_TRAIN, help="training records per task")
    a = p.parse_args()
    write_all(a.out, a.n)


if __name__ == "__main__":
    main()
