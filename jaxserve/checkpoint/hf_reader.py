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
from jaxserve.models.architectures import GEMMA
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
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
    "mlp.gate.weight": "router",  # Qwen3-MoE, OLMoE
    "block_sparse_moe.gate.weight": "router",  # Mixtral
}
# Gemma 2/3 norm around both blocks; their post_attention_layernorm is the attention output's norm.
_GEMMA_NORMS = {
    "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "mlp_norm",
    "post_feedforward_layernorm.weight": "post_mlp_norm",
}
# Checkpoints that store several of our matrices as one (Phi-3; transformers 5's experts, [E, out, in]):
# their rows, in order.
_FUSED = {
    "self_attn.qkv_proj.weight": ("wq", "wk", "wv"),
    "mlp.gate_up_proj.weight": ("w_gate", "w_up"),
    "mlp.experts.gate_up_proj": ("we_gate", "we_up"),
}
_STACKED_EXPERTS = {"mlp.experts.down_proj": "we_down"}
# One tensor per expert, as hub checkpoints store them.
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_TENSORS = {"w1": "we_gate", "gate_proj": "we_gate", "w3": "we_up", "up_proj": "we_up", "w2": "we_down", "down_proj": "we_down"}
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
        files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))  # not a stray extra file
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{folder} is missing safetensors shards: {', '.join(missing)}")
    return files


def read_hf(folder: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Load an HF model folder (any architecture of `jaxserve.models.architectures`) fully into host
    memory as float32; Gemma's norm weights w become the 1 + w they scale by."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg = ModelConfig.from_hf(hf_config)
    builder = ParamBuilder(cfg)
    plus_one = cfg.architecture in GEMMA
    layer_tensors = {**_LAYER_TENSORS, **(_GEMMA_NORMS if cfg.sandwich_norm else {})}
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
                if plus_one and name.endswith("norm.weight"):
                    weight = weight + 1.0
                if name in _GLOBAL_TENSORS:
                    builder.put(_GLOBAL_TENSORS[name], weight)
                    continue
                _put_layer_tensor(builder, cfg, layer_tensors, name, weight, shard.name)
    return cfg, builder.build(), Tokenizer.from_hf(folder)


def _put_layer_tensor(builder: ParamBuilder, cfg: ModelConfig, names: dict[str, str], name: str, weight: np.ndarray, shard: str) -> None:
    m = _LAYER.fullmatch(name)
    if not m:
        raise UserError(f"unexpected tensor {name!r} in {shard}")
    layer, suffix = int(m.group(1)), m.group(2)
    expert = _EXPERT.fullmatch(suffix)
    if expert and expert.group(2) in _EXPERT_TENSORS:
        builder.put(_EXPERT_TENSORS[expert.group(2)], weight, layer, expert=int(expert.group(1)))
    elif suffix in _FUSED:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        rows = weight.shape[-2]
        sizes = (q, kv, kv) if len(_FUSED[suffix]) == 3 else (rows // 2,) * 2
        if rows != sum(sizes):
            raise UserError(f"tensor {name!r} has {rows} rows, expected {sum(sizes)}")
        for param, part in zip(_FUSED[suffix], np.split(weight, np.cumsum(sizes)[:-1], axis=-2)):
            builder.put(param, part, layer)
    elif suffix in _STACKED_EXPERTS:
        builder.put(_STACKED_EXPERTS[suffix], weight, layer)
    elif suffix in names:
        builder.put(names[suffix], weight, layer)
    else:
        raise UserError(f"unexpected tensor {name!r} in {shard} (a {cfg.architecture} layer has no such tensor here)")
