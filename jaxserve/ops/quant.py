"""Int8 weight-and-activation (W8A8) linear layers.

On CPUs with VNNI/AMX, XLA runs an int8 x int8 -> int32 dot about 4x faster than the same float32
dot, and the weights take a quarter of the memory traffic. Weights get one scale per output column
(fixed at load); activations get one scale per row (computed in the step), so every row's result
depends on that row alone and batch invariance holds (given a norm before it whose bits do not depend
on the batch either: `jaxserve.ops.norm`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

@flax.struct.dataclass
class Int8Weight:
    """A [..., in, out] weight as int8 values times a per-output-column scale."""

    q: jnp.ndarray  # [..., in, out] int8
    scale: jnp.ndarray  # [..., out] float32


def quantize(w: jnp.ndarray) -> Int8Weight:
    """Symmetric per-column int8: w ~= q * scale, |q| <= 127."""
    w = w.astype(jnp.float32)  # [..., in, out]
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0  # [..., out]
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Weight(q=q, scale=scale)


def matmul(x: jnp.ndarray, w: jnp.ndarray, out_dtype: jnp.dtype | None = None) -> jnp.ndarray:
    """x [..., in] @ w [in, out] -> [..., out] over the rows of x, a single row padded to two.

    XLA:CPU runs a one-row product through a matrix-vector kernel that sums in another order than its
    matrix kernel (so a row's last bits would depend on whether others share the step) and, for int8,
    5x slower than a two-row product."""
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    padded = jnp.pad(rows, ((0, 1), (0, 0))) if rows.shape[0] == 1 else rows
    out = jnp.matmul(padded, w, preferred_element_type=out_dtype)[: rows.shape[0]]  # [N, out]
    return out.reshape(*x.shape[:-1], -1)


def linear(x: jnp.ndarray, w: jnp.ndarray | Int8Weight) -> jnp.ndarray:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype; int8 weights quantize x per row."""
    if not isinstance(w, Int8Weight):
        return matmul(x, w)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)  # [..., 1]
    amax = jnp.where(amax == 0, 1.0, amax)
    row_scale = amax * (1 / 127)
    xq = jnp.round(xf * (127 / amax)).astype(jnp.int8)  # [..., in]
    acc = matmul(xq, w.q, jnp.int32)  # [..., out]; integer sums: exact in any order
    return (acc.astype(jnp.float32) * row_scale * w.scale).astype(x.dtype)


def weight_format(params: Any) -> str:
    """How a model's dense layers are stored: "int8" when any is an `Int8Weight`, else the embedding's dtype."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return "int8" if any(isinstance(x, Int8Weight) for x in leaves) else jnp.dtype(params["embed"].dtype).name
