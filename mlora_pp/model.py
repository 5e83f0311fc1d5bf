"""One pipeline stage of a Hugging Face LLaMA-family model (Llama, Mistral, Qwen2 shapes).

A stage is: optional token embedding, decoder layers [first, last), optional final norm + lm_head.
One stage holding everything is the single-rank case; the pipeline only moves `first` and `last`.
The stage reads only its own tensors from the safetensors files (`safe_open`, sharded checkpoints
through `model.safetensors.index.json`) and never unpickles anything. Decoder layers, the rotary
embedding and the attention function are transformers' own; the layers' self-attention, MLP and
(below fp32) norms are taken over by modules here (`SelfAttention`, `SwiGLU`, `RMSNorm`) that give
the same bits eagerly, keep less for backward and, on CUDA, run their elementwise work as fused
kernels (`mlora_pp.kernels`). Every projection an adapter may target is wrapped in a
`BatchedLoRALinear`, so the frozen base GEMM runs once for the rows of all adapters.

With ``quantize: nf4 | int8`` those projections are bitsandbytes modules (`mlora_pp.quantize`);
tensors are then read and quantized one decoder layer at a time, so the full-precision weights of
at most one layer are alive at once. Embedding, norms and lm_head stay in the model dtype.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import safetensors

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from mlora_pp.config import LORA_TARGETS
from mlora_pp.head_loss import LossTokens, head_loss
from mlora_pp.kernels import LAYER_KERNELS, warm_up_layer_kernels
from mlora_pp.lora import BatchedLoRALinear, LoRABatch, LoRAContext
from mlora_pp.quantize import MODES as QUANTIZE_MODES
from mlora_pp.quantize import QuantizeError, quantize_linear, release_freed_memory
from mlora_pp.seeding import stable_seed

# transformers renamed create_causal_mask's `past_key_values` to `cache` during 5.x; we pass neither a cache.
_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTN: dict[str, str] = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


class ModelError(ValueError):
    """A model directory we cannot use; the message names the directory and what is wrong."""


_ARCH_PREFIX: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _arch_module(model_type: str) -> ModuleType:
    """transformers' modeling module of a supported architecture."""
    if model_type not in _ARCH_PREFIX:
        raise ModelError(f"model_type {model_type!r} is not supported (supported: {', '.join(_ARCH_PREFIX)})")
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _arch_classes(model_type: str) -> tuple[type, type, type]:
    """(DecoderLayer, RMSNorm, RotaryEmbedding) of a supported architecture."""
    m, prefix = _arch_module(model_type), _ARCH_PREFIX[model_type]
    return getattr(m, prefix + "DecoderLayer"), getattr(m, prefix + "RMSNorm"), getattr(m, prefix + "RotaryEmbedding")


def _attention_extra(model_type: str, attn: nn.Module) -> dict[str, object]:
    """The arguments beyond Llama's that transformers' attention of this architecture passes to
    its attention function: Mistral and Qwen2/3 pass their sliding window (None where off)."""
    if model_type == "mistral":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if model_type in ("qwen2", "qwen3"):
        return {"sliding_window": attn.sliding_window}
    return {}


def _is_projection(param_name: str) -> bool:
    """Whether a stage parameter (``layers.3.self_attn.q_proj.weight``) belongs to a targetable projection."""
    parts = param_name.split(".")
    return len(parts) >= 4 and parts[0] == "layers" and parts[3] in LORA_TARGETS


def module_path(layer: int, target: str) -> str:
    """The PEFT-style path of a targetable projection, e.g. ``layers.3.self_attn.q_proj``."""
    return f"layers.{layer}.{_ATTN.get(target, 'mlp')}.{target}"


