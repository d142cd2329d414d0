"""GGUF files: config, tokenizer and weights: dequantized to float32 (every type `gguf` dequantizes),
or, on request, dense layers stored in 4-bit blocks kept as their codes (`gguf_blocks`).

Files are read as llama.cpp writes (convert_hf_to_gguf.py) and runs them (llama-model.cpp): its
architecture names (`GGUF_ARCHITECTURES`), tensor names, metadata keys and the rules its loader
hard-codes per architecture. llama.cpp permutes Q/K rows only for LlamaModel (llama, Mistral and
Mixtral as "llama"); every other architecture here keeps HF's rows (NEOX RoPE). Gemma norms are stored
as the 1 + w they scale by, as our params hold them.

What a GGUF file cannot say, it gets from llama.cpp's rules, not from the HF model: Gemma's attention
scale is 1/sqrt(head_dim) (27B sizes: 1/sqrt(hidden/heads)), never `query_pre_attn_scalar`; Gemma 3's
windows repeat every 6 layers unless the file names a pattern; Qwen3-MoE always renormalises its top-k
weights and OLMoE never does; a "llama" file has no sliding window (Mistral v0.1's is lost).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.gguf_blocks import block_codes, scale_dtypes, to_int4
from jaxserve.checkpoint.layout import ParamBuilder, unpermute_rope
from jaxserve.config import ModelConfig, RopeScaling, shortest_float
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.models.quantize import DENSE
from jaxserve.tokenizer import Tokenizer

# llama.cpp's general.architecture -> ours (HF model types, `jaxserve.models.architectures`).
GGUF_ARCHITECTURES = {
    "llama": "llama",  # llama.cpp converts Mistral and Mixtral as "llama" too; with experts it is Mixtral
    "mistral": "mistral",  # not llama.cpp's: files jaxserve's own writers name so, laid out as llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
_PERMUTED = ("llama", "mistral", "mixtral")  # llama.cpp's LlamaModel permutes their Q/K rows (interleaved RoPE)

# GGUF tensor suffix -> our per-layer parameter name.
_LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm",  # Gemma's norm of the attention output
    "ffn_norm.weight": "mlp_norm",  # Gemma's pre-feed-forward norm has this name too
    "post_ffw_norm.weight": "post_mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
    "ffn_gate_inp.weight": "router",  # [E, D]
    "ffn_gate_exps.weight": "we_gate",  # all of a layer's experts, [E, out, in]
    "ffn_up_exps.weight": "we_up",
    "ffn_down_exps.weight": "we_down",
}
# Tensors holding several of our parameters: their rows (output features), in order.
_FUSED = {
    "attn_qkv.weight": ("wq", "wk", "wv"),  # Phi-3
    "attn_qkv.bias": ("bq", "bk", "bv"),
    "ffn_gate_up_exps.weight": ("we_gate", "we_up"),  # the converter's --fuse-gate-up-exps
}
_PHI3_GATE_UP = ("w_gate", "w_up")  # Phi-3's ffn_up is [2F, D]: gate rows, then up rows
_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # older Mixtral files: one tensor per expert
_GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
# Read into the config (RoPE frequency factors): llama3's rope_freqs, Phi-3's LongRoPE lists.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

Part = tuple[str, int | None, slice | None]  # (param, expert, rows)


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise UserError(f"{path} is not a valid GGUF file (corrupt or truncated): {e}") from None


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise UserError(f"tensor {tensor.name} has unsupported quantization type {tensor.tensor_type.name}") from None
    except Exception as e:
        raise UserError(f"tensor {tensor.name} cannot be read (corrupt or truncated file): {e}") from None


def _parts(name: str, cfg: ModelConfig) -> tuple[int, list[Part]] | None:
    """A `blk.{i}.*` tensor's layer and the parameters it holds; None when it is no layer tensor we know."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer, suffix = int(m.group(1)), m.group(2)
    if cfg.architecture == "phi3" and suffix == "ffn_up.weight":
        params: Sequence[str] = _PHI3_GATE_UP
    elif suffix in _FUSED:
        params = _FUSED[suffix]
    elif suffix in _LAYER_TENSORS:
        return layer, [(_LAYER_TENSORS[suffix], None, None)]
    elif expert := _EXPERT.fullmatch(suffix):
        return layer, [(f"we_{expert.group(1)}", int(expert.group(2)), None)]
    else:
        return None
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ff = cfg.moe_intermediate_size if params[0].startswith("we_") else cfg.intermediate_size
    sizes = (q, kv, kv) if len(params) == 3 else (ff, ff)
    bounds = np.cumsum((0, *sizes)).tolist()
    return layer, [(p, None, slice(a, b)) for p, a, b in zip(params, bounds, bounds[1:])]


