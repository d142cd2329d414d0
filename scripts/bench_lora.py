"""LoRA's cost in the engine: the same batch with LoRA off, with LoRA on for base-model rows, and with
four adapters mixed; prints and saves JSON.

One process, offline `LLM` engines of the test servers' limits over one model: random adapters of
`--rank` on all seven modules, 16 prompts x 32 greedy tokens, the three runs alternating `--rounds`
times; each figure is the best round (the least disturbed by other work on the machine).

    python scripts/bench_lora.py --rank 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jaxserve.bench.report import save_report  # noqa: E402

from jaxserve.checkpoint.loader import load_model  # noqa: E402
from jaxserve.checkpoint.peft import save_peft  # noqa: E402
from jaxserve.checkpoint.registry import DEFAULT_MODEL, cache_dir  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.engine.llm import LLM  # noqa: E402
from jaxserve.engine.runner import enable_compilation_cache  # noqa: E402
from jaxserve.models.lora import target_dims  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=128, num_pages=256, max_model_len=2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results/lora.json"))
    args = parser.parse_args()
    enable_compilation_cache(cache_dir() / "jax_cache")
    model = load_model(args.model)
    cfg, rng, folder = model.cfg, np.random.default_rng(0), Path(tempfile.mkdtemp(prefix="bench_lora_"))
    off = LLM(model, ENGINE)
    on = LLM(model, dataclasses.replace(ENGINE, max_loras=args.adapters, max_lora_rank=args.rank))
    for i in range(args.adapters):
        weights = {t: (rng.normal(0, 0.02, (cfg.num_layers, n_in, args.rank)).astype(np.float32),
                       rng.normal(0, 0.02, (cfg.num_layers, args.rank, n_out)).astype(np.float32)) for t, (n_in, n_out) in target_dims(cfg).items()}
        save_peft(folder / f"a{i}", weights, args.rank, 2.0 * args.rank, 0.0, args.model)
        on.load_adapter(f"a{i}", str(folder / f"a{i}"))
    prompts = [f"Request {i}: tell me about the number {i}" for i in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    mixed = [f"a{i % args.adapters}" for i in range(args.prompts)]
    runs = {"lora_off": lambda: off.generate(prompts, sp, use_tqdm=False),
            "lora_on_base_rows": lambda: on.generate(prompts, sp, use_tqdm=False),
            "lora_on_adapters_mixed": lambda: on.generate(prompts, sp, use_tqdm=False, adapter=mixed)}
    for run in runs.values():  # compiles, first-request effects
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    tokens = args.prompts * args.max_tokens
    best = {name: min(s) for name, s in seconds.items()}
    save_report({"model": args.model, "rank": args.rank, "adapters": args.adapters, "prompts": args.prompts, "max_tokens": args.max_tokens,
                 "rounds": args.rounds, "output_tokens_per_s": {name: round(tokens / s, 1) for name, s in best.items()},
                 "against_lora_off": {name: round(best["lora_off"] / s, 3) for name, s in best.items()},
                 "seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()}}, args.out)


if __name__ == "__main__":
    main()
