"""SmolLM2 greedy continuations equal Hugging Face transformers' (golden file from scripts/make_golden.py).

A divergence is tolerated only exactly at a step where the reference's top-1/top-2 logit margin is
below 0.01 (float32 summation order can flip such near-ties); the comparison stops there. Any other
divergence fails.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.engine.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.server_process import SERVER_ENGINE
from tests.tiny_models import prefill_logits

NEAR_TIE = 0.01


def _prompt_ids(model, case: dict) -> list[int]:
    tok = model.tokenizer
    return tok.encode(case["prompt"]) if case["kind"] == "raw" else tok.encode_chat(case["messages"])


def test_prompts_tokenize_like_reference(smollm2, golden) -> None:
    assert len(golden["cases"]) >= 6
    for case in golden["cases"]:
        assert _prompt_ids(smollm2, case) == case["prompt_ids"], case.get("prompt") or case["messages"]


def test_greedy_continuations_match_reference(smollm2, golden) -> None:
    """All cases in one batch, on the test servers' engine limits (their compiled steps): rows do not
    depend on the batch, so each is its own greedy continuation (the CLI's unrolled layout is held to
    this stacked one by `test_unrolled_layout_equals_stacked`)."""
    llm = LLM(smollm2, SERVER_ENGINE)
    sp = SamplingParams(max_tokens=golden["new_tokens"], temperature=0.0, ignore_eos=True)
    outs = llm.generate([case["prompt_ids"] for case in golden["cases"]], sp, use_tqdm=False)
    tolerated = []
    for n, (case, out) in enumerate(zip(golden["cases"], outs)):
        ours = out.outputs[0].token_ids
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


def test_unrolled_layout_equals_stacked(smollm2, smollm2_unrolled, golden) -> None:
    """The layout the CLI serves on one CPU device (per-layer buffers, fused q/k/v and gate/up) gives
    the stacked layout's logits at every position of the longest reference prompt, up to float32
    summation order, and the reference's top 5 after it."""
    case = max(golden["cases"], key=lambda c: len(c["prompt_ids"]))
    stacked = prefill_logits(smollm2.cfg, smollm2.params, case["prompt_ids"])
    unrolled = prefill_logits(smollm2_unrolled.cfg, smollm2_unrolled.params, case["prompt_ids"])
    assert isinstance(smollm2_unrolled.params["layers"], tuple) and "wqkv" in smollm2_unrolled.params["layers"][0]
    np.testing.assert_allclose(unrolled, stacked, rtol=0, atol=1e-3)  # bit-equal on an AVX2 EPYC; kernels may differ elsewhere
    assert (unrolled.argmax(-1) == stacked.argmax(-1)).all()
    logprobs = np.asarray(jax.nn.log_softmax(unrolled[-1]))
    assert np.argsort(-logprobs)[:5].tolist() == case["first_top5_ids"]
