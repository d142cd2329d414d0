"""Speculative decoding benchmark: what drafts (n-gram by default; any `--speculative-config`, such as
trained heads) buy on single-stream decode, whether outputs stay
the same, and (on an accelerator) the verify step against the HBM roofline. Prints and saves JSON.

Sections (--sections, comma-separated; default "workloads"):

- workloads: SmolLM2, one request at a time, greedy, 128 new tokens, speculation off against
  on (`--speculative-config`, default n-gram with k=4, lookup 1..3), alternating prompt by prompt in
  one run. Workloads: (a) grounded editing of a ~300-token passage, (b) code edit, (c) open chat,
  (d) random-token text. Per workload: the median over its prompts of decode tokens/s after the
  first token, off and on, their ratio, and the mean accepted length (accepted drafts per verify).
- equality: SmolLM2 outputs with and without speculation, 10 chat prompts x 128 tokens, greedy and
  seeded (temperature 0.8, top_p 0.95), each prompt alone and all in one batch of 16 (the 10 plus
  6 random-token requests): requests equal token for token, and for any that differ, the first
  differing step and the top-1/top-2 log-prob margin there. On CPU every output is equal; on an
  accelerator a verify row runs in a larger decode bucket than the plain row, whose matmuls may
  round differently, so this section measures the agreement there instead of assuming it.
- large: a random model of Llama-3-8B's shape in bfloat16 (a tiny one on CPU), unrolled, batch 1: the step
  time of 1..k+1 decode rows (a verify of j drafts is a j+1-row step) against the HBM roofline
  (weights + each row's KV over the copy bandwidth measured in the same run), and single-stream
  decode tokens/s off and on for a random-token prompt and a repeated-motif prompt.

    python scripts/bench_speculative.py                                   # workloads, on this machine
    python scripts/bench_speculative.py --sections equality,workloads
    python scripts/bench_speculative.py --speculative-config '{"method": "medusa", "model": "HEADS_DIR"}'
    python scripts/bench_speculative.py --quantization int8 --speculative-config '{"method": "medusa", "model": "HEADS_DIR"}'
    python scripts/bench_speculative.py --sections equality,large --out bench_results/speculative_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxserve.checkpoint.loader import LoadedModel, load_draft, load_model
from jaxserve.checkpoint.registry import cache_dir
from jaxserve.config import EngineConfig, SpeculativeConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.runner import enable_compilation_cache
from jaxserve.errors import UserError
from jaxserve.models.llama import unstack_layers
from jaxserve.parallel.mesh import make_mesh
from jaxserve.parallel.report import LLAMA3_8B, TINY_BENCH, bytes_read, copy_bandwidth, decode_batch, device_params, time_step
from jaxserve.sampling_params import SamplingParams

PASSAGE = (
    "The lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper climbed the "
    "spiral stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships far out at sea "
    "saw the beam sweep across the water and knew where the rocks were. In the winter of the great storm the "
    "keeper's daughter kept the light burning for three nights alone, because her father had gone to the "
    "village for oil and the road had washed away behind him. She carried the oil up the stairs in small "
    "cans, one in each hand, and rested on every landing. On the third night a fishing boat that had lost its "
    "mast drifted toward the rocks, and its crew saw the light just in time to row clear. When the storm "
    "passed, the fishermen walked up the cliff path to thank her, and they found her asleep in the lamp room "
    "with her hand still on the clockwork. The village painted her name on the door of the lighthouse, and "
    "it is still there today, faded by the salt and the wind."
)
TYPOS = {"cliff": "clif", "keeper": "keper", "stairs": "stiars", "village": "vilage", "thank": "tahnk", "still": "stil"}
CODE = '''def summarize(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        if order["status"] != "paid":
            continue
        total += order["amount"]
        count += 1
        if largest is None or order["amount"] > largest["amount"]:
            largest = order
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average, "largest": largest}


def paid_customers(orders):
    names = []
    for order in orders:
        if order["status"] == "paid" and order["customer"] not in names:
            names.append(order["customer"])
    return names
'''
CHAT = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a child.",
    "Give three tips for staying focused while studying.",
    "What should I pack for a weekend hiking trip?",
]
WORKLOADS: dict[str, list[str]] = {
    "a_grounded_edit": [
        "Correct the spelling mistakes in this passage and return the whole passage:\n\n"
        + " ".join(TYPOS.get(w, w) for w in PASSAGE.split(" ")),
        f"Rewrite this passage in the present tense:\n\n{PASSAGE}",
        f"Repeat this passage word for word:\n\n{PASSAGE}",
    ],
    "b_code_edit": [
        f"Rename the variable `total` to `revenue` everywhere and return the whole code:\n\n{CODE}",
        f"Add a docstring to each function and return the whole code:\n\n{CODE}",
        f"Add type hints to both functions and return the whole code:\n\n{CODE}",
    ],
    "c_open_chat": CHAT[:3],
    "d_random_tokens": [],  # random token ids, made in `prompts`
}
EQUALITY_PROMPTS = [*WORKLOADS["a_grounded_edit"], *WORKLOADS["b_code_edit"], *CHAT]  # 10
NEW_TOKENS = 128
DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
# Single-stream engines: one sequence, one prefill row of 256 tokens (few step programs).
SINGLE = EngineConfig(max_num_seqs=1, max_num_batched_tokens=256, max_prefill_seqs=1, prefill_row_len=256, num_pages=129, max_model_len=2048)


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def prompts(model: LoadedModel) -> dict[str, list[list[int]]]:
    """Token ids of each workload's prompts (chat-templated; random tokens raw)."""
    chat = lambda text: model.tokenizer.encode_chat([{"role": "user", "content": text}])  # noqa: E731
    ids = {name: [chat(t) for t in texts] for name, texts in WORKLOADS.items()}
    ids["d_random_tokens"] = random_prompts(model.cfg.vocab_size, 3, 200, seed=0)
    return ids


