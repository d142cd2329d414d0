"""Rotary position embeddings (half-split `rotate_half` layout, as in HF Llama), with frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] after any RoPE scaling (host constant, baked into the jit)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.kind == "factors":
        return (inv / np.asarray(rs.factors, dtype=np.float64)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - smooth) * inv / rs.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / rs.factor, np.where(wavelen < high_wavelen, inv, blended))
    return out.astype(np.float32)


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, 1, D/2] for positions [B, T]: computed once per step, shared by all layers."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, H, D] by the tables of `rope_tables`; computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
