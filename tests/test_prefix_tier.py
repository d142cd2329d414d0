"""The host prefix tier (`--host-prefix-cache`, `--prefix-cache-dir`): prefix blocks the device evicts
come back from host memory instead of being recomputed, outputs stay those without the tier, a saved
tier warms a restarted engine, and a corrupt, mismatched or failing tier costs only recompute."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_PAGES, break_first_read, tiny_config, tiny_params

TIER = dataclasses.replace(SMALL_PAGES, host_prefix_cache=0.01)  # 47 device pages of 4 tokens; the host tier holds thousands


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_position_embeddings=256)
    return cfg, tiny_params(cfg)


def _engine(tiny, cfg: EngineConfig = TIER, params=None, **kw) -> LLMEngine:
    model_cfg, own = tiny
    return LLMEngine(model_cfg, own if params is None else params, dataclasses.replace(cfg, **kw), eos_token_ids=(2,))


def _tenants(vocab: int, count: int = 6) -> list[list[int]]:
    """Distinct 40-token system prompts (10 blocks each): six of them are more than the device cache holds."""
    rng = random.Random(7)
    return [[rng.randrange(3, vocab) for _ in range(40)] for _ in range(count)]


def _rotation(engine: LLMEngine, tenants: list[list[int]], rounds: int, start: int = 0) -> list[tuple[list[int], int]]:
    """Each tenant's system prompt plus a fresh question, one request at a time, tenant after tenant;
    the generated tokens and cached prompt tokens of each."""
    rng, out = random.Random(start), []
    for r in range(rounds):
        for t, system in enumerate(tenants):
            prompt = system + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(6)]
            params = SamplingParams(max_tokens=8, temperature=0.8 if t % 2 else 0.0, seed=r * 100 + t, ignore_eos=True)
            result = engine.run({f"{r}-{t}": (prompt, params)})[f"{r}-{t}"]
            out.append((result.outputs[0].token_ids, result.num_cached_tokens))
    return out


def _all_free(engine: LLMEngine) -> None:
    engine.blocks.check_consistency()
    assert engine.blocks.usage == 0.0
    engine.prefix_tier.cache.check_consistency()


def test_host_tier_turns_evicted_prefixes_into_hits_with_equal_outputs(tiny) -> None:
    """Six tenants' 10-block prompts rotate through 47 device pages: without the tier each return
    finds its prefix evicted and recomputes it; with it, the blocks come back from host memory."""
    tenants = _tenants(tiny[0].vocab_size)
    plain, tiered = _engine(tiny, host_prefix_cache=0.0), _engine(tiny)
    without, with_tier = _rotation(plain, tenants, 3), _rotation(tiered, tenants, 3)
    assert [t for t, _ in with_tier] == [t for t, _ in without]
    later = slice(len(tenants), None)  # the rounds after the first, which fills the caches
    assert sum(c for _, c in without[later]) < sum(c for _, c in with_tier[later]) == len(with_tier[later]) * 40
    stats = tiered.stats()
    tier = stats.prefix_tier
    assert tier.hits > 0 and tier.stored > 0 and tier.fallbacks == 0
    page = tiered.prefix_tier.cache.pool.page_bytes()
    assert tier.stored_bytes == tier.stored * page and tier.loaded_bytes == tier.hits * page
    assert stats.prefix_cache_hits + tier.hits == len(with_tier[later]) * 10 > plain.stats().prefix_cache_hits  # every later system prompt, whole
    assert tiered.num_computed_tokens < plain.num_computed_tokens
    _all_free(tiered)


def test_saved_tier_warms_a_restarted_engine_and_a_bad_one_is_ignored(tiny, tmp_path, caplog) -> None:
    tenants = _tenants(tiny[0].vocab_size, 3)
    first = _engine(tiny, prefix_cache_dir=str(tmp_path))
    cold = _rotation(first, tenants, 1)
    first.close()
    restarted = _engine(tiny, prefix_cache_dir=str(tmp_path))
    assert len(restarted.prefix_tier.cache) > 0
    warm = _rotation(restarted, tenants, 1)
    assert [t for t, _ in warm] == [t for t, _ in cold]  # the same questions: the same answers
    assert all(c == 0 for _, c in cold) and all(c == 44 for _, c in warm)  # the same questions too: the 11 full blocks before the last token
    assert restarted.stats().prefix_tier.hits > 0
    _all_free(restarted)

    other = tiny_params(tiny[0], seed=1)  # another model's weights: its KV would be wrong
    with caplog.at_level(logging.WARNING, logger="jaxserve.prefix_tier"):
        assert len(_engine(tiny, params=other, prefix_cache_dir=str(tmp_path)).prefix_tier.cache) == 0
    assert "written for another model" in caplog.text
    caplog.clear()
    (tmp_path / "pages.npz").write_bytes(b"not an archive")
    with caplog.at_level(logging.WARNING, logger="jaxserve.prefix_tier"):
        corrupt = _engine(tiny, prefix_cache_dir=str(tmp_path))
    assert len(corrupt.prefix_tier.cache) == 0 and "ignoring the corrupt" in caplog.text
    assert [t for t, _ in _rotation(corrupt, tenants, 1)] == [t for t, _ in cold]


def test_failed_copy_back_recomputes_and_forgets_the_blocks(tiny, monkeypatch) -> None:
    tenants = _tenants(tiny[0].vocab_size)
    reference = _rotation(_engine(tiny, host_prefix_cache=0.0), tenants, 2)
    engine = _engine(tiny)
    fails = {"left": 2}
    to_device = engine.copier.to_device

    def flaky(pool, device, host) -> None:
        if pool is engine.prefix_tier.cache.pool and fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("injected copy failure")
        to_device(pool, device, host)

    monkeypatch.setattr(engine.copier, "to_device", flaky)
    assert [t for t, _ in _rotation(engine, tenants, 2)] == [t for t, _ in reference]
    assert fails["left"] == 0 and engine.stats().prefix_tier.fallbacks == 2
    _all_free(engine)


def test_bad_host_prefix_settings_are_refused(tiny) -> None:
    with pytest.raises(UserError, match=r"swap_space of 1 GiB \+ host_prefix_cache of 1e\+06 GiB exceeds the [0-9.]+ GiB of host memory available"):
        _engine(tiny, swap_space=1, host_prefix_cache=1e6)
    with pytest.raises(UserError, match="host_prefix_cache must be >= 0 GiB"):
        EngineConfig(host_prefix_cache=-1)
    with pytest.raises(UserError, match="host_prefix_cache needs prefix caching"):
        EngineConfig(host_prefix_cache=1, enable_prefix_caching=False)
    with pytest.raises(UserError, match="set host_prefix_cache"):
        EngineConfig(prefix_cache_dir="/tmp/x")
    with pytest.raises(UserError, match="prefix_cache_dir: cannot create /proc/jaxserve"):
        _engine(tiny, prefix_cache_dir="/proc/jaxserve")


def test_blocks_whose_copy_fails_in_flight_are_forgotten(tiny, monkeypatch, caplog) -> None:
    """The first blocks evicted to host memory never arrive (the transfer fails after it was started):
    the tier forgets them, their tenant recomputes its prefix, and no output changes."""
    tenants = _tenants(tiny[0].vocab_size)
    reference = _rotation(_engine(tiny, host_prefix_cache=0.0), tenants, 2)
    engine = _engine(tiny)
    break_first_read(engine.runner, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="jaxserve.prefix_tier"):
        tiered = _rotation(engine, tenants, 2)
    assert [t for t, _ in tiered] == [t for t, _ in reference] and "failed in flight" in caplog.text
    later = [c for _, c in tiered[len(tenants):]]
    assert min(later) < 40 == max(later)  # one tenant's prefix was lost on the way; the others came back whole
    assert engine.stats().prefix_tier.fallbacks == 0
    _all_free(engine)
