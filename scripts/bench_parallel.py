"""Decode step time against tensor-parallel size; prints and saves JSON.

On CPU the devices are fake (`--xla_force_host_platform_device_count=8`, set here): every "device"
shares the same two cores, so the times are a sanity check of the sharded program (it runs, its
collectives are the expected ones, memory per device falls as 1/TP), not a speed claim. On a GPU,
`--model llama3-8b` times a random-weight Llama-3-8B-shaped model's decode step against the HBM
roofline: the bytes a step must read (all weights plus the batch's KV cache) over peak bandwidth.

    python scripts/bench_parallel.py                                   # CPU, TP = 1, 2, 4, 8
    python scripts/bench_parallel.py --model llama3-8b --tp 1 --batch 1 8 32 --context 1024 --hbm-gbps 3350
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxserve.config import EngineConfig, ModelConfig, ParallelConfig  # noqa: E402
from jaxserve.engine.runner import ModelRunner, StepShapes  # noqa: E402
from jaxserve.models.llama import init_params  # noqa: E402
from jaxserve.parallel.mesh import make_mesh  # noqa: E402
from jaxserve.parallel.report import bytes_per_device, decode_batch, step_collectives, time_step  # noqa: E402
from jaxserve.parallel.sharding import check_tensor_parallel, replicate_kv_heads  # noqa: E402

from jaxserve.bench.report import save_report  # noqa: E402

MODELS = {
    # small enough for fake CPU devices; 8 query / 8 KV heads split any power of two up to 8 ways
    "cpu-sanity": ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
        num_heads=8, num_kv_heads=8, head_dim=128, max_position_embeddings=4096,
    ),
    "llama3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
    ),
}


def measure(cfg: ModelConfig, tp: int, batches: list[int], context: int, dtype: jnp.dtype, hbm: float | None) -> dict:
    check_tensor_parallel(cfg, tp)
    params, cfg_tp = replicate_kv_heads(init_params(cfg, jax.random.key(0), dtype), cfg, tp)
    engine = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * 2, max_model_len=context)
    pages = max(batches) * -(-context // engine.page_size) + 1
    runner = ModelRunner(cfg_tp, params, pages, engine.page_size, StepShapes.from_config(engine, context), make_mesh(ParallelConfig(tp)))
    del params
    held = bytes_per_device(runner.params)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.params))
    kv_token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    result = {
        "tp": tp,
        "param_bytes_per_device": max(held.values()),
        "param_bytes_total": weight_bytes,
        "collectives": dict(step_collectives(runner, decode_batch(runner, batches[0], context))),
        "steps": [],
    }
    for b in batches:
        seconds = time_step(runner, decode_batch(runner, b, context))
        step = {"batch": b, "context": context, "step_ms": round(seconds * 1e3, 3), "tokens_per_s": round(b / seconds, 1)}
        if hbm:  # every weight once, plus each row's KV cache, at peak bandwidth split over TP devices
            floor = (weight_bytes + b * context * kv_token_bytes) / (hbm * 1e9 * tp)
            step.update(roofline_ms=round(floor * 1e3, 3), fraction_of_roofline=round(floor / seconds, 3))
        result["steps"].append(step)
        print(json.dumps({**step, "tp": tp}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cpu-sanity")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--context", type=int, default=512, help="tokens of KV cache each row attends to")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="peak memory bandwidth per device in GB/s, for the roofline")
    parser.add_argument("--out", type=Path, default=Path("bench_results/parallel.json"))
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    runs = [measure(MODELS[args.model], tp, args.batch, args.context, dtype, args.hbm_gbps) for tp in args.tp]
    report = {"model": args.model, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "dtype": str(dtype), "runs": runs}
    save_report(report, args.out)


if __name__ == "__main__":
    main()
