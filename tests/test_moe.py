"""Mixture-of-experts dispatch (`jaxserve.models.moe`): grouped = dense = a NumPy loop over each token's
experts; a token's bits do not depend on the rows beside it; expert parallelism over 2 and 4 fake CPU
devices (conftest asks XLA for 8) computes what one device does."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.config import EngineConfig, ModelConfig, ParallelConfig
from jaxserve.errors import UserError
from jaxserve.models import moe
from jaxserve.models.llama import init_params, layer_at
from jaxserve.parallel.mesh import MODEL, make_mesh
from jaxserve.parallel.sharding import check_tensor_parallel, param_shardings
from tests.tiny_models import tiny_config


def moe_config(experts: int = 8, k: int = 2, norm: bool = True, **kw) -> ModelConfig:
    return tiny_config("qwen3_moe", qk_norm="head", num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=32,
                       norm_topk_prob=norm, max_position_embeddings=256, **kw)


def layer(cfg: ModelConfig, seed: int = 0) -> dict:
    return layer_at(init_params(cfg, jax.random.key(seed))["layers"], 0)


def mlp(cfg: ModelConfig, dispatch: str):
    """moe_mlp(x, lp) under jit with `dispatch` traced in."""
    def run(x, lp):
        old, moe.DISPATCH = moe.DISPATCH, dispatch
        try:
            return moe.moe_mlp(x, lp, cfg, jax.nn.silu)
        finally:
            moe.DISPATCH = old

    return jax.jit(run)


def reference(x: np.ndarray, lp: dict, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each token through its own top-k experts, in float64; and those experts [N, K]."""
    lp = {k: np.asarray(v, np.float64) for k, v in lp.items()}
    logits = x @ lp["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    tops = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
    for n, top in enumerate(tops):
        w = probs[n, top] / (probs[n, top].sum() if cfg.norm_topk_prob else 1)
        for e, we in zip(top, w):
            g, u = x[n] @ lp["we_gate"][e], x[n] @ lp["we_up"][e]
            out[n] += we * ((g / (1 + np.exp(-g)) * u) @ lp["we_down"][e])
    return out, tops


@pytest.mark.parametrize(("experts", "k", "norm"), [(8, 2, True), (16, 4, False), (64, 8, True)])
def test_grouped_and_dense_dispatch_compute_each_tokens_experts(experts: int, k: int, norm: bool) -> None:
    """70 tokens (past a 32-row block): the router picks the NumPy loop's top-k, both dispatches give its
    numbers, and each other's bits (the same per-row products, mixed over k in the same order)."""
    cfg = moe_config(experts, k, norm)
    lp = layer(cfg)
    x = jax.random.normal(jax.random.key(1), (70, cfg.hidden_size))
    expected, tops = reference(np.asarray(x, np.float64), lp, cfg)
    np.testing.assert_array_equal(np.asarray(moe.route(x, lp["router"], cfg)[0]), tops)
    grouped, dense = (np.asarray(mlp(cfg, d)(x, lp)) for d in ("grouped", "dense"))
    np.testing.assert_allclose(grouped, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grouped, dense)


def test_a_tokens_bits_do_not_depend_on_its_batch() -> None:
    """64 experts, top-8: every token alone, and among 2 to 300 rows, has the same bits. (The router's
    softmax over 64 experts differed from 64 rows on, when XLA:CPU gave its max and exp to YNNPACK.)"""
    cfg = moe_config(64, 8)
    lp = layer(cfg)
    x = jax.random.normal(jax.random.key(2), (300, cfg.hidden_size))
    run = mlp(cfg, "grouped")
    alone = np.stack([np.asarray(run(x[i : i + 1], lp))[0] for i in range(0, 300, 7)])
    for rows in (2, 33, 64, 300):
        np.testing.assert_array_equal(np.asarray(run(x[:rows], lp))[::7], alone[: -(-rows // 7)], err_msg=f"{rows} rows")


def test_forward_rows_have_their_own_bits_beside_others() -> None:
    """Six prompts in one [6, 32] prefill through the paged cache (192 rows reach each MoE block) give
    every position the logits it has when its prompt runs alone."""
    from jaxserve.cache.kv_cache import KVCache
    from jaxserve.models.llama import ForwardBatch, compute_logits, forward
    from tests.tiny_models import prefill_logits

    cfg = moe_config(16, 4)
    params = init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (32, 1, 7, 20, 31, 13)]
    tokens = np.zeros((6, 32), np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, : len(ids)] = ids
    table = np.arange(1, 13, dtype=np.int32).reshape(6, 2)  # two 16-token pages a row
    batch = ForwardBatch(tokens, np.broadcast_to(np.arange(32, dtype=np.int32), (6, 32)), table, np.asarray([len(p) for p in prompts], np.int32))
    step = jax.jit(lambda params, cache, batch: compute_logits(params, forward(params, cache, (batch,), cfg)[0][0], cfg))
    together = np.asarray(step(params, KVCache.create(cfg, 13, 16, jnp.float32), batch))
    for b, ids in enumerate(prompts):
        np.testing.assert_array_equal(together[b, : len(ids)], prefill_logits(cfg, params, ids, pad_to=32), err_msg=f"prompt {b}")


@pytest.mark.parametrize("devices", [2, 4])
def test_expert_parallel_moe_block_is_one_devices_to_the_bit(devices: int) -> None:
    """Each device holds 8 / devices whole experts and computes their assignments; one all-reduce (no
    gathered weights) sums one non-zero term per slot: one device's bits, at any row count."""
    cfg = moe_config(8, 2, num_layers=1)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (70, cfg.hidden_size))
    one = mlp(cfg, "grouped")
    ep_cfg = dataclasses.replace(cfg, expert_parallel_size=devices)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=devices))
    shardings = param_shardings(params, mesh, ep_cfg)
    sharded = jax.device_put(params, shardings)
    gate = sharded["layers"]["we_gate"]
    assert gate.sharding.spec == P(None, MODEL, None, None) and gate.sharding.shard_shape(gate.shape)[1] == 8 // devices
    assert sharded["layers"]["router"].sharding.is_fully_replicated
    replicated = NamedSharding(mesh, P())
    ep = jax.jit(lambda p, x: moe.moe_mlp(x, layer_at(p["layers"], 0), ep_cfg, jax.nn.silu), in_shardings=(shardings, replicated),
                 out_shardings=replicated)
    for rows in (1, 5, 70):
        np.testing.assert_array_equal(np.asarray(ep(sharded, x[:rows])), np.asarray(one(x[:rows], layer_at(params["layers"], 0))))
    hlo = ep.lower(sharded, x).compile().as_text()
    assert hlo.count("all-reduce(") == 1 and "all-gather" not in hlo


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, top-2) as a jaxserve checkpoint."""
    from jaxserve.checkpoint.loader import read_source
    from jaxserve.checkpoint.native import save_checkpoint
    from tests.tiny_models import tiny_params, write_hf_folder

    tmp = tmp_path_factory.mktemp("moe")
    tokenizer = read_source(write_hf_folder(tmp / "hf", tiny_config(), tiny_params(tiny_config())))[2]
    cfg = moe_config(8, 2)
    save_checkpoint(tmp / "moe", cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(6))), tokenizer)
    return str(tmp / "moe")


def _greedy(model, devices: int, steps: int = 6) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after a 10-token prompt, and each step's last-token logits [steps, V]: the prompt
    and the tokens so far re-run as one [1, 32] prefill row (one compiled program)."""
    from jaxserve.engine.runner import ModelRunner, StepShapes
    from jaxserve.models.llama import ForwardBatch

    engine = EngineConfig(max_num_seqs=1, max_num_batched_tokens=32, prefill_row_len=32, num_pages=4, max_model_len=32)
    shapes = StepShapes.from_config(engine, 32)
    runner = ModelRunner(model.cfg, model.params, engine.num_pages, engine.page_size, shapes, make_mesh(ParallelConfig(tensor_parallel_size=devices)))
    ids, logits = [5, 17, 99, 3, 250, 42, 7, 64, 128, 200], []
    table = np.asarray([[1, 2]], np.int32)
    for _ in range(steps):
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(ids)] = ids
        runner.forward([ForwardBatch(tokens, np.arange(32, dtype=np.int32)[None], table, np.asarray([len(ids)], np.int32))])
        logits.append(np.asarray(runner.logits)[0])
        ids.append(int(logits[-1].argmax()))
    return ids[10:], np.stack(logits)


