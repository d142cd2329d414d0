"""One served model version: where its weights come from and the engine settings it runs with.

Written as `--model NAME=SOURCE` (or a plain `--model SOURCE`, named after the loaded model), as an
entry of a YAML `models:` list, or as the body of the admin API's `POST /admin/models/{name}/versions`:

```yaml
models:
  - name: chat                       # the id clients send as `model`
    model: smollm2-135m-instruct     # registry name, GGUF file, HF folder or jaxserve checkpoint
    version: v1                      # default: VERSION of a store's NAME@VERSION, else "default"
    lazy: true                       # load on the first request; may be evicted (--max-loaded-models)
    tensor_parallel_size: 1
    data_parallel_size: 1
    devices: [0]                     # jax device indices (default: the first ones)
    max_num_seqs: 8
    num_pages: 256                   # or kv_cache_memory: bytes or a fraction of free memory
    max_model_len: 2048
    kv_cache_dtype: auto
    quantization: int8
    dtype: float32
```

Settings left out take the `serve` flags' values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from jaxserve.config import KV_CACHE_DTYPES, QUANTIZATIONS
from jaxserve.errors import UserError

DEFAULT_VERSION = "default"
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # names and versions: no '/' (URL paths) nor '@' (NAME@VERSION)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# YAML / JSON field -> (check, what it must be)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and ID.fullmatch(v) is not None, "a name of letters, digits, '.', '_', ':' or '-'"),
    "model": (lambda v: isinstance(v, str) and v != "", "a registry name or a path"),
    "version": (lambda v: isinstance(v, str) and ID.fullmatch(v) is not None, "a version of letters, digits, '.', '_', ':' or '-'"),
    "lazy": (lambda v: isinstance(v, bool), "true or false"),
    "tensor_parallel_size": (_positive_int, "an integer >= 1"),
    "data_parallel_size": (_positive_int, "an integer >= 1"),
    "devices": (lambda v: isinstance(v, list) and v != [] and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
                and len(set(v)) == len(v), "a non-empty list of distinct device indices"),
    "max_num_seqs": (_positive_int, "an integer >= 1"),
    "num_pages": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "kv_cache_memory": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0 (bytes, or a fraction <= 1)"),
    "max_model_len": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "kv_cache_dtype": (lambda v: v in KV_CACHE_DTYPES, f"one of {', '.join(KV_CACHE_DTYPES)}"),
    "quantization": (lambda v: v in QUANTIZATIONS, f"one of {', '.join(QUANTIZATIONS)}"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model version to serve; None settings take the `serve` flags' values."""

    name: str  # the id clients send ("": the loaded model's own name, for a plain --model)
    source: str  # what `checkpoint.loader.load_model` reads
    version: str = DEFAULT_VERSION
    lazy: bool = False
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    devices: tuple[int, ...] | None = None
    max_num_seqs: int | None = None
    num_pages: int | None = None
    kv_cache_memory: float | None = None
    max_model_len: int | None = None
    kv_cache_dtype: str | None = None
    quantization: str | None = None
    dtype: str | None = None

    @classmethod
    def from_flag(cls, value: str) -> ModelSpec:
        """`--model NAME=SOURCE`, or a plain `--model SOURCE` (named after the model it loads)."""
        name, sep, source = value.partition("=")
        if not sep or ID.fullmatch(name) is None:  # a path may hold '=' too
            return cls("", value)
        return cls.from_mapping({"name": name, "model": source}, f"--model {value}")

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> ModelSpec:
        """A YAML `models:` entry or an admin request body; UserError naming `where` and the field."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: a model must be a mapping with at least 'name' and 'model'")
        for key, value in data.items():
            if key not in _FIELDS:
                raise UserError(f"{where}: unknown field '{key}' (known: {', '.join(_FIELDS)})", param=str(key))
            check, what = _FIELDS[key]
            if not check(value):
                raise UserError(f"{where}: '{key}' must be {what}, got {value!r}", param=key)
        for key in ("name", "model"):
            if key not in data:
                raise UserError(f"{where}: '{key}' is required", param=key)
        values = {k: v for k, v in data.items() if k not in ("model", "devices")}
        stored, _, version = data["model"].rpartition("@")
        if "version" not in data and stored and "/" not in data["model"] and ID.fullmatch(version):  # the model store's NAME@VERSION
            values["version"] = version
        return cls(source=data["model"], devices=tuple(data["devices"]) if "devices" in data else None, **values)

    @property
    def id(self) -> str:
        """NAME@VERSION: how logs, metrics and the admin API name this version."""
        return f"{self.name}@{self.version}"
