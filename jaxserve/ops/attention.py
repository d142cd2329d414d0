"""Paged attention, reference implementation in jax.numpy (runs on every backend; the test oracle).

Keys and values live in head-major pages `[kv_heads, num_pages, page_size, head_dim]` per layer; each sequence reads its
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


def _gather_pages(cache: jnp.ndarray, layer: int | jnp.ndarray, page_table: jnp.ndarray) -> jnp.ndarray:
    """Pages [Hkv, B * P, page_size * D] of one layer, gathered as whole rows of the flattened cache.

    Row gathers run about 4x faster than element-wise advanced indexing on XLA:CPU, and indexing the
    flat cache directly never copies a layer out of the stack. Page ids come from the host allocator
    and are always in range, so bounds handling is skipped.
    """
    num_layers, hkv, num_pages, page_size, d = cache.shape
    rows = (layer * hkv + jnp.arange(hkv)[:, None]) * num_pages + page_table.reshape(1, -1)  # [Hkv, B * P]
    flat = cache.reshape(num_layers * hkv * num_pages, page_size * d)
    return flat.at[rows].get(mode="promise_in_bounds")


def paged_attention(
    q: jnp.ndarray,  # [B, T, Hq, D]
    k_cache: jnp.ndarray,  # [L, Hkv, num_pages, page_size, D]
    v_cache: jnp.ndarray,  # [L, Hkv, num_pages, page_size, D]
    layer: int | jnp.ndarray,
    page_table: jnp.ndarray,  # [B, P] int32
    mask: jnp.ndarray,  # [B, T, P * page_size] bool, from `attention_mask`
) -> jnp.ndarray:  # [B, T, Hq, D]
    """Causal GQA attention of new tokens over each sequence's cached pages of one layer.

    Pages are gathered straight from the stacked cache (no layer is sliced out), and head-major pages
    come out as [Hkv, B, S, D]: both attention matmuls then batch over (Hkv, B) with no transposes of
    the gathered keys and values.
    """
    b, t, hq, d = q.shape
    hkv, page_size = k_cache.shape[1], k_cache.shape[3]
    g = hq // hkv
    s = page_table.shape[1] * page_size
    k = _gather_pages(k_cache, layer, page_table).reshape(hkv, b, s, d)  # [Hkv, B, S, D]
    v = _gather_pages(v_cache, layer, page_table).reshape(hkv, b, s, d)
    qh = q.reshape(b, t, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv, b, g * t, d)  # [Hkv, B, G*T, D]
    # Keys on the left ([S, D] @ [D, G*T]): with few queries per sequence this runs ~3x faster on
    # XLA:CPU than queries on the left.
    scores = jnp.einsum("hbsd,hbqd->hbsq", k, qh, preferred_element_type=jnp.float32) * (d**-0.5)
    keep = jnp.broadcast_to(mask.transpose(0, 2, 1)[None, :, :, None, :], (hkv, b, s, g, t)).reshape(hkv, b, s, g * t)
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)  # [Hkv, B, S, G*T]
    probs = jax.nn.softmax(scores, axis=2).astype(v.dtype)
    out = jnp.einsum("hbsq,hbsd->hbqd", probs, v, preferred_element_type=jnp.float32)  # [Hkv, B, G*T, D]
    return out.reshape(hkv, b, g, t, d).transpose(1, 3, 0, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
