"""Draft heads trained by `jaxserve train-draft`: training on the tiny model beats chance, serving with
them changes no output (offline, through the server, greedy and seeded) and adds no program after
warm-up, and heads that cannot serve are refused with an error naming the field."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import openai
import pytest

from jaxserve.checkpoint.loader import load_draft, load_model
from jaxserve.config import SpeculativeConfig, TrainDraftConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.models.draft_heads import advance, draft_logits, draft_table
from jaxserve.ops.sampling import SamplingArrays
from jaxserve.sampling_params import SamplingParams
from jaxserve.training.draft_trainer import train_draft
from tests.server_process import InProcessServer
from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params, write_gguf

TRAIN = TrainDraftConfig(num_heads=3, num_prompts=24, samples_per_prompt=2, max_tokens=40, steps=240, batch_size=64, eval_every=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """The tiny model (written as GGUF, with its chat template) and heads trained for it."""
    folder = tmp_path_factory.mktemp("heads")
    cfg = tiny_config("llama", max_position_embeddings=2048)
    model = load_model(str(write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg))), unroll_layers=False)
    report = train_draft(model, folder / "heads", TRAIN, TINY_ENGINE)
    return model, folder / "heads", report


def _spec(heads: Path, k: int = 3) -> SpeculativeConfig:
    return SpeculativeConfig.from_json(json.dumps({"method": "medusa", "model": str(heads), "num_speculative_tokens": k, "disable_by_batch_size": 16, "tune_k": False}))


def test_training_beats_chance_and_learns(trained) -> None:
    _, heads, report = trained
    first, last = report["history"][0], report["history"][-1]
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    assert report["answers"] == TRAIN.num_prompts * TRAIN.samples_per_prompt and report["training_positions"] > 500
    assert last["positions"] > 20 and last["head_top1"][0] > 10 * last["chance_top1"]  # far above 1 / draft vocabulary
    assert last["mean_accepted_length"] > 0.3 and last["loss"] < first["loss"]
    saved = json.loads((heads / "heads.json").read_text())
    assert saved["config"]["num_heads"] == TRAIN.num_heads and saved["training"]["final_loss"] == report["final_loss"]


def _requests(count: int) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(3)
    return {
        str(i): ([int(t) for t in rng.integers(3, 200, rng.integers(4, 30))],
                 SamplingParams(max_tokens=int(rng.integers(10, 60)), temperature=0.0 if i % 2 else 0.8, top_p=0.95, seed=i,
                                logprobs=2 if i % 3 == 0 else None, ignore_eos=True, stop_token_ids=[7] if i % 5 == 0 else []))
        for i in range(count)
    }


def _outputs(engine: LLMEngine, requests: dict) -> dict:
    return {rid: [(s.token_ids, s.logprobs, s.top_logprobs, s.finish_reason) for s in out.outputs] for rid, out in engine.run(requests).items()}


def test_heads_change_no_output_offline_or_served(trained) -> None:
    """Alone and 12 at a time, greedy and seeded: the same tokens, log-probs and finish reasons as
    without speculation; drafts are accepted; nothing compiles after warm-up; and a server with the
    heads answers the official client exactly as the offline engine does."""
    model, heads, _ = trained
    requests = _requests(12)
    plain = _outputs(LLMEngine(model.cfg, model.params, TINY_ENGINE, eos_token_ids=(2,)), requests)
    engine_cfg = dataclasses.replace(TINY_ENGINE, speculative=_spec(heads))
    engine = LLMEngine(model.cfg, model.params, engine_cfg, eos_token_ids=(2,), draft=load_draft(model, engine_cfg.speculative))
    engine.speculator.draft.warmup(progress=False)  # the heads' programs (the model's are warmed as without heads)
    assert engine.speculator.draft.num_compiles == len(engine.speculator.draft.sizes) == 4  # 1, 2, 4, 8 drafting sequences
    assert _outputs(engine, requests) == plain
    assert {rid: _outputs(engine, {rid: r})[rid] for rid, r in list(requests.items())[:4]} == {rid: plain[rid] for rid in list(requests)[:4]}
    c = engine.speculator.snapshot()
    print(c)
    assert engine.speculator.draft.num_compiles == 4
    assert c.num_drafts > 10 and 0 < c.num_accepted_tokens < c.num_draft_tokens
    assert engine.blocks.usage == 0.0

    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in (plain[str(i)][0][0] for i in range(6))]
    with InProcessServer(model, engine_cfg) as server:
        async def ask(client, i: int) -> str:
            prompt, sp = requests[str(i)]
            r = await client.completions.create(model=model.name, prompt=prompt, max_tokens=sp.max_tokens, temperature=sp.temperature,
                                                top_p=sp.top_p, seed=sp.seed, extra_body={"ignore_eos": True, "stop_token_ids": list(sp.stop_token_ids)})
            return r.choices[0].text

        async def everyone() -> list[str]:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
                return await asyncio.gather(*(ask(client, i) for i in range(6)))

        assert asyncio.run(everyone()) == texts


def test_served_drafts_follow_the_float_heads(trained) -> None:
    """The serving proposer (int8 draft-vocabulary head, drafts picked over the draft ids) drafts
    what the heads as trained (float head, chained greedily) draft, but for near-ties; sampled rows
    draft ids of the draft vocabulary too."""
    model, heads_dir, _ = trained
    heads = load_draft(model, _spec(heads_dir))
    rows = 64
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(rows, model.cfg.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(3, model.cfg.vocab_size, rows), jnp.int32)
    vocab = jnp.asarray(heads.vocab)
    table = draft_table(model.params, vocab)  # [D, N] float
    state, token, expected = hidden, tokens, []
    for i in range(heads.config.num_heads):
        state = advance(heads.params, i, state, model.params["embed"][token])
        token = vocab[jnp.argmax(draft_logits(state, model.params["final_norm"], table, heads.config.rms_norm_eps), axis=-1)]
        expected.append(token)
    expected = np.stack(expected, axis=1)  # [rows, K]
    engine_cfg = dataclasses.replace(TINY_ENGINE, speculative=_spec(heads_dir))
    engine = LLMEngine(model.cfg, model.params, engine_cfg, eos_token_ids=(2,), draft=heads)
    proposer = engine.speculator.draft
    index = np.arange(rows, dtype=np.int32)
    drafted = proposer.draft(hidden, index, np.asarray(tokens), SamplingArrays.greedy(rows, model.cfg.vocab_size), index)
    print("first draft agrees", (drafted[:, 0] == expected[:, 0]).mean(), "all", (drafted == expected).mean())
    assert (drafted[:, 0] == expected[:, 0]).mean() > 0.9 and (drafted == expected).mean() > 0.8
    sampled = SamplingArrays.greedy(rows, model.cfg.vocab_size)
    sampled.temperature[:], sampled.top_p[:], sampled.seed[:] = 0.8, 0.95, np.arange(rows)
    drawn = proposer.draft(hidden, index, np.asarray(tokens), sampled, index)
    assert np.isin(drawn, heads.vocab).all() and (drawn != drafted).any()


def test_heads_that_cannot_serve_are_refused(trained, tmp_path) -> None:
    """A missing folder, a broken file, heads of another model, more tokens than heads: a UserError
    naming the field, at start-up."""
    model, heads, _ = trained
    other_cfg = tiny_config("llama", max_position_embeddings=2048)
    other = dataclasses.replace(model, params=load_model(str(write_gguf(tmp_path / "other.gguf", other_cfg, tiny_params(other_cfg, seed=5))),
                                                          unroll_layers=False).params)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "heads.json").write_text("{not json")
    for spec, target, message in (
        (_spec(tmp_path / "missing"), model, "holds no draft heads"),
        (_spec(broken), model, "broken draft heads"),
        (_spec(heads), other, "trained for another model"),
    ):
        with pytest.raises(UserError, match=f"speculative_config.model: .*{message}"):
            load_draft(target, spec)
    too_many = _spec(heads, k=4)
    with pytest.raises(UserError, match="speculative_config.num_speculative_tokens: 4 exceeds the 3 draft heads"):
        LLMEngine(model.cfg, model.params, dataclasses.replace(TINY_ENGINE, speculative=too_many), draft=load_draft(model, too_many))


def test_cli_refuses_bad_heads_and_bad_prompts(tmp_path) -> None:
    """One line on stderr, exit 2: a medusa config without heads, a prompts file that is not JSONL,
    a bad training flag."""
    cfg = tiny_config("llama")
    tiny = str(write_gguf(tmp_path / "tiny.gguf", cfg, tiny_params(cfg)))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": 3}\n')
    for args, message in (
        (["generate", "--model", tiny, "--prompt", "x", "--speculative-config", '{"method": "medusa", "model": "' + str(tmp_path / "none") + '"}'], "holds no draft heads"),
        (["train-draft", tiny, "--out", str(tmp_path / "o"), "--prompts", str(bad)], "line 2 needs"),
        (["train-draft", tiny, "--out", str(tmp_path / "o"), "--steps", "0"], "--steps must be an integer >= 1"),
    ):
        run = subprocess.run([sys.executable, "-m", "jaxserve.cli", *args], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("jaxserve:")]  # beside progress bars
        assert len(errors) == 1 and message in errors[0], run.stderr
