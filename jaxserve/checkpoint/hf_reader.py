"""Hugging Face model folders: config.json, safetensors (single or sharded) and the tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.layout import ParamBuilder
from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.tokenizer import Tokenizer

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{folder} is missing safetensors shards: {', '.join(missing)}")
    return files


def read_hf(folder: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Load an HF Llama/Mistral/Qwen2 folder fully into host memory as float32."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg = ModelConfig.from_hf(hf_config)
    builder = ParamBuilder(cfg)
    for shard in _shard_files(folder):
        try:
            handle = safe_open(str(shard), framework="flax")
        except Exception as e:
            raise UserError(f"{shard} is not a valid safetensors file: {e}") from None
        with handle:
            for name in tqdm(list(handle.keys()), desc=f"reading {shard.name}", unit="tensor", leave=False):
                if _IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                weight = np.asarray(handle.get_tensor(name), np.float32)
                if name in _GLOBAL_TENSORS:
                    builder.put(_GLOBAL_TENSORS[name], weight)
                    continue
                m = _LAYER.fullmatch(name)
                if not m or m.group(2) not in _LAYER_TENSORS:
                    raise UserError(f"unexpected tensor {name!r} in {shard.name}")
                builder.put(_LAYER_TENSORS[m.group(2)], weight, int(m.group(1)))
    return cfg, builder.build(), Tokenizer.from_hf(folder)