def single_stream(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """One request alone: its tokens and decode tokens/s after the first token."""
    engine.add_request("bench", prompt, params)
    tokens, stamps = [], []
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens.append(out.token_id)
                stamps.append(time.perf_counter())
    return tokens, (len(tokens) - 1) / (stamps[-1] - stamps[0]) if len(tokens) > 1 else 0.0


def counters(engine: LLMEngine) -> tuple[int, int]:
    c = engine.speculator.snapshot()
    return c.num_drafts, c.num_accepted_tokens


def compare_speed(plain: LLMEngine, spec: LLMEngine, batch: list[list[int]], params: SamplingParams, label: str) -> dict[str, Any]:
    """Each prompt off then on (counting the prompts whose tokens are the same); medians of decode tokens/s and the mean accepted length."""
    off, on, same = [], [], 0
    drafts0, accepted0 = counters(spec)
    for prompt in tqdm(batch, desc=label, unit="prompt", file=sys.stderr):
        a, tps_off = single_stream(plain, prompt, params)
        b, tps_on = single_stream(spec, prompt, params)
        same += a == b
        off.append(tps_off)
        on.append(tps_on)
    drafts1, accepted1 = counters(spec)
    median_off, median_on = statistics.median(off), statistics.median(on)
    return {
        "prompts": len(batch),
        "same_output": same,
        "decode_tps_off": round(median_off, 2),
        "decode_tps_on": round(median_on, 2),
        "speedup": round(median_on / median_off, 3),
        "verify_passes": drafts1 - drafts0,
        "mean_accepted_length": round((accepted1 - accepted0) / max(drafts1 - drafts0, 1), 3),
        "per_prompt_tps": [[round(x, 2), round(y, 2)] for x, y in zip(off, on)],
    }


def engines(model: LoadedModel, engine_cfg: EngineConfig, spec: SpeculativeConfig) -> tuple[LLMEngine, LLMEngine]:
    """Speculation off and on (with the draft model or heads `spec` names)."""
    plain = LLMEngine(model.cfg, model.params, engine_cfg, eos_token_ids=())
    drafted = LLMEngine(model.cfg, model.params, dataclasses.replace(engine_cfg, speculative=spec), eos_token_ids=(), draft=load_draft(model, spec))
    return plain, drafted


def workloads(model: LoadedModel, spec: SpeculativeConfig) -> dict[str, Any]:
    plain, drafted = engines(model, SINGLE, spec)
    for engine in (plain, drafted):
        engine.warmup(progress=True)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return {name: compare_speed(plain, drafted, batch, greedy, name) for name, batch in prompts(model).items()}


def first_difference(a, b) -> dict[str, Any] | None:
    """Where two completions first differ, and the smaller top-1/top-2 log-prob margin there."""
    if a.token_ids == b.token_ids:
        return None
    step = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
    margins = [o.top_logprobs[step][0][1] - o.top_logprobs[step][1][1] for o in (a, b) if step < len(o.top_logprobs)]
    return {"step": step, "margin": round(min(margins), 5) if margins else None}


def equality(model: LoadedModel, spec: SpeculativeConfig) -> dict[str, Any]:
    """Outputs with speculation against without: alone and in a batch of 16, greedy and seeded."""
    limits = EngineConfig(max_num_seqs=16, max_num_batched_tokens=256, num_pages=513, max_model_len=2048)
    plain, drafted = engines(model, limits, spec)
    chat = [model.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in EQUALITY_PROMPTS]
    fillers = random_prompts(model.cfg.vocab_size, 6, 64, seed=1)
    report = {}
    for mode in ("greedy", "seeded"):
        def params(i: int) -> SamplingParams:
            sampled = dict(temperature=0.8, top_p=0.95, seed=i) if mode == "seeded" else dict(temperature=0.0)
            return SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, **sampled)

        batch = {str(i): (p, params(i)) for i, p in enumerate(chat + fillers)}
        outputs = {}
        for name, engine in (("off", plain), ("on", drafted)):
            alone = {rid: engine.run({rid: batch[rid]})[rid] for rid in tqdm(list(batch)[: len(chat)], desc=f"{mode} alone, {name}", file=sys.stderr)}
            together = engine.run(batch)
            outputs[name] = {"alone": alone, "batch_of_16": together}
        for setting in ("alone", "batch_of_16"):
            rids = list(outputs["off"][setting])
            differ = {rid: first_difference(outputs["off"][setting][rid].outputs[0], outputs["on"][setting][rid].outputs[0]) for rid in rids}
            report[f"{mode}_{setting}"] = {
                "requests": len(rids),
                "equal": sum(d is None for d in differ.values()),
                "differ": {rid: d for rid, d in differ.items() if d is not None},
            }
    c = drafted.speculator.snapshot()
    report["accepted_tokens"], report["draft_tokens"] = c.num_accepted_tokens, c.num_draft_tokens
    report["ok"] = all(r["equal"] == r["requests"] for r in report.values() if isinstance(r, dict))
    return report


