"""The batched engine on SmolLM2: batching, batch invariance, preemption and prefix caching change
nothing about a request's output."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.server_process import SERVER_ENGINE

WORDS = "the quick brown fox jumps over a lazy dog while curious cats watch from old windows of houses".split()


def _prompts(n: int, seed: int, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def _engine(model, **kw) -> LLM:
    """An engine with the test servers' limits, changed by `kw` (unchanged, its compiled steps are shared)."""
    return LLM(model, dataclasses.replace(SERVER_ENGINE, **kw))


@pytest.fixture(scope="module")
def llm(smollm2) -> LLM:
    """One engine shared by the tests that use the default limits (its compiled steps are reused).
    The unrolled CPU layout's batch invariance is held by the int8 engine test (the same ops)."""
    return _engine(smollm2)


def test_batched_greedy_equals_one_at_a_time(smollm2, llm) -> None:
    prompts = _prompts(24, seed=0)
    rng = random.Random(1)
    params = [SamplingParams(max_tokens=rng.randint(2, 12), temperature=0.0) for _ in prompts]
    batched = llm.generate(prompts, params, use_tqdm=False)
    single = _engine(smollm2, max_num_seqs=1)
    for prompt, sp, out in zip(prompts, params, batched):
        alone = single.generate([prompt], sp, use_tqdm=False)[0].outputs[0]  # an engine that only ever runs one request
        # To the bit, though batched steps mix decodes with prefill chunks far past 32 rows (`ops/quant.matmul`).
        assert (out.outputs[0].token_ids, out.outputs[0].logprobs) == (alone.token_ids, alone.logprobs), prompt


def test_seeded_sampling_is_batch_invariant(llm) -> None:
    target = "Tell me a story about a lighthouse"
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(15, seed=2)
    rng = random.Random(3)
    other_params = [SamplingParams(max_tokens=rng.randint(4, 20), temperature=1.0, top_k=rng.choice([-1, 20])) for _ in others]
    crowd = llm.generate([target, *others], [sp, *other_params], use_tqdm=False)[0].outputs[0].token_ids
    reordered = llm.generate([*others[:7], target, *others[7:]], [*other_params[:7], sp, *other_params[7:]], use_tqdm=False)[7].outputs[0].token_ids
    assert alone == crowd == reordered
    assert len(alone) == 16


def test_preemption_keeps_outputs_identical(smollm2, llm) -> None:
    """Preempted sequences swap their pages to host memory and back: the tokens are those of a roomy
    cache (recompute is held to the same on the tiny model: tests/test_swap.py)."""
    prompts = _prompts(8, seed=4, max_words=40)
    params = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True) for i in range(8)]
    roomy = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    tight = _engine(smollm2, num_pages=12, swap_space=0.1, preemption_mode="swap")  # 11 pages of 16 tokens: too few for all
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in squeezed] == roomy
    tight.engine.blocks.check_consistency()
    assert tight.engine.blocks.usage == 0.0
    swaps = tight.engine.stats().swap
    assert swaps.swap_outs > 0 and swaps.swap_ins == swaps.swap_outs and tight.engine.swapper.pool.usage == 0.0


def test_prefix_cache_computes_only_the_suffix(smollm2) -> None:
    tok = smollm2.tokenizer
    system = tok.encode(" ".join(WORDS * 40))[:512]
    llm = _engine(smollm2)  # the 512-token prefix is prefilled in chunks of the step budget
    engine = llm.engine
    sp = SamplingParams(max_tokens=4, temperature=0.0)
    first = llm.generate([system + tok.encode(" question one?")], sp, use_tqdm=False)
    before = engine.num_computed_tokens
    suffix = tok.encode(" and a second question?")
    second = llm.generate([system + suffix], sp, use_tqdm=False)
    computed = engine.num_computed_tokens - before
    # The 512 shared tokens (32 full pages) come from the cache; only the suffix and the decode steps run.
    assert computed == len(suffix) + (len(second[0].outputs[0].token_ids) - 1 + (second[0].outputs[0].finish_reason == "stop"))
    uncached = _engine(smollm2, enable_prefix_caching=False).generate([system + suffix], sp, use_tqdm=False)
    assert second[0].outputs[0].token_ids == uncached[0].outputs[0].token_ids
    assert first[0].outputs[0].token_ids


