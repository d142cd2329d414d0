"""RMSNorm whose result for a row does not depend on how many rows are normalised with it.

XLA:CPU picks the summation order of a row reduction from the whole array's shape: on an AVX2 CPU the
sum of squares of a 576-wide row comes out different in its last bits for 1, 2..7 and 8+ rows
(a 1536-wide row: 1..2 and 3+). One ULP in the norm's scale moves every activation of the row; int8
activations, rounded to 255 levels, turn that into different tokens a few steps later. A row sum
built from element-wise adds of halves has one order, fixed by the width alone, on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_sum(x: jnp.ndarray) -> jnp.ndarray:
    """x [..., K] -> [..., 1]: the sum over the last axis by pairwise halving; the same bits for a row
    whatever the leading shape (element-wise adds are exact IEEE operations, never reordered)."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight [D], computed in float32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(row_sum(xf * xf) / x.shape[-1] + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)
