"""Jitted paged prefill + decode logits equal an independent NumPy forward (float32, < 1e-4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache.kv_cache import KVCache
from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.models.llama import ForwardBatch, compute_logits, forward, init_params, unstack_layers
from tests.numpy_reference import reference_logits

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, head_dim=16, max_position_embeddings=256)
CONFIGS = {
    "llama-gqa-untied": ModelConfig(architecture="llama", num_heads=4, num_kv_heads=2, **BASE),
    "llama-mha-tied": ModelConfig(architecture="llama", num_heads=4, num_kv_heads=4, tie_word_embeddings=True, **BASE),
    "qwen2-bias-tied": ModelConfig(
        architecture="qwen2", num_heads=4, num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6, **BASE
    ),
    "llama3-rope-scaling": ModelConfig(
        architecture="llama",
        num_heads=4,
        num_kv_heads=2,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_position_embeddings=64),
        **BASE,
    ),
    "mistral-linear-rope": ModelConfig(
        architecture="mistral", num_heads=8, num_kv_heads=2, head_dim=8,
        rope_scaling=RopeScaling(kind="linear", factor=2.0),
        **{k: v for k, v in BASE.items() if k != "head_dim"},
    ),
}


PROMPT_LEN, DECODE_STEPS, PAGE_SIZE = 13, 20, 4


def _tokens(cfg: ModelConfig) -> list[int]:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, PROMPT_LEN + DECODE_STEPS).tolist()


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, cache, batch, cfg):
    (hidden,), cache = forward(params, cache, (batch,), cfg)
    return compute_logits(params, hidden, cfg), cache


@pytest.mark.parametrize("layers", ["stacked-scan", "unrolled"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_numpy(name: str, layers: str) -> None:
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.PRNGKey(0))
    expected = reference_logits(params, cfg, tokens := _tokens(cfg))  # [T, V]
    if layers == "unrolled":
        params = unstack_layers(params)
    rng = np.random.default_rng(1)

    # Pages handed out out of order, so reads really go through the page table.
    num_pages = 16
    pages = rng.permutation(np.arange(1, num_pages))[: -(-len(tokens) // PAGE_SIZE)]
    page_table = np.zeros((1, 16), np.int32)
    page_table[0, : len(pages)] = pages
    cache = KVCache.create(cfg, num_pages, PAGE_SIZE, jnp.float32)

    t = 16  # prefill bucket: 13 real tokens + 3 padding
    prefill = ForwardBatch(
        tokens=np.asarray([tokens[:PROMPT_LEN] + [0] * (t - PROMPT_LEN)], np.int32),
        positions=np.arange(t, dtype=np.int32)[None],
        page_table=page_table,
        kv_lens=np.asarray([PROMPT_LEN], np.int32),
    )
    logits, cache = _logits(params, cache, prefill, cfg)
    np.testing.assert_allclose(np.asarray(logits)[0, :PROMPT_LEN], expected[:PROMPT_LEN], atol=1e-4, rtol=0)

    for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        batch = ForwardBatch(
            tokens=np.asarray([[tokens[pos]]], np.int32),
            positions=np.asarray([[pos]], np.int32),
            page_table=page_table,
            kv_lens=np.asarray([pos + 1], np.int32),
        )
        logits, cache = _logits(params, cache, batch, cfg)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], expected[pos], atol=1e-4, rtol=0, err_msg=f"decode {pos}")


@pytest.mark.parametrize("decode_kernel", [False, True], ids=["reference", "pallas-kernel"])
def test_mixed_groups_and_chunked_prefill_match_numpy(decode_kernel: bool) -> None:
    """One step holding a prefill group beside a decode group, and a prompt prefilled in two chunks,
    give the same logits as the NumPy reference on each whole sequence. The decode group runs through
    the reference attention or the Pallas decode kernel (compiled on GPU, interpreted elsewhere)."""
    cfg = CONFIGS["llama-gqa-untied"]
    params = init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (14, 10, 7)]  # A, B, C (last token of each is decoded)
    expected = [reference_logits(params, cfg, s) for s in seqs]
    cache = KVCache.create(cfg, 16, PAGE_SIZE, jnp.float32)
    tables = np.zeros((3, 8), np.int32)
    for row, pages in enumerate([[3, 9, 1, 14], [7, 2, 12], [5, 11]]):
        tables[row, : len(pages)] = pages

    def group(rows, starts, ends, t):
        tokens = np.zeros((len(rows), t), np.int32)
        positions = np.zeros((len(rows), t), np.int32)
        for r, (row, a, b) in enumerate(zip(rows, starts, ends)):
            tokens[r, : b - a] = seqs[row][a:b]
            positions[r] = a + np.arange(t)
        return ForwardBatch(tokens, positions, tables[list(rows)], np.asarray(ends, np.int32))

    step = jax.jit(lambda p, c, gs: forward(p, c, gs, cfg, decode_kernel=decode_kernel))
    # Step 1: prefill A and B (all but their last token) and the first chunk of C.
    (h_ab, h_c), cache = step(params, cache, (group([0, 1], [0, 0], [13, 9], 16), group([2], [0], [3], 4)))
    logits = compute_logits(params, h_ab, cfg)
    np.testing.assert_allclose(np.asarray(logits)[0, :13], expected[0][:13], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[1, :9], expected[1][:9], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(compute_logits(params, h_c, cfg))[0, :3], expected[2][:3], atol=1e-4, rtol=0)
    # Step 2: decode A and B (one token each) beside the second chunk of C.
    (h_dec, h_c), cache = step(params, cache, (group([0, 1], [13, 9], [14, 10], 1), group([2], [3], [7], 4)))
    dec = np.asarray(compute_logits(params, h_dec, cfg))[:, 0]
    np.testing.assert_allclose(dec[0], expected[0][13], atol=1e-4, rtol=0)
    np.testing.assert_allclose(dec[1], expected[1][9], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(compute_logits(params, h_c, cfg))[0], expected[2][3:7], atol=1e-4, rtol=0)
