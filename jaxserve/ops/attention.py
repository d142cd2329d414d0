"""Paged attention, reference implementation in jax.numpy (runs on every backend; the test oracle).

On GPU, one-token (decode) rows use JAX's Pallas paged-attention kernel instead (`decode_attention`),
which reads pages in place; prefill rows and every other backend use the reference.

Keys and values live in head-major pages, `[kv_heads, layers, num_pages, page_size, head_dim]`: per KV
head, the pages of all layers form one slab, so a layer's page p is page `layer * num_pages + p` of
the slab and no layer is ever sliced (copied) out. Each sequence reads its pages through a page-table
row. Page 0 is the null page: padding writes land there
and it is never read unmasked.

Page tables have one fixed width (the most pages a sequence can hold), so context length never shapes
a compiled step. Attention walks the pages in blocks with an online softmax and stops after the
block that holds the longest sequence in the batch: the trip count is data, not shape, and work
follows the real context length. Blocks past a row's length are fully masked and leave its result
bit-for-bit unchanged, so a row's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxserve.cache.kv_cache import KVCache, code_values, scale_values
from jaxserve.ops.reduce import ordered_sum

_MASKED = -1e30  # finite, so a fully masked block never produces inf - inf
# Keys per attention block. Page tables are a whole number of the largest. On XLA:CPU small blocks
# keep a block's gathered keys in cache: 16 decode rows over 130 keys take 30 ms for 30 layers with
# 32-key blocks against 53 ms with 128-key blocks; prefill rows (64 queries) do best with 64.
BLOCK_TOKENS = 128  # the Pallas decode kernel
# Shared memory the kernel's pipelined K and V blocks may take: an A100 has 164 KiB per block, an
# H100/H200 227 KiB. Float32 K/V blocks of 128 keys x 128 dims in two stages need 256 KiB (the
# launch fails on an H200), so such shapes run with one stage, then with smaller blocks.
KERNEL_SMEM_BYTES = 160 * 1024
DECODE_BLOCK_TOKENS = 32
PREFILL_BLOCK_TOKENS = 64


def block_pages(width: int, page_size: int, tokens: int = BLOCK_TOKENS) -> int:
    """Pages per attention block: about `tokens` keys, dividing the page-table width."""
    n = max(1, min(width, tokens // page_size))
    while width % n:
        n -= 1
    return n


def table_width(max_len: int, page_size: int) -> int:
    """Page-table width for sequences of up to max_len tokens, a whole number of attention blocks."""
    pages = -(-max_len // page_size)
    per_block = max(1, BLOCK_TOKENS // page_size)
    return -(-pages // per_block) * per_block


def write_slots(
    page_table: jnp.ndarray, positions: jnp.ndarray, valid: jnp.ndarray, page_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cache coordinates (page [B, T], offset [B, T]) for each new token; invalid tokens go to page 0."""
    slot = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table, slot, axis=1)  # [B, T]
    page = jnp.where(valid, page, 0)
    offset = jnp.where(valid, positions % page_size, 0)
    return page, offset


