"""Speculative decoding changes nothing but speed: with n-gram drafts the outputs (tokens, log-probs,
finish reasons) equal those without, greedy and seeded, beside other requests, through penalties,
min_tokens, stop tokens, n > 1, aborts and preemption, with no step shape beyond the warmed-up ones."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import numpy as np
import openai
import pytest

from jaxserve.config import SpeculativeConfig
from jaxserve.engine.llm import LLM
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.speculation import ngram_draft
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.server_process import SERVER_ARGS, SERVER_ENGINE, SERVER_KEY, InProcessServer, ServerProcess, get
from tests.tiny_models import SMALL_PAGES, TINY_ENGINE, run_with_aborts, tiny_config, tiny_params, write_gguf

# Drafts in crowded steps too, and k fixed (not tuned by step times), so the counters tests assert on are the same on every machine.
NGRAM = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=16, tune_k=False)


@pytest.mark.parametrize(
    "text,field",
    [
        ('{"method": "eagle3"}', "speculative_config.method"),
        ('{"num_speculative_tokens": 0}', "speculative_config.num_speculative_tokens"),
        ('{"num_speculative_tokens": 17}', "speculative_config.num_speculative_tokens"),
        ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "speculative_config.prompt_lookup_min"),
        ('{"num_speculative_tokens": 3, "lookahead": 1}', "speculative_config.lookahead"),
        ('{"method": "ngram", "model": "/models/draft"}', "speculative_config.model"),
        ('{"method": "draft_model"}', "speculative_config.model"),
        ('{"disable_by_batch_size": 0}', "speculative_config.disable_by_batch_size"),
        ('{"method": "eagle", "model": "/heads"}', "speculative_config.method"),
        ('{"method": "medusa"}', "speculative_config.model"),
        ("[3]", "speculative_config must be a JSON object"),
        ("{method: ngram}", "speculative_config is not valid JSON"),
    ],
)
def test_bad_speculative_configs_name_the_field(text: str, field: str) -> None:
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        SpeculativeConfig.from_json(text)


def test_vllm_configs_carry_over() -> None:
    cfg = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 2, 4)
    draft = SpeculativeConfig.from_json('{"model": "/models/draft", "num_speculative_tokens": 3}')
    assert (draft.method, draft.model, draft.num_speculative_tokens) == ("draft_model", "/models/draft", 3)


def test_ngram_draft_continues_the_latest_longest_match() -> None:
    tokens = np.array([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3])
    assert ngram_draft(tokens, 3, 1, 3) == [4, 5, 9]  # "1 2 3" occurred once before
    assert ngram_draft(tokens, 3, 1, 2) == [7, 1, 2]  # only "2 3" looked up: its latest earlier occurrence
    assert ngram_draft(tokens, 8, 3, 3) == [4, 5, 9, 2, 3, 7, 1, 2]  # as many as follow, up to k
    assert ngram_draft(np.array([5, 6, 7]), 2, 1, 3) == []  # nothing repeats
    assert ngram_draft(np.array([4, 4, 4]), 4, 1, 2) == [4]  # overlapping occurrences; never past the end


def _requests(cfg, count: int, seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """Repetitive prompts (so drafts come up and are sometimes right) with every per-token feature."""
    rng = random.Random(seed)
    requests = {}
    for i in range(count):
        motif = [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(2, 10))]
        sp = SamplingParams(
            max_tokens=rng.randint(6, 40),
            temperature=rng.choice([0.0, 0.0, 0.8, 1.0]),
            top_p=rng.choice([1.0, 0.9]),
            seed=i,
            n=rng.choice([1, 1, 2]),
            logprobs=rng.choice([None, 3]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.5]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
            min_tokens=rng.choice([0, 0, 5]),
            stop_token_ids=rng.choice([[], [motif[0]]]),
            ignore_eos=rng.random() < 0.5,
        )
        requests[str(i)] = (motif * rng.randint(1, 6), sp)
    return requests


def _outputs(engine: LLMEngine, requests: dict) -> dict:
    return {
        rid: [(s.token_ids, s.logprobs, s.top_logprobs, s.finish_reason, s.stop_token_id) for s in out.outputs]
        for rid, out in engine.run(requests).items()
    }


def test_tiny_outputs_equal_without_speculation_and_drafts_are_accepted() -> None:
    """A crowd of 24 requests with every feature (few spare rows), then two long greedy requests and
    a seeded one, which fall into loops that the lookup predicts (all paths of the verify)."""
    cfg = tiny_config("llama", max_position_embeddings=2048)
    params = tiny_params(cfg)
    crowd = _requests(cfg, 24, seed=0)
    rng = random.Random(1)
    loops = {
        str(i): ([rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(2, 10))] * 3,
                 SamplingParams(max_tokens=100, temperature=0.0 if i < 2 else 0.7, seed=i, logprobs=2, ignore_eos=True))
        for i in range(3)
    }
    plain_engine = LLMEngine(cfg, params, TINY_ENGINE, eos_token_ids=(2,))
    plain = [_outputs(plain_engine, requests) for requests in (crowd, loops)]
    engine = LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, speculative=NGRAM), eos_token_ids=(2,))
    assert engine.shapes == plain_engine.shapes  # drafts ride in spare decode rows
    assert [_outputs(engine, requests) for requests in (crowd, loops)] == plain
    c = engine.speculator.snapshot()
    print(c)
    assert c.num_drafts > 20 and 0 < c.num_accepted_tokens < c.num_draft_tokens  # both paths ran
    assert sum(c.acceptance_lengths) == c.num_drafts and c.acceptance_lengths[0] > 0 and sum(c.acceptance_lengths[2:]) > 0
    assert c.accepted_per_position == sorted(c.accepted_per_position, reverse=True) and c.accepted_per_position[1] > 0
    assert engine.blocks.usage == 0.0
    engine.blocks.check_consistency()


def test_no_drafts_in_steps_with_more_decoding_sequences_than_disable_by_batch_size() -> None:
    """Six looping requests decoding side by side draft nothing with disable_by_batch_size 5 (the
    default for 8 sequences is 4); the same requests one at a time draft, and outputs never change."""
    cfg = tiny_config("llama", max_position_embeddings=512)
    params = tiny_params(cfg)
    rng = random.Random(5)
    loops = {str(i): ([rng.randrange(3, cfg.vocab_size) for _ in range(4)] * 4, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
             for i in range(6)}
    plain = _outputs(LLMEngine(cfg, params, TINY_ENGINE), loops)
    engine = LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, speculative=dataclasses.replace(NGRAM, disable_by_batch_size=5)))
    assert _outputs(engine, loops) == plain and engine.speculator.snapshot().num_drafts == 0
    assert {rid: _outputs(engine, {rid: loops[rid]})[rid] for rid in loops} == plain and engine.speculator.snapshot().num_drafts > 0


DRAFT = SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=4, disable_by_batch_size=16, tune_k=False)


def _first_layer(cfg, params) -> tuple:
    """A draft made of the model's first layer (and its embedding and head): often right, not always."""
    return dataclasses.replace(cfg, num_layers=1), {**params, "layers": {k: v[:1] for k, v in params["layers"].items()}}


