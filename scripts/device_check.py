"""Accelerator check: one command that says whether the GPU/TPU path works and how fast it decodes.

Prints a JSON report on stdout (progress bars go to stderr) and writes it to --out; exits 1 when any
check fails. The report: `backend`, `devices`, `checks` (each `name`, `ok`, `seconds` and detail),
`decode` (each `layout`, `batch`, `step_ms`, `tokens_per_s`, `roofline_ms`, `roofline_ratio`) and `ok`. Checks:

- pallas_decode_matches_reference: the decode kernel (`decode_attention`: Pallas, Triton on GPU,
  interpreted elsewhere) against the reference `paged_attention`, in float32, bfloat16, and int8 and
  fp8 (where the device has it) caches with per-token scales; in full
  mode also over a cache of more than 2**31 elements, read near its end (offsets past 32 bits);
- golden_smollm2: greedy SmolLM2 in float32 (matmul precision "highest": no TF32) against the
  Hugging Face golden tokens, diverging only at near-ties (as tests/test_smollm2_golden.py);
- batched_equals_one_at_a_time: greedy outputs of a batching engine against an engine that runs one
  request at a time, in the serving dtype (a divergence is allowed only at a near-tie);
- no_recompiles_after_warmup: the batching engine's compile counter after warm-up and all requests;
- tensor_parallel_matches_one_device: a tiny model's prefill and decode logits on a 1 x 2 mesh
  against one device, and the sharded decode step's collectives (skipped with one device);
- decode_benchmark: ok when the benchmark below ran; its memory and bandwidth figures.

Then a decode benchmark of a random Llama-3-8B-shaped model (32 layers, hidden 4096, FFN 14336,
32 q / 8 KV heads, head_dim 128, vocab 128256) in bfloat16, created on the device, at batch 1, 8,
32 and 128 with --context tokens of KV cache per row, in both weight layouts (stacked layers under
`scan`, and one buffer per layer with fused q/k/v and gate/up): step time, tokens/s and the ratio of the HBM
roofline (weights read + KV read per step, over the copy bandwidth measured in the same run) to the
measured step (1.0 = at the roofline). Batches whose KV cache does not fit are listed as skipped.

    python scripts/device_check.py                    # on a GPU/TPU: about 5 minutes
    python scripts/device_check.py --smoke            # anywhere (CI, on CPU): tiny shapes, 1-2 minutes
    python scripts/device_check.py --context 2048 --out bench_results/device_check.json

The full mode refuses to run on CPU (exit 2): its shapes are for accelerators. --smoke runs every
check and the benchmark with small shapes (3 golden cases; a tiny random model instead of SmolLM2
for the engine checks and instead of the 8B shape; batches 1 and 4), so the script does not rot.
Compiled programs are cached in $JAXSERVE_CACHE/jax_cache, so a rerun starts faster.
"""

from __future__ import annotations

import os

# Two host devices for the tensor-parallel check on CPU; accelerators are unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxserve.cache.kv_cache import KVCache, storage_dtype, supported_kv_dtypes  # noqa: E402
from jaxserve.checkpoint.loader import default_dtype, load_model  # noqa: E402
from jaxserve.checkpoint.registry import cache_dir  # noqa: E402
from jaxserve.config import EngineConfig, ModelConfig, ParallelConfig  # noqa: E402
from jaxserve.engine.llm_engine import LLMEngine  # noqa: E402
from jaxserve.engine.runner import ModelRunner, StepShapes, enable_compilation_cache  # noqa: E402
from jaxserve.models.llama import ForwardBatch, Params, init_params, unstack_layers  # noqa: E402
from jaxserve.ops.attention import decode_attention, paged_attention, table_width, use_decode_kernel  # noqa: E402
from jaxserve.parallel.mesh import make_mesh  # noqa: E402
from jaxserve.parallel.report import (  # noqa: E402
    LLAMA3_8B, TINY_BENCH, bytes_read, copy_bandwidth, decode_batch, device_params, param_structs, step_collectives, time_step,
    time_swap_overlap,
)
from jaxserve.sampling_params import SamplingParams  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "smollm2_reference.json"
SMOLLM2 = "smollm2-135m-instruct"
# A greedy divergence is tolerated only where the top-1/top-2 log-prob margin is below this: summation
# order flips such near-ties. float32 as the golden test; bfloat16 rounds logits ~100x coarser.
NEAR_TIE = {"float32": 0.01, "bfloat16": 0.1}
# Kernel vs reference: max |difference| of attention outputs (values ~ N(0, 1)).
ATTENTION_ATOL = {"float32": 1e-4, "bfloat16": 3e-2, "int8": 1e-4, "fp8_e4m3": 1e-4}
PAGE_SIZE = 16

TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
)


@dataclass(frozen=True)
class Plan:
    """What one mode runs: full (accelerator shapes) or smoke (tiny shapes, for CI on CPU)."""

    engine_model: str  # "smollm2" or "tiny": the model of the batching and recompile checks
    unroll_layers: bool | None  # SmolLM2's layout: None is the serving default (unrolled on one device)
    max_num_seqs: int  # of the batching engine: sets how many step shapes warm-up compiles
    golden_cases: int | None  # None: every case
    prompts: int  # requests of the batching check
    attention: tuple[tuple[int, int, int, int], ...]  # (Hq, Hkv, Dh, pages) of each kernel case
    bench: ModelConfig
    batches: tuple[int, ...]
    copy_bytes: int  # array size of the bandwidth measurement


# Attention cases read 256 pages at the end of the cache; 600k pages of 16 x 128 for 2 KV heads put
# 2.5e9 > 2**31 elements in the cache (1.2e9 per head: the second head's pages lie past 2**31).
FULL = Plan("smollm2", None, 8, None, 16, ((32, 8, 128, 1025), (8, 2, 128, 600_000)), LLAMA3_8B, (1, 8, 32, 128), 2 << 30)
SMOKE = Plan("tiny", False, 2, 3, 6, ((4, 2, 64, 300),), TINY_BENCH, (1, 4), 64 << 20)


# ---- checks --------------------------------------------------------------------------------------


def memory_limit() -> int | None:
    """Bytes the first device can hold (None where the backend does not say, as on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def fits(nbytes: int, headroom: float = 1.0) -> bool:
    limit = memory_limit()
    return limit is None or nbytes * headroom <= limit


def run_checks(names: tuple[str, ...], fn: Callable[[], dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The named checks `fn` returns (name -> {"ok": ..., detail}); an exception fails all of them,
    with the traceback's end, instead of ending the run."""
    start = time.perf_counter()
    try:
        results = fn()
    except Exception as e:  # noqa: BLE001 - a failing check is reported, the others still run
        error = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        results = {name: error for name in names}
    seconds = round(time.perf_counter() - start, 1)
    return [{"name": name, **results[name], "seconds": seconds} for name in names]


def random_cache(key: jax.Array, hkv: int, num_pages: int, used: np.ndarray, d: int, kv_dtype: str) -> KVCache:
    """A one-layer cache [Hkv, 1, num_pages, page, D] holding `kv_dtype` (as `--kv-cache-dtype`; a
    float dtype's name for plain values), zero except random values in the `used` pages: a huge cache
    costs its zeros, not a random fill."""
    eight_bit = kv_dtype in ("int8", "fp8_e4m3")
    value_dtype = jnp.dtype(jnp.float32 if eight_bit else kv_dtype)
    cfg = ModelConfig(architecture="llama", vocab_size=1, hidden_size=d, intermediate_size=1, num_layers=1,
                      num_heads=hkv, num_kv_heads=hkv, head_dim=d)
    cache = KVCache.create(cfg, num_pages, PAGE_SIZE, storage_dtype(kv_dtype if eight_bit else "auto", value_dtype))
    page = np.repeat(used, PAGE_SIZE)  # [N]: every slot of the used pages
    offset = np.tile(np.arange(PAGE_SIZE, dtype=np.int32), len(used))
    k, v = jax.random.normal(key, (2, hkv, len(page), d), value_dtype)
    return jax.jit(lambda c: c.write(0, page, offset, k, v))(cache)


