"""Our checkpoint format: one folder with params (orbax), config.json and the tokenizer files.

`jaxserve.json` is written last, so a folder without it is an interrupted conversion.

A quantized checkpoint (`jaxserve convert --quantization`) stores its dense layers as they are served
(int4 codes with their scales and offsets, or int8 values with their scales), and its embedding and
LM head, which stay float in the step, as 8-bit blocks of 32 values with a float16 scale (llama.cpp's
Q8_0, 8.5 bits a value; a GGUF Q8_0 embedding comes back to the bit), float again at load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxserve.config import QUANTIZATIONS, ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.ops.quant import Int4Weight, Int8Weight, is_quantized_weight, weight_format
from jaxserve.tokenizer import Tokenizer

MARKER = "jaxserve.json"
READABLE_VERSIONS = (1, 2)  # 1: float weights; 2: quantized dense layers (older readers refuse them)
BLOCK8 = 32  # values per float16 scale in the 8-bit blocks of a quantized checkpoint's embedding and LM head
_WEIGHT_KINDS = {frozenset(f.name for f in dataclasses.fields(k)): k for k in (Int4Weight, Int8Weight)}


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (a checkpoint's size on disk)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def save_atomically(folder: Path, tree: Any, name: str, write_files: Callable[[Path], None]) -> None:
    """Write a folder atomically: `tree` (arrays) with orbax under `name`, then `write_files(tmp)`
    (its marker last), all into `folder.tmp`, renamed over `folder` at the end."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / name, jax.tree.map(np.asarray, tree))
    write_files(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def restore_tree(path: Path) -> Any:
    """An orbax-saved tree of arrays, as host NumPy arrays of their saved shapes and dtypes."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        return ckptr.restore(path, jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree))


def _blocks8(x: np.ndarray) -> dict[str, np.ndarray]:
    """[..., n] float -> int8 codes [..., n] and float16 scales [..., n / BLOCK8], symmetric per block."""
    g = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, BLOCK8)  # [..., n / BLOCK8, BLOCK8]
    scale = (np.abs(g).max(axis=-1) / 127).astype(np.float16)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[..., None]
    return {"q8": np.clip(np.round(g / safe), -127, 127).astype(np.int8).reshape(x.shape), "q8_scale": scale}


def _unblock8(q8: np.ndarray, q8_scale: np.ndarray) -> np.ndarray:
    g = q8.reshape(*q8.shape[:-1], -1, BLOCK8).astype(np.float32)
    return (g * q8_scale.astype(np.float32)[..., None]).reshape(q8.shape)


def _to_disk(params: Params) -> dict:
    """Quantized weights as dicts of their arrays; in a quantized model, the embedding and LM head as 8-bit blocks."""
    tree = jax.tree.map(lambda x: {f.name: getattr(x, f.name) for f in dataclasses.fields(x)} if is_quantized_weight(x) else x,
                        params, is_leaf=is_quantized_weight)
    if weight_format(params) in QUANTIZATIONS:
        for name in ("embed", "lm_head"):
            if name in tree and tree[name].shape[-1] % BLOCK8 == 0:
                tree[name] = _blocks8(np.asarray(tree[name]))
    return tree


def _from_disk(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if set(node) == {"q8", "q8_scale"}:
        return _unblock8(node["q8"], node["q8_scale"])
    kind = _WEIGHT_KINDS.get(frozenset(node))
    return kind(**node) if kind else {k: _from_disk(v) for k, v in node.items()}


def save_checkpoint(folder: Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer) -> None:
    """Write atomically (`save_atomically`); params as loaded (float, or with quantized dense layers)."""

    if not isinstance(params["layers"], dict):
        raise ValueError("save stacked layers (load_model(..., unroll_layers=False)): the format stores [L, ...] arrays")
    weights = weight_format(params)

    def write_files(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        tokenizer.save(tmp)
        (tmp / MARKER).write_text(json.dumps({"format_version": 2 if weights in QUANTIZATIONS else 1, "weights": weights}))

    save_atomically(folder, _to_disk(params), "params", write_files)


def load_checkpoint(folder: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Params come back as host NumPy arrays (float32, or quantized weights of host arrays); placing
    and casting them is the caller's job."""
    folder = Path(folder).absolute()
    if not is_checkpoint(folder):
        raise UserError(f"{folder} is not a jaxserve checkpoint (no {MARKER})")
    version = json.loads((folder / MARKER).read_text()).get("format_version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{folder} has checkpoint format {version}; this jaxserve reads {', '.join(map(str, READABLE_VERSIONS))}")
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return cfg, _from_disk(restore_tree(folder / "params")), Tokenizer.load(folder)