def test_target_as_its_own_draft_accepts_every_token_and_a_random_draft_changes_nothing() -> None:
    """A draft model samples each draft as the target would at its position (seed, filters): the target
    as its own draft has every draft accepted, greedy and seeded. A random one-layer draft with the
    same vocabulary is almost never right; outputs stay those without speculation in both cases,
    beside a crowd of requests with every feature (penalties: the draft does not apply them)."""
    cfg = tiny_config("llama", max_position_embeddings=2048)
    params = tiny_params(cfg)
    rng = random.Random(3)
    clean = {
        str(i): ([rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(3, 40))],
                 SamplingParams(max_tokens=40, temperature=0.0 if i % 2 else 0.9, top_p=1.0 if i % 3 else 0.9, seed=i, logprobs=2, ignore_eos=True))
        for i in range(6)
    }
    solo = {"solo": clean["0"]}  # alone, it drafts 3 at every step (4 rows: a decode bucket)
    crowd = _requests(cfg, 8, seed=4)
    plain_engine = LLMEngine(cfg, params, TINY_ENGINE, eos_token_ids=(2,))
    plain = [_outputs(plain_engine, requests) for requests in (clean, solo, crowd)]
    own = LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, speculative=DRAFT), eos_token_ids=(2,), draft=(cfg, params))
    assert [_outputs(own, requests) for requests in (clean, solo)] == plain[:2]
    c = own.speculator.snapshot()
    assert c.num_drafts > 20 and c.num_accepted_tokens == c.num_draft_tokens and sum(c.acceptance_lengths[3:]) >= 5  # 1 + 3 rows fill a bucket
    assert _outputs(own, crowd) == plain[2]
    small = tiny_config("llama", max_position_embeddings=2048, num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    other = LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, speculative=DRAFT), eos_token_ids=(2,), draft=(small, tiny_params(small, seed=9)))
    assert [_outputs(other, requests) for requests in (clean, solo, crowd)] == plain
    c = other.speculator.snapshot()
    assert c.num_draft_tokens > 20 and c.num_accepted_tokens < 0.2 * c.num_draft_tokens
    for engine in (own, other):
        assert engine.blocks.usage == 0.0
        engine.blocks.check_consistency()