def large(spec: SpeculativeConfig, context: int) -> dict[str, Any]:
    """Batch 1 on a random 8B-shaped bfloat16 model: verify step times against the roofline, and
    single-stream speed off and on."""
    accelerator = jax.default_backend() != "cpu"
    cfg = LLAMA3_8B if accelerator else TINY_BENCH
    dtype = jnp.dtype("bfloat16")
    bandwidth = copy_bandwidth((2 << 30) if accelerator else (64 << 20))
    params = unstack_layers(device_params(cfg, make_mesh(), dtype))  # the one-device serving layout
    k = spec.num_speculative_tokens
    limits = dataclasses.replace(SINGLE, num_pages=(k + 1) * -(-context // SINGLE.page_size) + 1, max_model_len=max(context, 2048))
    plain, drafted = engines(LoadedModel("random", cfg, params, None), limits, spec)
    steps = []
    for rows in tqdm(drafted.shapes.decode_rows, desc="verify steps", file=sys.stderr):
        seconds = time_step(drafted.runner, decode_batch(drafted.runner, rows, context))
        roofline = bytes_read(cfg, params, rows, context) / bandwidth
        steps.append({"rows": rows, "drafts": rows - 1, "step_ms": round(seconds * 1e3, 3), "roofline_ms": round(roofline * 1e3, 3),
                      "roofline_ratio": round(roofline / seconds, 3)})
    one = steps[0]["step_ms"]
    for s in steps:  # tokens per unit time if every draft is accepted, against plain decode
        s["speedup_if_all_accepted"] = round(s["rows"] * one / s["step_ms"], 3)
    motif = random_prompts(cfg.vocab_size, 1, 16, seed=2)[0]
    batches = {"random_tokens": random_prompts(cfg.vocab_size, 1, 200, seed=3), "repeated_motif": [motif * 12]}
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for batch in batches.values():  # compile the shapes each prompt's run takes
        for engine in (plain, drafted):
            single_stream(engine, batch[0], greedy)
    speed = {name: compare_speed(plain, drafted, batch, greedy, name) for name, batch in batches.items()}
    return {"model": cfg.to_dict(), "dtype": dtype.name, "context": context, "copy_gbps": round(bandwidth / 1e9, 1),
            "verify_steps": steps, "single_stream": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="workloads", help="comma-separated: workloads, equality, large")
    parser.add_argument("--speculative-config", default=DEFAULT_SPEC, help=f"vLLM-style JSON (default {DEFAULT_SPEC})")
    parser.add_argument("--quantization", choices=("int8",), help="the target's dense layers (default: the model dtype's)")
    parser.add_argument("--context", type=int, default=1024, help="KV tokens per row in the large section's step times")
    parser.add_argument("--out", type=Path, default=Path("bench_results/speculative.json"))
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - {"workloads", "equality", "large"}
    try:
        if unknown:
            raise UserError(f"--sections: unknown section(s) {', '.join(sorted(unknown))}")
        spec = SpeculativeConfig.from_json(args.speculative_config)
        if "large" in sections and spec.model is not None:
            raise UserError(f"--sections large: its random model has no {spec.method} drafts; use method 'ngram'")
    except UserError as e:
        print(f"bench_speculative: {e}", file=sys.stderr)
        sys.exit(2)
    enable_compilation_cache(cache_dir() / "jax_cache")
    report: dict[str, Any] = {"backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
                              "speculative_config": dataclasses.asdict(spec), "new_tokens": NEW_TOKENS}
    report["quantization"] = args.quantization
    model = load_model(quantization=args.quantization) if {"workloads", "equality"} & set(sections) else None  # the serving layout
    for section in sections:
        start = time.perf_counter()
        report[section] = {"equality": lambda: equality(model, spec), "workloads": lambda: workloads(model, spec),
                           "large": lambda: large(spec, args.context)}[section]()
        report[section]["seconds"] = round(time.perf_counter() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each section: a later failure keeps the earlier
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
