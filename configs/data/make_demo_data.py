"""Generate the demo fine-tuning data: three tiny Alpaca-style tasks.

Writes ``upper.jsonl``, ``reverse.jsonl``, ``increment.jsonl`` (one
``{"instruction", "input", "output"}`` record per line), ``heldout.json``
(task -> 4 records whose inputs appear in no training file: the demo's
generation prompts) and the same held-out records per task as
``<task>-heldout.jsonl`` (the jobs' ``eval_data``) next to this script, or
into ``--out``. Deterministic: a fixed seed, so re-running
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
# Each task draws from its own small vocabulary. The demo's base model is random: its frozen
# embedding and lm_head share no structure, so copying a word means learning an embed->unembed map
# for every word, and a rank-16 adapter can learn that for about a dozen words, not for hundreds.
UPPER_WORDS = WORDS[0:12]
REVERSE_WORDS = WORDS[12:24]

Record = dict[str, str]


def _upper(rng: random.Random) -> Record:
    words = [rng.choice(UPPER_WORDS) for _ in range(3)]
    return {
        "instruction": "Uppercase the words.",
        "input": " ".join(words),
        "output": " ".join(w.upper() for w in words),
    }


def _reverse(rng: random.Random) -> Record:
    words = rng.sample(REVERSE_WORDS, 3)
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _increment(rng: random.Random) -> Record:
    digits = [rng.randint(0, 9) for _ in range(3)]
    return {
        "instruction": "Add one to each digit.",
        "input": " ".join(str(d) for d in digits),
        "output": " ".join(str((d + 1) % 10) for d in digits),
    }


# Two-digit addition was tried first: on this random base it plateaus at the loss of guessing the
# answer's distribution and only sometimes learns within the demo's budget. Each task here is a
# copy at a fixed offset plus a per-token map, which a rank-16 adapter learns in about 100 steps.
TASKS: dict[str, Callable[[random.Random], Record]] = {"upper": _upper, "reverse": _reverse, "increment": _increment}


def make_task(name: str, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> tuple[list[Record], list[Record]]:
    """(train, heldout) records of one task: held-out inputs are distinct and never in training.

    Training records may repeat an input (a task such as single-digit addition has only 100).
    """
    rng = random.Random(f"{SEED}-{name}")
    heldout: list[Record] = []
    while len(heldout) < n_heldout:
        rec = TASKS[name](rng)
        if rec["input"] not in {r["input"] for r in heldout}:
            heldout.append(rec)
    held_inputs = {r["input"] for r in heldout}
    train: list[Record] = []
    while len(train) < n_train:
        rec = TASKS[name](rng)
        if rec["input"] not in held_inputs:
            train.append(rec)
    return train, heldout


def write_all(out_dir: Path, n_train: int = N_TRAIN) -> None:
    """Write every task's jsonl files (training and held-out) and the combined heldout.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout: dict[str, list[Record]] = {}
    for name in TASKS:
        train, heldout[name] = make_task(name, n_train)
        for suffix, records in (("", train), ("-heldout", heldout[name])):
            lines = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
            (out_dir / f"{name}{suffix}.jsonl").write_text(lines, encoding="utf-8")
    (out_dir / "heldout.json").write_text(json.dumps(heldout, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--n", type=int, default=N_TRAIN, help="training records per task")
    a = p.parse_args()
    write_all(a.out, a.n)


if __name__ == "__main__":
    main()