def test_server_with_a_draft_model_answers_as_the_offline_engine_without(tmp_path) -> None:
    """A server whose draft model is the tiny model's first layer answers 12 concurrent requests
    (greedy and seeded, streamed and whole, with log-probs) with the texts and log-probs of the
    offline engine without speculation, and /metrics counts the drafts."""
    from jaxserve.checkpoint.loader import load_model

    cfg = tiny_config("llama", max_position_embeddings=512)
    params = tiny_params(cfg)
    draft_cfg, draft_params = _first_layer(cfg, params)
    model = load_model(str(write_gguf(tmp_path / "model.gguf", cfg, params)), unroll_layers=False)  # the draft follows
    draft_path = write_gguf(tmp_path / "draft.gguf", draft_cfg, {**draft_params, "layers": {k: np.asarray(v) for k, v in draft_params["layers"].items()}})
    prompts = [f"the theme {'the ' * i}" for i in range(12)]
    sampling = [SamplingParams(max_tokens=30, temperature=0.0 if i % 2 else 0.8, seed=i, logprobs=1, ignore_eos=True) for i in range(12)]
    expected = [o.outputs[0] for o in LLM(model, TINY_ENGINE).generate(prompts, sampling, use_tqdm=False)]

    async def ask(client, i: int) -> tuple[str, list[float]]:
        kw = dict(model=model.name, prompt=prompts[i], max_tokens=30, temperature=sampling[i].temperature, seed=i, logprobs=1,
                  extra_body={"ignore_eos": True})
        if i % 4 < 2:
            r = await client.completions.create(**kw)
            return r.choices[0].text, r.choices[0].logprobs.token_logprobs
        text, logprobs = "", []
        async for chunk in await client.completions.create(**kw, stream=True):
            text += chunk.choices[0].text
            logprobs += chunk.choices[0].logprobs.token_logprobs if chunk.choices[0].logprobs else []
        return text, logprobs

    spec = SpeculativeConfig.from_json(json.dumps({"model": str(draft_path), "num_speculative_tokens": 3, "tune_k": False}))
    with InProcessServer(model, dataclasses.replace(TINY_ENGINE, speculative=spec)) as server:
        async def everyone() -> list:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
                return await asyncio.gather(*(ask(client, i) for i in range(12)))

        answers = asyncio.run(everyone())
        metrics = get(server.url + "/metrics")[1]
    assert [text for text, _ in answers] == [e.text for e in expected]
    for (_, logprobs), e in zip(answers, expected):
        np.testing.assert_allclose(logprobs, e.logprobs, rtol=0, atol=1e-5)
    accepted = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("jaxserve:spec_decode_num_accepted_tokens_total"))
    assert accepted > 0


