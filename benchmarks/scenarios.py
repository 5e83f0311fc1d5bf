"""The benchmark scenarios of `benchmarks.run`: the model, the jobs, and how ranks are placed.

A scenario writes one workspace: a random local LLaMA (`mlora_pp.tiny`), one data file per job,
and a run config per method that differs only in ``output_dir`` and ``pipeline.schedule``. Every
method therefore trains the same jobs on the same rows in the same step plans.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

ALL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    def describe(self) -> str:
        return (f"random LLaMA, {self.layers} layers, hidden {self.hidden}, heads {self.heads}/{self.kv_heads}, "
                f"MLP {self.intermediate}, fp32")


@dataclass(frozen=True)
class Workload:
    """The jobs every method trains."""

    model: ModelShape
    jobs: int
    steps: int
    batch_size: int
    micro_batch_size: int
    words: tuple[int, int]
    """Each row is this many random words (the tiny tokenizer makes about two tokens of a word)."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    lr: float = 3.0e-4

    def describe(self) -> str:
        return (f"{self.jobs} jobs x {self.steps} steps, batch {self.batch_size}, micro-batch "
                f"{self.micro_batch_size}, rows of {self.words[0]}-{self.words[1]} words, LoRA rank {self.rank} "
                f"on all 7 projections, dropout {self.dropout}")


@dataclass(frozen=True)
class Scenario:
    name: str
    hosts: str
    """``local``: every rank on this host over loopback; ``netns``: `benchmarks/cluster.sh`'s two hosts."""
    full: Workload
    quick: Workload
    description: str

    def workload(self, quick: bool) -> Workload:
        return self.quick if quick else self.full


_QUICK = Workload(ModelShape(4, 128, 4, 2, 256), jobs=2, steps=2, batch_size=4, micro_batch_size=2, words=(16, 24))
_FULL = Workload(ModelShape(8, 512, 8, 4, 1024), jobs=4, steps=8, batch_size=8, micro_batch_size=2, words=(24, 40))

SCENARIOS: dict[str, Scenario] = {
    "loopback": Scenario("loopback", "local", _FULL, _QUICK, "one host, 2 ranks over loopback (Gloo)"),
    "two-hosts-1gbit": Scenario(
        "two-hosts-1gbit", "netns", _FULL, _QUICK,
        "two hosts (network namespaces) joined by a veth pair shaped to 1 Gbit/s, one rank each (Gloo)"),
}


def _dataset(path: Path, seed: int, rows: int, words: tuple[int, int]) -> Path:
    from mlora_pp.tiny import WORDS

    rnd = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(*words)))}) + "\n")
    return path


@dataclass(frozen=True)
class Workspace:
    root: Path
    model: Path
    data: tuple[Path, ...]
    workload: Workload
    mixed_micro: bool = False
    """Odd-numbered jobs use micro-batches twice the workload's (where the step still splits into an
    even number): a calibration run then sees the larger micro-batches that fusing jobs forms."""

    def micro_batch_size(self, job: int) -> int:
        w = self.workload
        double = 2 * w.micro_batch_size
        if self.mixed_micro and job % 2 and w.batch_size % (2 * double) == 0:
            return double
        return w.micro_batch_size

    def config(self, name: str, schedule: str, fuse: bool = True) -> Path:
        """The run config of one method: same jobs, its own output_dir, schedule and lora fusion."""
        w = self.workload
        raw = {
            "model": {"path": str(self.model)},
            "output_dir": str(self.root / name / "out"),
            "seed": 0,
            "pipeline": {"schedule": schedule, "timeout_s": 300, "fuse": fuse},
            "jobs": [
                {"name": f"job{i}", "data": str(path), "template": "plain", "rank": w.rank, "alpha": w.alpha,
                 "dropout": w.dropout, "lr": w.lr, "batch_size": w.batch_size,
                 "micro_batch_size": self.micro_batch_size(i), "max_steps": w.steps, "max_seq_len": 256,
                 "save_every": None, "keep_last": 1, "target_modules": list(ALL_TARGETS)}
                for i, path in enumerate(self.data)
            ],
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path


def prepare(root: Path, workload: Workload, mixed_micro: bool = False) -> Workspace:
    """Write the model and every job's data under `root` (a fresh directory)."""
    from mlora_pp.tiny import make_tiny_model

    m = workload.model
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(root / "model", layers=m.layers, hidden=m.hidden, heads=m.heads, kv_heads=m.kv_heads,
                            intermediate=m.intermediate)
    rows = workload.batch_size * workload.steps  # exactly the steps' rows: every step is a full batch
    data = tuple(_dataset(root / f"job{i}.jsonl", i, rows, workload.words) for i in range(workload.jobs))
    return Workspace(root, model, data, workload, mixed_micro)