def module_id(layer: int, target: str) -> int:
    """A small stable integer per (layer, projection); it keys the dropout masks."""
    return layer * len(LORA_TARGETS) + LORA_TARGETS.index(target)


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model one stage holds."""

    first_layer: int
    last_layer: int  # exclusive
    has_embedding: bool
    has_head: bool

    @staticmethod
    def whole(num_layers: int) -> "StageSpec":
        return StageSpec(0, num_layers, True, True)


def read_model_config(model_dir: Path) -> PretrainedConfig:
    """The Hugging Face config of a local model directory (no remote code, no hub)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: {'not a directory' if model_dir.exists() else 'no such directory'}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{config_file}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{config_file}: not valid UTF-8") from None
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - also huggingface_hub's StrictDataclassError (bad field values)
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        first = lines[0] if lines else exc.__class__.__name__
        if first.endswith(":") and len(lines) > 1:  # huggingface_hub's validation errors: the reason is below
            first = f"{first} {lines[1]}"
        raise ModelError(f"{config_file}: not a usable model config ({first})") from None
    _arch_classes(config.model_type)
    config._attn_implementation = "sdpa"
    return config


class SafetensorsIndex:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lives."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: self.model_dir / fname for name, fname in weight_map.items()}
            except OSError as exc:
                raise ModelError(f"{index}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{index}: not a safetensors index ({exc.__class__.__name__}: {exc})") from None
        elif single.is_file():
            try:
                with safetensors.safe_open(str(single), framework="pt") as f:
                    self.files = {name: single for name in f.keys()}
            except (OSError, safetensors.SafetensorError) as exc:
                raise ModelError(f"{single}: cannot read the safetensors header ({exc})") from None
        else:
            raise ModelError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are read; .bin files are never unpickled)"
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read exactly `names`, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise ModelError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            try:
                with safetensors.safe_open(str(path), framework="pt") as f:
                    for name in wanted:
                        out[name] = f.get_tensor(name)
            except (OSError, safetensors.SafetensorError) as exc:
                raise ModelError(f"{path}: cannot read its tensors ({exc})") from None
        return out


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward and recomputing silu(gate) there.

    Autograd's silu-then-multiply also keeps silu(gate): one more [tokens, intermediate] tensor
    per decoder layer, about 14% of what a layer saves for backward. The gradients are the same
    kernels on the same values as autograd's, so they are bit for bit the same; on CUDA forward and
    backward are one fused kernel each (`mlora_pp.kernels`).
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        width = gate.shape[-1]
        return LAYER_KERNELS["silu_mul_forward"](gate.reshape(-1, width), up.reshape(-1, width)).reshape(gate.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        width = gate.shape[-1]
        d_gate, d_up = LAYER_KERNELS["silu_mul_backward"](
            grad.reshape(-1, width), gate.reshape(-1, width), up.reshape(-1, width))
        return d_gate.reshape(gate.shape), d_up.reshape(up.shape)


class RMSNormFunction(torch.autograd.Function):
    """The LLaMA-family RMSNorm with a frozen weight: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype),
    x32 = x in fp32. Keeps x in its own dtype and the fp32 rsqrt per row for backward.

    transformers' version keeps the fp32 copy of x instead: in bf16 that is twice x's bytes, 20%
    of everything a decoder layer keeps for backward (two norms a layer). The forward is the same
    ops on the same values, so bit for bit the same; the backward is autograd's own sequence of
    ops on the recomputed fp32 copy (`mlora_pp.kernels`: one fused kernel each on CUDA).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = LAYER_KERNELS["rms_norm_forward"](x.reshape(-1, x.shape[-1]), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        dx = LAYER_KERNELS["rms_norm_backward"](grad.reshape(-1, width), x.reshape(-1, width), weight, rstd)
        return dx.reshape(x.shape), None, None


class Rotary(torch.autograd.Function):
    """transformers' `apply_rotary_pos_emb` of (q, k) with frozen (cos, sin), as one fused kernel
    forward and one backward on CUDA (`mlora_pp.kernels`); eagerly the same ops and bits."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return LAYER_KERNELS["rotary_forward"](q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dq, dk = LAYER_KERNELS["rotary_backward"](dq, dk, cos, sin)
        return dq, dk, None, None


class RMSNorm(nn.Module):
    """A frozen RMSNorm through `RMSNormFunction`, taking over transformers' module (same weight,
    same eps, same state-dict key). Used where the model dtype is not fp32: in fp32 the upcast is
    x itself, so transformers' graph already keeps nothing more."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise ModelError("RMSNorm: the norm weights are frozen; training them is not supported")
        return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)


class FusedBase:
    """The frozen base weights of projections that read the same input (q/k/v; gate/up),
    concatenated, so that one GEMM computes all their base outputs.

    Forward, that is one larger GEMM instead of several small ones (GQA's k and v are a quarter of
    q's width); backward, one input-gradient GEMM instead of one per projection and the adds
    between them. Each projection's adapters then add their deltas to its slice of the output
    (`BatchedLoRALinear.forward`'s `base_out`). The projections' own weights become views of the
    concatenation, so memory does not grow, and their module paths, state-dict keys and unfused
    calls stay as they were. A weight given new storage (`.to()`, assigning `.data`) is noticed at
    the next call, which concatenates again; a projection's base module replaced by another needs
    `StageModel.fuse_projections` again.
    """

    def __init__(self, projections: list[BatchedLoRALinear]):
        self.sizes = [p.out_features for p in projections]
        self.weight: torch.Tensor
        self.bias: torch.Tensor | None
        bases = [p.base for p in projections]
        self._params: list[nn.Parameter] = [b.weight for b in bases] + (
            [b.bias for b in bases] if bases[0].bias is not None else [])
        """The projections' own weights (and biases): checked at every call, so kept at hand (a
        module attribute lookup costs microseconds of host time, more than the check itself)."""
        self._pointers: list[int] = []
        self._fuse()

    @staticmethod
    def of(projections: list[BatchedLoRALinear]) -> "FusedBase | None":
        """A fusion of `projections`, or None where their bases cannot share one GEMM (quantized
        bases, different inputs, dtypes or devices, biases on some only)."""
        bases = [p.base for p in projections]
        if not all(type(b) is nn.Linear for b in bases):
            return None
        weights = [b.weight for b in bases]
        if (len({w.shape[1] for w in weights}) != 1 or len({(w.dtype, w.device) for w in weights}) != 1
                or len({b.bias is None for b in bases}) != 1 or any(w.requires_grad for w in weights)):
            return None
        return FusedBase(projections)

    def _fuse(self) -> None:
        weights, biases = self._params[:len(self.sizes)], self._params[len(self.sizes):]
        self.weight = torch.cat([w.detach() for w in weights])
        for w, view in zip(weights, self.weight.split(self.sizes)):
            w.data = view
        self.bias = torch.cat([b.detach() for b in biases]) if biases else None
        for b, view in zip(biases, self.bias.split(self.sizes) if self.bias is not None else ()):
            b.data = view
        self._pointers = [t.data_ptr() for t in self._params]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every projection's base output for x [..., in], as [tokens, out_i] column slices of one
        [tokens, sum(out_i)] result (autograd sees separate tensors, so each may be modified in place)."""
        if [t.data_ptr() for t in self._params] != self._pointers:
            self._fuse()
        out = nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return torch.unsafe_split_with_sizes(out, self.sizes, dim=1)


class SwiGLU(nn.Module):
    """The LLaMA-family MLP, down(silu(gate(x)) * up(x)), through `SiluMul`. It takes over the
    projections of transformers' MLP under the same names, so module paths do not change."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.fused: FusedBase | None = None
        """gate and up in one base GEMM (`StageModel.fuse_projections`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))
        gate, up = self.fused(x)
        return self.down_proj(SiluMul.apply(self.gate_proj(x, gate), self.up_proj(x, up)))


class KVCache:
    """Every layer's keys and values so far, for decoding a token at a time (`StageModel.decode`):
    [rows, kv_heads, slots, head_dim] each, `capacity` slots allocated at the first write."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        """Slots written (by every layer) before the current call."""
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's keys and values of `layer` after the cached ones; all of them so far."""
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} slots needed, {self.capacity} allocated")
        if layer not in self._keys:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self._keys[layer] = key.new_empty(shape)
            self._values[layer] = value.new_empty(shape)
        self._keys[layer][:, :, self.length:end] = key
        self._values[layer][:, :, self.length:end] = value
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]


