"""Offline throughput and chunked-prefill latency of the batched engine on the default model; prints and
saves JSON.

1. 64 requests of ~128 prompt / 128 output tokens through `LLM.generate` (batched), against the same
   engine limited to one running sequence (one at a time), on a sample, in the same run.
2. 16 streams decoding when a ~1,000-token prompt arrives: the streams' worst inter-token gap with
   chunked prefill (a 256-token step budget) and without (the whole prompt in one step).

    python scripts/bench_throughput.py [--requests 64] [--sequential-sample 8] [--out bench_results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from jaxserve.checkpoint.loader import load_model
from jaxserve.checkpoint.registry import cache_dir
from jaxserve.config import EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.engine.runner import enable_compilation_cache
from jaxserve.sampling_params import SamplingParams

WORDS = "the a of to and in is it that for on with as was by at be this from or an are which but not".split()


def prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length * 2)))[:length]
        out.append(ids)
    return out


def throughput(llm: LLM, reqs: list[list[int]], sp: SamplingParams) -> dict:
    start = time.perf_counter()
    outs = llm.generate(reqs, sp, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(s.token_ids) for o in outs for s in o.outputs)
    return {"requests": len(reqs), "seconds": round(elapsed, 2), "output_tokens_per_s": round(generated / elapsed, 1)}


def worst_stream_gap(llm: LLM, streams: list[list[int]], long_prompt: list[int]) -> tuple[float, int]:
    """Largest gap between consecutive tokens of any decoding stream while the long prompt is prefilled,
    and how many compilations happened meanwhile (a compile inside the window would be measured too)."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(streams):
        engine.add_request(f"s{i}", ids, sp)
    while any(len(engine.seqs[f"s{i}"][0].output_ids) < 4 for i in range(len(streams))):
        engine.step()  # all streams are decoding
    last = {f"s{i}": time.perf_counter() for i in range(len(streams))}
    compiles = engine.runner.num_compiles
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=1, temperature=0.0))
    worst = 0.0
    while "long" in engine.seqs:
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id in last:
                worst = max(worst, now - last[out.request_id])
                last[out.request_id] = now
    compiles = engine.runner.num_compiles - compiles
    for i in range(len(streams)):
        engine.abort(f"s{i}")
    return worst, compiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--sequential-sample", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_results/throughput.json"))
    args = parser.parse_args()
    enable_compilation_cache(cache_dir() / "jax_cache")

    model = load_model()
    tok = model.tokenizer
    sp = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    reqs = prompts(tok, args.requests, 128, seed=0)
    batched = LLM(model, EngineConfig(num_pages=1024, max_num_seqs=64, max_num_batched_tokens=512))
    single = LLM(model, EngineConfig(num_pages=64, max_num_seqs=1, max_num_batched_tokens=512))
    for llm in (batched, single):
        llm.engine.warmup()  # every step shape compiled before the clock starts
    compiles_after_warmup = batched.engine.runner.num_compiles + single.engine.runner.num_compiles

    result = {"batched": throughput(batched, reqs, sp), "one_at_a_time": throughput(single, reqs[: args.sequential_sample], sp)}
    result["speedup"] = round(result["batched"]["output_tokens_per_s"] / result["one_at_a_time"]["output_tokens_per_s"], 2)
    result["compiles_while_measuring"] = batched.engine.runner.num_compiles + single.engine.runner.num_compiles - compiles_after_warmup

    streams = prompts(tok, 16, 64, seed=2)
    warm_prompt, long_prompt = prompts(tok, 2, 1000, seed=3)  # same length, different text: no prefix hits
    gaps = {}
    for name, budget in (("chunked_prefill_256", 256), ("whole_prompt_in_one_step", 1024)):
        llm = LLM(model, EngineConfig(num_pages=512, max_num_seqs=17, max_num_batched_tokens=budget))
        worst_stream_gap(llm, streams, warm_prompt)  # compile this configuration's shapes
        gap, compiles = worst_stream_gap(llm, streams, long_prompt)
        assert compiles == 0, "the measured window compiled: the gap would include it"
        gaps[name] = round(gap, 3)
    result["worst_inter_token_gap_s"] = gaps
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
