"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensors are named `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`,
A [r, in] and B [out, r] in torch's layout; the update is (alpha / r) * B @ A (alpha / sqrt(r) with
`use_rslora`). Pickled `adapter_model.bin` files are refused: loading one would run its code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxserve.errors import UserError
from jaxserve.models.lora import PEFT_NAMES, LoraAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")
_GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_UNSUPPORTED = {  # config keys whose non-default values change what the weights mean
    "use_dora": "DoRA adapters", "modules_to_save": "modules_to_save (fully trained extra modules)",
    "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts)",
}


def read_peft(folder: str | Path, name: str, num_layers: int) -> LoraAdapter:
    """The adapter in `folder`, for a model of `num_layers` layers; UserError naming what is missing,
    unreadable or unsupported. Shapes are checked against the model by `lora.check_adapter`."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise UserError(f"LoRA adapter '{name}': {config_path} not found (a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not weights_path.is_file():
        pickled = " (adapter_model.bin is not loaded: unpickling runs code; save with safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise UserError(f"LoRA adapter '{name}': {weights_path} not found{pickled}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"LoRA adapter '{name}': {config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"LoRA adapter '{name}': {config_path} must hold a JSON object")
    scale = _scale(config, name)
    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header or data
        raise UserError(f"LoRA adapter '{name}': {weights_path} is not a readable safetensors file: {e}") from None
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _TENSOR.fullmatch(key)
        if m is None or m.group(2) not in PEFT_NAMES:
            raise UserError(f"LoRA adapter '{name}': unsupported tensor {key!r} (adapters may target "
                            f"{', '.join(PEFT_NAMES)} of the decoder layers)")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise UserError(f"LoRA adapter '{name}': tensor {key!r} is for layer {layer}, but the model has {num_layers} layers")
        if value.ndim != 2:
            raise UserError(f"LoRA adapter '{name}': tensor {key!r} has shape {list(value.shape)}; LoRA matrices are 2-D")
        found.setdefault((m.group(2), m.group(3)), {})[layer] = np.asarray(value, np.float32)
    if not found:
        raise UserError(f"LoRA adapter '{name}': {weights_path} holds no LoRA tensors")
    weights, rank = {}, 0
    for module in PEFT_NAMES:
        a_layers, b_layers = found.get((module, "A"), {}), found.get((module, "B"), {})
        if set(a_layers) != set(b_layers):
            raise UserError(f"LoRA adapter '{name}': {module} has lora_A for layers {sorted(a_layers)} but lora_B for {sorted(b_layers)}")
        if not a_layers:
            continue
        shapes = {(a.shape, b.shape) for a, b in zip(a_layers.values(), b_layers.values())}
        (a_shape, b_shape), *others = shapes
        if others or a_shape[0] != b_shape[1]:
            raise UserError(f"LoRA adapter '{name}': {module}'s A and B shapes disagree across layers or on the rank: {sorted(shapes)}")
        r, n_in, n_out = a_shape[0], a_shape[1], b_shape[0]
        a = np.zeros((num_layers, n_in, r), np.float32)
        b = np.zeros((num_layers, r, n_out), np.float32)
        for layer in a_layers:
            a[layer] = a_layers[layer].T
            b[layer] = b_layers[layer].T * scale(r)
        weights[PEFT_NAMES[module]] = (a, b)
        rank = max(rank, r)
    return LoraAdapter(name, rank, weights, str(folder))


def _scale(config: dict, name: str) -> Callable[[int], float]:
    """The checked config's scaling, as a function of a module's rank."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"LoRA adapter '{name}': peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"LoRA adapter '{name}': {what} are not supported")
    if config.get("bias", "none") != "none":
        raise UserError(f"LoRA adapter '{name}': bias {config['bias']!r} is not supported (only 'none')")
    alpha, r = config.get("lora_alpha"), config.get("r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"LoRA adapter '{name}': {CONFIG_FILE} needs a numeric lora_alpha and an integer r >= 1")
    rs = bool(config.get("use_rslora"))
    return lambda rank: alpha / (math.sqrt(rank) if rs else rank)


def save_peft(folder: str | Path, weights: dict[str, tuple[np.ndarray, np.ndarray]], rank: int, alpha: float, dropout: float,
              base_model: str) -> None:
    """Write an adapter PEFT (and our server) can load: `weights` per target (our names) as unscaled
    A [L, in, r] and B [L, r, out]."""
    from safetensors.numpy import save_file

    ours = {v: k for k, v in PEFT_NAMES.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target, (a, b) in weights.items():
        module = ours[target]
        for layer in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{layer}.{_GROUPS[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a[layer], np.float32).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b[layer], np.float32).T)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(ours[t] for t in weights), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
