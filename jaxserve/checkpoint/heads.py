"""Draft heads on disk: a folder with the weights and draft vocabulary (orbax) and `heads.json`.

`heads.json` (written last, so a folder without it is an interrupted save) holds the heads' config
and a fingerprint of the model they were trained on: its final-norm weights and first embedding rows,
compared within bfloat16 rounding, so heads trained on another model of the same shape are refused
however that model is loaded (float32, bfloat16, int8 dense layers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.checkpoint.native import restore_tree, save_atomically
from jaxserve.errors import UserError
from jaxserve.models.draft_heads import DraftHeads, HeadsConfig
from jaxserve.models.llama import Params

MARKER = "heads.json"
KIND = "jaxserve-draft-heads"
FORMAT_VERSION = 1
PROBE_ROWS = 8  # embedding rows in the fingerprint


def _probe(params: Params) -> dict[str, np.ndarray]:
    return {"final_norm": np.asarray(params["final_norm"], np.float32), "embed": np.asarray(params["embed"][:PROBE_ROWS], np.float32)}


def save_heads(folder: Path, heads: DraftHeads, model_params: Params, report: dict[str, Any]) -> None:
    """Write atomically (`native.save_atomically`); `report` (training figures) goes into heads.json."""
    tree = {"heads": heads.params, "vocab": np.asarray(heads.vocab, np.int32), "probe": _probe(model_params)}
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "config": dataclasses.asdict(heads.config), "training": report}
    save_atomically(folder, tree, "weights", lambda tmp: (tmp / MARKER).write_text(json.dumps(meta, indent=1)))


def load_heads(folder: Path, vocab_size: int, hidden_size: int, model_params: Params) -> DraftHeads:
    """Heads for this model, or a UserError saying why not (missing, broken, or trained for another model)."""
    folder = Path(folder).expanduser().absolute()
    if not (folder / MARKER).is_file():
        raise UserError(f"{folder} holds no draft heads (no {MARKER}; make them with `jaxserve train-draft`)")
    try:
        meta = json.loads((folder / MARKER).read_text())
        if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"kind {meta.get('kind')!r}, format {meta.get('format_version')!r}")
        cfg = HeadsConfig(**meta["config"])
        tree = restore_tree(folder / "weights")
        params, vocab = tree["heads"], np.asarray(tree["vocab"], np.int32)
        shapes = (params["w_in"].shape, params["w_out"].shape, vocab.shape)
        want = ((cfg.num_heads, 2 * cfg.hidden_size, cfg.hidden_size), (cfg.num_heads, cfg.hidden_size, cfg.hidden_size), (cfg.draft_vocab_size,))
        if shapes != want:
            raise ValueError(f"weight shapes {shapes} do not match the config's {want}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}: broken draft heads ({type(e).__name__}: {e})") from None
    if (cfg.vocab_size, cfg.hidden_size) != (vocab_size, hidden_size) or not _same_model(tree["probe"], _probe(model_params)):
        raise UserError(f"{folder}: these draft heads were trained for another model (vocabulary {cfg.vocab_size}, hidden size "
                        f"{cfg.hidden_size}, other weights); train heads for this one with `jaxserve train-draft`")
    if vocab.min(initial=0) < 0 or vocab.max(initial=0) >= vocab_size:
        raise UserError(f"{folder}: broken draft heads (draft vocabulary ids outside [0, {vocab_size}))")
    return DraftHeads(cfg, params, vocab)


def _same_model(saved: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> bool:
    return all(saved[k].shape == now[k].shape and np.allclose(saved[k], now[k], rtol=1e-2, atol=1e-3) for k in saved)
