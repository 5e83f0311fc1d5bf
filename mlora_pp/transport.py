"""Point-to-point tensors between neighbouring stages, with headers and timeouts.

Every tensor is preceded by a fixed-size header (kind, micro-batch id, shape, dtype), so a receiver
checks what it got instead of reading garbage or hanging on a size mismatch. Messages between two
ranks are matched in issue order (as NCCL does), which the schedule guarantees. Every wait has a
timeout; a lost or silent peer becomes a `PipelineError` that names this rank, the peer and what
was awaited.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ACTIVATION = 0
GRADIENT = 1
METRICS = 2
_KIND_NAMES = {ACTIVATION: "activation", GRADIENT: "gradient", METRICS: "metrics"}
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER_LEN = 8


class PipelineError(RuntimeError):
    """A distributed wait that failed or timed out; the message says who waited for what."""


@dataclass(frozen=True)
class Header:
    kind: int
    micro_batch: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def encode(self) -> torch.Tensor:
        if len(self.shape) > _HEADER_LEN - 3:
            raise ValueError(f"tensor rank {len(self.shape)} too high for the header")
        values = [self.kind, self.micro_batch, _DTYPES.index(self.dtype), *self.shape]
        values += [-1] * (_HEADER_LEN - len(values))
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def decode(t: torch.Tensor) -> "Header":
        values = t.tolist()
        shape = tuple(v for v in values[3:] if v >= 0)
        return Header(int(values[0]), int(values[1]), shape, _DTYPES[int(values[2])])


def describe(kind: int, micro_batch: int) -> str:
    return f"the {_KIND_NAMES.get(kind, kind)} of micro-batch {micro_batch}"


class StageTransport:
    """Sends to and receives from neighbour ranks; tensors travel on `device`, headers on the CPU group."""

    def __init__(self, rank: int, timeout_s: float, device: torch.device, group: Any = None, header_group: Any = None):
        self.rank = rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.device = device
        self.group = group
        self.header_group = header_group
        self._pending_sends: list[tuple[Any, str, int, torch.Tensor]] = []
        self._posted: dict[tuple[int, int, int], tuple[Any, torch.Tensor, Any, torch.Tensor]] = {}
        self.waited_s = 0.0
        """Total time spent blocked on peers (not computing)."""
        self.bytes_sent = 0
        """Bytes of every header and tensor this rank has posted to a peer."""

    def _post(self, op: Any, tensor: torch.Tensor, peer: int, group: Any, what: str) -> Any:
        """Issue an isend/irecv; a peer already gone fails here, not only in the wait."""
        try:
            return op(tensor, peer, group=group)
        except RuntimeError as exc:
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while {what} ({exc})") from None

    def _wait(self, work: Any, peer: int, what: str) -> None:
        start = time.perf_counter()
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as exc:
            text = str(exc).lower()
            if "timeout" in text or "timed out" in text:
                raise PipelineError(
                    f"rank {self.rank}: timed out after {self.timeout_s:.0f}s waiting for {what} "
                    f"(peer rank {peer} stopped answering)"
                ) from None
            raise PipelineError(f"rank {self.rank}: lost rank {peer} while waiting for {what} ({exc})") from None
        finally:
            self.waited_s += time.perf_counter() - start
        if ok is False:
            raise PipelineError(f"rank {self.rank}: timed out after {self.timeout_s:.0f}s waiting for {what} from rank {peer}")

    def send(self, tensor: torch.Tensor, peer: int, kind: int, micro_batch: int) -> None:
        """Post the header and the tensor; completion is checked later (`flush`) so compute overlaps."""
        tensor = tensor.detach().contiguous()
        header = Header(kind, micro_batch, tuple(tensor.shape), tensor.dtype).encode()
        what = f"sending {describe(kind, micro_batch)} to rank {peer}"
        self._pending_sends.append((self._post(dist.isend, header, peer, self.header_group, what), what, peer, header))
        self._pending_sends.append((self._post(dist.isend, tensor, peer, self.group, what), what, peer, tensor))
        self.bytes_sent += header.numel() * header.element_size() + tensor.numel() * tensor.element_size()
        self._reap()

    def _reap(self) -> None:
        """Drop completed sends so their buffers can be freed (a failed one raises in its wait)."""
        while self._pending_sends and self._pending_sends[0][0].is_completed():
            work, what, peer, _ = self._pending_sends.pop(0)
            self._wait(work, peer, what)

    def post(self, peer: int, kind: int, micro_batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Post the receives of an expected message now, so it lands while this rank computes.

        Must be called in the order the peer sends (the schedule guarantees it); `recv` then
        only waits.
        """
        key = (peer, kind, micro_batch)
        if key in self._posted:
            return
        raw = torch.empty(_HEADER_LEN, dtype=torch.int64)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        what = f"posting the receive of {describe(kind, micro_batch)} from rank {peer}"
        header_work = self._post(dist.irecv, raw, peer, self.header_group, what)
        tensor_work = self._post(dist.irecv, out, peer, self.group, what)
        self._posted[key] = (header_work, raw, tensor_work, out)

    def recv(self, peer: int, kind: int, micro_batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Receive `kind` of `micro_batch` from `peer` (posted earlier or now), checking its header."""
        self.post(peer, kind, micro_batch, shape, dtype)
        header_work, raw, tensor_work, out = self._posted.pop((peer, kind, micro_batch))
        what = describe(kind, micro_batch)
        self._wait(header_work, peer, f"{what} from rank {peer}")
        header = Header.decode(raw)
        if header.kind != kind or header.micro_batch != micro_batch or header.shape != tuple(shape) or header.dtype != dtype:
            raise PipelineError(
                f"rank {self.rank}: expected {what} {tuple(shape)} from rank {peer}, got "
                f"{describe(header.kind, header.micro_batch)} {header.shape}: the ranks run different schedules"
            )
        self._wait(tensor_work, peer, f"{what} from rank {peer}")
        return out

    def flush(self) -> None:
        """Wait for every posted send."""
        for work, what, peer, _ in self._pending_sends:
            self._wait(work, peer, what)
        self._pending_sends.clear()
