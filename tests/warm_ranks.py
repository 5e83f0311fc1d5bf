"""Rank processes forked from warm interpreters, for the tests' multi-rank runs.

A rank process spends about 5 s of CPU importing torch and transformers before it reads its config:
on the suite's 2 cores that was more than the training most runs test (a 2-stage run: ~6 s of start,
~2 s of work). A warm interpreter imports what `python -m launcher` imports once, then forks each
rank from itself; the fork runs the launcher's own `__main__` (runpy, as `python -m launcher` does)
with the test's arguments, environment, working directory and output files, and exits the way the
interpreter exits. One warm interpreter per rank index, each its own interpreter: the ranks of one
run hash strings with different seeds, as separate processes do, so an order that differs between
ranks still shows.

What a fork leaves untested (torchrun, signals to a run, the command line, the imports themselves)
fresh processes test: `torchrun()`, the demo and command-line tests. `MLORA_PP_TEST_FRESH_RANKS=1`
starts every rank as its own interpreter here too.

The warm interpreter is single-threaded (a fork copies only the forking thread, and a lock another
thread held would stay held in the child): it reads requests and reaps children in one loop.
Protocol, one JSON object a line: in, {"run": {args, env, cwd, stdout, stderr}} answered {"pid": N},
and {"kill": N} (a child not yet reaped, so never a reused pid); out, {"exited": N, "code": C} with
C as `Popen.returncode` gives it (-N for a child killed by signal N). End of input kills the
children left and ends the interpreter.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRESH_ENV = "MLORA_PP_TEST_FRESH_RANKS"
READY = b'{"ready": true}\n'


def _serve() -> None:
    """The warm interpreter's loop (this file run as a script)."""
    sys.path[0] = str(ROOT)  # as `python -m launcher` run from the repository has it
    import launcher.__main__  # noqa: F401  everything a rank imports before its config
    import transformers.models.llama.modeling_llama  # noqa: F401  imported by the model as it loads

    del sys.modules["launcher.__main__"]  # runs as __main__, as `-m` runs it: its imports stay loaded

    children: set[int] = set()
    pending = b""
    os.write(1, READY)
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            data = os.read(0, 1 << 16)
            if not data:
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                if "kill" in request:
                    if request["kill"] in children:
                        os.kill(request["kill"], signal.SIGKILL)
                    continue
                pid = os.fork()
                if pid == 0:
                    _run_rank(request["run"])  # never returns: exits as an interpreter does
                children.add(pid)
                os.write(1, json.dumps({"pid": pid}).encode() + b"\n")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            os.write(1, json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _run_rank(run: dict) -> None:
    """In the fork: become `python -m launcher ARGS` and exit with its code (a SystemExit, or a
    traceback and 1, out through the interpreter's own shutdown)."""
    import runpy

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.closerange(3, 256)
    sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED: nothing lost to a kill
    os.chdir(run["cwd"])
    os.environ.clear()
    os.environ.update(run["env"])
    sys.argv = ["launcher", *run["args"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runpy.run_module("launcher", run_name="__main__", alter_sys=True)
    sys.exit(0)


class WarmInterpreter:
    """A warm interpreter, seen from the test process: starts rank processes and waits for them."""

    def __init__(self, env: dict[str, str], timeout: float = 120) -> None:
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()
        self.pending = b""
        self.pids: list[int] = []
        self.codes: dict[int, int] = {}
        self.ready = False
        deadline = time.monotonic() + timeout
        while not self.ready:
            self._read(deadline, "its imports")

    def _read(self, deadline: float, waiting_for: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the warm interpreter (pid {self.proc.pid}) did not answer in time: {waiting_for}")
        readable, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.1))
        if not readable:
            return
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not data:
            raise RuntimeError(f"the warm interpreter (pid {self.proc.pid}) ended (code {self.proc.wait()}) "
                               f"while the tests waited for {waiting_for}")
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "ready" in message:
                self.ready = True
            elif "pid" in message:
                self.pids.append(message["pid"])
            else:
                self.codes[message["exited"]] = message["code"]

    def start(self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path) -> int:
        """Forks a rank running `python -m launcher ARGS`; its pid."""
        threads = env.get("OMP_NUM_THREADS")
        if threads != self.env.get("OMP_NUM_THREADS"):  # read once, as torch loads
            raise ValueError(f"a warm rank has OMP_NUM_THREADS={self.env.get('OMP_NUM_THREADS')}, not {threads}")
        request = {"run": {"args": args, "env": env, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}}
        with self.lock:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + 30
            while not self.pids:
                self._read(deadline, "the pid of a rank it forks")
            return self.pids.pop(0)

    def wait(self, pid: int, timeout: float) -> int | None:
        """The rank's exit code once it has ended, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while pid not in self.codes:
            if time.monotonic() >= deadline:
                return None
            with self.lock:
                if pid not in self.codes:
                    try:
                        self._read(deadline, f"rank process {pid}")
                    except TimeoutError:
                        return None
        return self.codes[pid]

    def kill(self, pid: int) -> None:
        with self.lock:
            self.proc.stdin.write(json.dumps({"kill": pid}).encode() + b"\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WarmRank:
    """A rank forked from a warm interpreter."""

    def __init__(self, interpreter: WarmInterpreter, pid: int) -> None:
        self.interpreter, self.pid = interpreter, pid

    def wait(self, timeout: float) -> int | None:
        return self.interpreter.wait(self.pid, timeout)

    def kill(self) -> int | None:
        self.interpreter.kill(self.pid)
        return self.interpreter.wait(self.pid, 30)


class FreshRank:
    """A rank started as its own interpreter."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.pid = proc, proc.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        self.proc.kill()
        return self.proc.wait()


def start_rank(args: list[str], env: dict[str, str], stdout: Path, stderr: Path, fresh: bool = False,
               base_env: dict[str, str] | None = None) -> WarmRank | FreshRank:
    """`python -m launcher ARGS` as rank env["RANK"], run from the repository with its output in the
    two files: forked from that rank's warm interpreter (started with `base_env` on first use), or
    as its own interpreter where `fresh` or MLORA_PP_TEST_FRESH_RANKS=1 asks for it."""
    if fresh or fresh_ranks():
        with open(stdout, "w") as out, open(stderr, "w") as err:
            return FreshRank(subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env,
                                              stdout=out, stderr=err, stdin=subprocess.DEVNULL))
    interpreter = warm_interpreter(int(env["RANK"]), env if base_env is None else base_env)
    return WarmRank(interpreter, interpreter.start(args, env, ROOT, stdout, stderr))


_WARM: dict[int, WarmInterpreter] = {}


def warm_interpreter(index: int, env: dict[str, str]) -> WarmInterpreter:
    """The warm interpreter for rank `index`, started on first use and closed when the tests end."""
    if index not in _WARM or _WARM[index].proc.poll() is not None:  # not started, or ended (killed)
        if not _WARM:
            atexit.register(lambda: [warm.close() for warm in _WARM.values()])
        _WARM[index] = WarmInterpreter(env)
    return _WARM[index]


def fresh_ranks() -> bool:
    return os.environ.get(FRESH_ENV, "0") not in ("", "0")


if __name__ == "__main__":
    _serve()
