"""Tensor parallelism on fake CPU devices (conftest asks XLA for 8): same numbers as one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.checkpoint.loader import load_model
from jaxserve.config import EngineConfig, ParallelConfig
from jaxserve.engine.runner import ModelRunner, StepShapes
from jaxserve.errors import UserError
from jaxserve.models.llama import ForwardBatch
from jaxserve.parallel.mesh import MODEL, make_mesh
from jaxserve.models.quantize import quantize_model
from jaxserve.parallel.sharding import check_int4_split, check_tensor_parallel, replicate_kv_heads
from tests.tiny_models import tiny_config, tiny_params

ENGINE = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, prefill_row_len=32, num_pages=16, max_model_len=128)


def _run(cfg, params, tp: int, ids: list[int], cache_dtype=None) -> tuple[np.ndarray, np.ndarray, ModelRunner]:
    """Last-token logits [1, V] and prefill hidden states [T, D] of one prompt on a 1 x tp mesh."""
    params, cfg = replicate_kv_heads(params, cfg, tp)
    shapes = StepShapes.from_config(ENGINE, 128)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp))
    runner = ModelRunner(cfg, params, ENGINE.num_pages, ENGINE.page_size, shapes, mesh, cache_dtype)
    t = shapes.row_len
    table = np.zeros((1, shapes.table_width), np.int32)
    table[0, :2] = [1, 2]
    tokens = np.zeros((1, t), np.int32)
    tokens[0, : len(ids)] = ids
    batch = ForwardBatch(tokens, np.arange(t, dtype=np.int32)[None], table, np.asarray([len(ids)], np.int32))
    runner.forward([batch])
    return np.asarray(runner.logits), np.asarray(runner._prefill)[: len(ids)], runner


@pytest.mark.parametrize(("tp", "vocab"), [(2, 262), (4, 262), (8, 512)])
def test_tensor_parallel_matches_one_device(tp: int, vocab: int) -> None:
    """8 query / 2 KV heads: TP 4 and 8 copy KV heads; vocab 262 does not split 4 ways (replicated)."""
    cfg = tiny_config(num_heads=8, num_kv_heads=2, head_dim=8, vocab_size=vocab)
    params = tiny_params(cfg)
    ids = [5, 17, 99, 3, 250, 42, 7, 64, 128, 200]
    ref_logits, ref_hidden, _ = _run(cfg, params, 1, ids)
    logits, hidden, runner = _run(cfg, params, tp, ids)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    assert runner.cache.k.sharding.shard_shape(runner.cache.k.shape)[0] == max(cfg.num_kv_heads, tp) // tp
    assert runner.params["layers"]["wq"].sharding.spec[-1] == MODEL


def test_an_int8_cache_splits_its_scales_with_its_kv_heads() -> None:
    """Each device holds the codes and the scales of its own KV heads, and the numbers stay those of
    one device (a code may land on the other side of a rounding edge: hence the tolerance)."""
    cfg = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, vocab_size=262)
    params = tiny_params(cfg)
    ids = [5, 17, 99, 3, 250, 42, 7, 64, 128, 200]
    ref_logits, _, _ = _run(cfg, params, 1, ids, np.int8)
    logits, _, runner = _run(cfg, params, 4, ids, np.int8)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    for x in (runner.cache.k, runner.cache.k_scale, runner.cache.v_scale):
        assert x.sharding.shard_shape(x.shape)[0] == 1


def test_int4_weights_split_with_their_groups() -> None:
    """Codes, scales and offsets split together: a row-split weight's devices each get whole groups,
    KV heads copied for TP 4 are copied in all three, and the numbers stay those of one device. A
    split inside a group is refused."""
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2, head_dim=16, vocab_size=262)
    ids = [5, 17, 99, 3, 250, 42, 7, 64, 128, 200]
    params = quantize_model(tiny_params(cfg), cfg, ids, "int4", 32)
    ref_logits, _, _ = _run(cfg, params, 1, ids)
    logits, _, runner = _run(cfg, params, 4, ids)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    down = runner.params["layers"]["w_down"]  # [L, 256 / 2, 128] codes, [L, 8, 128] scales: rows split 4 ways
    assert down.packed.sharding.shard_shape(down.packed.shape)[1] == 32 and down.scale.sharding.shard_shape(down.scale.shape)[1] == 2
    with pytest.raises(UserError, match="tensor_parallel_size 8 would split wo's 128 input rows inside int4 groups of 32"):
        check_int4_split(params, 8)


def _bytes_on(tree, device) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_per_device_parameter_bytes_scale_as_one_over_tp() -> None:
    cfg = tiny_config(hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=8, head_dim=32, vocab_size=1024)
    params = tiny_params(cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    rows = []
    for tp in (1, 2, 4, 8):
        runner = _run(cfg, params, tp, [1, 2, 3])[2]
        per_device = _bytes_on(runner.params, runner.mesh.devices.flat[0])
        rows.append((tp, per_device, per_device / total))
        assert per_device == pytest.approx(total / tp, rel=0.02)  # only the norms are replicated
    print("\n".join(f"TP={tp}: {b / 2**20:.2f} MiB per device ({f:.3f} of {total / 2**20:.2f} MiB)" for tp, b, f in rows))


def test_tensor_parallel_size_must_split_heads() -> None:
    smollm2_like = tiny_config(num_heads=9, num_kv_heads=3, head_dim=8, intermediate_size=96)
    with pytest.raises(UserError, match="9 query heads.*3 KV heads"):
        check_tensor_parallel(smollm2_like, 2)
    with pytest.raises(UserError, match="4 query heads"):
        check_tensor_parallel(tiny_config(), 8)
    check_tensor_parallel(smollm2_like, 3)
    check_tensor_parallel(tiny_config(num_heads=8, num_kv_heads=2), 8)  # KV heads copied 4 times


def test_smollm2_with_tp2_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="tensor_parallel_size 2 must divide the model's 9 query heads.*3 KV heads"):
        load_model("smollm2-135m-instruct", tensor_parallel_size=2)


def test_mesh_larger_than_the_devices_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="needs 16 devices; 8 available"):
        make_mesh(ParallelConfig(tensor_parallel_size=8, data_parallel_size=2))
    with pytest.raises(UserError, match="tensor_parallel_size must be >= 1"):
        ParallelConfig(tensor_parallel_size=0)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "List three primes:", "Water boils at", "import numpy as np"]


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "3"], ["--tensor-parallel-size", "3", "--data-parallel-size", "2"]])
def test_smollm2_served_tensor_and_data_parallel_equals_one_device(layout, smollm2, tmp_path) -> None:
    """Greedy SmolLM2 (9 query / 3 KV heads) split over 3 fake devices, and two such replicas on 6,
    through the real server and the official client: the single-device offline outputs."""
    import concurrent.futures

    import openai

    from jaxserve.engine.llm import LLM
    from jaxserve.sampling_params import SamplingParams
    from tests.server_process import SERVER_ENGINE, ServerProcess, get

    limits = ["--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--num-pages", "128", "--max-model-len", "512"]
    server = ServerProcess([*limits, *layout, "--no-warmup"], tmp_path / "log.txt")
    try:
        server.wait()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: both replicas get work
            answers = list(pool.map(lambda p: client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=16, temperature=0), PROMPTS))
        engines = [line for line in get(server.url + "/metrics")[1].splitlines() if line.startswith("jaxserve:num_compiles{")]
    finally:
        assert server.stop() == 0
    offline = LLM(smollm2, SERVER_ENGINE)  # the test servers' compiled steps
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
    assert [a.choices[0].text for a in answers] == [e.outputs[0].text for e in expected]
    replicas = int(layout[-1]) if "--data-parallel-size" in layout else 1
    assert len(engines) == replicas and all(float(line.split()[-1]) > 0 for line in engines), engines  # every replica compiled and ran steps