def attention_case(hq: int, hkv: int, d: int, num_pages: int, kv_dtype: str) -> dict[str, Any]:
    """Whether the kernel is finite, and its max |difference| from the reference over 7 decode rows of
    1 token to a full page table, on pages taken from the end of the cache (the largest offsets). A
    padding row (length 0) rides along unchecked: the engine discards it, and the reference leaves
    the mean of a block's values there where the kernel leaves zeros. 8-bit caches take float32
    queries; both paths read the same codes and scales."""
    width = table_width(8 * PAGE_SIZE * 4, PAGE_SIZE)  # a few kernel blocks
    lengths = np.asarray([0, 1, 15, 16, 17, 100, 333, width * PAGE_SIZE], np.int32)  # [B]
    rng = np.random.default_rng(0)
    used = num_pages - 1 - rng.permutation(len(lengths) * width).astype(np.int32)  # distinct, near the end
    table = used.reshape(len(lengths), width)  # [B, P]
    kq, kc = jax.random.split(jax.random.key(0))
    cache = random_cache(kc, hkv, num_pages, used, d, kv_dtype)
    q_dtype = jnp.dtype(jnp.float32 if kv_dtype in ("int8", "fp8_e4m3") else kv_dtype)
    q = jax.random.normal(kq, (len(lengths), 1, hq, d), q_dtype)  # [B, 1, Hq, D]
    positions = np.maximum(lengths - 1, 0)[:, None]  # [B, 1]
    kernel = jax.jit(decode_attention)(q, cache, 0, table, lengths)
    f32 = lambda x: x.astype(jnp.float32)  # the reference in float32 on the same (rounded) inputs
    reference = jax.jit(paged_attention)(f32(q), cache if cache.k_scale is not None else jax.tree.map(f32, cache), 0, table, positions, lengths)
    err = float(jnp.max(jnp.abs(f32(kernel) - reference)[1:]))  # row 0 is the padding row
    finite = bool(jnp.all(jnp.isfinite(kernel)))
    ok = finite and err <= ATTENTION_ATOL[kv_dtype]
    return {"finite": finite, "max_abs_err": err if finite else None, "ok": ok}


def check_attention(plan: Plan) -> dict[str, Any]:
    """Kernel against reference in float32 and bfloat16; matmuls at "highest" precision, so that a
    TF32 reference on GPU does not pass for a kernel error."""
    if not use_decode_kernel() and jax.default_backend() != "cpu":
        return {"ok": True, "skipped": f"the engine runs the reference attention on {jax.default_backend()}"}
    cases = []
    for hq, hkv, d, pages in plan.attention:
        if not fits(2 * hkv * pages * PAGE_SIZE * d * 4, headroom=3):
            cases.append({"shape": [hq, hkv, d, pages], "skipped": "does not fit in device memory"})
            continue
        for dtype in ("float32", "bfloat16", "int8", *(("fp8_e4m3",) if "fp8_e4m3" in supported_kv_dtypes() else ())):
            slab = pages * PAGE_SIZE * d  # elements per KV head; hkv * slab past 2**31 needs 64-bit offsets
            with jax.default_matmul_precision("highest"):
                result = attention_case(hq, hkv, d, pages, dtype)
            cases.append({"hq": hq, "hkv": hkv, "head_dim": d, "slab_elements": slab, "dtype": dtype, **result})
    return {"ok": all(c.get("ok", True) for c in cases), "cases": cases}




def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    """The first step where two greedy outputs differ (None if equal)."""
    if ours == ref:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))


def check_golden(plan: Plan) -> dict[str, Any]:
    """As tests/test_smollm2_golden.py: a divergence only at a reference near-tie, at most 2 of them."""
    golden = json.loads(GOLDEN.read_text())
    cases = golden["cases"][: plan.golden_cases]
    with jax.default_matmul_precision("highest"):
        model = load_model(SMOLLM2, dtype="float32", unroll_layers=plan.unroll_layers)
        limits = EngineConfig(max_num_seqs=1, num_pages=33, max_model_len=512)
        engine = LLMEngine(model.cfg, model.params, limits, eos_token_ids=())
        sp = SamplingParams(max_tokens=golden["new_tokens"], temperature=0.0, ignore_eos=True)
        outs = [engine.run({"golden": (c["prompt_ids"], sp)})["golden"].outputs[0].token_ids for c in cases]
    tolerated, failed = [], []
    for n, (ours, case) in enumerate(zip(outs, cases)):
        step = first_divergence(ours, case["output_ids"])
        if step is None:
            continue
        margin = case["margins"][step] if step < len(case["margins"]) else 0.0
        found = {"case": n, "step": step, "margin": round(margin, 4)}
        (tolerated if margin < NEAR_TIE["float32"] else failed).append(found)
    return {"ok": not failed and len(tolerated) <= 2, "cases": len(cases), "near_ties": tolerated, "diverged": failed}


def engine_model(plan: Plan, dtype: str) -> tuple[ModelConfig, Params]:
    if plan.engine_model == "smollm2":
        model = load_model(SMOLLM2, dtype=dtype, unroll_layers=plan.unroll_layers)
        return model.cfg, model.params
    return TINY, init_params(TINY, jax.random.key(0), jnp.dtype(dtype))


def margin(top: tuple[tuple[int, float], ...]) -> float:
    """Top-1 minus top-2 log-prob of one step."""
    return top[0][1] - top[1][1]