def paged_attention(
    q: jnp.ndarray,  # [B, T, Hq, D]
    cache: KVCache,
    layer: int | jnp.ndarray,
    page_table: jnp.ndarray,  # [B, P] int32
    positions: jnp.ndarray,  # [B, T] int32
    kv_lens: jnp.ndarray,  # [B] int32
    scale: float | None = None,
    window: jnp.ndarray | None = None,
    softcap: float | None = None,
) -> jnp.ndarray:  # [B, T, Hq, D]
    """Causal GQA attention of new tokens over each sequence's cached pages of one layer.

    Head-major pages gather as [Hkv, B, S, D], so both matmuls batch over (Hkv, B) with no transposes
    of keys or values; keys go on the left ([S, D] @ [D, G*T]), which with few queries per sequence
    runs ~3x faster on XLA:CPU than queries on the left.

    `scale`: of the scores (default D^-1/2). `window` (int32 scalar, traced): a query sees itself and
    the previous window - 1 tokens; the walk starts at the first block any row's window reaches (the
    blocks before it would be fully masked, which leaves a row's result bit-for-bit unchanged).
    `softcap`: scores -> softcap * tanh(scores / softcap) before the mask.
    """
    b, t, hq, d = q.shape
    hkv, page_size = cache.k.shape[0], cache.page_size
    g = hq // hkv
    per_block = block_pages(page_table.shape[1], page_size, DECODE_BLOCK_TOKENS if t == 1 else PREFILL_BLOCK_TOKENS)
    s = per_block * page_size
    qh = q.reshape(b, t, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv, b, g * t, d) * jnp.asarray(scale or d**-0.5, q.dtype)
    qpos = jnp.broadcast_to(positions[:, None, :], (b, g, t)).reshape(1, b, 1, g * t)  # position of each query column

    def block(i: jnp.ndarray, carry: tuple) -> tuple:
        m, l, acc = carry  # running max, normaliser [Hkv, B, 1, G*T]; weighted values [Hkv, B, G*T, D]
        table = jax.lax.dynamic_slice_in_dim(page_table, i * per_block, per_block, axis=1)  # [B, per_block]
        k, v = (x.reshape(hkv, b, s, d) for x in cache.pages(layer, table, q.dtype))  # [Hkv, B, S, D]
        key_pos = (i * s + jnp.arange(s, dtype=jnp.int32))[None, None, :, None]  # [1, 1, S, 1]
        keep = (key_pos <= qpos) & (key_pos < kv_lens[None, :, None, None])  # [1, B, S, G*T]
        if window is not None:
            keep &= key_pos > qpos - window
        scores = _cap(jnp.einsum("hbsd,hbqd->hbsq", k, qh, preferred_element_type=jnp.float32), softcap)
        scores = jnp.where(keep, scores, _MASKED)  # [Hkv, B, S, G*T]
        m_new = jnp.maximum(m, scores.max(axis=2, keepdims=True))
        p = jnp.exp(scores - m_new)
        scale = jnp.exp(m - m_new)
        l = l * scale + ordered_sum(p, axis=2)  # sums over keys in one order, whatever B (`ops/reduce.py`)
        if t == 1:  # one query per row: a fused multiply-reduce beats a tiny batched matmul on XLA:CPU
            pv = ordered_sum(p[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=2)[:, :, 0]  # [Hkv, B, G, D]
        else:
            pv = jnp.einsum("hbsq,hbsd->hbqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * scale.transpose(0, 1, 3, 2) + pv

    num_blocks = (jnp.max(kv_lens) + s - 1) // s
    init = (
        jnp.full((hkv, b, 1, g * t), _MASKED, jnp.float32),
        jnp.zeros((hkv, b, 1, g * t), jnp.float32),
        jnp.zeros((hkv, b, g * t, d), jnp.float32),
    )
    if window is None:  # the first block runs outside the loop: most decode batches need no loop at all
        _, l, acc = jax.lax.fori_loop(1, num_blocks, block, block(jnp.int32(0), init))
    else:  # from the first block holding a key some row's window reaches, every block in the loop (a block
        # compiled outside it rounds differently, and which block comes first depends on the other rows)
        first = (jnp.min(jnp.where(positions < kv_lens[:, None], positions, jnp.iinfo(jnp.int32).max)) - window + 1) // s
        _, l, acc = jax.lax.fori_loop(jnp.clip(first, 0, num_blocks), num_blocks, block, init)
    out = acc / jnp.maximum(l, 1e-30).transpose(0, 1, 3, 2)  # [Hkv, B, G*T, D]; padding rows have l = 0
    return out.reshape(hkv, b, g, t, d).transpose(1, 3, 0, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


def causal_attention(
    q: jnp.ndarray,  # [B, T, Hq, D]
    k: jnp.ndarray,  # [B, T, Hkv, D]
    v: jnp.ndarray,  # [B, T, Hkv, D]
    positions: jnp.ndarray,  # [B, T] int32
    kv_lens: jnp.ndarray,  # [B] int32
    scale: float | None = None,
    window: jnp.ndarray | None = None,
    softcap: float | None = None,
) -> jnp.ndarray:  # [B, T, Hq, D]
    """Dense causal GQA attention within each row, with no cache: the differentiable path training
    takes (the paged walk's loop has a data-dependent trip count, which reverse-mode cannot follow).
    `scale`, `window` and `softcap` as in `paged_attention`."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    qh = q.reshape(b, t, k.shape[2], g, d) * jnp.asarray(scale or d**-0.5, q.dtype)
    scores = _cap(jnp.einsum("bqhgd,bkhd->bhgqk", qh, k, preferred_element_type=jnp.float32), softcap)
    keep = (positions[:, None, :] <= positions[:, :, None]) & (positions[:, None, :] < kv_lens[:, None, None])  # [B, Tq, Tk]
    if window is not None:
        keep &= positions[:, None, :] > positions[:, :, None] - window
    scores = jnp.where(keep[:, None, None], scores, _MASKED)
    p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, t, hq, d)


def _cap(scores: jnp.ndarray, softcap: float | None) -> jnp.ndarray:
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def use_decode_kernel() -> bool:
    """Whether decode rows take the Pallas kernel: on GPU, where it compiles to Triton, unless
    JAXSERVE_DECODE_KERNEL=0 selects the reference attention (a way around a Triton that fails)."""
    return jax.default_backend() == "gpu" and os.environ.get("JAXSERVE_DECODE_KERNEL", "1") != "0"


def decode_attention(
    q: jnp.ndarray,  # [B, 1, Hq, D]
    cache: KVCache,
    layer: int | jnp.ndarray,
    page_table: jnp.ndarray,  # [B, P] int32
    kv_lens: jnp.ndarray,  # [B] int32
    scale: float | None = None,
) -> jnp.ndarray:  # [B, 1, Hq, D]
    """Attention of one new token per row through the Pallas GPU paged-attention kernel (flash-decoding
    over page blocks, split across the page table). Off GPU it runs in Pallas' interpreter, which is
    how tests hold it to the reference on CPU. An 8-bit cache hands the kernel its per-token scales,
    which it applies to the scores and the probabilities."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas

    hkv, num_layers, num_pages, page_size, d = cache.k.shape
    width = page_table.shape[1]
    k_pages, v_pages = (code_values(c).reshape(hkv, num_layers * num_pages, page_size, d) for c in (cache.k, cache.v))  # no copy
    k_scales, v_scales = (None if c is None else scale_values(c).reshape(hkv, num_layers * num_pages, page_size) for c in (cache.k_scale, cache.v_scale))
    tokens, stages = BLOCK_TOKENS, 2
    while stages * 2 * tokens * d * k_pages.dtype.itemsize > KERNEL_SMEM_BYTES and tokens > page_size:
        tokens, stages = (tokens, 1) if stages == 2 else (tokens // 2, 1)
    per_block = block_pages(width, page_size, tokens)
    blocks = width // per_block
    splits = max(k for k in range(1, min(blocks, 16) + 1) if blocks % k == 0)
    out = pallas.paged_attention(
        q[:, 0] * jnp.asarray(scale or d**-0.5, q.dtype),  # the kernel does not scale scores
        k_pages,  # all layers' pages
        v_pages,
        page_table + layer * num_pages,
        kv_lens,
        k_scales,
        v_scales,
        pages_per_compute_block=per_block,
        k_splits=splits,
        num_stages=stages,
        interpret=jax.default_backend() != "gpu",
    )
    return out[:, None]
