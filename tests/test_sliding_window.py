"""Sliding-window models give up the pages that fall out of the window (`Scheduler`): a long
conversation holds about window / page_size + 2 pages and runs on a cache far smaller than its
context, and outputs equal those of a cache that keeps every page, through recompute and swap
preemption, prefix-cache hits (also when the early blocks of a cached prefix were evicted, and from
the host prefix tier), speculative decoding and beam search. The comparison runs turn freeing off
with `engine.scheduler.window = None`."""

from __future__ import annotations

import dataclasses
import random

import pytest

from jaxserve.config import EngineConfig, SpeculativeConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.sequence import Sequence
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import tiny_config, tiny_params

# A 6,000-token conversation: a 1,024-token window over pages of 16 tokens, on 99 pages (1,584 tokens).
LONG_WINDOW = 1024
LONG = EngineConfig(num_pages=100, page_size=16, max_num_seqs=2, max_num_batched_tokens=512, prefill_row_len=256, max_model_len=6144)
LONG_ROOMY = dataclasses.replace(LONG, num_pages=400)  # every page of the conversation, kept
# Many short sequences past a 22-token window (not a whole number of 4-token pages) on 47 pages:
# windowed or not, they preempt one another; one compiled step set for every engine of these tests.
WINDOW = 22
SMALL = EngineConfig(num_pages=48, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, prefill_row_len=16, max_model_len=176)


def _mistral(window: int, max_len: int):
    """A tiny Mistral-v0.1-style model: every layer slides."""
    cfg = tiny_config("mistral", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      max_position_embeddings=max_len, layer_types=("sliding_attention",) * 2, sliding_window=window)
    assert cfg.kv_window == window
    return cfg, tiny_params(cfg)


@pytest.fixture(scope="module")
def long_model():
    return _mistral(LONG_WINDOW, 8192)


@pytest.fixture(scope="module")
def small_model():
    return _mistral(WINDOW, 256)


DRAFT = SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=4, disable_by_batch_size=16, tune_k=False)


def _first_layer(model, **changes) -> tuple:
    """A draft model made of the model's first layer (its embedding and head too), with `changes` to its config."""
    cfg, params = model
    draft = dataclasses.replace(cfg, **{"num_layers": 1, "layer_types": cfg.layer_types[:1], **changes})
    return draft, {**params, "layers": {k: v[:1] for k, v in params["layers"].items()}}


def _engine(model, cfg: EngineConfig, free: bool = True, draft=None, **kw) -> LLMEngine:
    engine = LLMEngine(model[0], model[1], dataclasses.replace(cfg, **kw), eos_token_ids=(2,), draft=draft)
    if draft is None:
        assert engine.scheduler.window == model[0].kv_window
    if not free:
        engine.scheduler.window = None  # keep every page: the reference
    return engine


def _held(engine: LLMEngine) -> int:
    """Pages the running sequences hold (the null page 0 marks one given up)."""
    return sum(1 for s in engine.scheduler.running for p in s.pages if p)


def _conversation(engine: LLMEngine, turns: list[tuple[int, int]], seed: int = 0) -> tuple[list[list[int]], list[int], list[int], int]:
    """A chat, one request per turn (the history, then `user` new tokens; `reply` tokens generated),
    checking after every step that the pages referenced are exactly those the sequence holds.
    Returns each turn's reply, its prompt tokens found in the prefix cache, the pages held after each
    decode step of the last turn, and the most pages held after any step."""
    rng, vocab = random.Random(seed), engine.model_config.vocab_size
    history: list[int] = []
    replies, cached, held, peak = [], [], [], 0
    for t, (user, reply) in enumerate(turns):
        prompt = history + [rng.randrange(3, vocab) for _ in range(user)]
        engine.add_request(str(t), prompt, SamplingParams(max_tokens=reply, temperature=0.0, ignore_eos=True))
        out: list[int] = []
        while engine.has_unfinished():
            step = engine.step()
            out += [o.token_id for o in step if o.token_id is not None]
            engine.blocks.check_consistency()
            in_use = engine.num_pages - 1 - engine.blocks.num_free
            assert in_use == _held(engine), (in_use, _held(engine))  # a page given up is free (or cached and evictable)
            seqs = engine.scheduler.running
            peak = max(peak, _held(engine))
            if t == len(turns) - 1 and seqs and seqs[0].num_computed > len(prompt):
                held.append(_held(engine))
            if step and step[0].num_cached_tokens is not None:
                cached.append(step[0].num_cached_tokens)
        replies.append(out)
        history = prompt + out
    assert engine.blocks.usage == 0.0
    return replies, cached, held, peak


