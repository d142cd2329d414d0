"""Our checkpoint format: one folder with params (orbax), config.json and the tokenizer files.

`jaxserve.json` is written last, so a folder without it is an interrupted conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

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


def save_checkpoint(folder: Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer) -> None:
    """Write atomically (`save_atomically`)."""

    def write_files(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        tokenizer.save(tmp)
        (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION}))

    save_atomically(folder, params, "params", write_files)


def load_checkpoint(folder: Path) -> tuple[ModelConfig, Params, Tokenizer]:
    """Params come back as host NumPy float32 arrays; placing and casting them is the caller's job."""
    folder = Path(folder).absolute()
    if not is_checkpoint(folder):
        raise UserError(f"{folder} is not a jaxserve checkpoint (no {MARKER})")
    version = json.loads((folder / MARKER).read_text()).get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder} has checkpoint format {version}; this jaxserve reads {FORMAT_VERSION}")
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return cfg, restore_tree(folder / "params"), Tokenizer.load(folder)
