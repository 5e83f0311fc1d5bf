"""Fused elementwise kernels of the frozen base: RMSNorm, SwiGLU's silu(gate) * up, rotary embedding.

Eager PyTorch runs every elementwise operator as its own kernel over the whole tensor. The
LLaMA-family RMSNorm in bf16 is 8 kernels forward and 14 backward over a [tokens, hidden] tensor,
most of them reading and writing fp32 copies; rotary is 5 per tensor each way, SiLU-times-up 2
forward and 4 backward (`benchmarks.layer_kernels` counts them). On a GPU each is a launch (host
time) and a pass through memory (device time); the 8-job H100 profile put such elementwise work
of the layers at most of the device time besides GEMMs, AdamW, dropout and casts (README, "On a
GPU"). Compiled, each function below is one kernel forward and one backward.

Each function is written once, as plain tensor code, and runs either way: a `FusedKernel` runs
it through `torch.compile` on the devices it is enabled for (CUDA by default), eagerly elsewhere.
The eager formulas are the ones the model used before, operation for operation, so CPU runs (and
the fp32 correctness contract) are unchanged. Compiled, the same formulas may round differently
(inductor keeps intermediates in fp32), within bf16 tolerance; `tests/gpu` and
`tests/test_kernels.py` check that.

`MLORA_PP_COMPILE=0` turns compiling off everywhere (as for the dropout kernel), and
`set_layer_kernels("eager")` turns it off for these kernels alone, for side-by-side benchmarks.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FusedKernel", "LAYER_KERNELS", "set_layer_kernels", "warm_up_calls", "warm_up_layer_kernels",
           "rms_norm_forward", "rms_norm_backward", "silu_mul_forward", "silu_mul_backward",
           "rotary_forward", "rotary_backward"]

_MODES = ("fused", "eager")
_mode = ["fused"]


def set_layer_kernels(mode: str) -> None:
    """`fused` (compiled where a kernel is enabled for the device, the default) or `eager`."""
    if mode not in _MODES:
        raise ValueError(f"layer kernels must be one of {_MODES}, got {mode!r}")
    _mode[0] = mode


class FusedKernel:
    """A pure tensor function run as one `torch.compile`d kernel on `devices`, eagerly elsewhere.

    No autograd: inputs are detached and it runs under `no_grad` (the callers are autograd
    Functions with their own backward), so one grad mode means one compile. Shapes change from
    micro-batch to micro-batch: the second shape recompiles with the changed sizes symbolic, and
    that graph then serves every later shape (`warm_up_layer_kernels` makes the compiles at
    set-up). A failed compile warns once, in one line, and the kernel runs eagerly from then on:
    same formula.
    """

    def __init__(self, fn: Callable[..., object], devices: Sequence[str] = ("cuda",)):
        self.fn = fn
        self.devices = tuple(devices)
        self._compiled: Callable[..., object] | None = None
        self.failed: str | None = None

    def enabled_for(self, device: torch.device) -> bool:
        return (device.type in self.devices and self.failed is None and _mode[0] == "fused"
                and os.environ.get("MLORA_PP_COMPILE", "1") != "0")

    def __call__(self, *args):
        first = next(a for a in args if isinstance(a, Tensor))
        if not self.enabled_for(first.device):
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True)
        detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            with torch.no_grad():
                return self._compiled(*detached)
        except Exception as exc:  # no compiler, no Triton, a compiler bug: the eager formula is the same
            cause = exc
            while cause.__cause__ is not None:  # dynamo wraps the compiler's error: name that one
                cause = cause.__cause__
            first_line = (str(cause).strip().splitlines() or [""])[0][:200]  # compiler errors run to pages
            self.failed = f"{type(cause).__name__}: {first_line}"
            warnings.warn(f"compiling {self.fn.__name__} failed ({self.failed}); running it eagerly")
            return self.fn(*args)


# ------------------------------------------------------------------------------------- RMSNorm


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * (x32 * rstd).to(x.dtype), rstd) of x [tokens, d], x32 = x in fp32 and
    rstd = rsqrt(mean(x32^2) + eps) [tokens, 1]: transformers' LLaMA RMSNorm, op for op."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """The input gradient of `rms_norm_forward` (the weight is frozen), in autograd's order of
    operations on the recomputed fp32 copy of x."""
    x32 = x.to(torch.float32)
    g = (grad * weight).to(torch.float32)
    grad_rstd = (g * x32).sum(-1, keepdim=True)
    grad_square = (grad_rstd * (-0.5 * rstd.pow(3))).expand_as(x32) / x32.shape[-1]
    return (g * rstd + grad_square * 2 * x32).to(x.dtype)


# --------------------------------------------------------------------------------------- SwiGLU


def silu_mul_forward(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def silu_mul_backward(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) of `silu_mul_forward`: autograd's kernels on the same values."""
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