def test_a_6000_token_conversation_holds_a_window_of_pages(long_model) -> None:
    """The acceptance check: three turns reaching 6,000 tokens on a 99-page cache (the context needs
    375) hold at most window / page_size + 2 pages while decoding, are never preempted, and reply
    exactly as a cache that keeps every page does; each new turn finds the previous turns' in-window
    blocks in the prefix cache, though their early blocks were evicted."""
    turns = [(2000, 100), (1900, 100), (1800, 100)]
    windowed = _engine(long_model, LONG)
    replies, cached, held, peak = _conversation(windowed, turns)
    want, want_cached, kept, _ = _conversation(_engine(long_model, LONG_ROOMY, free=False), turns)
    assert replies == want and all(len(r) == 100 for r in replies)
    assert windowed.scheduler.num_preemptions == 0
    page = LONG.page_size
    assert len(held) == 98 and max(held) <= LONG_WINDOW // page + 2, max(held)
    assert peak <= windowed.scheduler.pages_needed(6000)  # prefilling: the window's pages and a chunk's
    assert max(kept) == 6000 // page  # the reference holds the whole context
    # Later turns hit the full blocks of the turns before (the last token is never cached), in both.
    assert cached == want_cached == [0, 2096, 4096]
    print(f"pages held decoding the last turn: max {max(held)}, at the end {held[-1]} (reference {kept[-1]}); at most {peak} prefilling")


def test_capacity_counts_the_window_and_max_model_len_the_whole_context(long_model) -> None:
    """A 6,000-token request fits 99 pages with a 1,024-token window (not without one); the context
    length limit still counts every token."""
    engine = _engine(long_model, LONG)
    six_k = SamplingParams(max_tokens=100)
    engine.check_request([5] * 5900, six_k)
    # The window's 64 pages, a step's 512-token chunk (32) and one page each side for their offsets.
    assert engine.scheduler.pages_needed(6000) == 97 and engine.scheduler.pages_needed(100) == 7
    with pytest.raises(UserError) as e:
        engine.check_request([5] * 6100, six_k)
    assert e.value.code == "context_length_exceeded"
    engine.scheduler.window = None
    assert engine.scheduler.pages_needed(6000) == 375
    with pytest.raises(UserError, match="needs 6000 tokens of KV cache"):
        engine.check_request([5] * 5900, six_k)
    # A draft model reads the same pages: the wider of the two windows frees them; none if it has none.
    for draft_window, window in ((2048, 2048), (512, LONG_WINDOW), (None, None)):
        changes = dict(sliding_window=draft_window) if draft_window else dict(layer_types=(), sliding_window=None)
        draft = _first_layer(long_model, **changes)
        assert _engine(long_model, LONG, speculative=DRAFT, draft=draft).scheduler.window == window


