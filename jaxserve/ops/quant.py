"""Quantized linear layers: int8 weight-and-activation (W8A8), and 4-bit weight-only (W4A16).

On CPUs with VNNI/AMX, XLA runs an int8 x int8 -> int32 dot about 4x faster than the same float32
dot, and the weights take a quarter of the memory traffic. Weights get one scale per output column
(fixed at load); activations get one scale per row (computed in the step), so every row's result
depends on that row alone and batch invariance holds (given a norm before it whose bits do not depend
on the batch either: `jaxserve.ops.norm`).

4-bit weights stay packed in memory (two codes a byte) with a float16 scale and offset per group of
input rows and output column; the step unpacks them and multiplies in the activations' dtype, which
XLA fuses into the dot's operand where the backend can. Its rows are as batch-invariant as a float
layer's.
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


@flax.struct.dataclass
class Int4Weight:
    """A [..., in, out] weight as 4-bit codes q in [0, 15], w ~= q * scale + offset per group of input
    rows and output column: GGUF's Q4_0, Q4_1 and Q4_K blocks, and zero-point (asymmetric) int4, alike."""

    packed: jnp.ndarray  # [..., in / 2, out] uint8: input row 2i in the low nibble, 2i + 1 in the high
    scale: jnp.ndarray  # [..., in / group, out] float16 (float32 for GGUF Q4_K, whose scales float16 cannot hold)
    offset: jnp.ndarray  # [..., in / group, out] like scale

    @property
    def group(self) -> int:
        return 2 * self.packed.shape[-2] // self.scale.shape[-2]

    def codes(self) -> jnp.ndarray:
        """The codes [..., in, out] (uint8)."""
        p = self.packed  # [..., in / 2, out]
        return jnp.stack([p & 0xF, p >> 4], axis=-2).reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
        """The weight [..., in, out] in `dtype`."""
        q = self.codes()
        *lead, n, out = q.shape
        grouped = q.reshape(*lead, n // self.group, self.group, out).astype(jnp.float32)  # [..., G, group, out]
        w = grouped * self.scale[..., :, None, :].astype(jnp.float32) + self.offset[..., :, None, :].astype(jnp.float32)
        return w.reshape(*lead, n, out).astype(dtype)


def pack_int4(codes: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray, scale_dtype: jnp.dtype = jnp.float16) -> Int4Weight:
    """An `Int4Weight` from codes [..., in, out] in [0, 15] and per-group scale and offset [..., in / group, out]
    (NumPy in, NumPy out: host weights stay on the host)."""
    q = codes.astype(jnp.uint8)
    return Int4Weight(packed=q[..., 0::2, :] | (q[..., 1::2, :] << 4), scale=scale.astype(scale_dtype), offset=offset.astype(scale_dtype))


def quantize_int4(w: jnp.ndarray, group: int) -> Int4Weight:
    """Round-to-nearest asymmetric 4-bit in groups of `group` input rows: each group's min and max map to
    codes 0 and 15 (the float16-rounded scale and offset are the ones the codes are chosen for)."""
    *lead, n, out = w.shape
    g = w.astype(jnp.float32).reshape(*lead, n // group, group, out)  # [..., G, group, out]
    lo, hi = jnp.min(g, axis=-2), jnp.max(g, axis=-2)  # [..., G, out]
    scale = jnp.where(hi > lo, (hi - lo) / 15, 1.0).astype(jnp.float16).astype(jnp.float32)
    offset = lo.astype(jnp.float16).astype(jnp.float32)
    q = jnp.clip(jnp.round((g - offset[..., None, :]) / scale[..., None, :]), 0, 15)
    return pack_int4(q.reshape(*lead, n, out), scale, offset)


ROW_BLOCK = 32  # float products on XLA:CPU run in blocks of at most this many rows


def matmul(x: jnp.ndarray, w: jnp.ndarray, out_dtype: jnp.dtype | None = None) -> jnp.ndarray:
    """x [..., in] @ w [in, out] -> [..., out] over the rows of x, a single row padded to two, and on
    CPU float rows in blocks of `ROW_BLOCK`.

    XLA:CPU picks a product's kernel, and with it the order of each row's sum, from the row count: a
    one-row product runs a matrix-vector kernel (other bits, and for int8 5x slower than two rows),
    and from 33 rows (SmolLM2's shapes; 64 for some tiny ones, on an AVX-512 CPU) it hands float
    products to YNNPACK. From 2 to 32 rows every row of every shape measured has the bits it has
    alone (on an AVX-512 CPU, also with codegen capped at AVX2, one device or eight), so longer float
    products run as a loop over 32-row blocks: a token's bits do not depend on how many rows share
    its step, or where in them it sits. That costs 256-row products on CPU 1.5x (SmolLM2's 576 x 1728;
    its LM head 2.1x). Integer sums are exact in any order, so int8 products keep one kernel call."""
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    n = rows.shape[0]
    if n <= ROW_BLOCK or jnp.issubdtype(rows.dtype, jnp.integer) or jax.default_backend() != "cpu":
        padded = jnp.pad(rows, ((0, 1), (0, 0))) if n == 1 else rows
        out = jnp.matmul(padded, w, preferred_element_type=out_dtype)[:n]  # [N, out]
    else:
        blocks = jnp.pad(rows, ((0, -n % ROW_BLOCK), (0, 0))).reshape(-1, ROW_BLOCK, rows.shape[-1])  # [N / 32, 32, in]
        out = jax.lax.map(lambda b: jnp.matmul(b, w, preferred_element_type=out_dtype), blocks).reshape(-1, w.shape[-1])[:n]
    return out.reshape(*x.shape[:-1], -1)


def linear(x: jnp.ndarray, w: jnp.ndarray | Int8Weight | Int4Weight) -> jnp.ndarray:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype; int8 weights quantize x per row, int4
    weights are unpacked into x's dtype."""
    if isinstance(w, Int4Weight):
        return matmul(x, w.dequantize(x.dtype))
    if not isinstance(w, Int8Weight):
        return matmul(x, w)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)  # [..., 1]
    amax = jnp.where(amax == 0, 1.0, amax)
    row_scale = amax * (1 / 127)
    xq = jnp.round(xf * (127 / amax)).astype(jnp.int8)  # [..., in]
    acc = matmul(xq, w.q, jnp.int32)  # [..., out]; integer sums: exact in any order
    return (acc.astype(jnp.float32) * row_scale * w.scale).astype(x.dtype)


def is_quantized_weight(x: Any) -> bool:
    return isinstance(x, (Int8Weight, Int4Weight))


def weight_format(params: Any) -> str:
    """How a model's dense layers are stored: "int8" or "int4" when any is quantized, else the embedding's dtype."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized_weight)
    for kind, name in ((Int4Weight, "int4"), (Int8Weight, "int8")):
        if any(isinstance(x, kind) for x in leaves):
            return name
    return jnp.dtype(params["embed"].dtype).name
