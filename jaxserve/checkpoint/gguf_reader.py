"""GGUF files: config, tokenizer and dequantized float32 weights (every type `gguf` dequantizes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.layout import ParamBuilder, unpermute_rope
from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
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


def read_gguf(path: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Load a GGUF file fully into host memory."""
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
    for name, tensor in tqdm(tensors.items(), desc=f"reading {path.name}", unit="tensor", leave=False):
        if name == "rope_freqs.weight":
            continue
        weight = _dequantize(tensor)
        if name in _GLOBAL_TENSORS:
            builder.put(_GLOBAL_TENSORS[name], weight)
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_TENSORS:
            raise UserError(f"unexpected tensor {name!r} in {path.name}")
        layer, suffix = int(parts[1]), parts[2]
        if permute and suffix.startswith("attn_q."):
            weight = unpermute_rope(weight, cfg.num_heads)
        elif permute and suffix.startswith("attn_k."):
            weight = unpermute_rope(weight, cfg.num_kv_heads)
        builder.put(_LAYER_TENSORS[suffix], weight, layer)
    return cfg, builder.build(), tokenizer