def test_draft_models_that_cannot_serve_are_refused(tmp_path) -> None:
    """Another vocabulary, another tokenizer of the same size, or a missing path: one error naming
    speculative_config.model; a draft with tensor parallelism is refused too."""
    from jaxserve.checkpoint.loader import LoadedModel, load_draft
    from jaxserve.parallel.mesh import make_mesh
    from jaxserve.config import ParallelConfig
    from tests.tiny_models import write_gguf

    cfg = tiny_config("llama")
    target = LoadedModel("t", cfg, tiny_params(cfg), None)
    bigger = tiny_config("llama", vocab_size=cfg.vocab_size + 8)
    write_gguf(tmp_path / "bigger.gguf", bigger, tiny_params(bigger))
    for spec, message in (
        (str(tmp_path / "bigger.gguf"), f"the draft's vocabulary has {cfg.vocab_size + 8} tokens and the model's {cfg.vocab_size}"),
        (str(tmp_path / "missing"), "model path not found"),
    ):
        with pytest.raises(UserError, match=f"speculative_config.model: .*{message}"):
            load_draft(target, dataclasses.replace(DRAFT, model=spec))
    with pytest.raises(UserError, match="speculative_config.model: draft_model drafts run on one device"):
        LLMEngine(cfg, target.params, dataclasses.replace(TINY_ENGINE, speculative=DRAFT), mesh=make_mesh(ParallelConfig(tensor_parallel_size=2)),
                  draft=(cfg, target.params))


@pytest.mark.parametrize("proposer,count", [("ngram", 300), ("draft_model", 40)])
def test_stress_with_speculation_aborts_preemption_and_a_shared_prefix(proposer: str, count: int) -> None:
    """300 requests (40 with a draft model, whose steps are several) on a small cache (preemptions:
    recomputed with n-gram drafts, swapped to host memory with the draft model, whose own cache is
    swapped alongside), half sharing a prefix, random aborts: after warm-up no compile (the draft
    model's programs included), every page ends free, and each finished request equals its run
    without speculation. The draft model is the target with one layer dropped."""
    cfg = tiny_config("llama", max_position_embeddings=256)
    params = tiny_params(cfg)
    spec, draft = (NGRAM, None) if proposer == "ngram" else (DRAFT, _first_layer(cfg, params))
    swap = {} if proposer == "ngram" else {"swap_space": 0.01, "preemption_mode": "swap"}
    engine = LLMEngine(cfg, params, dataclasses.replace(SMALL_PAGES, speculative=spec, **swap), eos_token_ids=(2,), draft=draft)
    engine.warmup(progress=False)
    compiled = engine.stats().compiles
    rng = random.Random(7)
    shared = [rng.randrange(3, cfg.vocab_size) for _ in range(24)] * 2
    requests = {rid: ((shared if int(rid) % 2 else []) + prompt[:40], dataclasses.replace(sp, n=1, max_tokens=min(sp.max_tokens, 30)))
                for rid, (prompt, sp) in _requests(cfg, count, seed=1).items()}
    results, aborted = run_with_aborts(engine, requests, rng)
    assert engine.stats().compiles == compiled
    assert engine.blocks.usage == 0.0 and engine.blocks.num_free == SMALL_PAGES.num_pages - 1
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.prefix_hits > 0 and len(aborted) > count // 30
    assert engine.speculator.snapshot().num_accepted_tokens > 0
    assert proposer == "ngram" or (engine.stats().swap.swap_outs > 0 and engine.swapper.pool.usage == 0.0)
    engine.blocks.check_consistency()
    done = {rid: requests[rid] for rid in requests if rid not in aborted}
    plain = LLMEngine(cfg, params, SMALL_PAGES, eos_token_ids=(2,)).run(done)
    for rid in done:
        assert [t for t in results[rid] if t is not None] == plain[rid].outputs[0].token_ids, rid


