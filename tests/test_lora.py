"""Batched multi-LoRA on tiny models: PEFT adapters in device slots, mixed with the base model in one step."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve.checkpoint.loader import load_model
from jaxserve.checkpoint.peft import read_peft, save_peft
from jaxserve.config import EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.errors import UserError
from jaxserve.models.lora import target_dims
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params, write_gguf

LORA_ENGINE = dataclasses.replace(TINY_ENGINE, max_loras=4, max_lora_rank=8)


def random_adapter(folder: Path, cfg, seed: int, rank: int = 4, modules: tuple[str, ...] | None = None) -> Path:
    """A PEFT adapter with random A and B, large enough to change greedy outputs."""
    rng = np.random.default_rng(seed)
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
    weights = {t: (rng.normal(0, 0.3, (cfg.num_layers, i, rank)).astype(np.float32), rng.normal(0, 0.3, (cfg.num_layers, rank, o)).astype(np.float32))
               for t, (i, o) in target_dims(cfg).items() if modules is None or names[t] in modules}
    save_peft(folder, weights, rank, alpha=2 * rank, dropout=0.0, base_model="tiny")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config()
    folder = tmp_path_factory.mktemp("lora")
    path = write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg, seed=3))
    adapters = [random_adapter(folder / f"a{i}", cfg, seed=i) for i in range(5)]
    return str(path), cfg, adapters


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    path, _, adapters = tiny
    llm = LLM(path, LORA_ENGINE)
    for i, folder in enumerate(adapters[:4]):
        llm.load_adapter(f"a{i}", str(folder))
    return llm


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def test_adapter_equals_its_weights_merged_into_the_model(tiny, llm) -> None:
    path, cfg, adapters = tiny
    adapter = read_peft(adapters[1], "a1", cfg.num_layers)
    model = load_model(path, unroll_layers=False)
    layers = dict(model.params["layers"])
    for target, (a, b) in adapter.weights.items():
        layers[target] = layers[target] + np.einsum("lir,lro->lio", a, b)
    merged = LLM(dataclasses.replace(model, params={**model.params, "layers": layers}), TINY_ENGINE)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for prompt in _prompts(4, seed=1):
        with_adapter = llm.generate([prompt], sp, use_tqdm=False, adapter="a1")[0].outputs[0]
        reference = merged.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        base = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        assert with_adapter.token_ids == reference.token_ids
        np.testing.assert_allclose(with_adapter.logprobs, reference.logprobs, atol=1e-4)
        assert with_adapter.token_ids != base.token_ids  # the adapter changes the output


def test_mixed_batch_equals_each_adapter_alone(tiny, llm) -> None:
    """16 requests over 4 adapters and the base model in shared steps: each gets what it gets alone
    (the same tokens; log-probs to rounding, as the tiny base model's own batched rows)."""
    prompts = _prompts(16, seed=2)
    names = [None, "a0", "a1", "a2", "a3"] * 4
    names = names[:16]
    rng = random.Random(5)
    params = [SamplingParams(max_tokens=rng.randint(4, 16), temperature=0.0, ignore_eos=True) for _ in prompts]
    batched = llm.generate(prompts, params, use_tqdm=False, adapter=names)
    for prompt, sp, name, out in zip(prompts, params, names, batched):
        alone = llm.generate([prompt], sp, use_tqdm=False, adapter=name)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids, name
        np.testing.assert_allclose(out.outputs[0].logprobs, alone.logprobs, atol=1e-5)
    assert len({tuple(o.outputs[0].token_ids) for o in batched[:5]}) == 5  # five different models


@pytest.fixture(scope="module")
def warm(tiny) -> LLM:
    """A warmed-up engine with two adapter slots and few step shapes (warm-up compiles them all)."""
    path, _, _ = tiny
    llm = LLM(path, EngineConfig(num_pages=64, max_num_seqs=2, max_num_batched_tokens=32, prefill_row_len=32, max_model_len=256,
                                 max_loras=2, max_lora_rank=8))
    llm.warmup(progress=False)
    return llm


def test_more_adapters_than_slots_take_turns(tiny, warm) -> None:
    """Five adapters over two slots: a request whose adapter finds no slot waits for one, and every
    request gets what it gets alone; moving adapters in and out of slots compiles nothing."""
    _, _, adapters = tiny
    for i, folder in enumerate(adapters):
        warm.load_adapter(f"t{i}", str(folder))
    compiles = warm.engine.stats().compiles
    prompts = _prompts(10, seed=3)
    names = [f"t{i % 5}" for i in range(10)]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    batched = warm.generate(prompts, sp, use_tqdm=False, adapter=names)
    alone = [warm.generate([p], sp, use_tqdm=False, adapter=n)[0] for p, n in zip(prompts, names)]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
    assert warm.engine.stats().compiles == compiles
    for i in range(5):
        warm.engine.unload_adapter(f"t{i}")


def test_loading_an_adapter_at_runtime_compiles_nothing(tiny, warm) -> None:
    _, _, adapters = tiny
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    warm.load_adapter("first", str(adapters[0]))
    warm.generate(_prompts(2, seed=4), sp, use_tqdm=False, adapter="first")
    compiles = warm.engine.stats().compiles
    warm.engine.unload_adapter("first")
    warm.load_adapter("fresh", str(adapters[4]))
    out = warm.generate(_prompts(2, seed=5), sp, use_tqdm=False, adapter=["fresh", None])
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    assert warm.engine.stats().compiles == compiles


def test_bad_adapters_are_refused_with_the_reason(tiny, tmp_path) -> None:
    path, cfg, adapters = tiny
    llm = LLM(path, dataclasses.replace(LORA_ENGINE, max_lora_rank=2))
    with pytest.raises(UserError, match="rank 4, over --max-lora-rank 2"):
        llm.load_adapter("big", str(adapters[0]))
    other = random_adapter(tmp_path / "other", tiny_config(hidden_size=32, num_heads=2, num_kv_heads=1), seed=1, rank=2)
    with pytest.raises(UserError, match="another base model"):
        llm.load_adapter("other", str(other))
    with pytest.raises(UserError, match="not found"):
        llm.load_adapter("missing", str(tmp_path / "nowhere"))
    corrupt = random_adapter(tmp_path / "corrupt", cfg, seed=2, rank=2)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        llm.load_adapter("corrupt", str(corrupt))
    dora = random_adapter(tmp_path / "dora", cfg, seed=3, rank=2)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        llm.load_adapter("dora", str(dora))
    with pytest.raises(UserError, match="no LoRA adapter 'nope'"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False, adapter="nope")
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids  # still serving


def test_prefix_cache_never_shares_blocks_across_adapters(tiny, llm) -> None:
    prompt = list(range(10, 60))  # three full pages
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    before = llm.engine.stats()
    base = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    with_adapter = llm.generate([prompt], sp, use_tqdm=False, adapter="a2")[0].outputs[0].token_ids
    again = llm.generate([prompt], sp, use_tqdm=False, adapter="a2")[0].outputs[0].token_ids
    after = llm.engine.stats()
    assert with_adapter == again != base
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3  # only the adapter's second request hit


@pytest.mark.parametrize("tp", [2, 4])
def test_adapters_split_with_tensor_parallelism(tiny, llm, tp: int) -> None:
    """The slot tables split like their weights (TP 4 copies the tiny model's 2 KV heads, and each
    adapter's K/V columns with them); every adapter's tokens are one device's."""
    from jaxserve.config import ParallelConfig
    from jaxserve.parallel.mesh import MODEL, make_mesh

    path, _, adapters = tiny
    model = load_model(path, tensor_parallel_size=tp)
    split = LLM(model, dataclasses.replace(LORA_ENGINE, max_num_seqs=4), mesh=make_mesh(ParallelConfig(tensor_parallel_size=tp)))
    for i in range(2):
        split.load_adapter(f"a{i}", str(adapters[i]))
    tables = split.engine.runner.lora
    assert tables["wq"]["b"].sharding.spec[-1] == MODEL and tables["wo"]["a"].sharding.spec[-3] == MODEL
    prompts, names = _prompts(3, seed=6), [None, "a0", "a1"]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for got, want in zip(split.generate(prompts, sp, use_tqdm=False, adapter=names), llm.generate(prompts, sp, use_tqdm=False, adapter=names)):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        np.testing.assert_allclose(got.outputs[0].logprobs, want.outputs[0].logprobs, atol=1e-4)


def test_a_request_for_another_adapter_gets_a_slot_without_preempting_or_starving() -> None:
    """One slot held by adapter A's requests: a more urgent request for adapter C preempts nothing (it
    could not use a slot A still holds), later A requests wait behind it, and it runs as soon as A's
    running requests finish."""
    from jaxserve.cache.block_manager import BlockManager
    from jaxserve.engine.scheduler import Scheduler
    from jaxserve.engine.sequence import Sequence, Status
    from jaxserve.models.lora import LoraAdapter

    a, c = LoraAdapter("A", 1, {}), LoraAdapter("C", 1, {})
    scheduler = Scheduler(EngineConfig(max_num_seqs=2, num_pages=32, max_loras=1), BlockManager(32))
    sp = SamplingParams(max_tokens=100)
    running = [Sequence(f"a{i}", [1, 2, 3], sp, i, priority=1, adapter=a) for i in range(2)]
    for seq in running:
        scheduler.add(seq)
    scheduler.schedule()
    urgent = Sequence("c", [1, 2, 3], sp, 2, priority=0, adapter=c)
    later = Sequence("a-later", [1, 2, 3], sp, 3, priority=1, adapter=a)
    scheduler.add(urgent)
    scheduler.add(later)
    for _ in range(5):
        scheduled = {chunk.seq.request_id for chunk in scheduler.schedule()}
        assert scheduled == {"a0", "a1"} and scheduler.num_preemptions == 0
    scheduler.finish(running[0], "stop")
    assert {chunk.seq.request_id for chunk in scheduler.schedule()} == {"a1"}  # a-later waits behind c
    scheduler.finish(running[1], "stop")
    assert {chunk.seq.request_id for chunk in scheduler.schedule()} == {"c"}
    assert urgent.status is Status.RUNNING and later.status is Status.WAITING


def test_a_request_keeps_its_adapter_when_it_is_unloaded_before_it_starts(tiny, warm) -> None:
    """The adapter is resolved once, when the request is checked: unloading it before the engine
    queues the request changes nothing about its output."""
    from jaxserve.engine.interface import Admission

    _, _, adapters = tiny
    warm.load_adapter("keep", str(adapters[1]))
    prompt, sp = _prompts(1, seed=7)[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = warm.generate([prompt], sp, use_tqdm=False, adapter="keep")[0].outputs[0].token_ids
    adapter = warm.engine.adapter("keep")
    warm.engine.unload_adapter("keep")
    warm.engine.enqueue("late", prompt, sp, Admission(adapter="keep"), adapter)
    tokens = []
    while warm.engine.has_unfinished():
        tokens += [out.token_id for out in warm.engine.step() if out.token_id is not None]
    assert tokens == expected
    with pytest.raises(UserError, match="no LoRA adapter 'keep'"):
        warm.engine.adapter("keep")
