"""Entry point: ``torchrun --nproc-per-node 1 -m launcher CONFIG.yaml`` or ``python -m launcher CONFIG.yaml``.

Bad input ends with one line naming the file and field, exit code 2, no traceback (``--debug``
shows it). A lost rank or a failed write (disk full, read-only) ends with one line and exit code 1.
A run in which some jobs failed (non-finite) finishes the others and exits 3 from rank 0; Ctrl-C
ends each rank with one line and exit code 130. SIGTERM while training (a scheduler pre-empting the
run) stops it at the next decision point with every unfinished job checkpointed, exit code 143.
Jobs resume from their checkpoints in output_dir; ``--fresh`` deletes those and starts over.
``python -m launcher status OUTPUT_DIR [--watch SECONDS | --json]`` shows a run's jobs (mlora_pp.status);
``python -m launcher cache DIR [--unused-days N] [--max-gib X] [--dry-run]`` lists or prunes a data cache
(mlora_pp.cache_entries);
``python -m launcher submit OUTPUT_DIR JOB.yaml``, ``cancel OUTPUT_DIR NAME`` and ``priority OUTPUT_DIR
NAME N`` change a running run (mlora_pp.control).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading

# MKL's own memory manager keeps every GEMM buffer it has used: 21-26 MiB of heap per rank on the
# benchmark's model, for no speed we could measure. MKL reads this once, as torch loads it.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

SUBCOMMANDS = ("status", "submit", "cancel", "priority", "cache")


def run_subcommand(argv: list[str]) -> int:
    """``status OUTPUT_DIR``: a run's jobs, from its metrics.jsonl; ``submit``, ``cancel``, ``priority``:
    a job added to, stopped in or re-prioritized in a running run; ``cache DIR``: a data cache's
    entries, listed or pruned."""
    if argv[0] == "status":
        from mlora_pp.status import main as status_main

        return status_main(argv[1:])
    if argv[0] == "cache":
        from mlora_pp.cache_entries import main as cache_main

        return cache_main(argv[1:])
    from mlora_pp.control import cancel_main, priority_main, submit_main

    return {"submit": submit_main, "cancel": cancel_main, "priority": priority_main}[argv[0]](argv[1:])


EXIT_BAD_INPUT = 2
EXIT_PIPELINE_FAILED = 1
EXIT_JOBS_FAILED = 3
"""The run finished, but some jobs failed (their outputs are their last good checkpoints)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), the shell's convention: 128 + the signal's number."""
EXIT_STOPPED = 143
"""Stopped by SIGTERM (128 + 15) with every unfinished job checkpointed (`mlora_pp.stopping`)."""


def report(line: str) -> None:
    """One line to stderr in one write: the ranks share torchrun's stderr, and print() writes the text
    and its newline apart (stderr writes through), so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The training command's arguments (a bad one: argparse's usage line and exit code 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m launcher", description="Train many LoRA adapters at once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="on a run, by its output_dir (each with --help):\n"
               "  python -m launcher status OUTPUT_DIR             its jobs: step, loss, speed, state\n"
               "  python -m launcher submit OUTPUT_DIR JOB.yaml    add a job while it runs\n"
               "  python -m launcher cancel OUTPUT_DIR NAME        stop a job after its last finished step\n"
               "  python -m launcher priority OUTPUT_DIR NAME N    change a job's admission priority\n"
               "  python -m launcher cache DIR                     list or prune a data cache's entries")
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--no-live", action="store_true", help="plain log lines instead of the live table")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the jobs' checkpoints in output_dir and start over instead of resuming")
    return parser.parse_args(argv)


def refuse_bad_input(args: argparse.Namespace) -> int | None:
    """EXIT_BAD_INPUT, after one line, for what needs neither torch nor the data to find: a bad
    stop-grace variable, a config that is not valid YAML or has a bad field. None when neither is
    wrong. With `--debug` the config is left to `main`, which shows the traceback."""
    from mlora_pp import stopping
    from mlora_pp.config import ConfigError, load_config

    try:
        stopping.grace_s()
    except ValueError as exc:
        report(f"error: rank {os.environ.get('RANK', '0')}: {exc}")
        return EXIT_BAD_INPUT
    if args.debug:
        return None
    try:
        load_config(args.config)
    except ConfigError as exc:
        report(f"error: {exc}")
        return EXIT_BAD_INPUT
    return None


# Run before the imports below, which take 4-6 s (torch and transformers): `status` and the other
# subcommands answer in 0.1 s, and so does a run whose command line or config is wrong.
if __name__ == "__main__" and sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
    sys.exit(run_subcommand(sys.argv[1:]))
if __name__ == "__main__":
    _refused = refuse_bad_input(parse_args(sys.argv[1:]))
    if _refused is not None:
        sys.exit(_refused)

# Importing torch and transformers makes about 350k objects that live as long as the process. The
# collector walking them as they are made costs each rank 0.4 s of start-up; frozen once made, they
# are left out of every later collection, the ones at exit included (0.55 s). Only as a program: a
# process that imports this module (a test) keeps its collector as it was.
_AS_PROGRAM = __name__ == "__main__"
if _AS_PROGRAM:
    gc.disable()