def _requests(vocab: int, seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """12 requests of 20-100 prompt tokens and 30-60 new ones (greedy and seeded), half sharing a
    60-token prefix, and a beam search."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(60)]
    out = {}
    for i in range(12):
        own = [rng.randrange(3, vocab) for _ in range(rng.randint(20, 40 if i % 2 else 100))]
        sp = SamplingParams(max_tokens=rng.randint(30, 60), temperature=rng.choice([0.0, 0.8]), top_p=0.95, seed=i, ignore_eos=True)
        out[str(i)] = ((shared + own) if i % 2 else own, sp)
    out["beam"] = ([rng.randrange(3, vocab) for _ in range(30)], SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=40))
    return out


def _tokens(results) -> dict[str, list[list[int]]]:
    return {rid: [o.token_ids for o in out.outputs] for rid, out in results.items()}


def _all_free(engine: LLMEngine) -> None:
    engine.blocks.check_consistency()
    assert engine.blocks.usage == 0.0 and engine.blocks.num_free == engine.num_pages - 1
    if engine.swapper is not None:
        engine.swapper.pool.check_consistency()
        assert engine.swapper.pool.num_free == engine.swapper.pool.num_pages


@pytest.fixture(scope="module")
def small_reference(small_model) -> dict[str, list[list[int]]]:
    """The requests' tokens from an engine that keeps every page (preempting, recomputing)."""
    return _tokens(_engine(small_model, SMALL, free=False).run(_requests(small_model[0].vocab_size, seed=1)))


@pytest.mark.parametrize("mode", ["recompute", "swap", "ngram", "draft"])
def test_preempted_windowed_sequences_equal_a_cache_that_keeps_every_page(small_model, small_reference, mode) -> None:
    """13 requests (a beam search among them) on 47 pages of 4 tokens: sequences are preempted again
    and again, recomputed or swapped (only their in-window pages travel), or drafting speculatively;
    requests sharing a prefix hit its blocks. The tokens equal those of a reference that keeps every
    page, and every page ends free."""
    requests = _requests(small_model[0].vocab_size, seed=1)
    kw = {"recompute": {}, "swap": dict(swap_space=0.01, preemption_mode="swap"),
          "ngram": dict(speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=16, tune_k=False)),
          "draft": dict(speculative=DRAFT, draft=_first_layer(small_model))}[mode]
    engine = _engine(small_model, SMALL, **kw)
    assert _tokens(engine.run(requests)) == small_reference
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.prefix_hits > 0
    if mode == "swap":
        c = engine.stats().swap
        assert c.swap_outs > 0 and c.swap_ins == c.swap_outs and c.fallbacks == 0
        # Only in-window pages travel: at most ceil((window + page_size - 2) / page_size) a sequence.
        assert c.swap_out_bytes <= c.swap_outs * -(-(WINDOW + SMALL.page_size - 2) // SMALL.page_size) * engine.swapper.pool.page_bytes()
    if mode in ("ngram", "draft"):
        assert engine.stats().spec.num_accepted_tokens > 0
    _all_free(engine)


def _evict_all_but(engine: LLMEngine, keep: int, seed: int) -> None:
    """Run short unrelated requests (each evicts at most 4 blocks) until at most `keep` of the blocks
    cached now are left on the device."""
    rng, n = random.Random(seed), 0
    before = {h for _, h in engine.blocks.cached_blocks()}
    while len(before & {h for _, h in engine.blocks.cached_blocks()}) > keep:
        n += 1
        engine.run({f"filler{n}": ([rng.randrange(3, engine.model_config.vocab_size) for _ in range(12)], SamplingParams(max_tokens=4))})


@pytest.mark.parametrize("tier", [False, True])
def test_a_prefix_whose_early_blocks_were_evicted_needs_only_its_in_window_blocks(small_model, tier) -> None:
    """A 120-token prompt and its 20-token reply; its early blocks, given up first, are evicted. The
    next turn (the history plus a question) finds the history's last in-window blocks cached and
    computes only from there: a prefix hit needs the blocks its first chunk's window reaches, not the
    evicted ones before. With the host prefix tier, the device keeps none of the blocks and the tier
    copies back only the in-window ones."""
    rng, vocab = random.Random(3), small_model[0].vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(120)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = _engine(small_model, SMALL, host_prefix_cache=0.01 if tier else 0.0)
    question = prompt + engine.run({"first": (prompt, sp)})["first"].outputs[0].token_ids + [rng.randrange(3, vocab) for _ in range(10)]
    hashes = Sequence("h", question, sp, 0).full_block_hashes(SMALL.page_size, len(question) - 1)
    _evict_all_but(engine, keep=0 if tier else 10, seed=4)
    assert engine.blocks.match_prefix(hashes[:1]) == []  # the first block is gone from the device
    result = engine.run({"again": (question, sp)})["again"]
    want = _engine(small_model, SMALL, free=False).run({"again": (question, sp)})["again"]
    assert result.outputs[0].token_ids == want.outputs[0].token_ids
    hit = 139 // SMALL.page_size * SMALL.page_size  # every full block the first turn computed (its last token is not)
    assert result.num_cached_tokens == hit
    if tier:
        loaded = engine.prefix_tier.counters.loaded_bytes // engine.prefix_tier.cache.pool.page_bytes()
        assert loaded == hit // SMALL.page_size - (hit - WINDOW + 1) // SMALL.page_size  # only those the window reaches
        engine.prefix_tier.cache.check_consistency()
    _all_free(engine)
