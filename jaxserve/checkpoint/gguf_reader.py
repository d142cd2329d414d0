"""GGUF files: config, tokenizer and weights: dequantized to float32 (every type `gguf` dequantizes),
or, on request, dense layers stored in 4-bit blocks kept as their codes (`gguf_blocks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.gguf_blocks import block_codes, scale_dtypes, to_int4
from jaxserve.checkpoint.layout import ParamBuilder, unpermute_rope
from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.models.quantize import DENSE
from jaxserve.tokenizer import Tokenizer

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
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}
_GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}


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


def _layer_param(name: str) -> str | None:
    parts = name.split(".", 2)
    return _LAYER_TENSORS.get(parts[2]) if len(parts) == 3 and parts[0] == "blk" else None


def _int4_params(tensors: dict[str, Any]) -> dict[str, Any]:
    """Dense layer parameters stored in 4-bit blocks in every layer -> the scale dtype that holds them
    exactly. A parameter some layers store otherwise (Q4_K_M files keep some in Q6_K) is dequantized:
    a stacked parameter has one format."""
    kinds: dict[str, set] = {}
    for name, tensor in tensors.items():
        param = _layer_param(name)
        if param in DENSE:
            kinds.setdefault(param, set()).add(tensor.tensor_type)
    dtypes = scale_dtypes()
    return {p: max((dtypes[k] for k in ks), key=lambda d: np.dtype(d).itemsize) for p, ks in kinds.items() if ks <= set(dtypes)}


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
    rope_factors = tuple(float(x) for x in _dequantize(tensors["rope_freqs.weight"])) if "rope_freqs.weight" in tensors else ()
    cfg = ModelConfig.from_gguf(meta, set(tensors), rope_factors)
    tokenizer = Tokenizer.from_gguf(meta)
    builder = ParamBuilder(cfg)
    permute = cfg.architecture in ("llama", "mistral")
    packed = _int4_params(tensors) if keep_int4 else {}
    for name, tensor in tqdm(tensors.items(), desc=f"reading {path.name}", unit="tensor", leave=False):
        if name == "rope_freqs.weight":
            continue
        if name in _GLOBAL_TENSORS:
            builder.put(_GLOBAL_TENSORS[name], _dequantize(tensor))
            continue
        param = _layer_param(name)
        if param is None:
            raise UserError(f"unexpected tensor {name!r} in {path.name}")
        # Rows are output features, in the file's order: a permutation of rows moves codes and scales alike.
        weights = _read_blocks(tensor) if param in packed else (_dequantize(tensor),)
        if permute and param in ("wq", "bq"):
            weights = tuple(unpermute_rope(w, cfg.num_heads) for w in weights)
        elif permute and param in ("wk", "bk"):
            weights = tuple(unpermute_rope(w, cfg.num_kv_heads) for w in weights)
        builder.put(param, to_int4(*weights, packed[param]) if param in packed else weights[0], int(name.split(".")[1]))
    return cfg, builder.build(), tokenizer


def _read_blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return block_codes(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise UserError(f"tensor {tensor.name} cannot be read (corrupt or truncated file): {e}") from None
