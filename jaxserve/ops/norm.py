"""RMSNorm whose result for a row does not depend on how many rows are normalised with it
(`jaxserve.ops.reduce`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.ops.reduce import ordered_sum


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight [D], computed in float32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(ordered_sum(xf * xf) / x.shape[-1] + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)
