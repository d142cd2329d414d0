"""8-bit KV caches (`--kv-cache-dtype int8 | fp8_e4m3`): codes with a scale per token and KV head,
close to a float cache on SmolLM2, about twice the tokens of bfloat16 in the same memory, and read
alike by the reference attention and the Pallas decode kernel."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache import kv_cache
from jaxserve.cache.kv_cache import KVCache, decode, encode, page_bytes, storage_dtype, supported_kv_dtypes
from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.ops.attention import decode_attention, paged_attention
from tests.test_quantization import PASSAGE
from tests.tiny_models import TINY_ENGINE, prefill_logits, tiny_config, tiny_params

HELD_OUT = (
    "Glaciers form where more snow falls in winter than melts in summer. Year after year the snow "
    "piles up, and its own weight presses the lower layers into dense blue ice. When the ice is thick "
    "enough it begins to flow downhill under gravity, a few centimetres to several metres a day, "
    "grinding the rock beneath it and carrying boulders far from where they broke off. The valleys a "
    "glacier leaves behind are shaped like a U rather than the V that rivers cut, and the long ridges "
    "of gravel at its old edges, called moraines, show how far it once reached. Today most glaciers "
    "are shrinking. Scientists measure them with stakes drilled into the ice, with satellites that "
    "weigh the ice sheets by their pull on the orbit, and with old photographs that show the same "
    "mountain a hundred years apart. Meltwater from glaciers feeds rivers that millions of people "
    "depend on for drinking water and farming, especially in the dry months of late summer."
)


@pytest.mark.parametrize("kv_cache_dtype,bound", [("int8", 0.5 / 127), ("fp8_e4m3", 2.0**-4)])
def test_codes_and_scales_round_trip(kv_cache_dtype: str, bound: float) -> None:
    """Each vector comes back within half a code step of its max |x| (int8) or within fp8's relative
    precision (3 mantissa bits); a zero vector comes back zero; the stored scale is what decodes."""
    dtype = storage_dtype(kv_cache_dtype, jnp.float32)
    x = np.random.default_rng(0).normal(size=(3, 40, 64)).astype(np.float32) * np.geomspace(1e-3, 1e3, 40)[None, :, None]
    x[1, 7] = 0.0
    codes, scale = encode(jnp.asarray(x), dtype)
    assert codes.dtype == dtype and scale.shape == (3, 40) and scale.dtype == jnp.uint16
    back = np.asarray(decode(codes, scale, jnp.float32))
    amax = np.abs(x).max(-1, keepdims=True)
    err = np.abs(back - x)
    if kv_cache_dtype == "int8":
        assert np.all(err <= bound * amax * 1.01)
    else:  # relative to each value, with fp8's subnormals near zero bounded by the vector's scale
        assert np.all(err <= bound * np.abs(x) + amax * 2.0**-9 / 448 * 8)
    assert np.all(back[1, 7] == 0.0)


def test_8bit_caches_hold_about_twice_the_tokens_of_bfloat16(caplog) -> None:
    """SmolLM2's shape (head_dim 64): 66 bytes per token and KV head against 128, scales included;
    an engine given the same memory holds 1.94x the tokens and says so in its `KV cache:` line."""
    smollm2_shape = tiny_config("llama", num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, max_position_embeddings=512)
    bf16 = page_bytes(smollm2_shape, 16, storage_dtype("bfloat16", jnp.float32))
    for name in ("int8", "fp8_e4m3"):
        assert bf16 / page_bytes(smollm2_shape, 16, storage_dtype(name, jnp.float32)) == 128 / 66
    params = tiny_params(smollm2_shape)
    memory = 200 * bf16
    tokens = {}
    for name in ("bfloat16", "int8"):
        with caplog.at_level(logging.INFO, logger="jaxserve"):
            caplog.clear()
            engine = LLMEngine(smollm2_shape, params, dataclasses.replace(TINY_ENGINE, kv_cache_memory=memory, kv_cache_dtype=name), eos_token_ids=(2,))
        tokens[name] = engine.limits.kv_cache_tokens
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
        assert f"= {tokens[name]} tokens ({name}" in line
    assert tokens["bfloat16"] == 199 * 16 and tokens["int8"] / tokens["bfloat16"] >= 1.93
    assert engine.limits.kv_cache_scales == "token_head" and engine.runner.cache.k_scale.shape == (3, 2, engine.num_pages, 16)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_decode_kernel_reads_8bit_pages_as_the_reference_does(kv_cache_dtype: str) -> None:
    """The Pallas kernel (interpreted on CPU) applies the per-token scales to scores and probabilities;
    the reference decodes the gathered pages: the same attention either way."""
    cfg = tiny_config("llama", num_heads=4, num_kv_heads=2, head_dim=16)
    cache = KVCache.create(cfg, 80, 16, storage_dtype(kv_cache_dtype, jnp.float32))
    rng = np.random.default_rng(1)
    lengths = np.asarray([1, 17, 130, 256], np.int32)
    table = (1 + rng.permutation(79)[:64].astype(np.int32)).reshape(4, 16)  # [B, P]: distinct pages
    page, offset = np.repeat(table.reshape(-1), 16), np.tile(np.arange(16, dtype=np.int32), table.size)
    k, v = (jnp.asarray(rng.normal(size=(2, page.size, 16)).astype(np.float32) * 3) for _ in range(2))
    cache = jax.jit(lambda c: c.write(1, page, offset, k, v))(cache)
    q = jnp.asarray(rng.normal(size=(4, 1, 4, 16)).astype(np.float32))
    want = jax.jit(paged_attention)(q, cache, 1, table, (lengths - 1)[:, None], lengths)
    got = jax.jit(decode_attention)(q, cache, 1, table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_smollm2_with_an_8bit_cache_tracks_a_float32_cache(smollm2) -> None:
    """Float32 weights, teacher-forced over two passages (nothing is calibrated for the cache): next-token
    choices with an 8-bit cache agree with a float32 cache's nearly everywhere (int8 at least 97% of
    positions), and the distributions stay close."""
    bounds = {"int8": (0.97, 0.005), "fp8_e4m3": (0.93, 0.02)}  # (agreement at least, mean KL below)
    agree, kl, n = dict.fromkeys(bounds, 0.0), dict.fromkeys(bounds, 0.0), 0
    for text in (HELD_OUT, PASSAGE):
        ids = smollm2.tokenizer.encode(text)
        ref = prefill_logits(smollm2.cfg, smollm2.params, ids).astype(np.float64)
        log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
        n += len(ids)
        for kv_cache_dtype in bounds:
            got = prefill_logits(smollm2.cfg, smollm2.params, ids, kv_cache_dtype=kv_cache_dtype).astype(np.float64)
            assert not np.array_equal(got, ref)  # the cache really was 8-bit
            log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
            kl[kv_cache_dtype] += float(np.sum(np.exp(log_p) * (log_p - log_q)))
            agree[kv_cache_dtype] += float(np.sum(ref.argmax(-1) == got.argmax(-1)))
    for kv_cache_dtype, (least, most) in bounds.items():
        print(f"{kv_cache_dtype} KV cache vs float32 over {n} tokens: top-1 agreement {agree[kv_cache_dtype] / n:.4f}, mean KL {kl[kv_cache_dtype] / n:.5f}")
        assert agree[kv_cache_dtype] / n >= least and kl[kv_cache_dtype] / n < most, kv_cache_dtype


def test_a_kv_dtype_the_backend_lacks_is_refused_with_the_supported_ones(monkeypatch) -> None:
    """An Ampere GPU (compute capability 8.0) has no fp8; CPUs convert it. Asking an engine for a
    dtype its backend lacks names the ones it has."""
    ampere = SimpleNamespace(platform="gpu", compute_capability="8.0")
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0")
    assert supported_kv_dtypes(ampere) == ("auto", "bfloat16", "int8")
    assert "fp8_e4m3" in supported_kv_dtypes(hopper) and "fp8_e4m3" in supported_kv_dtypes()
    monkeypatch.setattr(kv_cache, "supported_kv_dtypes", lambda device=None: supported_kv_dtypes(ampere))
    cfg = tiny_config("llama")
    with pytest.raises(UserError, match=r"kv_cache_dtype 'fp8' is not supported on cpu; supported: auto, bfloat16, int8$"):
        LLMEngine(cfg, tiny_params(cfg), EngineConfig(num_pages=8, kv_cache_dtype="fp8"), eos_token_ids=(2,))
    with pytest.raises(UserError, match="kv_cache_dtype must be one of auto, bfloat16, int8, fp8, fp8_e4m3; got 'int4'"):
        EngineConfig(kv_cache_dtype="int4")