@pytest.fixture(scope="module")
def one_device(checkpoint) -> tuple[list[int], np.ndarray]:
    from jaxserve.checkpoint.loader import load_model

    return _greedy(load_model(checkpoint, unroll_layers=False), 1)


@pytest.mark.parametrize(("devices", "expert_parallel"), [(2, True), (4, True), (2, False)])
def test_expert_and_tensor_parallel_models_generate_one_devices_tokens(checkpoint, one_device, devices: int, expert_parallel: bool) -> None:
    """load_model(expert_parallel=True) splits whole experts over the devices (the MoE blocks compute
    one device's bits; attention splits over heads as without experts, and its all-reduce sums in
    another order, so logits agree to float tolerance), without it each expert's FFN: one device's
    greedy tokens either way."""
    from jaxserve.checkpoint.loader import load_model

    expected_ids, expected_logits = one_device
    model = load_model(checkpoint, tensor_parallel_size=devices, expert_parallel=expert_parallel)
    assert model.cfg.expert_parallel_size == (devices if expert_parallel else 1)
    ids, logits = _greedy(model, devices)
    assert ids == expected_ids
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_expert_parallel_flag_and_its_errors() -> None:
    """`serve` and `generate` take --enable-expert-parallel. Experts that do not split evenly, or (tensor
    parallelism) an expert FFN that does not, are clear errors; whole experts need no FFN split."""
    from jaxserve.cli import build_parser

    commands = build_parser()[1]
    for name, required in (("serve", []), ("generate", ["--prompt", "hi"])):
        assert commands[name].parse_args([*required, "--enable-expert-parallel"]).enable_expert_parallel
        assert not commands[name].parse_args(required).enable_expert_parallel
    with pytest.raises(UserError, match="expert parallelism over tensor_parallel_size 4 devices must split the model's 6 experts evenly"):
        check_tensor_parallel(moe_config(6, 2), 4, expert_parallel=True)
    with pytest.raises(UserError, match="divide its expert FFN size 30"):
        check_tensor_parallel(dataclasses.replace(moe_config(6, 2), moe_intermediate_size=30), 4)
    check_tensor_parallel(dataclasses.replace(moe_config(8, 2), moe_intermediate_size=30), 4, expert_parallel=True)