def check_batching(plan: Plan, dtype: str) -> dict[str, dict[str, Any]]:
    """Two checks on one batching engine: its greedy outputs equal one-at-a-time outputs, and after
    warm-up its compile counter never moves. Prompts of 1 to 150 tokens (so prefills are chunked),
    2 to 16 new tokens."""
    cfg, params = engine_model(plan, dtype)
    limits = dict(max_num_batched_tokens=64, prefill_row_len=64, num_pages=129, max_model_len=512)
    rng = random.Random(0)
    requests = {
        str(i): ([rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, 150))],
                 SamplingParams(max_tokens=rng.randint(2, 16), temperature=0.0, ignore_eos=True, logprobs=2))
        for i in range(plan.prompts)
    }
    batched = LLMEngine(cfg, params, EngineConfig(max_num_seqs=plan.max_num_seqs, **limits), eos_token_ids=())
    batched.warmup(progress=True)
    warm = batched.runner.num_compiles
    together = batched.run(requests)
    after = batched.runner.num_compiles
    recompiles = {"ok": after == warm, "after_warmup": warm, "after_requests": after}
    single = LLMEngine(cfg, params, EngineConfig(max_num_seqs=1, **limits), eos_token_ids=())
    tolerated, failed = [], []
    for rid, request in requests.items():
        a, b = together[rid].outputs[0], single.run({rid: request})[rid].outputs[0]
        step = first_divergence(a.token_ids, b.token_ids)
        if step is not None:
            m = min(margin(a.top_logprobs[step]), margin(b.top_logprobs[step]))
            (tolerated if m < NEAR_TIE[dtype] else failed).append({"request": rid, "step": step, "margin": round(m, 4)})
    equal = {"ok": not failed, "model": plan.engine_model, "dtype": dtype, "requests": len(requests),
             "near_ties": tolerated, "diverged": failed}
    return {"batched_equals_one_at_a_time": equal, "no_recompiles_after_warmup": recompiles}


