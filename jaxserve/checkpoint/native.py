"""Our checkpoint format: one folder with params (orbax), config.json and the tokenizer files.

`jaxserve.json` is written last, so a folder without it is an interrupted conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.tokenizer import Tokenizer

MARKER = "jaxserve.json"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def save_checkpoint(folder: Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer) -> None:
    """Write atomically: into `folder.tmp`, then rename."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    tokenizer.save(tmp)
    (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_checkpoint(folder: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Params come back as host NumPy float32 arrays; placing and casting them is the caller's job."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    if not is_checkpoint(folder):
        raise UserError(f"{folder} is not a jaxserve checkpoint (no {MARKER})")
    version = json.loads((folder / MARKER).read_text()).get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder} has checkpoint format {version}; this jaxserve reads {FORMAT_VERSION}")
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(folder / "params")
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        params = ckptr.restore(folder / "params", target)
    return cfg, params, Tokenizer.load(folder)
