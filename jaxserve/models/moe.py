"""Mixture-of-experts MLP: a softmax router picks each token's top-k experts (Mixtral, Qwen3-MoE, OLMoE).

Grouped dispatch (the default): the N * K (token, expert) assignments are sorted by expert, each
expert's rows padded to whole blocks of B rows (B about an expert's share of the assignments, in
[2, `ROW_BLOCK`]), and a loop runs each block through its expert, skipping the blocks past the
routing's last; only the chosen experts' products are computed. Every shape is static: the block
count is the most any routing can fill. (`jax.lax.ragged_dot` says the same in one call, but on CPU it
lowers to one dense product over all E experts with the other groups' rows masked: E times the work.)
Dense dispatch, every expert on every token, is kept as the baseline of scripts/bench_moe.py.

Batch invariance: XLA:CPU gives a row of a 2- to 32-row product the bits it has alone
(`jaxserve.ops.quant.matmul`), so a token's expert outputs do not depend on which rows share its
block, nor on B; the router's softmax and the weighted sum over the K experts (in top-k order) are
built from element-wise operations (`ordered_sum`, `ordered_max`). A token's output has the same bits
alone or in any batch, and grouped and dense dispatch give the same bits.

Expert parallelism (`ModelConfig.expert_parallel_size` > 1): each device holds E / devices whole
experts and computes the assignments routed to them, zeros elsewhere; a psum over the devices adds
one non-zero term per (token, k) slot, exact in any order, and every device then takes the weighted
sum over k. The outputs are one device's, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.ops.quant import ROW_BLOCK, matmul
from jaxserve.ops.reduce import ordered_max, ordered_sum
from jaxserve.parallel.mesh import DATA, MODEL

# "grouped", or "dense": every expert on every token (the baseline of scripts/bench_moe.py); read when a step is traced.
DISPATCH = "grouped"

Experts = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]  # gate, up [E, D, Fe]; down [E, Fe, D]
Activation = Callable[[jnp.ndarray], jnp.ndarray]


def route(x: jnp.ndarray, router: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each token's experts [N, K] int32 and their weights [N, K] float32: softmax over all experts, top-k,
    then (norm_topk_prob) renormalised to sum to 1."""
    logits = matmul(x, router, jnp.float32)  # [N, E]
    exp = jnp.exp(logits - ordered_max(logits))
    probs = exp / ordered_sum(exp)  # the softmax, in sums whose order is the row's own
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [N, K]
    if cfg.norm_topk_prob:
        weights = weights / ordered_sum(weights)
    return experts, weights


def _ffn(x: jnp.ndarray, gate: jnp.ndarray, up: jnp.ndarray, down: jnp.ndarray, act: Activation) -> jnp.ndarray:
    return matmul(act(matmul(x, gate)) * matmul(x, up), down)


def _dense(x: jnp.ndarray, experts: jnp.ndarray, w: Experts, act: Activation) -> jnp.ndarray:
    """[N, K, D]: every held expert on every token, then each slot's (zeros for experts not held)."""
    y = jax.lax.map(lambda g: _ffn(x, *g, act), w)  # [E, N, D]
    held = (experts >= 0) & (experts < y.shape[0])
    picked = y[jnp.clip(experts, 0, y.shape[0] - 1), jnp.arange(x.shape[0])[:, None]]  # [N, K, D]
    return jnp.where(held[..., None], picked, 0)


def block_rows(assignments: int, num_experts: int) -> int:
    """Rows per block: about an expert's share of the assignments, in [2, ROW_BLOCK]."""
    return min(ROW_BLOCK, max(2, -(-assignments // num_experts)))


def _grouped(x: jnp.ndarray, experts: jnp.ndarray, w: Experts, act: Activation) -> jnp.ndarray:
    """[N, K, D]: each (token, k) slot's expert output, computed in blocks of one expert's rows (zeros
    for experts not held)."""
    (n, k), e = experts.shape, w[0].shape[0]
    a = n * k
    b = block_rows(a, e)
    num_blocks = min(a, (a + min(a, e) * (b - 1)) // b)  # sum over experts of ceil(count / b), at most
    ids = experts.reshape(-1)  # [A]: assignment n * K + k
    ids = jnp.where((ids >= 0) & (ids < e), ids, e)  # experts held elsewhere sort last, as expert e
    order = jnp.argsort(ids, stable=True)  # [A]
    counts = jnp.bincount(ids, length=e + 1)[:e]  # [E]
    blocks = -(-counts // b)
    block_end = jnp.cumsum(blocks)  # [E]
    first_row = jnp.cumsum(counts) - counts  # each expert's first position in `order`
    sorted_ids = ids[order]
    expert = jnp.minimum(sorted_ids, e - 1)
    slot = (block_end - blocks)[expert] * b + jnp.arange(a) - first_row[expert]  # [A]: row of each sorted assignment
    slot = jnp.where(sorted_ids < e, slot, num_blocks * b)  # past the end: not computed here
    token = jnp.full(num_blocks * b, n, jnp.int32).at[slot].set(order // k, mode="drop")  # [rows]; n: padding
    rows = jnp.take(x, token, axis=0, mode="fill", fill_value=0).reshape(num_blocks, b, -1)
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"), e - 1)
    used = jnp.arange(num_blocks) < block_end[-1]

    def run(blk: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
        i, r, u = blk  # blocks past the routing's last are skipped: each costs its expert's weights
        return jax.lax.cond(u, lambda r: _ffn(r, *(m[i] for m in w), act), jnp.zeros_like, r)

    y = jax.lax.map(run, (block_expert, rows, used)).reshape(num_blocks * b, -1)  # [rows, D]
    row_of = jnp.zeros(a, jnp.int32).at[order].set(slot)  # [A]
    return jnp.take(y, row_of, axis=0, mode="fill", fill_value=0).reshape(n, k, -1)


def moe_mlp(x: jnp.ndarray, lp: dict[str, Any], cfg: ModelConfig, act: Activation) -> jnp.ndarray:
    """x [N, D] -> [N, D]: the gated MLP of each token's experts, mixed by the router's weights."""
    experts, weights = route(x, lp["router"], cfg)
    slots = _dense if DISPATCH == "dense" else _grouped
    w = (lp["we_gate"], lp["we_up"], lp["we_down"])
    ep = cfg.expert_parallel_size
    if ep > 1:
        def local(x: jnp.ndarray, experts: jnp.ndarray, *w: jnp.ndarray) -> jnp.ndarray:
            first = jax.lax.axis_index(MODEL) * w[0].shape[0]
            return jax.lax.psum(slots(x, experts - first, w, act), MODEL)  # one non-zero term per slot: exact

        mesh = AbstractMesh((1, ep), (DATA, MODEL))  # one replica's mesh (`jaxserve.parallel.mesh`)
        out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(MODEL), P(MODEL), P(MODEL)), out_specs=P())(x, experts, *w)
    else:
        out = slots(x, experts, w, act)
    return ordered_sum(out.astype(jnp.float32) * weights[..., None], axis=1)[:, 0].astype(x.dtype)