from mlora_pp import stopping, training
from mlora_pp.checkpoint import CheckpointError
from mlora_pp.config import ConfigError, load_config
from mlora_pp.data import DataError
from mlora_pp.model import ModelError
from mlora_pp.transport import PipelineError

if _AS_PROGRAM:
    gc.freeze()
    gc.enable()

def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv)
    args = parse_args(argv)

    try:
        grace = stopping.grace_s()
    except ValueError as exc:
        report(f"error: rank {os.environ.get('RANK', '0')}: {exc}")
        return EXIT_BAD_INPUT
    main_thread = threading.main_thread().ident

    def stopped_by_launcher(signum, frame):
        rank = os.environ.get("RANK", "0")
        if stopping.request():  # training: stop at the next decision point with every job checkpointed
            # Training not over in time: this handler runs again and stops the rank at once. A real
            # signal to the main thread, not `_thread.interrupt_main`: that one only marks the handler
            # due, so a main thread blocked in a sleep or a read would not run it until woken.
            stopping.arm(threading.Timer(grace, signal.pthread_kill, args=(main_thread, signal.SIGTERM)))
            if rank == "0":
                # torchrun also sends it when another rank has died: the stop then ends in that rank's loss.
                report(f"rank 0: SIGTERM: stopping at the next decision point, every unfinished job checkpointed "
                       f"at its last finished step (at most {grace:g} s, unless a rank is lost meanwhile)")
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun sends SIGTERM to every rank once one rank has failed; its own report names that rank.
            raise PipelineError(
                f"rank {rank}: stopped by the launcher because another rank failed "
                "(the launcher's failure report names it)"
            )
        raise PipelineError(f"rank {rank}: stopped by SIGTERM")

    signal.signal(signal.SIGTERM, stopped_by_launcher)
    try:
        try:
            cfg = load_config(args.config)
            result = training.train(cfg, progress=False if args.no_live else None, fresh=args.fresh)
        finally:
            # This rank has its outcome: a result, or its own error to report. A SIGTERM from now on
            # is torchrun reacting to another rank's exit (a lost rank, rank 0's EXIT_JOBS_FAILED, the
            # same bad input found everywhere) and must neither replace this rank's line nor break
            # into its exit with a traceback (seen from interpreter-exit finalizers).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ConfigError, DataError, ModelError) as exc:
        if args.debug:
            raise
        report(f"error: {exc}")
        return EXIT_BAD_INPUT
    except (PipelineError, CheckpointError) as exc:
        if args.debug:
            raise
        report(f"error: {exc}")
        return EXIT_PIPELINE_FAILED
    except KeyboardInterrupt:
        if args.debug:
            raise
        # Nothing is lost beyond the steps since the newest checkpoint: every file is written aside and
        # renamed, and a checkpoint counts once its manifest names every stage's part.
        report(f"error: rank {os.environ.get('RANK', '0')}: interrupted (Ctrl-C); running this config again "
               "resumes every job from its newest checkpoint")
        return EXIT_INTERRUPTED
    except OSError as exc:  # a write outside the checkpoints (metrics, trace) on a full or read-only disk
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        report(f"error: rank {os.environ.get('RANK', '0')}: {where}{exc.strerror or exc}")
        return EXIT_PIPELINE_FAILED
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_STOPPED if result.stopped else 0  # rank 0 reports for the run
    for name, path in result.adapters.items():
        if name in result.best and name not in result.failed:
            step, loss = result.best[name]
            how = (f"stopped early after {result.early_stopped[name]} steps" if name in result.early_stopped
                   else f"{result.steps[name]} steps")
            print(f"{name}: {how}; adapter of its best evaluation, step {step} (held-out loss {loss:.4f}) -> {path}")
            continue
        if name in result.cancelled and name not in result.failed:
            print(f"{name}: cancelled after {result.cancelled[name]} steps -> {path}")
            continue
        if name in result.failed:
            print(f"{name}: FAILED ({result.failed[name]}); its last good checkpoint -> {path}")
            continue
        if name not in result.final_loss:  # no step this run: the config ran again after the job finished
            print(f"{name}: {result.steps[name]} steps, finished in an earlier run -> {path}")
            continue
        print(f"{name}: {result.steps[name]} steps, final loss {result.final_loss[name]:.4f} -> {path}")
    for name in sorted(set(result.cancelled) - set(result.adapters) - set(result.failed)):
        print(f"{name}: cancelled before its first step: no adapter written")
    for name in sorted(set(result.failed) - set(result.adapters)):
        print(f"{name}: FAILED ({result.failed[name]}) before its first checkpoint: no adapter written")
    if result.stopped:
        for name, steps in result.stopped.items():
            print(f"{name}: stopped after {steps} of its steps; running this config again resumes it from there")
        took = ""
        if result.stop_s is not None:
            took = f" (the stop took {result.stop_s:.1f}s of its {grace:g}s)"
        report(f"error: rank 0: stopped by SIGTERM after {result.wall_s:.1f}s{took}; every unfinished job was "
               "checkpointed at its last finished step: running this config again resumes them")
        return EXIT_STOPPED
    print(f"done in {result.wall_s:.1f}s" + (f"; {len(result.failed)} job(s) failed" if result.failed else ""))
    return EXIT_JOBS_FAILED if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