def test_requests_that_cannot_run_are_rejected_up_front(smollm2) -> None:
    engine = LLMEngine(smollm2.cfg, smollm2.params, EngineConfig(num_pages=8, max_model_len=1024), eos_token_ids=(2,))
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(UserError, match="prompt is empty"):
        engine.add_request("a", [], sp)
    with pytest.raises(UserError, match="exceeds the context length 1024"):
        engine.add_request("b", [1] * 1022, sp)
    with pytest.raises(UserError, match="the cache holds 112"):
        engine.add_request("c", [1] * 200, sp)
    with pytest.raises(UserError, match=r"token id 1000000 is out of range.*vocabulary size is 49152"):
        engine.add_request("d", [10**6], sp)
    engine.add_request("e", [1, 2, 3], sp)
    with pytest.raises(UserError, match="already in use"):
        engine.add_request("e", [1, 2, 3], sp)
    assert [r.request_id for r in engine.scheduler.waiting] == ["e"]


def test_stress_with_shared_prefixes_and_aborts_returns_every_page() -> None:
    """200 requests (half sharing a long prefix) with random aborts on a tiny model and a small cache:
    everything finishes or is aborted, and every page ends free or evictable with consistent counts."""
    from tests.tiny_models import SMALL_PAGES, tiny_config, tiny_params

    cfg = tiny_config("llama", max_position_embeddings=256)
    engine = LLMEngine(cfg, tiny_params(cfg), SMALL_PAGES, eos_token_ids=(2,))
    rng = random.Random(5)
    shared = [rng.randrange(3, cfg.vocab_size) for _ in range(40)]
    live: set[str] = set()
    finished = aborted = 0
    for i in range(200):
        prompt = (shared if i % 2 else []) + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, 30))]
        sp = SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 1.0]), seed=i)
        engine.add_request(str(i), prompt, sp)
        live.add(str(i))
        for _ in range(rng.randint(0, 3)):
            for out in engine.step():
                if out.finish_reason:
                    live.discard(out.request_id)
                    finished += 1
        if live and rng.random() < 0.2:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
            aborted += 1
        engine.blocks.check_consistency()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason:
                live.discard(out.request_id)
                finished += 1
    assert not live and finished + aborted == 200 and aborted > 10
    assert engine.blocks.usage == 0.0 and engine.blocks.num_free == SMALL_PAGES.num_pages - 1
    assert engine.blocks.prefix_hits > 0 and engine.scheduler.num_preemptions > 0
    engine.blocks.check_consistency()


def test_a_bad_prompt_in_a_batch_queues_nothing(llm) -> None:
    with pytest.raises(UserError, match="prompt is empty"):
        llm.generate(["fine", [], "also fine"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.generate(["fine"], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)[0].outputs[0].token_ids


def test_kv_cache_sized_from_memory() -> None:
    from jaxserve.cache.kv_cache import page_bytes
    from tests.tiny_models import tiny_config, tiny_params

    cfg = tiny_config("llama")
    per_page = page_bytes(cfg, 16, "float32")  # 2 * 2 layers * 2 heads * 16 * 16 dims * 4 bytes
    assert per_page == 2 * 2 * 2 * 16 * 16 * 4
    engine = LLMEngine(cfg, tiny_params(cfg), EngineConfig(kv_cache_memory=per_page * 10 + 5), eos_token_ids=(2,))
    assert engine.num_pages == 10 and engine.blocks.num_free == 9
    with pytest.raises(UserError, match="holds 1 pages"):
        LLMEngine(cfg, tiny_params(cfg), EngineConfig(kv_cache_memory=per_page * 1.5), eos_token_ids=(2,))
    with pytest.raises(UserError, match="give a size in bytes"):  # CPU reports no free memory
        LLMEngine(cfg, tiny_params(cfg), EngineConfig(kv_cache_memory=0.5), eos_token_ids=(2,))


def test_stop_strings_cut_the_text_and_never_reach_the_stream(llm) -> None:
    prompt = llm.model.tokenizer.encode_chat([{"role": "user", "content": "Describe the sea in two sentences."}])
    free = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 60, free.text
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 4]  # likely spans a token boundary
    cut = free.text.index(stop)
    pieces = list(llm.stream(prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=(stop, "never-seen")), request_id="stop"))
    text = "".join(p.text for p in pieces)
    assert text == free.text[:cut] and pieces[-1].finish_reason == "stop"
    assert all(stop not in p.text for p in pieces)
    streamed = ""
    for p in pieces[:-1]:  # nothing released early could later turn out to be part of the stop string
        streamed += p.text
        assert free.text.startswith(streamed) and len(streamed) <= cut
