"""Paged attention, reference implementation in jax.numpy (runs on every backend; the test oracle).

Keys and values live in pages `[num_pages, page_size, kv_heads, head_dim]`; each sequence reads its
pages through a page-table row. Page 0 is the null page: padding writes land there and it is never
read unmasked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_slots(
    page_table: jnp.ndarray, positions: jnp.ndarray, valid: jnp.ndarray, page_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cache coordinates (page [B, T], offset [B, T]) for each new token; invalid tokens go to page 0."""
    slot = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table, slot, axis=1)  # [B, T]
    page = jnp.where(valid, page, 0)
    offset = jnp.where(valid, positions % page_size, 0)
    return page, offset


def attention_mask(positions: jnp.ndarray, kv_lens: jnp.ndarray, num_keys: int) -> jnp.ndarray:
    """Causal validity [B, T, S] of key slot s for each query: s <= its position and s < the sequence length.

    Computed once per step and shared by all layers.
    """
    key_pos = jnp.arange(num_keys, dtype=jnp.int32)
    return (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])


def paged_attention(
    q: jnp.ndarray,  # [B, T, Hq, D]
    k_cache: jnp.ndarray,  # [L, num_pages, page_size, Hkv, D]
    v_cache: jnp.ndarray,  # [L, num_pages, page_size, Hkv, D]
    layer: int | jnp.ndarray,
    page_table: jnp.ndarray,  # [B, P] int32
    mask: jnp.ndarray,  # [B, T, P * page_size] bool, from `attention_mask`
) -> jnp.ndarray:  # [B, T, Hq, D]
    """Causal GQA attention of new tokens over each sequence's cached pages of one layer.

    Pages are gathered straight from the stacked cache, so no layer of it is sliced out (copied).
    """
    b, t, hq, d = q.shape
    page_size, hkv = k_cache.shape[2], k_cache.shape[3]
    g = hq // hkv
    s = page_table.shape[1] * page_size
    # Page ids come from the host allocator and are always in range: skip XLA's bounds handling.
    k = k_cache.at[layer, page_table].get(mode="promise_in_bounds").reshape(b, s, hkv, d)  # [B, S, Hkv, D]
    v = v_cache.at[layer, page_table].get(mode="promise_in_bounds").reshape(b, s, hkv, d)
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)  # [B, Hkv, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
