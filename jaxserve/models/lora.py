"""LoRA adapters in a fixed slot table, so requests for different adapters and the base model share one step.

Each target matrix W [in, out] of a layer gets a table of `S = max_loras` adapter slots:

    a: [(L,) in, S, r]   b: [(L,) S, r, out]   (r = max_lora_rank; smaller ranks are zero-padded)

with the adapter's scaling (alpha / r) folded into b. Every row of a step carries its slot index
(-1: the base model), and a token's product is x @ a[:, s] @ b[s] for its row's slot s: computed as
x @ a over all slots at once ([N, S * r]: one dense matmul), masked to each token's slot, then
@ b ([S * r, out]: another). That is exactly the per-row gather, run as two dense GEMMs, which XLA
executes far faster than gathering a matrix per token; it costs 2 * S * r * (in + out) flops a
token per target. Loading or unloading an adapter writes a slot's values: shapes never change, so
nothing recompiles.

Targets use PEFT's module names for Llama-family models (`PEFT_NAMES`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.ops.quant import matmul

PEFT_NAMES = {  # PEFT module name -> our weight name
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down",
}
TARGETS = tuple(PEFT_NAMES.values())  # the order every table and check uses
Tables = Any  # per layer as params["layers"]: {target: {"a": ..., "b": ...}} stacked [L, ...], or a tuple of per-layer dicts


def target_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every target matrix of a layer (attention only in a mixture of experts: its MLP is
    the experts, which adapters here do not reach)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d)}
    return attention if cfg.num_experts else {**attention, "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One adapter's weights on the host, per target (our names): a [L, in, r] and b [L, r, out], with
    the scaling folded into b; zeros for layers the adapter leaves alone."""

    name: str
    rank: int
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""  # where it was read from
    # A hash of its values: what its requests' prefix-cache blocks are salted with (two adapters never
    # share K/V; the same adapter loaded again does).
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self.weights):
            h.update(name.encode())
            for x in self.weights[name]:
                h.update(np.ascontiguousarray(x, np.float32).tobytes())
        object.__setattr__(self, "digest", h.hexdigest())


def check_adapter(adapter: LoraAdapter, cfg: ModelConfig, max_rank: int, kv_copied: bool) -> None:
    """ValueError naming what does not fit this model: a rank over `max_rank`, or a matrix whose shape is
    not the base model's (an adapter trained for another model). `kv_copied`: the model's KV heads were
    copied for tensor parallelism (`cfg` counts the copies), so k/v outputs may be a whole fraction."""
    if adapter.rank > max_rank:
        raise ValueError(f"adapter '{adapter.name}' has rank {adapter.rank}, over --max-lora-rank {max_rank}")
    dims = target_dims(cfg)
    for name, (a, b) in adapter.weights.items():
        if name not in dims:
            raise ValueError(f"adapter '{adapter.name}' targets '{name}', which this server cannot adapt")
        (n_in, n_out), kv = dims[name], name in ("wk", "wv")
        ok_out = b.shape[-1] == n_out or (kv and kv_copied and b.shape[-1] % cfg.head_dim == 0 and n_out % b.shape[-1] == 0)
        if a.shape[0] != cfg.num_layers or a.shape[1] != n_in or b.shape[0] != cfg.num_layers or not ok_out:
            raise ValueError(f"adapter '{adapter.name}': {name} has A {list(a.shape)} and B {list(b.shape)}, but this model's "
                             f"{cfg.num_layers} layers need A [L, {n_in}, r] and B [L, r, {n_out}] (an adapter for another base model?)")


def slot_values(adapter: LoraAdapter | None, cfg: ModelConfig, max_rank: int, dtype: jnp.dtype) -> dict[str, dict[str, np.ndarray]]:
    """One slot's values for every target: a [L, in, r_max] and b [L, r_max, out], zero-padded (all
    zero for None: an empty slot, and targets the adapter leaves alone). KV heads an adapter was
    trained with are copied as the model's were for tensor parallelism."""
    out = {}
    for name, (n_in, n_out) in target_dims(cfg).items():
        a = np.zeros((cfg.num_layers, n_in, max_rank), dtype)
        b = np.zeros((cfg.num_layers, max_rank, n_out), dtype)
        if adapter is not None and name in adapter.weights:
            wa, wb = adapter.weights[name]
            if wb.shape[-1] != n_out:  # [L, r, Hkv * Dh] -> each KV head repeated, as `replicate_kv_heads` does
                heads = wb.shape[-1] // cfg.head_dim
                wb = np.repeat(wb.reshape(*wb.shape[:2], heads, cfg.head_dim), n_out // wb.shape[-1], axis=2).reshape(*wb.shape[:2], n_out)
            a[:, :, : wa.shape[-1]] = wa
            b[:, : wb.shape[1]] = wb
        out[name] = {"a": a, "b": b}
    return out


def empty_tables(cfg: ModelConfig, slots: int, max_rank: int, dtype: jnp.dtype, stacked: bool) -> Tables:
    """Zero tables for `slots` adapters, laid out like the params' layers (stacked or per layer)."""
    def table(n_in: int, n_out: int, lead: tuple[int, ...]) -> dict[str, jnp.ndarray]:
        return {"a": jnp.zeros((*lead, n_in, slots, max_rank), dtype), "b": jnp.zeros((*lead, slots, max_rank, n_out), dtype)}

    dims = target_dims(cfg)
    if stacked:
        return {name: table(i, o, (cfg.num_layers,)) for name, (i, o) in dims.items()}
    return tuple({name: table(i, o, ()) for name, (i, o) in dims.items()} for _ in range(cfg.num_layers))


def write_slot(tables: Tables, slot: jnp.ndarray, values: dict[str, dict[str, jnp.ndarray]]) -> Tables:
    """`tables` with slot `slot` (a traced scalar: one program for every slot) set to `values`
    (`slot_values`' a [L, in, r] and b [L, r, out] per target)."""
    if isinstance(tables, dict):
        return {name: {"a": t["a"].at[:, :, slot].set(values[name]["a"]), "b": t["b"].at[:, slot].set(values[name]["b"])}
                for name, t in tables.items()}
    return tuple({name: {"a": t["a"].at[:, slot].set(values[name]["a"][i]), "b": t["b"].at[slot].set(values[name]["b"][i])}
                  for name, t in layer.items()} for i, layer in enumerate(tables))


def slot_mask(slots: jnp.ndarray, num_slots: int, rank: int, dtype: jnp.dtype) -> jnp.ndarray:
    """Per token slot index [N] (-1: none) -> its mask over the stacked slots' rank columns [N, S * r]."""
    onehot = (slots[:, None] == jnp.arange(num_slots)).astype(dtype)  # [N, S]
    return jnp.repeat(onehot, rank, axis=1)


def lora_product(x: jnp.ndarray, table: dict[str, jnp.ndarray], mask: jnp.ndarray) -> jnp.ndarray:
    """x [N, in] through each token's adapter slot: ((x @ a) * mask) @ b -> [N, out], by `matmul`, so a
    row's bits do not depend on the rows beside it (a base row's product is exactly 0)."""
    a, b = table["a"], table["b"]  # [in, S, r], [S, r, out]
    xa = matmul(x, a.reshape(a.shape[0], -1).astype(x.dtype))  # [N, S * r]
    return matmul(xa * mask, b.reshape(-1, b.shape[-1]).astype(x.dtype))  # [N, out]
