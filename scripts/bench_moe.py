"""Decode throughput of a tiny random mixture-of-experts model through the engine, with the experts
dispatched dense (every expert on every token, weighted by the router: the baseline) and grouped
(each token's top-k only, in blocks of one expert's rows: `jaxserve.models.moe`); prints a table
and saves JSON.

Each run is a batch of greedy requests of a short prompt and `--output-len` tokens through
`LLMEngine.run`, once to compile every step shape it takes, then timed (no compile inside) `--repeats`
times per dispatch, interleaved, the best counting. Output tokens/s include the short prompts'
prefill. Both dispatches give the same tokens (the same bits: `tests/test_moe.py`), checked here too.

    python scripts/bench_moe.py                          # 8 experts top-2 and 64 experts top-8, batch 1, 8, 32
    python scripts/bench_moe.py --models 8x2 --batch 16 --output-len 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from jaxserve.bench.report import save_report
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.models import moe
from jaxserve.models.llama import init_params, unstack_layers
from jaxserve.sampling_params import SamplingParams


def tiny_moe(experts: int, k: int, expert_width: int) -> ModelConfig:
    return ModelConfig(architecture="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                       num_kv_heads=4, head_dim=32, qk_norm="head", num_experts=experts, num_experts_per_tok=k,
                       moe_intermediate_size=expert_width, max_position_embeddings=1024)


DISPATCHES = ("dense", "grouped")
# name -> (experts, top-k, expert FFN width): the same active FFN width per token (1024)
MODELS = {"8x2": (8, 2, 512), "64x8": (64, 8, 128)}


def requests(cfg: ModelConfig, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return {f"{seed}-{i}": (rng.integers(3, cfg.vocab_size, size=prompt_len).tolist(), sp) for i in range(batch)}


def engine(cfg: ModelConfig, params, dispatch: str, batch: int, prompt_len: int, output_len: int) -> LLMEngine:
    """An engine whose steps are traced (and compiled, by a first run) with `dispatch`."""
    moe.DISPATCH = dispatch  # read when the engine's steps are traced
    eng = LLMEngine(cfg, params, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(64, batch * prompt_len), prefill_row_len=prompt_len,
                                              num_pages=batch * -(-(prompt_len + output_len) // 16) + 1, max_model_len=prompt_len + output_len))
    eng.run(requests(cfg, batch, prompt_len, output_len, seed=0))
    return eng


def timed(eng: LLMEngine, cfg: ModelConfig, batch: int, prompt_len: int, output_len: int, seed: int) -> tuple[float, list]:
    """Seconds of one run of the batch (no compile inside) and its tokens."""
    compiles = eng.runner.num_compiles
    start = time.perf_counter()
    outs = eng.run(requests(cfg, batch, prompt_len, output_len, seed))
    seconds = time.perf_counter() - start
    assert eng.runner.num_compiles == compiles, "the timed run compiled"
    return seconds, [o.outputs[0].token_ids for o in outs.values()]


def measure(cfg: ModelConfig, params, batch: int, prompt_len: int, output_len: int, repeats: int) -> dict:
    """Both dispatches, their timed runs interleaved; the best of `repeats` each (the CPU may be shared)."""
    engines = {d: engine(cfg, params, d, batch, prompt_len, output_len) for d in DISPATCHES}
    best, tokens = dict.fromkeys(DISPATCHES, float("inf")), {}
    for r in range(repeats):
        for d, eng in engines.items():
            seconds, tokens[d] = timed(eng, cfg, batch, prompt_len, output_len, seed=1 + r)
            best[d] = min(best[d], seconds)
    result = {"batch": batch}
    for d in DISPATCHES:
        result[d] = {"seconds": round(best[d], 3), "output_tokens_per_s": round(batch * output_len / best[d], 1)}
    result["speedup"] = round(best["dense"] / best["grouped"], 2)
    result["same_tokens"] = tokens["dense"] == tokens["grouped"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per dispatch, interleaved; the best counts")
    parser.add_argument("--out", type=Path, default=Path("bench_results/moe.json"))
    args = parser.parse_args()
    report = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "prompt_len": args.prompt_len,
              "output_len": args.output_len, "models": []}
    print(f"{'model':>6} {'batch':>5} {'dense tok/s':>12} {'grouped tok/s':>14} {'speedup':>8}")
    for name in args.models:
        experts, k, width = MODELS[name]
        cfg = tiny_moe(experts, k, width)
        params = unstack_layers(init_params(cfg, jax.random.key(0)))  # the one-device CLI layout
        runs = []
        for batch in args.batch:
            run = measure(cfg, params, batch, args.prompt_len, args.output_len, args.repeats)
            runs.append(run)
            dense, grouped = run["dense"]["output_tokens_per_s"], run["grouped"]["output_tokens_per_s"]
            print(f"{name:>6} {batch:>5} {dense:>12} {grouped:>14} {run['speedup']:>7}x", flush=True)
        report["models"].append({"name": name, "experts": experts, "top_k": k, "expert_width": width, "hidden": cfg.hidden_size,
                                 "layers": cfg.num_layers, "runs": runs})
    save_report(report, args.out)


if __name__ == "__main__":
    main()
