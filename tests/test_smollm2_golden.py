"""SmolLM2 greedy continuations equal Hugging Face transformers' (golden file from scripts/make_golden.py).

A divergence is tolerated only exactly at a step where the reference's top-1/top-2 logit margin is
below 0.01 (float32 summation order can flip such near-ties); the comparison stops there. Any other
divergence fails.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import prefill_logits

NEAR_TIE = 0.01


def _prompt_ids(model, case: dict) -> list[int]:
    tok = model.tokenizer
    return tok.encode(case["prompt"]) if case["kind"] == "raw" else tok.encode_chat(case["messages"])


def test_prompts_tokenize_like_reference(smollm2, golden) -> None:
    assert len(golden["cases"]) >= 6
    for case in golden["cases"]:
        assert _prompt_ids(smollm2, case) == case["prompt_ids"], case.get("prompt") or case["messages"]


def test_greedy_continuations_match_reference(smollm2_unrolled, golden) -> None:
    llm = LLM(smollm2_unrolled, EngineConfig(max_num_seqs=1, num_pages=33, max_model_len=512))
    tolerated = []
    for n, case in enumerate(golden["cases"]):
        sp = SamplingParams(max_tokens=golden["new_tokens"], temperature=0.0, ignore_eos=True)
        ours = llm.generate([case["prompt_ids"]], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert len(ours) == golden["new_tokens"]
        for step, (a, b) in enumerate(zip(ours, case["output_ids"])):
            if a != b:
                margin = case["margins"][step]
                assert margin < NEAR_TIE, f"case {n}: diverged at step {step} (margin {margin:.4f}): {ours} vs {case['output_ids']}"
                tolerated.append((n, step, margin))
                break
    print(f"near-tie divergences tolerated (case, step, margin): {tolerated}")
    # Near-ties are rare: most cases must match in full.
    assert len(tolerated) <= 2, tolerated


def test_first_token_top5_logprobs_match_reference(smollm2, golden) -> None:
    for case in golden["cases"]:
        logits = prefill_logits(smollm2.cfg, smollm2.params, case["prompt_ids"])[-1]
        logprobs = np.asarray(jax.nn.log_softmax(logits))
        top5 = np.argsort(-logprobs)[:5]
        assert top5.tolist() == case["first_top5_ids"]
        np.testing.assert_allclose(logprobs[top5], case["first_top5_logprobs"], atol=1e-3, rtol=0)