class SelfAttention(nn.Module):
    """transformers' LLaMA-family self-attention (Llama, Mistral, Qwen2, Qwen3) with rotary through
    `Rotary`.

    It takes over the projections of transformers' module under the same names, so module paths do
    not change, and calls transformers' own attention function (sdpa, eager, ...) with the
    arguments transformers' forward passes. Qwen3's per-head RMSNorm of queries and keys
    (`q_norm`, `k_norm`) comes along where the module has it. Training never uses a KV cache, so
    there is none.
    """

    def __init__(self, attn: nn.Module, eager_attention: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                 extra: dict[str, object]):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm: nn.Module | None = getattr(attn, "q_norm", None)
        self.k_norm: nn.Module | None = getattr(attn, "k_norm", None)
        # what transformers' attention functions read from the module they are given
        self.config, self.layer_idx, self.head_dim = attn.config, attn.layer_idx, attn.head_dim
        self.num_key_value_groups, self.scaling = attn.num_key_value_groups, attn.scaling
        self.attention_dropout, self.is_causal = attn.attention_dropout, attn.is_causal
        self._eager_attention = eager_attention
        self._extra = extra
        self.fused: FusedBase | None = None
        """q, k and v in one base GEMM (`StageModel.fuse_projections`)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        for unused in ("cache", "past_key_values"):  # transformers' forward takes these, the rest goes on
            kwargs.pop(unused, None)
        kv_cache: KVCache | None = kwargs.pop("kv_cache", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self.fused is None:
            query, key, value = (p(hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q_base, k_base, v_base = self.fused(hidden_states)
            query, key = self.q_proj(hidden_states, q_base), self.k_proj(hidden_states, k_base)
            # attention keeps v for backward: a slice would keep q's and k's columns alive with it
            value = self.v_proj(hidden_states, v_base).contiguous()
        query, key, value = (t.view(hidden_shape) for t in (query, key, value))
        if self.q_norm is not None and self.k_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        query, key = Rotary.apply(query, key, *position_embeddings)
        if kv_cache is not None:
            key, value = kv_cache.append(self.layer_idx, key, value)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager_attention)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **self._extra, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class _Observed(contextlib.AbstractContextManager):
    """A recompute's context: the stage's `recompute_observer` at the time the recompute runs."""

    def __init__(self, stage: StageModel):
        self.stage = stage
        self.inner: contextlib.AbstractContextManager = contextlib.nullcontext()

    def __enter__(self):
        observer = self.stage.recompute_observer
        self.inner = observer() if observer is not None else contextlib.nullcontext()
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class StageModel(nn.Module):
    """Embedding? + decoder layers [first, last) + norm/lm_head?, with batched LoRA on every projection."""

    def __init__(
        self, config: PretrainedConfig, spec: StageSpec, dtype: torch.dtype, lora_path: str = "auto",
        quantize: str = "none",
    ):
        super().__init__()
        if quantize not in QUANTIZE_MODES:
            raise ModelError(f"model.quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
        self.quantize = quantize
        layer_cls, norm_cls, rotary_cls = _arch_classes(config.model_type)
        self.config = config
        self.spec = spec
        self.dtype = dtype
        self.context = LoRAContext()
        with torch.device("meta"):
            self.embed_tokens = (
                nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype) if spec.has_embedding else None
            )
            self.layers = nn.ModuleDict(
                {str(i): layer_cls(config, i).to(dtype) for i in range(spec.first_layer, spec.last_layer)}
            )
            eager_attention = _arch_module(config.model_type).eager_attention_forward
            for layer in self.layers.values():
                layer.self_attn = SelfAttention(layer.self_attn, eager_attention,
                                                _attention_extra(config.model_type, layer.self_attn))
            if config.hidden_act in ("silu", "swish"):
                for layer in self.layers.values():
                    layer.mlp = SwiGLU(layer.mlp)
            self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(dtype) if spec.has_head else None
            if dtype != torch.float32:
                for layer in self.layers.values():
                    layer.input_layernorm = RMSNorm(layer.input_layernorm)
                    layer.post_attention_layernorm = RMSNorm(layer.post_attention_layernorm)
                    attn = layer.self_attn
                    if attn.q_norm is not None and attn.k_norm is not None:  # Qwen3's, per head
                        attn.q_norm, attn.k_norm = RMSNorm(attn.q_norm), RMSNorm(attn.k_norm)
                if self.norm is not None:
                    self.norm = RMSNorm(self.norm)
            self.lm_head = (
                nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype) if spec.has_head else None
            )
        self.rotary_emb = rotary_cls(config=config)
        self.recompute = False
        """Activation checkpointing: keep each decoder layer's input only and recompute the layer in
        backward. Exact, because dropout masks are pure functions of the batch, not of RNG state."""
        self.recompute_observer: Callable[[], contextlib.AbstractContextManager] | None = None
        """With `recompute`: a context entered around each layer's recompute in backward (the
        memory meter's `RecomputeMeter.layer` counts what the recompute keeps); read when the
        recompute runs, not when the forward did."""
        self._lora_path = lora_path
        self._sliding = self._sliding_layers()

    def warm_up_kernels(self) -> float:
        """Compile the fused layer kernels for this stage's device and dtype now, so that the first
        steps do not pay for it (seconds spent; 0 where nothing is compiled: CPU, `MLORA_PP_COMPILE=0`)."""
        c = self.config
        device = next(self.parameters()).device
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        head_norms = any(getattr(layer.self_attn, "q_norm", None) is not None for layer in self.layers.values())
        return warm_up_layer_kernels(device, self.dtype, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                     c.num_key_value_heads, head_dim, c.rms_norm_eps,
                                     fused_projections=self.fused_projections, head_norms=head_norms)

    def _sliding_layers(self) -> set[int]:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return {i for i in self.layers_range() if layer_types[i] == "sliding_attention"}
        if getattr(self.config, "sliding_window", None) is not None and self.config.model_type == "mistral":
            return set(self.layers_range())
        return set()

    def layers_range(self) -> range:
        return range(self.spec.first_layer, self.spec.last_layer)

    # ------------------------------------------------------------------ weights
    def tensor_names(self) -> dict[str, str]:
        """Checkpoint tensor name -> our parameter name, for this stage only."""
        names: dict[str, str] = {}
        meta = dict(self.named_parameters())
        for ours in meta:
            if ours.startswith("embed_tokens."):
                names["model." + ours] = ours
            elif ours.startswith("layers.") or ours.startswith("norm."):
                names["model." + ours] = ours
            elif ours.startswith("lm_head."):
                names[ours] = ours
        return names

    def load_base(self, index: SafetensorsIndex, device: str | torch.device = "cpu") -> None:
        """Read this stage's frozen base tensors (and only those), then wrap the projections.

        Tensors are read one decoder layer at a time (embedding, norm and lm_head as one more
        group); with quantization each layer's targeted projections are quantized on `device`
        right after its tensors are read, before the next layer is read.
        """
        names = self.tensor_names()
        tied = self.spec.has_head and "lm_head.weight" not in index.files
        if tied and not getattr(self.config, "tie_word_embeddings", False):
            raise ModelError(f"{index.model_dir}: lm_head.weight is missing and embeddings are not tied")
        groups: dict[int | None, dict[str, str]] = {}
        for ckpt_name, ours in names.items():
            layer = int(ours.split(".")[1]) if ours.startswith("layers.") else None
            groups.setdefault(layer, {})[ckpt_name] = ours
        expected = set(self.state_dict(keep_vars=True))
        loaded: set[str] = set()

        def source(ckpt_name: str) -> str:
            return "model.embed_tokens.weight" if (tied and ckpt_name == "lm_head.weight") else ckpt_name

        for layer, group in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            tensors = index.read(sorted({source(n) for n in group}))
            state = {ours: tensors[source(ckpt)].to(self.dtype) for ckpt, ours in group.items()}
            if self.quantize != "none":
                # safetensors may hand out views of one memory map of the file; tensors we keep in
                # full precision get their own storage so that the map, and the quantized layers'
                # full-precision pages it keeps resident, go away once a layer is quantized.
                state = {k: (v if _is_projection(k) else v.clone()) for k, v in state.items()}
            del tensors
            try:
                _, unexpected = self.load_state_dict(state, strict=False, assign=True)
            except RuntimeError as exc:
                if "size mismatch" not in str(exc):
                    raise
                # a tensor's shape is not the one config.json gives (preflight checks the headers first)
                lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
                raise ModelError(f"{index.model_dir}: the weights do not match config.json "
                                 f"({lines[0] if lines else exc})") from None
            if unexpected:
                raise ModelError(f"{index.model_dir}: stage weights mismatch: unexpected {unexpected}")
            loaded |= set(state)
            del state
            if layer is not None and self.quantize != "none":
                self._quantize_layer(layer, device)
                release_freed_memory()
        missing = sorted(m for m in expected - loaded if not m.startswith("rotary_emb."))
        if missing:
            raise ModelError(f"{index.model_dir}: stage weights mismatch: missing {missing}, unexpected []")
        for p in self.parameters():
            p.requires_grad_(False)
        self._wrap_projections()

    def _quantize_layer(self, layer: int, device: str | torch.device) -> None:
        """Replace layer `layer`'s targetable projections by frozen bitsandbytes modules."""
        parent_layer = self.layers[str(layer)]
        for target in LORA_TARGETS:
            parent = getattr(parent_layer, _ATTN.get(target, "mlp"))
            try:
                quantized = quantize_linear(getattr(parent, target), self.quantize, self.dtype, device)
            except QuantizeError as exc:
                raise ModelError(f"model.quantize: {exc}") from None
            setattr(parent, target, quantized)  # drops the full-precision nn.Linear

    def _wrap_projections(self) -> None:
        for i in self.layers_range():
            layer = self.layers[str(i)]
            for target in LORA_TARGETS:
                parent = getattr(layer, _ATTN.get(target, "mlp"))
                base = getattr(parent, target)
                wrapped = BatchedLoRALinear(
                    base,
                    in_features=base.in_features,
                    out_features=base.out_features,
                    module_id=module_id(i, target),
                    context=self.context,
                    path=self._lora_path,
                )
                setattr(parent, target, wrapped)

    def fuse_projections(self, on: bool = True) -> None:
        """Compute q/k/v's base outputs with one GEMM, and gate/up's with another, in every layer
        (`FusedBase`), or again one GEMM a projection. Quantized bases stay unfused."""
        for i in self.layers_range():
            attn, mlp = self.layers[str(i)].self_attn, self.layers[str(i)].mlp
            attn.fused = FusedBase.of([attn.q_proj, attn.k_proj, attn.v_proj]) if on else None
            if isinstance(mlp, SwiGLU):
                mlp.fused = FusedBase.of([mlp.gate_proj, mlp.up_proj]) if on else None

    @property
    def fused_projections(self) -> bool:
        """Whether any layer computes several projections' base outputs with one GEMM."""
        return any(layer.self_attn.fused is not None or getattr(layer.mlp, "fused", None) is not None
                   for layer in self.layers.values())

    # ------------------------------------------------------------------ adapters
    def lora_modules(self, targets: list[str] | None = None) -> dict[str, BatchedLoRALinear]:
        """PEFT-style module path -> wrapped projection, for this stage's layers."""
        out: dict[str, BatchedLoRALinear] = {}
        for i in self.layers_range():
            for target in targets or LORA_TARGETS:
                parent = getattr(self.layers[str(i)], _ATTN.get(target, "mlp"))
                out[module_path(i, target)] = getattr(parent, target)
        return out

    def add_adapter(
        self, name: str, rank: int, alpha: float, dropout: float, target_modules: list[str], seed: int,
        rslora: bool = False,
    ) -> None:
        """Add adapter `name` on every targeted projection of this stage (`rslora`: scaled by
        alpha / sqrt(rank) instead of alpha / rank).

        Each module's A is initialised from a seed of (seed, name, module path), so the weights do not
        depend on how the model is cut into stages or which other adapters exist.
        """
        for path, module in self.lora_modules(target_modules).items():
            module.add_adapter(name, rank, alpha, dropout, init_seed=stable_seed(seed, name, path), rslora=rslora)

    def remove_adapter(self, name: str) -> None:
        for module in self.lora_modules().values():
            if name in module.adapters():
                module.remove_adapter(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for module in self.lora_modules().values():
            if name in module.adapters():
                params += [module.lora_A[name], module.lora_B[name]]
        return params

    def adapter_state(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (lora_A [r, in], lora_B [out, r]) of this stage's slice of adapter `name`."""
        return {
            path: (m.lora_A[name].detach(), m.lora_B[name].detach())
            for path, m in self.lora_modules().items()
            if name in m.adapters()
        }

    @torch.no_grad()
    def load_adapter_state(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy saved weights into adapter `name` (keys outside this stage are ignored)."""
        ours = self.lora_modules()
        for path, (a, b) in weights.items():
            if path not in ours:
                continue
            module = ours[path]
            if name not in module.adapters():
                raise ModelError(f"adapter {name!r} has weights for {path} but does not target it")
            module.lora_A[name].copy_(a)
            module.lora_B[name].copy_(b)

    # ------------------------------------------------------------------ forward
    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids)
        kwargs[_CACHE_KW] = None
        masks: dict[str, torch.Tensor | None] = {"full": create_causal_mask(**kwargs)}
        if self._sliding:
            masks["sliding"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """The forward's and the recompute's contexts for `torch.utils.checkpoint` (see
        `recompute_observer`)."""
        return contextlib.nullcontext(), _Observed(self)

    def _run_layer(self, index: int, hidden: torch.Tensor, batch: LoRABatch | None, **kwargs) -> torch.Tensor:
        """One decoder layer with its LoRA batch set: checkpointing replays this in backward, after
        the forward has already cleared the batch."""
        previous = self.context.batch
        self.context.batch = batch
        try:
            return self.layers[str(index)](hidden, **kwargs)
        finally:
            self.context.batch = previous

    def forward(self, inputs: torch.Tensor, batch: LoRABatch | None, head: bool = True) -> torch.Tensor:
        """Token ids [rows, L] (first stage) or hidden states [rows, L, d] -> hidden states or fp32 logits
        (the last stage; with `head=False` its hidden states before the final norm, for `head_loss`).

        Rows are right-padded: with causal attention real tokens never attend to padding, so no
        padding mask is needed and a row's result does not depend on how long its micro-batch is.
        """
        self.context.batch = batch
        try:
            hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
            seq_len = hidden.shape[1]
            position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
            position_embeddings = self.rotary_emb(hidden, position_ids)
            masks = self._masks(hidden, position_ids)
            for i in self.layers_range():
                kwargs = dict(
                    attention_mask=masks["sliding" if i in self._sliding else "full"],
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                )
                if self.recompute and torch.is_grad_enabled():
                    hidden = torch.utils.checkpoint.checkpoint(
                        self._run_layer, i, hidden, batch, use_reentrant=False,
                        context_fn=self._checkpoint_contexts, **kwargs
                    )
                else:
                    hidden = self.layers[str(i)](hidden, **kwargs)
            if self.lm_head is not None and head:
                hidden = self.lm_head(self.norm(hidden)).float()
            return hidden
        finally:
            self.context.batch = None

    def decodes_within(self, length: int) -> bool:
        """Whether `decode` serves sequences of up to `length` tokens: its masks let a token see every
        earlier one, which sliding-window layers do only up to their window."""
        window = getattr(self.config, "sliding_window", None)
        return not self._sliding or (window is not None and length <= window)

    @torch.no_grad()
    def decode(self, inputs: torch.Tensor, batch: LoRABatch | None, cache: KVCache, position_ids: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
        """For generation on a whole-model stage: token ids [rows, q] at their `position_ids` [rows, q],
        each attending to the slots `allowed` [rows, q, cached + q] (True where it may) of the cached
        keys and values followed by its own call's; their keys and values are appended to `cache`.
        Returns fp32 logits [rows, q, vocab], as `forward` would for the whole sequence."""
        if self.embed_tokens is None or self.lm_head is None:
            raise ModelError("decode: the stage must hold the whole model (embedding and head)")
        if not self.decodes_within(cache.capacity):
            raise ModelError(f"decode: sliding-window layers see fewer than the {cache.capacity} slots of this cache")
        self.context.batch = batch
        try:
            hidden = self.embed_tokens(inputs)
            position_embeddings = self.rotary_emb(hidden, position_ids)
            mask = allowed.unsqueeze(1)  # [rows, 1, q, slots]: broadcast over heads
            for i in self.layers_range():
                hidden = self.layers[str(i)](hidden, attention_mask=mask, position_ids=position_ids,
                                             position_embeddings=position_embeddings, kv_cache=cache)
            cache.length += inputs.shape[1]
            return self.lm_head(self.norm(hidden)).float()
        finally:
            self.context.batch = None

    def head_loss(self, hidden: torch.Tensor, where: LossTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's loss from its hidden states before the norm [rows, L, d]: (the weighted sum
        of the loss tokens' cross-entropy, to backpropagate; each part's summed cross-entropy [parts],
        detached). Norm and lm_head run on the loss tokens only (`mlora_pp.head_loss`)."""
        if self.lm_head is None:
            raise ModelError("head_loss: this stage has no lm_head (it is not the last stage)")
        return head_loss(hidden, self.norm, self.lm_head.weight, where)


def build_stage(
    model_dir: str | Path,
    spec: StageSpec | None = None,
    *,
    dtype: str = "float32",
    quantize: str = "none",
    lora_path: str = "auto",
    device: str | torch.device = "cpu",
    fuse_projections: bool | None = None,
) -> StageModel:
    """Build one stage from a local Hugging Face directory, reading only this stage's tensors.

    `fuse_projections`: one base GEMM for q/k/v and one for gate/up (`FusedBase`). On by default
    except on CPU; `MLORA_PP_FUSE_PROJECTIONS=1` or `0` overrides that. On CPU the
    frozen weights stay in the safetensors file's memory map, and concatenating them would copy
    q/k/v and gate/up (about 60% of a layer) to the heap, for no speed measured on CPU.
    """
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if spec is None:
        spec = StageSpec.whole(config.num_hidden_layers)
    if not 0 <= spec.first_layer < spec.last_layer <= config.num_hidden_layers:
        raise ModelError(
            f"{model_dir}: stage layers [{spec.first_layer}, {spec.last_layer}) outside the model's "
            f"{config.num_hidden_layers} layers"
        )
    stage = StageModel(config, spec, DTYPES[dtype], lora_path=lora_path, quantize=quantize)
    stage.load_base(SafetensorsIndex(model_dir), device=device)
    stage = stage.to(device)
    if fuse_projections is None:
        setting = os.environ.get("MLORA_PP_FUSE_PROJECTIONS")
        fuse_projections = torch.device(device).type != "cpu" if setting is None else setting != "0"
    stage.fuse_projections(fuse_projections)  # after the move, which would copy each view apart
    return stage
