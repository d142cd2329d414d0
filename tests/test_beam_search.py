"""Beam search on a tiny random model against a brute-force search that scores every prefix from
scratch over the whole vocabulary; beams fork pages copy-on-write without changing a shape."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_PAGES, prefill_logits, tiny_config, tiny_params

EOS = 2


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_position_embeddings=256)
    return cfg, tiny_params(cfg, seed=3)


def _engine(tiny) -> LLMEngine:
    cfg, params = tiny
    # 4-token pages: beams fork mid-page all the time, so partial pages are copied.
    return LLMEngine(cfg, params, SMALL_PAGES, eos_token_ids=(EOS,))


def brute_force(tiny, prompt: list[int], width: int, max_tokens: int, stops: set[int], length_penalty: float = 1.0) -> list[tuple]:
    """The documented rule (jaxserve/engine/beam.py) with every prefix's distribution computed from
    scratch over the whole vocabulary: the `width` best (tokens, finish reason) by score."""
    cfg, params = tiny
    live = [((), 0.0)]
    finished = []
    while live:
        ranked = []
        for b, (tokens, cum) in enumerate(live):
            logits = prefill_logits(cfg, params, prompt + list(tokens))[-1].astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits)
            order = np.argsort(-logp, kind="stable")
            ranked += [(cum + logp[t], b, k, int(t)) for k, t in enumerate(order)]
        ranked.sort(key=lambda c: (-c[0], c[1], c[2]))
        nxt = []
        for rank, (cum, b, _, token) in enumerate(ranked):
            tokens = live[b][0]
            n = len(tokens) + 1
            if token in stops:
                if rank < width:
                    finished.append((tokens, "stop", cum / n**length_penalty))
                continue
            if n == max_tokens:
                if rank < width:
                    finished.append(((*tokens, token), "length", cum / n**length_penalty))
                continue
            nxt.append(((*tokens, token), cum))
            if len(nxt) == width:
                break
        live = nxt
    order = sorted(range(len(finished)), key=lambda i: (-finished[i][2], i))
    return [finished[i][:2] for i in order[:width]]


def test_beam_search_equals_a_brute_force_search_and_greedy_is_one_beam(tiny) -> None:
    engine = _engine(tiny)
    engine.warmup(progress=False)
    compiled = engine.runner.num_compiles
    prompts = {"a": [5, 17, 99, 3, 250], "b": [7, 8, 9, 10, 11, 12, 13], "c": [40]}
    greedy = {name: out.outputs[0].token_ids for name, out in engine.run({n: (p, SamplingParams(max_tokens=8, temperature=0.0)) for n, p in prompts.items()}).items()}
    # Each request also stops at the third token of its greedy path: some beams end with "stop" early.
    requests = {
        name: (prompt, SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=8, stop_token_ids=[greedy[name][2]]))
        for (name, prompt), width in zip(prompts.items(), (3, 2, 3))
    }
    requests["one"] = (prompts["b"], SamplingParams(n=1, use_beam_search=True, temperature=0.0, max_tokens=8))
    requests["greedy"] = (prompts["b"], SamplingParams(max_tokens=8, temperature=0.0))  # beside the beams, same batch
    results = engine.run(requests)
    for name in prompts:
        prompt, sp = requests[name]
        expected = brute_force(tiny, prompt, sp.n, sp.max_tokens, {EOS, *sp.stop_token_ids})
        got = [(tuple(o.token_ids), o.finish_reason) for o in results[name].outputs]
        assert got == expected, name
    assert any(o.finish_reason == "stop" for name in prompts for o in results[name].outputs)
    assert results["one"].outputs[0].token_ids == greedy["b"] == results["greedy"].outputs[0].token_ids
    assert engine.runner.num_compiles == compiled  # forks copy pages with the warmed-up program: no new shapes
    engine.blocks.check_consistency()
    assert engine.blocks.usage == 0.0


def test_beam_outputs_carry_log_probs_and_usage_counts(tiny) -> None:
    engine = _engine(tiny)
    out = engine.run({"x": ([5, 6, 7], SamplingParams(n=3, use_beam_search=True, max_tokens=6, temperature=0.0, length_penalty=0.5))})["x"]
    for sample in out.outputs:
        assert len(sample.logprobs) == len(sample.token_ids) and all(lp <= 0 for lp in sample.logprobs)
    scores = [sum(o.logprobs) / len(o.token_ids) ** 0.5 for o in out.outputs]  # no stop token here: all run to max_tokens
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.7), ("top_p", 0.9), ("top_k", 5), ("presence_penalty", 0.5), ("logit_bias", {3: 1.0}), ("stop", ("x",)), ("n", 11)],
)
def test_sampling_fields_that_contradict_beam_search_are_refused(field: str, value) -> None:
    with pytest.raises(UserError) as e:
        SamplingParams(use_beam_search=True, **{"temperature": 0.0, field: value})
    assert e.value.param == field
