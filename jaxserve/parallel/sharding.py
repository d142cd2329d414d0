"""Which axis of every parameter, and of the KV cache, is split over the mesh's "model" axis.

Megatron-style tensor parallelism, declared rather than hand-scattered: q/k/v and gate/up are
column-parallel (each device owns whole heads and a slice of the FFN), o and down are row-parallel
(XLA all-reduces their partial sums), the embedding and LM head split over the vocabulary. The KV
cache splits over KV heads, so attention never leaves a device. When a model has fewer KV heads than
devices, each KV head is copied to the devices whose query heads read it (as vLLM does). Experts
split like the dense FFN (each device a slice of every expert), or with expert parallelism whole
(each device E / devices experts; `jaxserve.models.moe`); the router is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params
from jaxserve.ops.quant import Int4Weight, Int8Weight, is_quantized_weight
from jaxserve.parallel.mesh import MODEL

COLUMN = ("wq", "wk", "wv", "w_gate", "w_up", "we_gate", "we_up")  # [..., in, out]: out split
ROW = ("wo", "w_down", "we_down")  # [..., in, out]: in split
EXPERTS = ("we_gate", "we_up", "we_down")  # [..., E, in, out]: E split instead, with expert parallelism
BIAS = ("bq", "bk", "bv")  # [..., out]: out split, like their columns
CACHE_SPEC = P(MODEL)  # KVCache arrays [Hkv, L, pages, page, D]: KV heads split


def check_tensor_parallel(cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    """A clear error unless `tp` splits the model into whole heads and equal FFN slices (each expert's,
    or with `expert_parallel` equal sets of whole experts)."""
    if expert_parallel and cfg.num_experts % tp:
        raise UserError(f"expert parallelism over tensor_parallel_size {tp} devices must split the model's {cfg.num_experts} experts evenly")
    kv_ok = cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0
    ffn = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
    if cfg.num_heads % tp or not kv_ok or (ffn % tp and not (expert_parallel and cfg.num_experts)):
        raise UserError(
            f"tensor_parallel_size {tp} must divide the model's {cfg.num_heads} query heads, divide or be a "
            f"multiple of its {cfg.num_kv_heads} KV heads, and divide its {'expert ' if cfg.num_experts else ''}FFN size {ffn}"
        )


def replicate_kv_heads(params: Params, cfg: ModelConfig, tp: int) -> tuple[Params, ModelConfig]:
    """With fewer KV heads than devices, repeat each KV head tp / Hkv times in wk/wv (and biases), so
    device d holds the KV head its query heads use; the model computes the same function."""
    if cfg.num_kv_heads >= tp:
        return params, cfg
    reps, dh = tp // cfg.num_kv_heads, cfg.head_dim

    def repeat(w: jnp.ndarray) -> jnp.ndarray:  # [..., Hkv * Dh] -> [..., tp * Dh]
        heads = w.reshape(*w.shape[:-1], cfg.num_kv_heads, dh)
        return jnp.repeat(heads, reps, axis=-2).reshape(*w.shape[:-1], tp * dh)

    layers = dict(params["layers"])
    # OLMoE's k norm spans the whole projection: repeating every head alike leaves its RMS unchanged
    for name in ("wk", "wv", "bk", "bv", *(("k_norm",) if cfg.qk_norm == "full" else ())):
        if name in layers:  # quantized weights: every field ends in the output columns
            layers[name] = jax.tree.map(repeat, layers[name])
    return {**params, "layers": layers}, dataclasses.replace(cfg, num_kv_heads=tp)


def _spec(name: str, ndim: int, tp: int, vocab: int, split_experts: bool = False) -> tuple:
    """Mesh axis (or None) for each of an array's `ndim` axes; leading stacked-layer axes never split."""
    lead = (None,) * (ndim - 2)
    if split_experts and name in EXPERTS:
        return (*lead[:-1], MODEL, None, None)
    if name in COLUMN:
        return (*lead, None, MODEL)
    if name in ROW:
        return (*lead, MODEL, None)
    if name in BIAS:
        return (*(None,) * (ndim - 1), MODEL)
    if name == "embed" and vocab % tp == 0:
        return (MODEL, None)
    if name == "lm_head" and vocab % tp == 0:
        return (None, MODEL)
    return (None,) * ndim  # norms, fused single-device matrices (see load_model), indivisible vocabularies


def check_int4_split(params: Params, tp: int) -> None:
    """A clear error unless each device's slice of a row-split int4 weight holds whole groups."""
    layers = params["layers"]
    for lp in [layers] if isinstance(layers, dict) else layers:
        for name in ROW:
            w = lp.get(name)
            if isinstance(w, Int4Weight) and w.scale.shape[-2] % tp:
                n = 2 * w.packed.shape[-2]
                raise UserError(f"tensor_parallel_size {tp} would split {name}'s {n} input rows inside int4 groups of {w.group} "
                                f"({n // w.group} groups); use a tensor parallel size that divides {n // w.group}, or a smaller group size")


def lora_shardings(tree: Any, mesh: Mesh, table: bool) -> Any:
    """A NamedSharding for every LoRA factor (`jaxserve.models.lora`): of the slot tables (`table`: A
    [..., in, S, r], B [..., S, r, out]; stacked or per layer) or of one slot's values (A [L, in, r],
    B [L, r, out]). A column-parallel target's B splits its output columns like the weight, a
    row-parallel target's A its input rows; the other factor is replicated."""

    def for_factor(path, x):
        target, part = path[-2].key, path[-1].key
        spec = [None] * x.ndim
        if part == "b" and target in COLUMN:
            spec[-1] = MODEL
        elif part == "a" and target in ROW:
            spec[-3 if table else -2] = MODEL
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(for_factor, tree)


def param_shardings(params: Params, mesh: Mesh, cfg: ModelConfig) -> Params:
    """A NamedSharding for every leaf of `params` (stacked or per-layer, float, int8 or int4)."""
    tp = mesh.shape[MODEL]
    ep = cfg.expert_parallel_size > 1
    if ep and cfg.expert_parallel_size != tp:
        raise UserError(f"the model's experts are laid out for {cfg.expert_parallel_size} devices; the mesh has {tp}")

    def for_weight(path, w):
        name = path[-1].key
        if isinstance(w, Int8Weight):  # q splits like the float matrix; scale [..., out] like its output
            spec = _spec(name, w.q.ndim, tp, cfg.vocab_size, ep)
            return Int8Weight(q=NamedSharding(mesh, P(*spec)), scale=NamedSharding(mesh, P(*spec[:-2], spec[-1])))
        if isinstance(w, Int4Weight):  # codes, scales and offsets [..., in / k, out] all split like the float matrix
            spec = P(*_spec(name, w.packed.ndim, tp, cfg.vocab_size, ep))
            return Int4Weight(packed=NamedSharding(mesh, spec), scale=NamedSharding(mesh, spec), offset=NamedSharding(mesh, spec))
        return NamedSharding(mesh, P(*_spec(name, w.ndim, tp, cfg.vocab_size, ep)))

    return jax.tree_util.tree_map_with_path(for_weight, params, is_leaf=is_quantized_weight)
