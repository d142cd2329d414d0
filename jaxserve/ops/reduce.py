"""Sums and maxima whose result for a row does not depend on how many rows are reduced with it.

XLA:CPU picks a reduction's summation order from the whole array's shape. On an AVX2 CPU the sum of
squares of a 576-wide row comes out different in its last bits for 1, 2-7 and 8+ rows (1536 wide: 1-2
and 3+), and attention's sums over a block of keys change once a decode group has 8 or 16 rows. One
ULP there moves every later activation of the row; int8 activations, rounded to 255 levels, turn it
into other tokens a few steps later. A sum built from element-wise adds of halves has one order,
fixed by the summed axis's length alone, on every backend.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def ordered_sum(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Sum over `axis` (kept, size 1) by pairwise halving: the same bits for a row whatever the other
    axes' sizes (element-wise adds are exact IEEE operations, never reordered)."""
    return _pairwise(x, axis, jnp.add, jnp.zeros_like)


def ordered_max(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Max over `axis` (kept, size 1) by pairwise halving. From 64 rows XLA:CPU hands a row max and an
    exp after it to YNNPACK, whose exp has other bits than XLA's, so a softmax row's bits depended on
    the row count; element-wise maxima stay XLA's."""
    return _pairwise(x, axis, jnp.maximum, lambda first: first)


def _pairwise(x: jnp.ndarray, axis: int, combine: Callable, pad: Callable) -> jnp.ndarray:
    """Reduce `axis` by combining its halves until one is left (an odd length padded with `pad` of its
    first slice). Slices, not a moved axis, so XLA fuses it without a transpose."""
    axis = axis % x.ndim
    while x.shape[axis] > 1:
        if x.shape[axis] % 2:
            x = jnp.concatenate([x, pad(jax.lax.slice_in_dim(x, 0, 1, axis=axis))], axis=axis)
        half = x.shape[axis] // 2
        x = combine(jax.lax.slice_in_dim(x, 0, half, axis=axis), jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))
    return x
