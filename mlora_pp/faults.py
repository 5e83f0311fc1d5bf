"""Fault injection for failure tests: kill or freeze one rank before a chosen action.

Inert unless the environment sets ``MLORA_PP_FAULT=RANK:ACTION:kill|hang`` (ACTION is the index
into that rank's action list). Tests use it to show that when a stage dies or stops answering,
every other rank ends with a clear message within the timeout instead of hanging.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "MLORA_PP_FAULT"


@dataclass(frozen=True)
class Fault:
    rank: int
    action: int
    mode: str  # "kill": SIGKILL this process; "hang": stop answering forever

    @staticmethod
    def from_environ() -> "Fault | None":
        spec = os.environ.get(ENV)
        if not spec:
            return None
        rank, action, mode = spec.split(":")
        if mode not in ("kill", "hang"):
            raise ValueError(f"{ENV}={spec!r}: mode must be kill or hang")
        return Fault(int(rank), int(action), mode)

    def maybe_fire(self, rank: int, action: int) -> None:
        if rank != self.rank or action != self.action:
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: alive, connections open, never answering
            time.sleep(3600)
