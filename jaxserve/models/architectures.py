"""The Hugging Face model types jaxserve runs: each one's config.json read into a `ModelConfig`.

One decoder (`jaxserve.models.llama.forward`) runs them all. An architecture is a config reader that
switches on the variations it needs (windows, q/k norms, sandwich norms, GeGLU, soft-caps, MoE), plus
how its checkpoint names and stores tensors (`jaxserve.checkpoint.hf_reader`). Both the hub's keys
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and transformers 5's
(`rope_parameters`, `layer_types`) are read. A field that changes the math and is not implemented is
refused by name, never ignored.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from jaxserve.config import ROPE_SCALINGS, SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from jaxserve.errors import UserError

HF = Mapping[str, Any]
# Gemma: checkpoints store RMSNorm weights as w in x * (1 + w) (the reader adds the 1), and soft-caps.
GEMMA = ("gemma2", "gemma3_text")
# transformers' config-class defaults where they differ from the common ones, for configs that leave
# a field out (a sparse text_config, say): a missing field must mean what it means to transformers.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "sliding_window": 4096},
    "gemma3_text": {"hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "sliding_window": 4096},
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def read_hf_config(hf: HF) -> ModelConfig:
    """A `config.json` dict -> ModelConfig; a UserError names an unsupported type or field."""
    model_type = hf.get("model_type", "llama")
    if model_type == "gemma3" and "text_config" in hf:
        raise UserError("model type 'gemma3' is the multimodal Gemma 3; serve its text-only checkpoint (model_type 'gemma3_text')")
    reader = _READERS.get(model_type)
    if reader is None:
        raise UserError(f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    hf = {**_DEFAULTS.get(model_type, {}), **hf}
    _refuse(hf, model_type)
    return ModelConfig(**{**_common(hf, model_type), **reader(hf)})


def _common(hf: HF, model_type: str) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf, "full_attention")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise UserError(f"{model_type}: unsupported hidden_act {act!r} (supported: {', '.join(_ACTIVATIONS)})")
    return dict(
        architecture=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)),
        rope_scaling=scaling,
        hidden_act=_ACTIVATIONS[act],
        partial_rotary_factor=float(_rope_params(hf, "full_attention").get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0),
    )


def _refuse(hf: HF, model_type: str) -> None:
    """Fields some checkpoints set that would change the math here: refused rather than ignored."""
    checks = {
        "mlp_bias": lambda v: bool(v),
        "clip_qkv": lambda v: v is not None,
        "attn_logit_softcapping": lambda v: v is not None and model_type not in GEMMA,
        "final_logit_softcapping": lambda v: v is not None and model_type not in GEMMA,
        "use_qk_norm": lambda v: bool(v),
        "shared_expert_intermediate_size": lambda v: bool(v),
        "use_bidirectional_attention": lambda v: bool(v),
    }
    for key, bad in checks.items():
        if key in hf and bad(hf[key]):
            raise UserError(f"{model_type}: config field {key}={hf[key]!r} is not supported")


def _rope_params(hf: HF, layer_type: str) -> dict[str, Any]:
    """The RoPE parameters of one layer type, in transformers 5's shape: {"rope_type", "rope_theta", ...}."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        if layer_type in params or any(t in params for t in ("full_attention", "sliding_attention")):
            params = params.get(layer_type) or {}
        return dict(params)
    out = dict(hf.get("rope_scaling") or {})
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
        return {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "original_max_position_embeddings" in hf:
        out.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    return out


def _rope(hf: HF, layer_type: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of a layer type."""
    p = _rope_params(hf, layer_type)
    kind = p.get("rope_type", "default")
    if kind == "su":  # Phi-3's first name for LongRoPE
        kind = "longrope"
    theta = float(p.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(p["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(p["factor"]),
            low_freq_factor=float(p.get("low_freq_factor", 1.0)),
            high_freq_factor=float(p.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(p.get("original_max_position_embeddings", 8192)),
        )
    if kind == "longrope":
        original = int(p.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
        factor = float(p.get("factor") or hf.get("max_position_embeddings", original) / original)
        attention = p.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, RopeScaling(
            kind="longrope",
            factor=factor,
            original_max_position_embeddings=original,
            factors=tuple(float(x) for x in p.get("short_factor") or ()),
            long_factors=tuple(float(x) for x in p.get("long_factor") or ()),
            attention_factor=float(attention),
        )
    raise UserError(f"unsupported rope type {kind!r} (supported: default, {', '.join(ROPE_SCALINGS)})")


def _windows(hf: HF, pattern: Callable[[int], bool] | None) -> dict[str, Any]:
    """layer_types and sliding_window: transformers 5's explicit `layer_types`, else `pattern(i)` (is
    layer i sliding?) when the config has a window."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        if window is None or pattern is None:
            return {}
        types = ["sliding_attention" if pattern(i) else "full_attention" for i in range(hf["num_hidden_layers"])]
    if all(t == "full_attention" for t in types):
        return {}  # the default
    return {"layer_types": tuple(types), "sliding_window": window}  # ModelConfig checks both


def _qwen_windows(hf: HF) -> dict[str, Any]:
    """Qwen's windows: only with use_sliding_window, on the layers from max_window_layers on."""
    if "layer_types" not in hf and not hf.get("use_sliding_window"):
        return {}
    start = hf.get("max_window_layers", 0)
    return _windows(hf, lambda i: i >= start)


def _moe(hf: HF, width_key: str, renormalise: bool | None = None) -> dict[str, Any]:
    experts = hf.get("num_local_experts") or hf.get("num_experts")  # transformers 5 says num_local_experts
    if not experts:
        raise UserError(f"{hf.get('model_type')}: config.json names no experts (num_local_experts or num_experts)")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf[width_key]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if renormalise is None else renormalise,
    )


def _qwen3_moe(hf: HF) -> dict[str, Any]:
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise UserError("qwen3_moe: dense layers among the MoE layers (mlp_only_layers, decoder_sparse_step != 1) are not supported")
    return {**_qwen_windows(hf), "qk_norm": "head", **_moe(hf, "moe_intermediate_size")}


def _gemma(hf: HF, pattern: Callable[[int], bool]) -> dict[str, Any]:
    return dict(
        **_windows(hf, pattern),
        sandwich_norm=True,
        embed_scale=float(hf["hidden_size"]) ** 0.5,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _gemma3(hf: HF) -> dict[str, Any]:
    period = hf.get("sliding_window_pattern", 6)
    local_theta, local_scaling = _rope(hf, "sliding_attention")
    if local_scaling is not None:
        raise UserError("gemma3_text: scaled RoPE on the sliding layers is not supported")
    return {**_gemma(hf, lambda i: bool((i + 1) % period)), "qk_norm": "head", "rope_local_theta": local_theta}


_READERS: dict[str, Callable[[HF], dict[str, Any]]] = {
    "llama": lambda hf: {},
    "mistral": lambda hf: _windows(hf, lambda i: True),
    "mixtral": lambda hf: {**_windows(hf, lambda i: True), **_moe(hf, "intermediate_size", renormalise=True)},
    "qwen2": lambda hf: {**_qwen_windows(hf), "qkv_bias": bool(hf.get("attention_bias", True))},
    "qwen3": lambda hf: {**_qwen_windows(hf), "qk_norm": "head"},
    "qwen3_moe": _qwen3_moe,
    "olmoe": lambda hf: {"qk_norm": "full", **_moe(hf, "intermediate_size")},
    "gemma2": lambda hf: _gemma(hf, lambda i: not i % 2),
    "gemma3_text": _gemma3,
    "phi3": lambda hf: _windows(hf, lambda i: True),
}
