"""A short offline benchmark (`jaxserve bench`): fixed prompts decoded greedily, in one batch and alone.

Small on purpose: figures for comparing the versions of a model on one machine (after a conversion, a
quantization, an upgrade), recorded in the store's metadata. Each workload runs once untimed first,
so the timed run measures steps, not compilation; prefix caching is off, so the second run computes
what the first did.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from jaxserve.checkpoint.loader import LoadedModel
from jaxserve.checkpoint.store import utc_now
from jaxserve.config import EngineConfig
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams

__all__ = ["PROMPTS", "BenchFigures", "bench", "machine", "report"]

PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Explain what a compiler does.",
    "Once upon a time, in a small village,",
    "The best way to learn to cook is",
    "Translate 'good morning' into Spanish:",
    "def fibonacci(n):",
)
PAGE_SIZE = 16


@dataclass(frozen=True)
class BenchFigures:
    num_prompts: int
    max_tokens: int  # generated per prompt (EOS ignored)
    batch_output_tokens: int
    batch_seconds: float
    batch_tokens_per_s: float  # all prompts at once: output tokens / wall time
    batch1_ttft_s: float  # one prompt alone: time to its first token
    batch1_decode_tokens_per_s: float  # one prompt alone: tokens after the first / their time
    warmup_seconds: float  # the untimed runs (compilation included)


def bench(model: LoadedModel, num_prompts: int = 8, max_tokens: int = 32) -> BenchFigures:
    """Greedy decode of `num_prompts` fixed prompts x `max_tokens` tokens in one batch, and of the first
    prompt alone, each timed on its second run."""
    from jaxserve.engine.llm import LLM

    if num_prompts < 1 or max_tokens < 2:
        raise UserError(f"bench needs at least 1 prompt and 2 tokens, got {num_prompts} and {max_tokens}")
    ids = [model.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(num_prompts)]
    need = max(map(len, ids)) + max_tokens
    if need > model.cfg.max_position_embeddings:
        raise UserError(f"the longest bench prompt plus --max-tokens ({need} tokens) exceeds the model's context of "
                        f"{model.cfg.max_position_embeddings}", param="max_tokens")
    pages = -(-need // PAGE_SIZE)
    config = EngineConfig(max_num_seqs=num_prompts, page_size=PAGE_SIZE, num_pages=num_prompts * pages + 1,
                          max_model_len=min(pages * PAGE_SIZE, model.cfg.max_position_embeddings), enable_prefix_caching=False)
    llm = LLM(model, config)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    t0 = time.perf_counter()
    llm.generate(ids, sp, use_tqdm=False)
    _stream_times(llm, ids[0], sp)
    warmup = time.perf_counter() - t0

    t0 = time.perf_counter()
    outputs = llm.generate(ids, sp, use_tqdm=False)
    batch_seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    start, times = _stream_times(llm, ids[0], sp)
    return BenchFigures(
        num_prompts=num_prompts,
        max_tokens=max_tokens,
        batch_output_tokens=tokens,
        batch_seconds=round(batch_seconds, 4),
        batch_tokens_per_s=round(tokens / batch_seconds, 2),
        batch1_ttft_s=round(times[0] - start, 4),
        batch1_decode_tokens_per_s=round((len(times) - 1) / (times[-1] - times[0]), 2),
        warmup_seconds=round(warmup, 2),
    )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count()}


def report(figures: BenchFigures) -> dict[str, Any]:
    """The figures with the machine and the date (UTC), as recorded in a version's metadata."""
    return {**asdict(figures), "machine": machine(), "date": utc_now()}


def _stream_times(llm, prompt_ids: list[int], sp: SamplingParams) -> tuple[float, list[float]]:
    """The start time and the time each token of one request alone arrived."""
    start = time.perf_counter()
    times = [time.perf_counter() for out in llm.stream(prompt_ids, sp, request_id=f"bench-{start}") if out.token_id is not None]
    return start, times
