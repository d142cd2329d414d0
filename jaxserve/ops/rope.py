"""Rotary position embeddings (half-split `rotate_half` layout, as in HF Llama), with frequency scaling
and partial rotation (only a head's leading `rotary_dim` dims turn)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] after any RoPE scaling (host constant, baked into the jit);
    `local`: of the sliding layers, when they have their own base (unscaled)."""
    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta is not None else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = None if local and cfg.rope_local_theta is not None else cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.kind in ("factors", "longrope"):
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


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, 1, D/2] for positions [B, T]: computed once per step, shared by all layers;
    LongRoPE's `attention_factor` scales both."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :] * attention_factor, jnp.sin(angles)[:, :, None, :] * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the leading 2 * (D/2 of the tables) dims of x [B, T, H, Dh] by the tables of `rope_tables`
    (the rest pass through); computed in float32, returned in x's dtype."""
    rot = 2 * cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf[..., :rot], 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., rot:]], axis=-1)
    return out.astype(x.dtype)
