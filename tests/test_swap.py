"""Swap instead of recompute (`--swap-space`, `--preemption-mode`): a preempted sequence's pages go to
host memory and come back, outputs stay those of a roomy cache, a priority-0 arrival preempts by
swap and starts at once, and every device and host page ends free."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine import page_copier
from jaxserve.engine.interface import Admission
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.runner import SWAP_CHUNK
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_PAGES, break_first_read, run_with_aborts, tiny_config, tiny_params

SWAP = dataclasses.replace(SMALL_PAGES, swap_space=0.01, preemption_mode="swap")  # 10 MiB: thousands of tiny pages
ROOMY = dataclasses.replace(SMALL_PAGES, num_pages=400)  # no preemption (one compiled set for every test here)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_position_embeddings=256)
    return cfg, tiny_params(cfg)


def _engine(tiny, cfg: EngineConfig, **kw) -> LLMEngine:
    model_cfg, params = tiny
    return LLMEngine(model_cfg, params, dataclasses.replace(cfg, **kw), eos_token_ids=(2,))


def _requests(vocab: int, count: int, seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """Prompts of 5-60 tokens, 20-40 new tokens each, greedy and seeded sampling."""
    rng = random.Random(seed)
    return {
        str(i): (
            [rng.randrange(3, vocab) for _ in range(rng.randint(5, 60))],
            SamplingParams(max_tokens=rng.randint(20, 40), temperature=rng.choice([0.0, 0.8]), top_p=0.95, seed=i, ignore_eos=True),
        )
        for i in range(count)
    }


def _tokens(results) -> dict[str, list[int]]:
    return {rid: out.outputs[0].token_ids for rid, out in results.items()}


def _all_free(engine: LLMEngine) -> None:
    engine.blocks.check_consistency()
    assert engine.blocks.usage == 0.0
    if engine.swapper is not None:
        engine.swapper.pool.check_consistency()
        assert engine.swapper.pool.num_free == engine.swapper.pool.num_pages


def test_swapped_outputs_equal_a_roomy_cache_and_recompute(tiny) -> None:
    """16 requests on 47 pages of 4 tokens: sequences are preempted again and again. With swap their
    pages round-trip through host memory; the tokens equal a roomy cache's and a recomputing engine's."""
    requests = _requests(tiny[0].vocab_size, 16, seed=1)
    recompute = _engine(tiny, SMALL_PAGES)
    swap = _engine(tiny, SWAP)
    want = _tokens(_engine(tiny, ROOMY).run(requests))
    assert _tokens(recompute.run(requests)) == want
    assert _tokens(swap.run(requests)) == want
    c = swap.stats().swap
    assert recompute.stats().swap is None and recompute.stats().preemptions > 0
    assert c.swap_outs > 0 and c.swap_ins == c.swap_outs and c.fallbacks == 0
    assert c.swap_out_bytes == c.swap_in_bytes > 0 and c.swap_out_bytes % swap.swapper.pool.page_bytes() == 0
    # Pages are read out into, and written back from, page-locked host memory.
    pages = np.zeros(SWAP_CHUNK, np.int32)
    assert {x.sharding.memory_kind for x in swap.runner.read_pages(pages).values()} == {"pinned_host"}
    _all_free(swap)


def test_host_copies_carry_an_int8_caches_codes_and_scales(tiny) -> None:
    """Pages of an int8 cache read to the host and written to other pages come back bit for bit,
    scales included; padding (page 0) stays the null page."""
    cfg, _ = tiny
    engine = _engine(tiny, SWAP, kv_cache_dtype="int8")
    runner = engine.runner
    rng = np.random.default_rng(0)
    pages = np.arange(1, 9, dtype=np.int32)
    k, v = (rng.normal(size=(cfg.num_kv_heads, 8 * 4, cfg.head_dim)).astype(np.float32) for _ in range(2))
    runner.cache = runner.cache.write(0, np.repeat(pages, 4), np.tile(np.arange(4, dtype=np.int32), 8), k, v)
    src, dst = np.zeros(16, np.int32), np.zeros(16, np.int32)
    src[:8], dst[:8] = pages, pages + 20
    data = runner.read_pages(src)
    assert set(data) == {"k", "v", "k_scale", "v_scale"} and data["k"].dtype == np.int8
    runner.write_pages(dst, data)
    for name, a in data.items():
        stored = np.asarray(getattr(runner.cache, name))
        np.testing.assert_array_equal(stored[:, :, pages + 20], stored[:, :, pages], err_msg=name)
        assert np.any(stored[:, :, pages] != 0), name


def test_a_priority_request_swaps_low_priority_streams_out_and_starts_in_the_next_step(tiny) -> None:
    """Low-priority streams hold every running slot and nearly every page; a priority-0 request
    arriving then computes its prompt in the very next step (its first token comes out of it), the
    streams it displaced are swapped, not recomputed, and every stream ends with the tokens it has
    alone."""
    cfg, _ = tiny
    rng = random.Random(2)
    slots = SWAP.max_num_seqs
    streams = {f"s{i}": ([rng.randrange(3, cfg.vocab_size) for _ in range(8)], SamplingParams(max_tokens=40, temperature=0.8, seed=i, ignore_eos=True))
               for i in range(slots)}
    engine = _engine(tiny, SWAP)
    for rid, (prompt, sp) in streams.items():
        engine.add_request(rid, prompt, sp, Admission(priority=1))
    got: dict[str, list[int]] = {}
    for _ in range(60):  # until the streams fill every slot and all but a few of the 47 pages
        if len(engine.scheduler.running) == slots and engine.blocks.num_free < 4:
            break
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out.token_id)
    assert len(engine.scheduler.running) == slots and engine.blocks.num_free < 4
    swapped = engine.stats().swap.swap_outs
    engine.add_request("urgent", [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], SamplingParams(max_tokens=4, temperature=0.0), Admission(priority=0))
    first = engine.step()
    assert "urgent" in [out.request_id for out in first]
    for out in first:
        got.setdefault(out.request_id, []).append(out.token_id)
    assert engine.stats().swap.swap_outs > swapped
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out.token_id)
    alone = _engine(tiny, ROOMY).run(streams)
    for rid in streams:
        assert [t for t in got[rid] if t is not None] == alone[rid].outputs[0].token_ids, rid
    _all_free(engine)


def test_stress_300_requests_with_swaps_aborts_and_priorities(tiny) -> None:
    """300 requests on a small cache, a third of them urgent (priority 0), a third sharing a prefix,
    random aborts: after warm-up nothing compiles, every device and host page ends free, and each
    finished request has the tokens of a roomy cache."""
    cfg, _ = tiny
    engine = _engine(tiny, SWAP)
    engine.warmup(progress=False)
    compiled = engine.stats().compiles
    rng = random.Random(9)
    shared = [rng.randrange(3, cfg.vocab_size) for _ in range(24)]
    requests = {rid: ((shared if int(rid) % 3 == 1 else []) + prompt, sp) for rid, (prompt, sp) in _requests(cfg.vocab_size, 300, seed=3).items()}
    results, aborted = run_with_aborts(engine, requests, rng, priority=lambda rid: int(int(rid) % 3 != 0))
    stats = engine.stats()
    assert stats.compiles == compiled
    assert stats.swap.swap_outs > 0 and stats.swap.swap_ins > 0 and stats.swap.fallbacks == 0 and len(aborted) > 10
    _all_free(engine)
    done = {rid: requests[rid] for rid in requests if rid not in aborted}
    roomy = _engine(tiny, ROOMY).run(done)
    for rid in done:
        assert [t for t in results[rid] if t is not None] == roomy[rid].outputs[0].token_ids, rid


def test_a_failed_copy_falls_back_to_recompute_and_is_counted(tiny, monkeypatch) -> None:
    """The first copy back to the device fails: that sequence recomputes from its tokens instead,
    the fallback is counted, and no output changes."""
    requests = _requests(tiny[0].vocab_size, 16, seed=1)
    want = _tokens(_engine(tiny, ROOMY).run(requests))
    engine = _engine(tiny, SWAP)
    write, calls = engine.runner.write_pages, []

    def flaky(pages: np.ndarray, data: dict) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated copy failure")
        write(pages, data)

    monkeypatch.setattr(engine.runner, "write_pages", flaky)
    assert _tokens(engine.run(requests)) == want
    c = engine.stats().swap
    assert c.fallbacks == 1 and c.swap_ins == c.swap_outs - 1
    _all_free(engine)


def _in_flight_at_each_step(engine: LLMEngine, monkeypatch) -> list[int]:
    """Filled as the engine runs: the chunks in flight to host memory when each step is dispatched."""
    forward, counts = engine.runner.forward, []

    def forward_seeing_copies(groups) -> None:
        counts.append(len(engine.copier.in_flight))
        forward(groups)

    monkeypatch.setattr(engine.runner, "forward", forward_seeing_copies)
    return counts


def test_swap_outs_run_beside_the_step_and_one_failing_in_flight_recomputes(tiny, monkeypatch, caplog) -> None:
    """Copies to host memory are only started before the step: it is dispatched while they are in
    flight, and they have landed in the pool when it returns. The first one fails in flight: its
    sequence recomputes instead (a counted fallback) and no output changes."""
    requests = _requests(tiny[0].vocab_size, 16, seed=1)
    want = _tokens(_engine(tiny, ROOMY).run(requests))
    engine = _engine(tiny, SWAP)
    in_flight, step = _in_flight_at_each_step(engine, monkeypatch), engine.step

    def step_then_check():
        outputs = step()
        assert engine.copier.in_flight == []
        return outputs

    monkeypatch.setattr(engine, "step", step_then_check)
    break_first_read(engine.runner, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="jaxserve.swap"):
        assert _tokens(engine.run(requests)) == want
    assert sum(n > 0 for n in in_flight) > 1
    c = engine.stats().swap
    assert c.fallbacks == 1 and c.swap_ins == c.swap_outs - 1 and "failed in flight" in caplog.text
    _all_free(engine)


def test_copies_in_flight_are_capped_by_their_device_bytes(tiny, monkeypatch) -> None:
    """With room for one chunk on its way, each further copy lands the oldest first: outputs are
    unchanged and no step ever has more than one chunk in flight."""
    monkeypatch.setattr(page_copier, "MAX_IN_FLIGHT_BYTES", 1)
    requests = _requests(tiny[0].vocab_size, 16, seed=1)
    want = _tokens(_engine(tiny, ROOMY).run(requests))
    engine = _engine(tiny, SWAP)
    in_flight = _in_flight_at_each_step(engine, monkeypatch)
    assert _tokens(engine.run(requests)) == want
    assert max(in_flight) == 1 and engine.stats().swap.swap_outs > 0
    _all_free(engine)


def test_auto_mode_measures_when_swapping_pays_and_logs_it(tiny, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        engine = _engine(tiny, SMALL_PAGES, swap_space=0.01, preemption_mode="auto")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preemption:"))
    threshold = engine.scheduler.swap_min_tokens
    assert ("always recompute" in line) if threshold is None else (f"contexts of {threshold} tokens or more swap" in line)
    assert _engine(tiny, SMALL_PAGES, swap_space=0.01, preemption_mode="recompute").swapper is None


def test_swap_space_beyond_host_memory_is_refused(tiny) -> None:
    with pytest.raises(UserError, match=r"swap_space of 1e\+06 GiB exceeds the [0-9.]+ GiB of host memory available"):
        _engine(tiny, SMALL_PAGES, swap_space=1e6)
    with pytest.raises(UserError, match="preemption_mode must be one of auto, swap, recompute; got 'never'"):
        EngineConfig(preemption_mode="never")
    with pytest.raises(UserError, match="swap_space must be >= 0 GiB"):
        EngineConfig(swap_space=-1)
