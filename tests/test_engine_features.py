"""Engine features on a tiny random model: fixed shapes (no recompiles after warm-up), penalties, logit
bias, min_tokens, log-probs, prompt log-probs and n samples, each checked against a direct computation."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from jaxserve.engine.interface import Admission
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.numpy_reference import reference_logits
from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params

EOS = 2


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_position_embeddings=2048)
    return cfg, tiny_params(cfg)


def _engine(tiny, **kw) -> LLMEngine:
    cfg, params = tiny
    return LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, **kw), eos_token_ids=(EOS,))


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def test_no_recompiles_after_warmup(tiny) -> None:
    """60 requests with prompts of 1 to 900 tokens, random lengths and sampling options, aborts and
    preemptions: after warm-up the compile counter never moves."""
    cfg, _ = tiny
    engine = _engine(tiny, num_pages=80, max_num_seqs=4, max_num_batched_tokens=128, prefill_row_len=64, max_model_len=1024)  # 11 step shapes
    engine.warmup(progress=False)
    compiled = engine.runner.num_compiles
    assert compiled >= len(engine.shapes.combos())
    rng = random.Random(0)
    live: set[str] = set()
    aborted = finished = 0
    for i in range(60):
        length = rng.choice([1, 2, rng.randint(3, 64), rng.randint(65, 400), rng.randint(400, 900)])
        sp = SamplingParams(
            max_tokens=rng.randint(1, 48),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_k=rng.choice([-1, 5]),
            seed=i,
            n=rng.choice([1, 1, 1, 2]),
            logprobs=rng.choice([None, None, 3]),
            prompt_logprobs=rng.choice([None, None, None, 2]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.5]),
        )
        engine.add_request(str(i), _prompt(rng, length, cfg.vocab_size), sp)
        live.add(str(i))
        for _ in range(rng.randint(0, 4)):
            for out in engine.step():
                if out.finish_reason and out.request_id not in engine.seqs:
                    live.discard(out.request_id)
                    finished += 1
        if rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
            aborted += 1
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason and out.request_id not in engine.seqs:
                live.discard(out.request_id)
                finished += 1
    assert not live and finished + aborted == 60 and aborted > 3
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.num_compiles == compiled
    engine.blocks.check_consistency()
    assert engine.blocks.usage == 0.0


def _penalised_reference(cfg, params, prompt: list[int], sp: SamplingParams) -> list[int]:
    """Greedy decoding with HF-style repetition penalty, then OpenAI presence/frequency penalties and
    logit bias, on the float64 NumPy model."""
    out: list[int] = []
    while len(out) < sp.max_tokens:
        logits = reference_logits(params, cfg, prompt + out)[-1]
        seen = np.unique(prompt + out)
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / sp.repetition_penalty, logits[seen] * sp.repetition_penalty)
        counts = np.bincount(out, minlength=cfg.vocab_size)
        logits -= sp.presence_penalty * (counts > 0) + sp.frequency_penalty * counts
        for token, bias in sp.logit_bias.items():
            logits[token] += bias
        if len(out) < sp.min_tokens:
            logits[EOS] = -np.inf
        token = int(np.argmax(logits))
        if token == EOS:
            break
        out.append(token)
    return out


@pytest.mark.parametrize(
    "options",
    [
        dict(repetition_penalty=1.8),
        dict(presence_penalty=1.5, frequency_penalty=0.7),
        dict(logit_bias={7: 3.0, 11: -100.0}, frequency_penalty=-0.5),
    ],
    ids=["repetition", "presence+frequency", "logit_bias"],
)
def test_penalties_match_a_direct_computation(tiny, options) -> None:
    cfg, params = tiny
    rng = random.Random(1)
    prompts = [_prompt(rng, rng.randint(3, 40), cfg.vocab_size) for _ in range(3)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, **options)
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    requests = {f"p{i}": (p, sp) for i, p in enumerate(prompts)} | {f"q{i}": (p, plain) for i, p in enumerate(prompts)}
    results = _engine(tiny).run(requests)  # penalised and plain requests share steps
    for i, prompt in enumerate(prompts):
        assert results[f"p{i}"].outputs[0].token_ids == _penalised_reference(cfg, params, prompt, sp)
        assert results[f"q{i}"].outputs[0].token_ids == _penalised_reference(cfg, params, prompt, plain)
    assert any(results[f"p{i}"].outputs[0].token_ids != results[f"q{i}"].outputs[0].token_ids for i in range(3))


def test_min_tokens_and_stop_token_ids(tiny) -> None:
    engine = _engine(tiny)
    eager = {EOS: 100.0}  # the model would stop at once
    results = engine.run(
        {
            "min": ([5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, logit_bias=eager, min_tokens=6)),
            "none": ([5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, logit_bias=eager)),
            "stop-id": ([5, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, logit_bias={9: 100.0}, stop_token_ids=(9,))),
            "ignore": ([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, logit_bias=eager, ignore_eos=True)),
        },
    )
    assert len(results["min"].outputs[0].token_ids) == 6 and results["min"].outputs[0].finish_reason == "stop"
    assert results["none"].outputs[0].token_ids == [] and results["none"].outputs[0].finish_reason == "stop"
    assert results["stop-id"].outputs[0].token_ids == [] and results["stop-id"].outputs[0].finish_reason == "stop"
    assert results["ignore"].outputs[0].token_ids == [EOS] * 4 and results["ignore"].outputs[0].finish_reason == "length"


def test_logprobs_and_prompt_logprobs_match_the_model(tiny) -> None:
    cfg, params = tiny
    prompt = _prompt(random.Random(2), 70, cfg.vocab_size)  # prefilled over several rows and steps
    sp = SamplingParams(max_tokens=5, temperature=0.0, logprobs=4, prompt_logprobs=3, ignore_eos=True)
    result = _engine(tiny, max_num_batched_tokens=64).run({"r": (prompt, sp)})["r"]
    sample = result.outputs[0]
    logits = reference_logits(params, cfg, prompt + sample.token_ids)  # [T, V]
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert len(result.prompt_logprobs) == len(prompt) - 1
    for pos, (lp, top) in enumerate(result.prompt_logprobs):
        np.testing.assert_allclose(lp, logprobs[pos, prompt[pos + 1]], atol=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-logprobs[pos])[:3])
    for i, (token, lp, top) in enumerate(zip(sample.token_ids, sample.logprobs, sample.top_logprobs)):
        row = logprobs[len(prompt) - 1 + i]
        np.testing.assert_allclose(lp, row[token], atol=1e-4)
        assert len(top) == 4 and top[0][0] == token  # greedy: the sampled token is the most likely
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:4], atol=1e-4)


def test_n_samples_share_the_prompt_and_are_reproducible(tiny) -> None:
    cfg, _ = tiny
    prompt = _prompt(random.Random(3), 100, cfg.vocab_size)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=42, n=3, ignore_eos=True)
    engine = _engine(tiny)
    result = engine.run({"r": (prompt, sp)})["r"]
    samples = [o.token_ids for o in result.outputs]
    assert len({tuple(s) for s in samples}) == 3  # distinct
    # The prompt's 6 full pages are computed once; each later sample recomputes only the last partial page.
    prefill = engine.num_computed_tokens - 3 * (8 - 1)
    assert prefill == len(prompt) + 2 * (len(prompt) % 16)
    again = _engine(tiny).run({"r": (prompt, sp)})["r"]
    assert [o.token_ids for o in again.outputs] == samples
    # Sample i is exactly a single-sample request with the i-th derived seed.
    alone = _engine(tiny).run({f"s{i}": (prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=sp.sample_seed(i), ignore_eos=True)) for i in range(3)})
    assert [alone[f"s{i}"].outputs[0].token_ids for i in range(3)] == samples


BAD_PARAMS = {
    "top_p zero": (dict(top_p=0.0), "top_p"),
    "top_p above one": (dict(top_p=1.5), "top_p"),
    "top_k below -1": (dict(top_k=-2), "top_k"),
    "top_k zero": (dict(top_k=0), "top_k"),
    "n zero": (dict(n=0), "n must"),
    "logprobs too many": (dict(logprobs=21), "logprobs"),
    "prompt_logprobs negative": (dict(prompt_logprobs=-1), "prompt_logprobs"),
    "seed a string": (dict(seed="7"), "seed"),
    "seed a float": (dict(seed=1.5), "seed"),
    "max_tokens zero": (dict(max_tokens=0), "max_tokens"),
    "temperature negative": (dict(temperature=-1), "temperature"),
    "presence out of range": (dict(presence_penalty=3), "presence_penalty"),
    "repetition zero": (dict(repetition_penalty=0), "repetition_penalty"),
    "logit_bias key": (dict(logit_bias={"x": 1}), "logit_bias"),
    "logit_bias value": (dict(logit_bias={3: 500}), "logit_bias"),
    "min_tokens above max": (dict(max_tokens=2, min_tokens=3), "min_tokens"),
    "empty stop string": (dict(stop=[""]), "stop"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_sampling_params_name_the_parameter(case: str) -> None:
    options, name = BAD_PARAMS[case]
    with pytest.raises(UserError, match=name):
        SamplingParams(**options)


def test_bad_requests_leave_others_untouched(tiny) -> None:
    engine = _engine(tiny, max_model_len=256)
    engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
    for ids, sp, match in [
        ([5] * 300, SamplingParams(max_tokens=1), "exceeds the context length 256"),
        ([5] * 10, SamplingParams(max_tokens=250), "max_tokens \\(250\\) exceeds"),
        ([], SamplingParams(), "prompt is empty"),
        ([5], SamplingParams(logit_bias={10**6: 1.0}), r"logit_bias: token id 1000000 is out of range.*vocabulary size is 262"),
        ([5], SamplingParams(stop=["x"]), "stop strings need a tokenizer"),
    ]:
        with pytest.raises(UserError, match=match):
            engine.add_request("bad", ids, sp)
    assert list(engine.seqs) == ["good"]
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    assert results["good"][-1].finish_reason


def test_priority_orders_admission(tiny) -> None:
    """With one running slot, a lower priority value is admitted first; equal priorities keep arrival order."""
    engine = _engine(tiny, max_num_seqs=1)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for request_id, priority in (("a", 0), ("b", 0), ("urgent", -1), ("late", 1)):
        engine.add_request(request_id, [5, 6, 7], sp, Admission(priority=priority))
    order = []
    while engine.has_unfinished():
        order += [out.request_id for out in engine.step() if out.finish_reason]
    assert order == ["urgent", "a", "b", "late"]


@pytest.mark.parametrize("kv_cache_dtype,stored,atol", [("bfloat16", np.uint16, 0.05), ("int8", np.int8, 0.03)])
def test_compact_kv_cache_tracks_the_model_and_stays_batch_invariant(tiny, kv_cache_dtype, stored, atol) -> None:
    """A bfloat16 cache (stored as bits, half the bytes) and an int8 one (codes with a scale per token
    and KV head; fp8 shares its code path: tests/test_kv_quantization.py) hold log-probs within their
    rounding of the float model, and a seeded request samples the same tokens alone and in a batch."""
    cfg, params = tiny
    rng = random.Random(5)
    prompt = _prompt(rng, 70, cfg.vocab_size)
    sp = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    engine = _engine(tiny, max_num_batched_tokens=64, kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.cache.k.dtype == stored
    assert (engine.runner.cache.k_scale is None) == (kv_cache_dtype == "bfloat16")
    result = engine.run({"r": (prompt, sp)})["r"]
    logits = reference_logits(params, cfg, prompt)
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    got = [lp for lp, _ in result.prompt_logprobs]
    want = [logprobs[pos, prompt[pos + 1]] for pos in range(len(prompt) - 1)]
    print(f"{kv_cache_dtype} cache: max |prompt log-prob error| {max(abs(g - w) for g, w in zip(got, want)):.4f}")
    np.testing.assert_allclose(got, want, atol=atol)
    # The rounding is real: a float32 cache agrees within 1e-4 (test_logprobs_and_prompt_logprobs_match_the_model).
    assert max(abs(g - w) for g, w in zip(got, want)) > 1e-3
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    alone = engine.run({"s": (prompt[:20], sampled)})["s"].outputs[0].token_ids
    others = {f"o{i}": (_prompt(rng, rng.randint(5, 90), cfg.vocab_size), SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i in range(5)}
    assert engine.run({"s": (prompt[:20], sampled), **others})["s"].outputs[0].token_ids == alone