def prefill_then_decode(runner: ModelRunner, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Last-token logits [1, V] of a prompt's prefill row, then of one decode row after it."""
    s = runner.shapes
    table = np.zeros((1, s.table_width), np.int32)
    pages = -(-(len(ids) + 1) // PAGE_SIZE)
    table[0, :pages] = np.arange(1, pages + 1)
    tokens = np.zeros((1, s.row_len), np.int32)
    tokens[0, : len(ids)] = ids
    positions = np.arange(s.row_len, dtype=np.int32)[None]
    runner.forward([ForwardBatch(tokens, positions, table, np.asarray([len(ids)], np.int32))])
    prefill = np.asarray(runner.logits)
    n = np.asarray([[len(ids)]], np.int32)
    runner.forward([ForwardBatch(np.asarray([[7]], np.int32), n, table, n[0] + 1)])
    return prefill, np.asarray(runner.logits)


def check_tensor_parallel() -> dict[str, Any]:
    """Prefill and decode logits on a 1 x 2 mesh equal one device's (float32, highest precision), and
    the sharded decode step communicates only as Megatron layers do: all-reduces after the row-parallel
    matmuls and the vocabulary-split embedding, one all-gather of the logits. More all-gathers mean
    something left its shard, such as a kernel the partitioner cannot split (it gathers the operands)."""
    if len(jax.devices()) < 2:
        return {"ok": True, "skipped": "one device"}
    engine = EngineConfig(max_num_seqs=1, max_num_batched_tokens=32, prefill_row_len=32, num_pages=16,
                          max_model_len=256)
    shapes = StepShapes.from_config(engine, 256)
    meshes = [make_mesh(ParallelConfig(tensor_parallel_size=tp)) for tp in (1, 2)]
    params = init_params(TINY, jax.random.key(1))
    ids = list(range(3, 23))
    with jax.default_matmul_precision("highest"):
        runners = [ModelRunner(TINY, params, engine.num_pages, PAGE_SIZE, shapes, mesh) for mesh in meshes]
        (p1, d1), (p2, d2) = (prefill_then_decode(r, ids) for r in runners)
        collectives = step_collectives(runners[1], decode_batch(runners[1], 1, 16))
    err = float(max(np.max(np.abs(p1 - p2)), np.max(np.abs(d1 - d2))))
    megatron = set(collectives) <= {"all-reduce", "all-gather"} and collectives["all-gather"] <= 1
    return {"ok": err <= 1e-4 and megatron, "max_abs_err": err, "decode_step_collectives": dict(collectives)}


# ---- benchmark -----------------------------------------------------------------------------------


def benchmark(plan: Plan, context: int) -> dict[str, Any]:
    """Decode step time of the random `plan.bench` model in bfloat16 at each batch that fits."""
    cfg, dtype = plan.bench, jnp.dtype("bfloat16")
    pages_per_row = -(-context // PAGE_SIZE)
    page_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * PAGE_SIZE * cfg.head_dim * dtype.itemsize
    weight_bytes = sum(int(np.prod(s.shape)) * dtype.itemsize for s in jax.tree.leaves(param_structs(cfg, dtype)))
    need = lambda b: weight_bytes + (b * pages_per_row + 1) * page_bytes  # noqa: E731
    batches = [b for b in plan.batches if fits(need(b), headroom=1.15)]  # 15%: activations, logits
    skipped = [{"batch": b, "needs_gib": round(need(b) / 2**30, 1)} for b in plan.batches if b not in batches]
    result = {"model": cfg.to_dict(), "dtype": str(dtype), "context": context, "weight_bytes": weight_bytes,
              "skipped_for_memory": skipped, "memory_limit": memory_limit()}
    if not batches:
        return {**result, "decode": []}
    bandwidth = copy_bandwidth(plan.copy_bytes)
    result["copy_gbps"] = round(bandwidth / 1e9, 1)
    mesh = make_mesh()
    engine = EngineConfig(max_num_seqs=max(batches), max_model_len=context)
    num_pages = max(batches) * pages_per_row + 1
    decode = []
    for layout in ("stacked", "unrolled"):  # scan over [L, ...] weights, or one buffer per layer
        params = device_params(cfg, mesh, dtype)
        params = unstack_layers(params) if layout == "unrolled" else params
        runner = ModelRunner(cfg, params, num_pages, PAGE_SIZE, StepShapes.from_config(engine, context), mesh)
        for b in tqdm(batches, desc=f"decode benchmark, {layout} layers", unit="batch"):
            seconds = time_step(runner, decode_batch(runner, b, context))
            roofline = bytes_read(cfg, runner.params, b, context) / bandwidth
            decode.append({"layout": layout, "batch": b, "step_ms": round(seconds * 1e3, 3), "tokens_per_s": round(b / seconds, 1),
                           "roofline_ms": round(roofline * 1e3, 3), "roofline_ratio": round(roofline / seconds, 3)})
        if layout == "stacked":  # swap-outs of 4 chunks of pages beside the largest batch's step
            overlap = time_swap_overlap(runner, decode_batch(runner, batches[-1], context), chunks=4)
            result["swap_overlap"] = {"batch": batches[-1], "chunks": 4, "hidden": round(overlap.pop("hidden"), 3),
                                      **{f"{k}_ms": round(v * 1e3, 3) for k, v in overlap.items()}}
        del params, runner  # free the device before the next layout
    return {**result, "decode": decode}


# ---- main ----------------------------------------------------------------------------------------


def run(plan: Plan, context: int) -> dict[str, Any]:
    """Every check, then the benchmark (a failing benchmark is a failed check too)."""
    one = lambda name, fn: ((name,), lambda: {name: fn()})  # noqa: E731 - a check of its own
    steps = [
        one("pallas_decode_matches_reference", lambda: check_attention(plan)),
        one("golden_smollm2", lambda: check_golden(plan)),
        (("batched_equals_one_at_a_time", "no_recompiles_after_warmup"),
         lambda: check_batching(plan, default_dtype())),
        one("tensor_parallel_matches_one_device", check_tensor_parallel),
        one("decode_benchmark", lambda: {"ok": True, **benchmark(plan, context)}),
    ]
    checks = [c for names, fn in tqdm(steps, desc="device check", unit="step") for c in run_checks(names, fn)]
    return {"checks": checks, "decode": checks[-1].pop("decode", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CPU and CI")
    parser.add_argument("--context", type=int, help="KV-cache tokens per benchmark row (default 1024; smoke 64)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/device_check.json"))
    args = parser.parse_args()
    backend = jax.default_backend()
    if backend == "cpu" and not args.smoke:
        print("device_check: the backend is CPU; the full check (an 8B model in bfloat16) is for a GPU or TPU. "
              "Use --smoke for the small-shape run.", file=sys.stderr)
        sys.exit(2)
    enable_compilation_cache(cache_dir() / "jax_cache")
    start = time.perf_counter()
    report = {
        "mode": "smoke" if args.smoke else "full",
        "backend": backend,
        "jax_version": jax.__version__,
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in jax.devices()],
        **run(SMOKE if args.smoke else FULL, args.context or (64 if args.smoke else 1024)),
    }
    report["ok"] = all(c["ok"] for c in report["checks"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
