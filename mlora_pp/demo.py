"""`make demo`: three adapters with visibly different tasks, trained at once on one tiny random LLaMA.

1. generate the tiny model (``python -m mlora_pp.tiny``) unless it is already there,
2. train ``configs/demo.yaml`` through the real entry point (``torchrun -m launcher``),
3. print each adapter's greedy generations on held-out prompts next to the base model's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


from mlora_pp.config import load_config

DEMO_CONFIG = Path("configs/demo.yaml")
HELDOUT = Path("configs/data/heldout.json")
TINY_ARGS = ["--layers", "4", "--hidden", "256", "--heads", "8", "--kv-heads", "4", "--intermediate", "512", "--init-std", "0.06"]


def ensure_model(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "mlora_pp.tiny", str(model_dir), *TINY_ARGS, "--seed", "0"], check=True)


def run_training(config: Path, nproc: int = 1, extra: list[str] | None = None) -> None:
    """Train through torchrun, exactly as a user would launch it."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "launcher", str(config), *(extra or []),
    ]
    # One stage per rank: split the cores between them (oversubscribed OpenMP threads spin and crawl).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    subprocess.run(cmd, check=True, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show_generations(config: Path, heldout: Path, max_new_tokens: int = 24) -> dict[str, list[dict]]:
    """Greedy generations of every adapter (and the base) on each task's held-out prompts."""
    from rich.console import Console
    from rich.table import Table

    from mlora_pp.data import load_template
    from mlora_pp.generate import BASE, add_saved_adapter, generate
    from mlora_pp.model import build_stage
    from mlora_pp.training import load_tokenizer

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model.path)
    stage = build_stage(cfg.model.path)
    names = [job.name for job in cfg.jobs]
    for name in names:
        add_saved_adapter(stage, name, cfg.output_dir / name)
    tasks = json.loads(heldout.read_text())
    console = Console()
    report: dict[str, list[dict]] = {}
    for job in cfg.jobs:
        template = load_template(job.template)
        records = tasks[job.name]
        prompts = [template.render(r)[0] for r in records]
        gens = generate(stage, tokenizer, prompts, [job.name], max_new_tokens)
        table = Table(title=f"task '{job.name}': {records[0]['instruction']}")
        for column in ("input", "expected", f"adapter {job.name}", "base model"):
            table.add_column(column)
        by = {(g.adapter, g.prompt): g.text for g in gens}
        rows = []
        for record, prompt in zip(records, prompts):
            row = {"input": record.get("input", ""), "expected": record["output"],
                   "adapter": by[(job.name, prompt)].strip(), "base": by[(BASE, prompt)].strip()}
            rows.append(row)
            table.add_row(row["input"], row["expected"], row["adapter"], row["base"])
        console.print(table)
        report[job.name] = rows
    return report


def loss_summary(metrics: Path) -> dict[str, tuple[float, float]]:
    """First and last logged loss of each job."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "job" in record and "loss" in record:
            first.setdefault(record["job"], record["loss"])
            last[record["job"]] = record["loss"]
    return {job: (first[job], last[job]) for job in first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlora_pp.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--heldout", type=Path, default=HELDOUT)
    parser.add_argument("--nproc", type=int, default=2, help="pipeline stages (ranks)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    ensure_model(Path(cfg.model.path))
    # --fresh: the demo always trains (a second `make demo` would otherwise resume its finished jobs)
    run_training(args.config, args.nproc, ["--fresh"] + (["--no-live"] if not sys.stdout.isatty() else []))
    for job, (start, end) in loss_summary(cfg.output_dir / "metrics.jsonl").items():
        print(f"{job}: loss {start:.3f} -> {end:.3f}")
    show_generations(args.config, args.heldout)
    first = cfg.jobs[0]
    print(f"adapters (PEFT format) are in {cfg.output_dir}/<job>/; try one yourself:\n"
          f"  python -m mlora_pp.generate --model {cfg.model.path} --adapter {cfg.output_dir}/{first.name} "
          f"--template {first.template} \"Uppercase the words.\" --input \"it is the\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