PASSAGE = (
    "The lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper climbed the spiral "
    "stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships far out at sea saw the beam "
    "sweep across the water and knew where the rocks were."
)
TASKS = [
    f"Repeat this passage word for word:\n\n{PASSAGE}",
    f"Correct any spelling mistakes in this passage and return it whole:\n\n{PASSAGE.replace('cliff', 'clif')}",
    f"Rewrite this passage in the present tense:\n\n{PASSAGE}",
    f"Quote the sentence about ships from this passage, then explain it:\n\n{PASSAGE}",
    "Rename the variable `total` to `acc` and return the code:\n\ndef add(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n",
    "List the numbers from 1 to 30, separated by commas.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is to a child.",
    "Give three tips for staying focused while studying.",
]


def test_smollm2_outputs_equal_without_speculation(smollm2) -> None:
    """Ten tasks, 48 tokens each, greedy and seeded (temperature 0.8, top_p 0.95) in turn, in one batch
    on the test servers' limits (their programs are compiled; drafts use the rows the running
    sequences leave): token for token the same as without. (`scripts/bench_speculative.py --sections
    equality` runs 128 tokens, alone and in batches of 16.)"""
    prompts = [smollm2.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in TASKS]
    params = [SamplingParams(max_tokens=48, temperature=0.0) if i % 2 else SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, seed=i)
              for i in range(len(TASKS))]
    plain = LLM(smollm2, SERVER_ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(smollm2, dataclasses.replace(SERVER_ENGINE, speculative=NGRAM))
    drafted = llm.generate(prompts, params, use_tqdm=False)
    for p, a, b in zip(prompts, plain, drafted):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, smollm2.tokenizer.decode(p)
    c = llm.engine.speculator.snapshot()
    print(c)
    assert c.num_accepted_tokens > 50


def test_server_with_speculation_streams_what_the_plain_server_does(smollm2_server, tmp_path) -> None:
    """The served model with --speculative-config answers 16 concurrent requests (greedy and seeded,
    streamed and whole, with log-probs) exactly as the shared plain server does, several tokens per
    chunk at times, and /metrics counts the drafts. A bad config stops the server at start (exit 2)."""

    async def ask(url: str, i: int) -> tuple:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=SERVER_KEY, max_retries=0) as c:
            kw = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": TASKS[i % 10]}], max_tokens=32,
                      temperature=0.0 if i % 2 else 0.8, top_p=1.0 if i % 2 else 0.95, seed=i, logprobs=True, top_logprobs=2)
            if i % 4 < 2:
                r = await c.chat.completions.create(**kw)
                return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content], r.choices[0].finish_reason
            text, logprobs, finish = "", [], None
            async for chunk in await c.chat.completions.create(**kw, stream=True):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    logprobs += [t.logprob for t in (choice.logprobs.content if choice.logprobs else None) or []]
                    finish = choice.finish_reason or finish
            return text, logprobs, finish

    async def all_of(url: str) -> list:
        return await asyncio.gather(*(ask(url, i) for i in range(16)))

    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "disable_by_batch_size": 16, "tune_k": false}'
    # No warm-up: this server compiles only the shapes these requests use (the warm-up set is held elsewhere).
    with ServerProcess([*SERVER_ARGS, "--speculative-config", spec, "--no-warmup"], tmp_path / "log.txt") as server:
        drafted = asyncio.run(all_of(server.url))
        metrics = get(server.url + "/metrics", SERVER_KEY)[1]
    plain = asyncio.run(all_of(smollm2_server.url))
    assert [(text, finish) for text, _, finish in drafted] == [(text, finish) for text, _, finish in plain]
    # Float log-probs match to the last bits only within steps of at most 32 token rows (XLA:CPU's
    # matmul switches kernels above), and two servers mix prefill chunks into different steps.
    for (_, a, _), (_, b, _) in zip(drafted, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    counts = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("jaxserve:spec_decode_num")}
    assert counts["jaxserve:spec_decode_num_drafts_total"] > 0 and counts["jaxserve:spec_decode_num_accepted_tokens_total"] > 0
    bad = ServerProcess(["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 99})], tmp_path / "bad.txt")
    assert bad.proc.wait(timeout=120) == 2
    assert "speculative_config.num_speculative_tokens must be an integer in [1, 16]" in (tmp_path / "bad.txt").read_text()


def test_k_is_planned_from_step_times_and_acceptance() -> None:
    """`Speculator.plan`: of the k that fill a bucket, untimed buckets are tried first (smallest k
    first); then the k with the most expected tokens per second, so cheap verify rows (a GPU) get
    every draft, a CPU whose 4-row step costs 1.6 plain steps gets one draft while acceptance is
    middling, and all of them once drafts are nearly always accepted; a long run of no drafts
    retries one."""
    from jaxserve.engine.speculation import SpecState, Speculator

    sizes = (1, 2, 4, 8)
    spec = Speculator(dataclasses.replace(NGRAM, tune_k=True, num_speculative_tokens=3))
    assert [spec.plan(1, 1, sizes) for _ in range(2)] == [0, 0]  # nothing timed: k = 0 (bucket 1) first
    spec.observe(1, 0.010)
    assert spec.plan(1, 1, sizes) == 1  # then bucket 2
    spec.observe(2, 0.010)
    assert spec.plan(1, 1, sizes) == 3  # then bucket 4, which 1 + 3 rows fill
    for rows, seconds in ((4, 0.016), (8, 0.030)):
        spec.observe(rows, seconds)
    state = SpecState()
    for _ in range(20):  # the first draft kept 60% of the time, the second 20%, the third never
        for accepted in (0, 0, 1, 1, 2):
            spec.record(state, 3, accepted)
    assert spec.plan(1, 1, sizes) == 1  # 1.6 tokens per 10 ms beat 1.8 per 16 ms
    spec.step_seconds[4] = 0.0105  # a GPU: 4 rows cost what 1 does
    assert spec.plan(1, 1, sizes) == 3
    spec.step_seconds[4] = 0.016
    for _ in range(200):
        spec.record(state, 3, 3)
    assert spec.plan(1, 1, sizes) == 3  # nearly every draft kept: 3.3 tokens per 16 ms beat 1.9 per 10 ms
    assert spec.plan(6, 2, sizes) == 1  # 6 rows + 2 x 1 draft fill the 8-row bucket
    slow = Speculator(dataclasses.replace(NGRAM, tune_k=True, num_speculative_tokens=2))
    slow.step_seconds.update({1: 0.010, 2: 0.030, 4: 0.050})  # drafts never pay
    assert [slow.plan(1, 1, sizes) for _ in range(18)] == [0] * 16 + [1, 0]


def test_tuned_k_keeps_outputs_and_times_each_bucket() -> None:
    """With `tune_k` on (the default), the outputs are still those without speculation, and the
    decode buckets of 0 and 1 drafts have been timed."""
    cfg = tiny_config("llama", max_position_embeddings=2048)
    params = tiny_params(cfg)
    rng = random.Random(4)
    loops = {str(i): ([rng.randrange(3, cfg.vocab_size) for _ in range(5)] * 3, SamplingParams(max_tokens=60, temperature=0.0 if i else 0.8, seed=i, ignore_eos=True))
             for i in range(2)}
    plain = _outputs(LLMEngine(cfg, params, TINY_ENGINE, eos_token_ids=(2,)), loops)
    engine = LLMEngine(cfg, params, dataclasses.replace(TINY_ENGINE, speculative=dataclasses.replace(NGRAM, tune_k=True)), eos_token_ids=(2,))
    assert {rid: _outputs(engine, {rid: r})[rid] for rid, r in loops.items()} == plain
    assert set(engine.speculator.step_seconds) >= {1, 2} and engine.speculator.counters.num_accepted_tokens > 0