def _rows(w: np.ndarray, rows: slice | None, total: int | None, name: str) -> np.ndarray:
    """Rows (output features) `rows` of w, which has `total`: w is [out, in], [E, out, in], [out], or
    4-bit codes or scales [out, ...]."""
    if rows is None:
        return w
    axis = 1 if w.ndim == 3 else 0
    if w.shape[axis] != total:
        raise UserError(f"tensor {name} has {w.shape[axis]} rows, expected {total}")
    return w[:, rows] if axis == 1 else w[rows]


def _int4_params(plan: list[tuple[Any, int, list[Part]]]) -> dict[str, Any]:
    """Dense layer parameters stored in 4-bit blocks in every layer -> the scale dtype that holds them
    exactly. A parameter some layers store otherwise (Q4_K_M files keep some in Q6_K) is dequantized:
    a stacked parameter has one format."""
    kinds: dict[str, set] = {}
    for tensor, _, parts in plan:
        for param, expert, _ in parts:
            if param in DENSE and expert is None:
                kinds.setdefault(param, set()).add(tensor.tensor_type)
    dtypes = scale_dtypes()
    return {p: max((dtypes[k] for k in ks), key=lambda d: np.dtype(d).itemsize)
            for p, ks in kinds.items() if ks <= set(dtypes)}


def read_gguf(path: Path, keep_int4: bool = False) -> tuple[ModelConfig, Params, Tokenizer]:
    """Load a GGUF file fully into host memory; with `keep_int4`, dense layers in Q4_0, Q4_1 or Q4_K
    blocks (in every layer) come back as `Int4Weight`s holding the file's codes and scales."""
    path = Path(path)
    reader = _open(path)
    try:
        meta = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:
        raise UserError(f"{path} is not a valid GGUF file (corrupt or truncated): {e}") from None
    rope_factors = {n: tuple(float(x) for x in _dequantize(tensors[n]).ravel()) for n in ROPE_TENSORS if n in tensors}
    cfg = ModelConfig.from_gguf(meta, set(tensors), rope_factors)
    tokenizer = Tokenizer.from_gguf(meta)
    builder = ParamBuilder(cfg)
    permute = cfg.architecture in _PERMUTED
    plan = []
    for name, tensor in tensors.items():
        if name in ROPE_TENSORS:
            continue
        if name in _GLOBAL_TENSORS:
            plan.append((tensor, -1, [(_GLOBAL_TENSORS[name], None, None)]))
            continue
        found = _parts(name, cfg)
        if found is None:
            raise UserError(f"unexpected tensor {name!r} in {path.name} (a {cfg.architecture} model has no such tensor)")
        plan.append((tensor, *found))
    packed = _int4_params(plan) if keep_int4 else {}
    for tensor, layer, parts in tqdm(plan, desc=f"reading {path.name}", unit="tensor", leave=False):
        if layer < 0:
            builder.put(parts[0][0], _dequantize(tensor))
            continue
        # Rows are output features, in the file's order: a permutation or split of rows moves codes and scales alike.
        whole = _read_blocks(tensor) if parts[0][0] in packed else (_dequantize(tensor),)
        total = parts[-1][2].stop if parts[-1][2] else None
        for param, expert, rows in parts:
            weights = tuple(_rows(w, rows, total, tensor.name) for w in whole)
            if permute and param in ("wq", "bq"):
                weights = tuple(unpermute_rope(w, cfg.num_heads) for w in weights)
            elif permute and param in ("wk", "bk"):
                weights = tuple(unpermute_rope(w, cfg.num_kv_heads) for w in weights)
            builder.put(param, to_int4(*weights, packed[param]) if param in packed else weights[0], layer, expert)
    return cfg, builder.build(), tokenizer


