"""A row's bits do not depend on the other rows of its step, op by op, on every CPU.

XLA:CPU picks a reduction's order and a matmul's kernel from the whole array's shape; each test here
failed on an AVX2-only CPU before `jaxserve.ops.reduce` fixed the order (the engine-level checks are
in tests/test_engine.py and tests/test_quantization.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache.kv_cache import KVCache
from jaxserve.ops.attention import paged_attention
from jaxserve.ops.norm import rms_norm
from jaxserve.ops.quant import matmul
from jaxserve.ops.reduce import ordered_sum


@pytest.mark.parametrize("width", [64, 576, 1536])
def test_rms_norm_rows_do_not_depend_on_the_batch(width: int) -> None:
    """The sum of squares of a 576-wide row differed in its last bits for 1, 2-7 and 8+ rows, and one
    ULP of a row's norm scale moves its int8 activations."""
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.normal(size=(17, width)).astype(np.float32) * rng.uniform(0.1, 10, size=(17, 1)).astype(np.float32))
    weight = jnp.asarray(rng.uniform(0.5, 1.5, size=(width,)).astype(np.float32))
    norm = jax.jit(lambda x: rms_norm(x, weight, 1e-5))
    alone = np.stack([np.asarray(norm(x[i : i + 1]))[0] for i in range(17)])
    for rows in range(2, 18):
        np.testing.assert_array_equal(np.asarray(norm(x[:rows])), alone[:rows], err_msg=f"{rows} rows")


@pytest.mark.parametrize("width", [1, 7, 64, 576])
def test_ordered_sum_is_a_sum(width: int) -> None:
    x = np.random.default_rng(width).normal(size=(3, width, 5)).astype(np.float32)
    got = np.asarray(ordered_sum(jnp.asarray(x), axis=1))
    assert got.shape == (3, 1, 5)
    np.testing.assert_allclose(got, x.astype(np.float64).sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("width_in", "width_out"), [(64, 32), (64, 262), (576, 1728), (1536, 576)])
def test_product_rows_have_their_own_bits_at_any_row_count(width_in: int, width_out: int) -> None:
    """XLA:CPU's matrix-vector kernel sums in another order than its matrix kernel (`matmul` pads a
    single row to two), and from 33 rows (64 for the tiny model's 64 x 32 and 64 x 262) an AVX-512
    CPU's float products took another kernel (`matmul` runs 32-row blocks): every row, wherever it
    sits in 2 to 300 rows, has the bits it has alone."""
    rng = np.random.default_rng(width_in + width_out)
    x = jnp.asarray(rng.normal(size=(300, width_in)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(width_in, width_out)).astype(np.float32) / np.sqrt(width_in))
    product = jax.jit(matmul)
    alone = np.stack([np.asarray(product(x[i : i + 1], w))[0] for i in range(0, 300, 7)])
    for rows in (2, 31, 33, 64, 65, 300):
        np.testing.assert_array_equal(np.asarray(product(x[:rows], w))[::7], alone[: -(-rows // 7)], err_msg=f"{rows} rows")


def _attention_rows(batch: int, t: int, kv_len: int, cache: KVCache, start: int, **variant) -> np.ndarray:
    """Row 0's attention output in a group of `batch` rows (the others at their own lengths)."""
    hkv, _, num_pages, page_size, d = cache.k.shape
    rng = np.random.default_rng(batch)
    q = np.random.default_rng(7).normal(size=(1, t, 3 * hkv, d)).astype(np.float32)
    q = np.concatenate([q, rng.normal(size=(batch - 1, t, 3 * hkv, d)).astype(np.float32)])
    width = 16  # pages per row: 256 keys
    table = np.arange(1, 1 + batch * width, dtype=np.int32).reshape(batch, width) % (num_pages - 1) + 1
    table[0] = np.arange(1, 1 + width)
    positions = np.broadcast_to(start + np.arange(t, dtype=np.int32), (batch, t)).copy()
    lens = np.full(batch, 50, np.int32)
    lens[0] = kv_len
    positions[1:] = np.minimum(positions[1:], 49)
    attend = jax.jit(lambda *a: paged_attention(*a, **variant), static_argnums=2)
    return np.asarray(attend(jnp.asarray(q), cache, 0, table, positions, lens))[0]


@pytest.mark.parametrize("t,kv_len,start", [(1, 7, 6), (1, 99, 98), (1, 130, 129), (64, 128, 64)])
def test_attention_rows_do_not_depend_on_the_group(t: int, kv_len: int, start: int) -> None:
    """A row's sums over keys (the softmax normaliser, and decode's fused multiply-reduce) changed
    once its group had 8 or 16 rows."""
    rng = np.random.default_rng(3)
    shape = (3, 1, 64, 16, 64)  # [Hkv, L, pages, page_size, D]
    cache = KVCache(*(jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2)))
    alone = _attention_rows(1, t, kv_len, cache, start)
    for batch in (2, 8, 16, 32):
        np.testing.assert_array_equal(_attention_rows(batch, t, kv_len, cache, start), alone, err_msg=f"{batch} rows")


@pytest.mark.parametrize("t,kv_len,start", [(1, 130, 129), (64, 128, 64)])
def test_windowed_attention_rows_do_not_depend_on_the_group(t: int, kv_len: int, start: int) -> None:
    """With a window the walk starts at the first block any row's window reaches, so a row alone skips
    blocks it computes (fully masked) beside shorter rows: its bits must not change. Soft-capped and
    rescaled scores (Gemma 2) alike."""
    rng = np.random.default_rng(4)
    shape = (3, 1, 64, 16, 64)  # [Hkv, L, pages, page_size, D]
    cache = KVCache(*(jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2)))
    variant = dict(window=jnp.int32(40), softcap=5.0, scale=24**-0.5)
    alone = _attention_rows(1, t, kv_len, cache, start, **variant)
    for batch in (2, 8, 16):
        np.testing.assert_array_equal(_attention_rows(batch, t, kv_len, cache, start, **variant), alone, err_msg=f"{batch} rows")
