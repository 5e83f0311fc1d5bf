"""Frozen-base quantization (QLoRA style) of the projections an adapter may target.

``nf4``: `bitsandbytes.nn.Linear4bit` (NormalFloat4, blocks of 64, double quantization of the
absmax statistics, compute in the model dtype). ``int8``: `bitsandbytes.nn.Linear8bitLt` with
frozen int8 weights (row-wise absmax scales, ``threshold=6.0``). The stage quantizes layer by
layer while it reads the checkpoint, so a rank never holds its whole full-precision stage.

bitsandbytes is imported lazily: a run with ``quantize: none`` never needs it.

Notes on bitsandbytes 0.50 (checked on CPU):
- quantization happens when a not-yet-quantized `Params4bit` / `Int8Params` is moved with
  ``.to(device)`` (CPU included). We call that on the parameter itself, not through
  ``module.to()``: ``Module.to`` on a fresh `Linear8bitLt` loses the int8 scales (``SCB``).
- neither `MatMul4Bit` nor the int8 autograd functions save their output for backward, so the
  LoRA delta may be added in place into the quantized projection's output.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any, Callable, TypeVar

import torch
from torch import nn

MODES: tuple[str, ...] = ("none", "nf4", "int8")
INT8_THRESHOLD = 6.0

T = TypeVar("T")


class QuantizeError(ValueError):
    """bitsandbytes is missing or cannot quantize here."""


def import_bnb() -> Any:
    """bitsandbytes, or a clear error naming what to install."""
    try:
        import bitsandbytes  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QuantizeError(
            f"model.quantize needs the 'bitsandbytes' package ({exc}); install it (pip install bitsandbytes) "
            "or use quantize: none"
        ) from None
    return bitsandbytes


def quantize_linear(
    linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device: str | torch.device = "cpu"
) -> nn.Module:
    """A frozen bitsandbytes copy of `linear` (nf4 or int8), quantized on `device`.

    The returned module holds no reference to `linear`'s full-precision weight; the caller drops
    `linear` to free it. A bias stays in `compute_dtype`.
    """
    if mode not in ("nf4", "int8"):
        raise QuantizeError(f"quantize mode must be 'nf4' or 'int8', got {mode!r}")
    bnb = import_bnb()
    device = torch.device(device)
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if mode == "nf4":
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )
        param = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        )
        q.weight = param.to(device)
        if q.weight.quant_state is None:
            raise QuantizeError(f"bitsandbytes did not quantize a {tuple(weight.shape)} weight to nf4 on {device}")
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
            threshold=INT8_THRESHOLD, device="meta",
        )
        param = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        q.weight = param.to(device)
        if q.weight.dtype != torch.int8 or q.weight.SCB is None:
            raise QuantizeError(f"bitsandbytes did not quantize a {tuple(weight.shape)} weight to int8 on {device}")
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    q.requires_grad_(False)
    return q


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] float32 weight a quantized (or plain) linear computes with."""
    bnb = import_bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        w = module.weight
        scb = w.SCB if w.SCB is not None else module.state.SCB  # moved to .state by the first forward
        cb = w.CB if w.CB is not None else (module.state.CB if module.state.CB is not None else w.data)
        return cb.float() * (scb.float()[:, None] / 127.0)
    return module.weight.detach().float()


# ------------------------------------------------------------------------------------ peak RSS


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantizing on CPU allocates and frees many layer-sized temporaries; glibc keeps them in its
    heap, so without a trim after each layer the process's RSS grows as if every layer's
    full-precision temporaries were still alive.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes  # noqa: PLC0415

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _vm_hwm() -> int | None:
    """This process's peak resident set size in bytes since the last reset (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss() -> int:
    """Peak RSS in bytes: VmHWM on Linux (resettable), else ru_maxrss (process lifetime)."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def measure_peak_rss(fn: Callable[[], T]) -> tuple[T, int, int]:
    """Run fn(); return (result, peak RSS bytes during fn, RSS bytes before fn).

    The peak is exact only where the peak mark can be reset (Linux); elsewhere it is the process's
    lifetime peak, an upper bound.
    """
    before = current_rss()
    reset_peak_rss()
    result = fn()
    return result, peak_rss(), before