def _read_blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return block_codes(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise UserError(f"tensor {tensor.name} cannot be read (corrupt or truncated file): {e}") from None


# ---------------------------------------------------------------------------------------------------
# Config: `ModelConfig.from_gguf`.

_REQUIRED = object()


def gguf_config(
    meta: Mapping[str, Any], tensor_names: set[str], rope_factors: Mapping[str, Sequence[float]] | None = None
) -> ModelConfig:
    """GGUF metadata, the file's tensor names and its RoPE factor tensors (`ROPE_TENSORS`, by name) ->
    ModelConfig, as llama.cpp reads each architecture."""
    name = meta.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise UserError(f"unsupported architecture {name!r} in the GGUF file (supported GGUF architectures: {supported})")

    def key(k: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{name}.{k}")
        if value is None:
            if default is _REQUIRED:
                raise UserError(f"GGUF metadata is missing {name}.{k}")
            return default
        return value

    def per_layer(k: str, default: Any = _REQUIRED) -> int:
        """A key llama.cpp reads as one value or one per layer: ours must be the same in every layer."""
        value = key(k, default)
        values = set(value) if isinstance(value, (list, tuple)) else {value}
        if len(values) != 1:
            raise UserError(f"GGUF metadata {name}.{k} differs between layers ({sorted(values)}): not supported")
        return int(values.pop())

    factors = {n: tuple(float(x) for x in v) for n, v in (rope_factors or {}).items()}
    hidden, layers = int(key("embedding_length")), int(key("block_count"))
    heads = per_layer("attention.head_count")
    head_dim = int(key("attention.key_length", 0) or hidden // heads)
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise UserError(f"GGUF metadata {name}.attention.value_length differs from key_length: not supported")
    rotary = int(key("rope.dimension_count", head_dim))
    vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens", ()))
    common = dict(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=per_layer("attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=shortest_float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=shortest_float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names or "blk.0.attn_qkv.bias" in tensor_names,
        rope_scaling=_rope_scaling(key, factors),
        partial_rotary_factor=rotary / head_dim,
    )
    if arch == "llama" and int(key("expert_count", 0)):
        arch = "mixtral"
    return ModelConfig(**{**common, "architecture": arch, **_ARCHITECTURES[arch](key, common)})


def _rope_scaling(key: Callable[..., Any], factors: Mapping[str, tuple[float, ...]]) -> RopeScaling | None:
    long, short = factors.get("rope_factors_long.weight"), factors.get("rope_factors_short.weight")
    if long or short:  # Phi-3's LongRoPE: the long list past the original context, the short one within it
        original = int(key("rope.scaling.original_context_length"))
        return RopeScaling(
            kind="longrope",
            factor=int(key("context_length")) / original,
            original_max_position_embeddings=original,
            factors=short or long,
            long_factors=long or (),
            attention_factor=float(key("rope.scaling.attn_factor", 1.0)),
        )
    if "rope_freqs.weight" in factors:  # Llama 3's scaling, as llama.cpp's converter writes it
        return RopeScaling(kind="factors", factors=factors["rope_freqs.weight"])
    kind = key("rope.scaling.type", None)
    if kind == "linear":
        return RopeScaling(kind="linear", factor=shortest_float(key("rope.scaling.factor")))
    if kind in (None, "none"):
        linear = float(key("rope.scale_linear", 1.0))  # the older key
        return None if linear == 1.0 else RopeScaling(kind="linear", factor=shortest_float(linear))
    raise UserError(f"unsupported rope scaling type {kind!r} in the GGUF file "
                    "(supported: none, linear, Llama 3's rope_freqs, LongRoPE's rope_factors_long/short)")


def _layer_types(key: Callable[..., Any], layers: int, window: int, period: int) -> dict[str, Any]:
    """Windows as llama.cpp sets them: `attention.sliding_window_pattern` when the file has it (a
    period, or per layer whether it slides), else the architecture's period; with no window, none."""
    if not window:
        return {}
    pattern = key("attention.sliding_window_pattern", period)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != layers:
            raise UserError(f"GGUF metadata attention.sliding_window_pattern names {len(pattern)} layers; there are {layers}")
        sliding = [bool(x) for x in pattern]
    else:  # llama_hparams::set_swa_pattern: every period-th layer is full (0: none)
        p = int(pattern)
        sliding = [p == 0 or i % p < p - 1 for i in range(layers)]
    if not any(sliding):
        return {}
    return {"layer_types": tuple("sliding_attention" if s else "full_attention" for s in sliding), "sliding_window": int(window)}


def _experts(key: Callable[..., Any], width: int, renormalise: bool) -> dict[str, Any]:
    experts, used = int(key("expert_count", 0)), int(key("expert_used_count", 0))
    if not experts or not used:
        raise UserError("GGUF metadata names no experts (expert_count and expert_used_count)")
    return dict(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=width, norm_topk_prob=renormalise)


def _gemma(key: Callable[..., Any], common: dict[str, Any], big_layers: int) -> dict[str, Any]:
    """Gemma 2 and 3: sandwich norms, GeGLU, embeddings scaled by sqrt(hidden), and llama.cpp's attention
    scale: 1/sqrt(head_dim), except the 27B size's 1/sqrt(hidden / heads) (told by its layer count)."""
    hidden, heads = common["hidden_size"], common["num_heads"]
    scalar = hidden // heads if common["num_layers"] == big_layers else common["head_dim"]
    return dict(sandwich_norm=True, hidden_act="gelu_tanh", embed_scale=float(hidden) ** 0.5, query_pre_attn_scalar=float(scalar))


def _gemma2(key: Callable[..., Any], common: dict[str, Any]) -> dict[str, Any]:
    window = int(key("attention.sliding_window", 4096))  # llama.cpp's default: Gemma 2's
    return dict(
        **_gemma(key, common, big_layers=46),
        **_layer_types(key, common["num_layers"], window, period=2),
        attn_logit_softcap=float(key("attn_logit_softcapping", 50.0)),  # llama.cpp's defaults
        final_logit_softcap=float(key("final_logit_softcapping", 30.0)),
    )


def _gemma3(key: Callable[..., Any], common: dict[str, Any]) -> dict[str, Any]:
    window = int(key("attention.sliding_window", 0))
    final = float(key("final_logit_softcapping", 0.0))
    return dict(
        **_gemma(key, common, big_layers=62),
        **_layer_types(key, common["num_layers"], window, period=6),
        qk_norm="head",
        # llama.cpp: the sliding layers' base is 10000, unscaled (rope.freq_base_swa where a file has it)
        rope_local_theta=shortest_float(key("rope.freq_base_swa", 10000.0)),
        final_logit_softcap=final or None,
    )


def _phi3(key: Callable[..., Any], common: dict[str, Any]) -> dict[str, Any]:
    # The converter writes 0 for no window. (llama.cpp itself ignores Phi-3's window; transformers does not.)
    window = int(key("attention.sliding_window", 0))
    return _layer_types(key, common["num_layers"], window, period=0)


def _qwen3_moe(key: Callable[..., Any], common: dict[str, Any]) -> dict[str, Any]:
    used = int(key("expert_used_count", 0)) or 1
    width = int(key("expert_feed_forward_length", 0)) or common["intermediate_size"] // used  # llama.cpp's fallback
    return dict(qk_norm="head", **_experts(key, width, renormalise=True))  # llama.cpp always renormalises


_ARCHITECTURES: dict[str, Callable[[Callable[..., Any], dict[str, Any]], dict[str, Any]]] = {
    "llama": lambda key, c: {},
    "mistral": lambda key, c: {},
    "mixtral": lambda key, c: _experts(key, c["intermediate_size"], renormalise=True),
    "qwen2": lambda key, c: {},
    "qwen3": lambda key, c: {"qk_norm": "head"},
    "qwen3_moe": _qwen3_moe,
    "olmoe": lambda key, c: {"qk_norm": "full", **_experts(key, c["intermediate_size"], renormalise=False)},
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
}