# --------------------------------------------------------------------------------------- rotary


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(y: Tensor) -> Tensor:
    """The adjoint of `_rotate_half`: what its backward gives for an output gradient y."""
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


def rotary_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' `apply_rotary_pos_emb` of q, k [rows, heads, L, head_dim] with cos, sin
    [rows, L, head_dim] (broadcast over heads), op for op."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The input gradients of `rotary_forward`: grad * cos + rotate_half^T(grad * sin), bit for bit
    what autograd gives (its two terms are added once, and the halves it adds to zeros are exact)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return dq * cos + _rotate_half_transposed(dq * sin), dk * cos + _rotate_half_transposed(dk * sin)


# ------------------------------------------------------------------------------ kernels in use

LAYER_KERNELS: dict[str, FusedKernel] = {
    fn.__name__: FusedKernel(fn)
    for fn in (rms_norm_forward, rms_norm_backward, silu_mul_forward, silu_mul_backward,
               rotary_forward, rotary_backward)
}
"""The kernels the model's layers call, by function name; compiled on CUDA."""


def warm_up_calls(rows: int, length: int, dtype: torch.dtype, device: torch.device | str, hidden: int,
                  intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                  fused_projections: bool = False, head_norms: bool = False) -> list[tuple[str, tuple]]:
    """One decoder layer's kernel calls for `rows` x `length` tokens, their inputs laid out as the
    model gives them (a compiled kernel guards on strides as well as sizes): with
    `fused_projections`, gate and up are column slices of one [tokens, 2 x intermediate] result and
    q and k (unless Qwen3's `head_norms` made them anew) of one [tokens, q + k + v] result; q and k
    are transposed views either way. Qwen3's head norms normalize each head of q and k."""
    def t(*shape: int) -> Tensor:
        return torch.ones(*shape, dtype=dtype, device=device)

    tokens = rows * length
    calls: list[tuple[str, tuple]] = []
    norms = [(tokens, hidden)] + ([(tokens * heads, head_dim), (tokens * kv_heads, head_dim)] if head_norms else [])
    for count, width in norms:
        weight = t(width)
        rstd = torch.ones(count, 1, dtype=torch.float32, device=device)
        calls += [("rms_norm_forward", (t(count, width), weight, eps)),
                  ("rms_norm_backward", (t(count, width), t(count, width), weight, rstd))]
    if fused_projections:
        gate, up = t(tokens, 2 * intermediate).split(intermediate, dim=1)
    else:
        gate, up = t(tokens, intermediate), t(tokens, intermediate)
    calls += [("silu_mul_forward", (gate, up)), ("silu_mul_backward", (t(tokens, intermediate), gate, up))]
    if fused_projections and not head_norms:
        q, k, _ = t(tokens, (heads + 2 * kv_heads) * head_dim).split(
            [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    else:
        q, k = t(tokens, heads * head_dim), t(tokens, kv_heads * head_dim)
    q = q.view(rows, length, heads, head_dim).transpose(1, 2)
    k = k.view(rows, length, kv_heads, head_dim).transpose(1, 2)
    cos, sin = t(1, length, head_dim), t(1, length, head_dim)
    # attention's backward gives dq and dk laid out as q and k were (transposed views)
    dq = t(rows, length, heads, head_dim).transpose(1, 2)
    dk = t(rows, length, kv_heads, head_dim).transpose(1, 2)
    calls += [("rotary_forward", (q, k, cos, sin)), ("rotary_backward", (dq, dk, cos, sin))]
    return calls


def warm_up_layer_kernels(device: torch.device | str, dtype: torch.dtype, hidden: int, intermediate: int,
                          heads: int, kv_heads: int, head_dim: int, eps: float, fused_projections: bool = False,
                          head_norms: bool = False) -> float:
    """Compile every layer kernel enabled for `device` now, at three shapes, so that the first
    training steps do not pay for it (seconds spent; 0 where nothing is compiled). The inputs are
    laid out as the model gives them (`warm_up_calls`)."""
    device = torch.device(device)
    if not any(kernel.enabled_for(device) for kernel in LAYER_KERNELS.values()):
        return 0.0
    start = time.perf_counter()
    # the second shape makes rows and length symbolic; a single row is specialized apart (as sizes 0
    # and 1 always are), and micro-batches of one row are common
    for rows, length in ((2, 5), (3, 7), (1, 7)):
        for name, args in warm_up_calls(rows, length, dtype, device, hidden, intermediate, heads, kv_heads, head_dim,
                                        eps, fused_projections, head_norms):
            LAYER_KERNELS[name](*args)
    return time.perf_counter() - start
