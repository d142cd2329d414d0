"""Mixture-of-experts MLP: a softmax router picks each token's top-k experts (Mixtral, Qwen3-MoE, OLMoE).

Dense dispatch: every expert runs on every token and the router's weights (zero off the top-k) mix
the results, so a token's output depends on its own row alone.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.ops.quant import matmul
from jaxserve.ops.reduce import ordered_sum


def route(x: jnp.ndarray, router: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each token's experts [N, K] int32 and their weights [N, K] float32: softmax over all experts, top-k,
    then (norm_topk_prob) renormalised to sum to 1."""
    logits = matmul(x, router, jnp.float32)  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [N, K]
    if cfg.norm_topk_prob:
        weights = weights / ordered_sum(weights)
    return experts, weights


def moe_mlp(x: jnp.ndarray, lp: dict[str, Any], cfg: ModelConfig, act: Callable[[jnp.ndarray], jnp.ndarray]) -> jnp.ndarray:
    """x [N, D] -> [N, D]: the gated MLP of each token's experts, mixed by the router's weights."""
    experts, weights = route(x, lp["router"], cfg)
    mix = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E]

    def expert(w: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
        gate, up, down = w
        return matmul(act(matmul(x, gate)) * matmul(x, up), down)  # [N, D]

    out = jax.lax.map(expert, (lp["we_gate"], lp["we_up"], lp["we_down"]))  # [E, N, D]
    mixed = out.astype(jnp.float32) * mix.T[..., None]  # [E, N, D]
    return ordered_sum(mixed, axis=0)[0].astype(x.dtype)
