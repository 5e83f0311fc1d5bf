"""Save and load LoRA adapters in the on-disk format of ``peft`` (LoRA, causal LM).

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``; ``peft.PeftModel.from_pretrained`` loads what we
write, and we load what peft writes. In memory an adapter is a dict mapping a
decoder-relative module path (``"layers.3.self_attn.q_proj"``) to the pair
``(lora_A [r, in], lora_B [out, r])``; the update of that linear layer is
``(lora_alpha / r) * x @ A.T @ B.T``, or ``(lora_alpha / sqrt(r)) * ...`` with ``use_rslora``.

Only JSON and safetensors are read or written (never pickle), and files are
replaced atomically so a crash mid-save never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from mlora_pp.config import lora_scale
from mlora_pp.durable import fsync_dir, make_dirs, write_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# peft's PeftModelForCausalLM wraps the HF model (``base_model.model``), whose
# decoder is ``.model``; our module paths are relative to that decoder.
_SAVE_PREFIX = "base_model.model.model."
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# <module>.lora_A.weight, optionally with an adapter name: <module>.lora_A.default.weight
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdapterSpec:
    """Hyper-parameters of one LoRA adapter, as recorded in ``adapter_config.json``.

    ``layers_to_transform`` restricts the adapter to some decoder layers (peft's
    field of the same name); ``None`` means every layer of the base model.
    """

    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float
    base_model_name_or_path: str
    layers_to_transform: list[int] | None = None
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """Factor applied to ``x @ A.T @ B.T``: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.lora_alpha, self.r, self.use_rslora)


def _module_path(key: str) -> str:
    """Normalise a module path to be relative to the decoder (``layers.N....``)."""
    for prefix in ("base_model.model.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _layer_index(module: str) -> int | None:
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def _config_dict(spec: AdapterSpec) -> dict:
    """The JSON written to ``adapter_config.json`` (keys peft 0.21's LoraConfig accepts)."""
    alpha = spec.lora_alpha
    if float(alpha).is_integer():
        alpha = int(alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(spec.r),
        "lora_alpha": alpha,
        "lora_dropout": float(spec.lora_dropout),
        "target_modules": sorted(spec.target_modules),
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": bool(spec.use_rslora),
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": spec.layers_to_transform,
        "layers_pattern": "layers" if spec.layers_to_transform is not None else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_parameters": None,
        "trainable_token_indices": None,
    }


def _check_weights(spec: AdapterSpec, weights: LoraWeights, where: str) -> None:
    """Shape and target checks shared by save and load; raises ``ValueError``."""
    if not weights:
        raise ValueError(f"{where}: adapter has no LoRA weights")
    targets = spec.target_modules
    for module, (a, b) in weights.items():
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{where}: {module}: lora_A and lora_B must be 2-D, got {tuple(a.shape)}, {tuple(b.shape)}")
        if a.shape[0] != spec.r or b.shape[1] != spec.r:
            raise ValueError(
                f"{where}: {module}: rank mismatch with config r={spec.r}: "
                f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}"
            )
        if not any(module == t or module.endswith("." + t) for t in targets):
            raise ValueError(f"{where}: {module} is not one of target_modules {sorted(targets)}")


def save_adapter(
    out_dir: str | Path,
    spec: AdapterSpec,
    weights: LoraWeights,
    *,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``weights`` as a peft-loadable LoRA adapter directory.

    If the weights cover only some layers and ``spec.layers_to_transform`` is
    unset, layers that are not ``0..max`` are recorded in the config so peft
    does not expect adapters on layers we never trained.
    """
    out = Path(out_dir)
    weights = {_module_path(k): v for k, v in weights.items()}
    _check_weights(spec, weights, str(out))
    layers = {_layer_index(m) for m in weights}
    if spec.layers_to_transform is None and None not in layers:
        if layers != set(range(max(layers) + 1)):
            spec = AdapterSpec(**{**spec.__dict__, "layers_to_transform": sorted(layers)})

    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(weights):
        a, b = weights[module]
        for which, t in (("A", a), ("B", b)):
            tensors[f"{_SAVE_PREFIX}{module}.lora_{which}.weight"] = (
                t.detach().to(device="cpu", dtype=dtype).contiguous().clone()
            )
    make_dirs(out)
    # Weights first, config last: a directory with a config is complete. So an earlier adapter's
    # config that differs from this one goes first: a crash between the two renames must not leave
    # the new weights beside the old rank, alpha or targets, which peft would load without a word.
    config = (json.dumps(_config_dict(spec), indent=2, sort_keys=True) + "\n").encode("utf-8")
    try:
        stale = (out / CONFIG_NAME).read_bytes() != config
    except FileNotFoundError:
        stale = False
    if stale:
        (out / CONFIG_NAME).unlink()
        fsync_dir(out)
    write_atomic(out / WEIGHTS_NAME, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_atomic(out / CONFIG_NAME, config)


def _spec_from_config(cfg: dict, path: Path) -> AdapterSpec:
    """Validate a peft LoRA config dict and turn it into an ``AdapterSpec``."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_bias": False,
    }
    for key, ok in unsupported.items():
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={cfg['modules_to_save']!r} is not supported")
    try:
        r = int(cfg["r"])
        alpha = float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: missing or invalid 'r' / 'lora_alpha'") from exc
    if any(int(v) != r for v in (cfg.get("rank_pattern") or {}).values()) or any(
        float(v) != alpha for v in (cfg.get("alpha_pattern") or {}).values()
    ):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern is not supported")
    targets = cfg.get("target_modules")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return AdapterSpec(
        r=r,
        lora_alpha=alpha,
        # A regex string (peft allows one) is resolved from the weights by the caller.
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else [],
        lora_dropout=float(cfg.get("lora_dropout") or 0.0),
        base_model_name_or_path=cfg.get("base_model_name_or_path") or "",
        layers_to_transform=list(layers) if layers is not None else None,
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


def load_adapter(adapter_dir: str | Path) -> tuple[AdapterSpec, LoraWeights]:
    """Read an adapter directory written by ``save_adapter`` or by peft.

    Returns float tensors on CPU in their stored dtype, keyed by
    decoder-relative module path. Raises ``ValueError`` naming the offending
    file if the directory is incomplete or inconsistent.
    """
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path}: adapter config not found")
    if not w_path.is_file():
        hint = f" (only pickle {PICKLE_WEIGHTS_NAME} found; not loaded)" if (d / PICKLE_WEIGHTS_NAME).exists() else ""
        raise ValueError(f"{w_path}: adapter weights not found{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    spec = _spec_from_config(cfg, cfg_path)

    try:
        tensors = load_safetensors_bytes(w_path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{w_path}: not a readable safetensors file: {exc}") from exc
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"{w_path}: unsupported tensor {key!r} (only lora_A / lora_B weights)")
        module = _module_path(m.group("module"))
        pair = halves.setdefault(module, {})
        if m.group("which") in pair:
            raise ValueError(f"{w_path}: duplicate lora_{m.group('which')} for {module}")
        pair[m.group("which")] = t
    weights: LoraWeights = {}
    for module in sorted(halves):
        pair = halves[module]
        for which, other in (("A", "B"), ("B", "A")):
            if which not in pair:
                raise ValueError(f"{w_path}: {module} has lora_{other} but no lora_{which}")
        weights[module] = (pair["A"], pair["B"])
    if not spec.target_modules:
        spec.target_modules = sorted({m.rsplit(".", 1)[-1] for m in weights})
    _check_weights(spec, weights, str(w_path))
    return spec, weights
