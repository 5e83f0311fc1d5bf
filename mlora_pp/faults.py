"""Fault injection for failure tests: kill or freeze one rank before a chosen action.

Inert unless the environment sets ``MLORA_PP_FAULT=RANK:ACTION:kill|hang|delay|nan`` (ACTION is the
index into that rank's action list) or ``MLORA_PP_FAULT=RANK:save:N:kill|hang|delay``: during the
N-th (0-based) checkpoint file that rank writes (stage parts and, on rank 0, manifests), after the
temporary file is written and fsynced but before it is renamed. Tests use it to show that when a
stage dies or stops answering, every other rank ends with a clear message within the timeout
instead of hanging, and that the checkpoints on disk stay complete; `delay` (a pause of `DELAY_S`,
then on) forces one order of two ranks' actions, to test the order a race rarely picks; `nan`
(before an optimizer step: that job's gradients on that rank become NaN) fails a job on one stage
only, as a real overflow may.

A fault fires in torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that
a run started with ``--max-restarts`` shows what its restart does. The count is each agent's: with
several agents, one that restarts its ranks without counting (another agent re-joined) fires it again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "MLORA_PP_FAULT"
DELAY_S = 3.0
MODES = ("kill", "hang", "delay", "nan")


@dataclass(frozen=True)
class Fault:
    rank: int
    action: int  # the action's index; with point "save", the index of the checkpoint file written
    mode: str  # "kill": SIGKILL this process; "hang": stop answering forever; "delay": pause, go on;
    # "nan": the caller poisons the action's gradients
    point: str = "action"  # "action": before an action; "save": inside a checkpoint file write

    @staticmethod
    def from_environ() -> "Fault | None":
        spec = os.environ.get(ENV)
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None
        parts = spec.split(":")
        point = "save" if len(parts) == 4 and parts[1] == "save" else "action"
        if point == "save":
            parts.pop(1)
        if len(parts) != 3 or parts[2] not in MODES:
            raise ValueError(f"{ENV}={spec!r}: expected RANK:ACTION:MODE or RANK:save:N:MODE, "
                             f"MODE one of {'|'.join(MODES)}")
        return Fault(int(parts[0]), int(parts[1]), parts[2], point)

    def maybe_fire(self, rank: int, action: int, point: str = "action") -> bool:
        """Fire if this is the place; True when the caller must poison the action's gradients."""
        if point != self.point or rank != self.rank or action != self.action:
            return False
        if self.mode == "nan":
            return True
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "delay":
            time.sleep(DELAY_S)
            return False
        while True:  # hang: alive, connections open, never answering
            time.sleep(3600)
