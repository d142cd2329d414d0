"""The engine measured in this process, without a server: `bench generate` (single-stream decode, from a
cold set-up, beside quantized weights and other engines) and `bench throughput` (offline batching, and
what chunked prefill spares running streams)."""

from __future__ import annotations

import contextlib
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from jaxserve.checkpoint import registry
from jaxserve.config import EngineConfig
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams

PROMPT = "Write a detailed story about a lighthouse keeper who discovers a message in a bottle. " * 3
PAGE_SIZE = 16

# Other engines' decode tokens/s, each run by a Python of its own after ours has finished.
REFERENCE_DECODE = r"""
import sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, prompt, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
ids = torch.tensor([tok(prompt)["input_ids"]])
def run():
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        return (n - 1) / (time.perf_counter() - t0)
run()
print(max(run() for _ in range(2)))
"""

LLAMA_CPP_DECODE = r"""
import sys, time
from llama_cpp import Llama
gguf, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=gguf, n_threads=2, n_ctx=1024, verbose=False)
ids = llm.tokenize(prompt.encode())
def run():
    llm.reset()
    stamps = []
    for _ in llm.generate(ids, temp=0.0, top_k=1):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            return (n - 1) / (stamps[-1] - stamps[0])
run()
print(max(run() for _ in range(2)))
"""


def other_engine_decode(python: str, script: str, gguf: Path, n: int) -> float:
    """Decode tokens/s of another engine on the same GGUF, run by `python` in its own process."""
    proc = subprocess.run([python, "-c", script, str(gguf), PROMPT, str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{python} could not run the reference decode: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return float(proc.stdout.strip().splitlines()[-1])


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """The same GGUF with every tensor dequantized to F32 (metadata copied as is): llama.cpp on the
    weights we decode in float."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def dense_bytes(params) -> int:
    """Bytes the decoder layers' weights take in memory (packed codes, scales and offsets included)."""
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(params["layers"]))


@contextlib.contextmanager
def no_compilation_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off, so a cold run compiles rather than loads. (JAX settles
    whether a process uses the cache at its first compile: in a process that has compiled already,
    this changes nothing.)"""
    import jax

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def _stamps(llm, prompt_ids: list[int], sp: SamplingParams) -> list[float]:
    """The start of one request alone, then the time each of its tokens came."""
    stamps = [time.perf_counter()]
    for _ in llm.stream(prompt_ids, sp):
        stamps.append(time.perf_counter())
    return stamps


def _single_stream(model, prompt_ids: list[int], sp: SamplingParams):
    """An engine for one sequence, its cold run (compiling the prefill and decode buckets) and the
    fastest of 3 warm ones (the least disturbed). Prefix caching is off, so warm runs prefill too."""
    from jaxserve.engine.llm import LLM

    max_len = min(2048, model.cfg.max_position_embeddings)
    llm = LLM(model, EngineConfig(max_num_seqs=1, page_size=PAGE_SIZE, num_pages=_pages(1, max_len), max_model_len=max_len,
                                  enable_prefix_caching=False))
    cold = _stamps(llm, prompt_ids, sp)
    return llm, cold, min((_stamps(llm, prompt_ids, sp) for _ in range(3)), key=lambda s: s[-1] - s[1])


def _decode(stamps: list[float]) -> dict:
    """Decode tokens/s after the first token, and each step's latency (ms)."""
    import numpy as np

    steps = np.diff(stamps[1:]) * 1000
    return {"decode_tokens_per_s": round(len(steps) / (stamps[-1] - stamps[1]), 1), "step_ms_p50": round(float(np.percentile(steps, 50)), 2),
            "step_ms_p99": round(float(np.percentile(steps, 99)), 2), "step_ms": [round(float(s), 2) for s in steps]}


def _gguf(model: str, folder: Path) -> tuple[Path, float | None]:
    """The model's GGUF: a registry model downloaded into `folder` (and the seconds it took), or a file."""
    entry = registry.REGISTRY.get(model)
    if entry is not None:
        t0 = time.perf_counter()
        path = registry.download_gguf(entry, folder / "model.gguf")
        return path, time.perf_counter() - t0
    if not model.endswith(".gguf") or not Path(model).is_file():
        raise UserError(f"bench generate --model takes a registry name ({', '.join(registry.REGISTRY)}) or a .gguf file "
                        f"(it measures set-up from the GGUF, and the other engines read it); got {model!r}")
    return Path(model), None


def generate(model: str, decode_tokens: int, quantizations: list[str], reference_python: str | None, llama_cpp_python: str | None) -> dict:
    """Single-stream figures of one model, from a cold start: download (registry models) and conversion
    into an empty folder, warm load, compile, prefill and decode tok/s with float weights and each of
    `quantizations`, and, given Pythons that have them (this one, if it has torch), transformers' and
    llama.cpp's decode on the same GGUF."""
    import jax

    from jaxserve.checkpoint.loader import convert, load_model

    sp = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp, no_compilation_cache():
        gguf, download = _gguf(model, Path(tmp))
        t0 = time.perf_counter()
        convert(gguf, Path(tmp) / "checkpoint")
        cold_setup = time.perf_counter() - t0 + (download or 0)
        t0 = time.perf_counter()
        loaded = load_model(str(Path(tmp) / "checkpoint"))
        jax.block_until_ready(loaded.params)
        warm_load = time.perf_counter() - t0
        prompt_ids = loaded.tokenizer.encode(PROMPT)
        llm, cold, warm = _single_stream(loaded, prompt_ids, sp)
        float_run = _decode(warm)
        result = {
            "model": model,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "dtype": str(jax.tree.leaves(loaded.params)[0].dtype),
            "download_s": None if download is None else round(download, 2),
            "cold_setup_s": round(cold_setup, 2),
            "warm_load_s": round(warm_load, 2),
            "compile_s": round((cold[2] - cold[0]) - (warm[2] - warm[0]), 2),  # the first two tokens, cold against warm
            "prompt_tokens": len(prompt_ids),
            "prefill_tokens_per_s": round(len(prompt_ids) / (warm[1] - warm[0]), 1),
            "decode_tokens": decode_tokens,
            "decode_tokens_per_s": float_run["decode_tokens_per_s"],
            "step_compiles": llm.engine.runner.num_compiles,
            "configurations": {"float": {"dense_weight_bytes": dense_bytes(loaded.params), **float_run}},
        }
        del llm, loaded
        for q in quantizations:  # the same model with quantized dense layers, in this run
            quantized = load_model(str(Path(tmp) / "checkpoint"), quantization=q)
            result["configurations"][q] = {"dense_weight_bytes": dense_bytes(quantized.params), **_decode(_single_stream(quantized, prompt_ids, sp)[2])}
            del quantized
        python = reference_python or (sys.executable if importlib.util.find_spec("torch") else None)
        if python:
            ref = other_engine_decode(python, REFERENCE_DECODE, gguf, decode_tokens)
            result["configurations"]["transformers f32"] = {"decode_tokens_per_s": round(ref, 1)}
            result["decode_speedup_vs_transformers"] = round(result["decode_tokens_per_s"] / ref, 2)
        if llama_cpp_python:
            llama = other_engine_decode(llama_cpp_python, LLAMA_CPP_DECODE, write_f32_gguf(gguf, Path(tmp) / "model-f32.gguf"), decode_tokens)
            result["configurations"]["llama.cpp f32"] = {"decode_tokens_per_s": round(llama, 1)}
            result["decode_ratio_vs_llama_cpp_f32"] = round(result["decode_tokens_per_s"] / llama, 2)
    return result


WORDS = "the a of to and in is it that for on with as was by at be this from or an are which but not".split()
STREAM_PROMPT_TOKENS, STREAM_OUTPUT_TOKENS = 64, 64


def token_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids, random common words."""
    rng = random.Random(seed)
    return [tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length * 2)))[:length] for _ in range(n)]


def _pages(seqs: int, tokens: int) -> int:
    """KV pages for `seqs` sequences of `tokens` each, and the null page."""
    return seqs * -(-tokens // PAGE_SIZE) + 1


def _budget(seqs: int, prompt_tokens: int) -> int:
    """Tokens per step: 512, or less when all the prompts and a decode row each fit in less (a budget
    that is never filled only adds step shapes to compile)."""
    return min(512, -(-seqs * (prompt_tokens + 1) // 64) * 64)


def _offline(llm, reqs: list[list[int]], sp: SamplingParams) -> dict:
    start = time.perf_counter()
    outs = llm.generate(reqs, sp, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(s.token_ids) for o in outs for s in o.outputs)
    return {"requests": len(reqs), "seconds": round(elapsed, 2), "output_tokens_per_s": round(generated / elapsed, 1)}


def worst_stream_gap(llm, streams: list[list[int]], long_prompt: list[int]) -> tuple[float, int]:
    """The largest gap between consecutive tokens of any decoding stream while the long prompt is
    prefilled, and how many compilations happened meanwhile (a compile in the window is measured too)."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=STREAM_OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
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


def throughput(model: str, requests: int, sequential_sample: int, prompt_tokens: int, output_tokens: int, streams: int,
               long_prompt_tokens: int, prefill_chunk: int) -> dict:
    """1. `requests` prompts through `LLM.generate` batched, against the same engine limited to one
    running sequence on the first `sequential_sample` of them, every step shape compiled first.
    2. `streams` requests decoding when a `long_prompt_tokens` prompt arrives: their worst
    inter-token gap with chunked prefill (`prefill_chunk` tokens a step) and with the whole prompt in
    one step."""
    from jaxserve.checkpoint.loader import load_model
    from jaxserve.engine.llm import LLM

    loaded = load_model(model)
    tok = loaded.tokenizer
    sp = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    reqs = token_prompts(tok, requests, prompt_tokens, seed=0)
    per_seq = prompt_tokens + output_tokens
    batched = LLM(loaded, EngineConfig(num_pages=_pages(requests, per_seq), max_num_seqs=requests, max_num_batched_tokens=_budget(requests, prompt_tokens)))
    single = LLM(loaded, EngineConfig(num_pages=_pages(1, per_seq), max_num_seqs=1, max_num_batched_tokens=_budget(1, prompt_tokens)))
    for llm in (batched, single):
        llm.engine.warmup()  # every step shape compiled before the clock starts
    compiles = batched.engine.runner.num_compiles + single.engine.runner.num_compiles
    runs = {"batched": _offline(batched, reqs, sp), "one_at_a_time": _offline(single, reqs[:sequential_sample], sp)}
    result = {"model": model, "runs": runs,
              "speedup": round(runs["batched"]["output_tokens_per_s"] / runs["one_at_a_time"]["output_tokens_per_s"], 2),
              "compiles_while_measuring": batched.engine.runner.num_compiles + single.engine.runner.num_compiles - compiles}
    del batched, single

    decoding = token_prompts(tok, streams, STREAM_PROMPT_TOKENS, seed=2)
    warm_prompt, long_prompt = token_prompts(tok, 2, long_prompt_tokens, seed=3)  # same length, different text: no prefix hits
    whole = -(-(long_prompt_tokens + streams) // 64) * 64  # the prompt and the streams' decode rows in one step
    pages = _pages(streams, STREAM_PROMPT_TOKENS + STREAM_OUTPUT_TOKENS) + 2 * _pages(1, long_prompt_tokens)
    gaps = {}
    for name, budget in ((f"chunked_prefill_{prefill_chunk}", prefill_chunk), ("whole_prompt_in_one_step", whole)):
        llm = LLM(loaded, EngineConfig(num_pages=pages, max_num_seqs=streams + 1, max_num_batched_tokens=budget))
        worst_stream_gap(llm, decoding, warm_prompt)  # compile this configuration's shapes
        gap, compiled = worst_stream_gap(llm, decoding, long_prompt)
        if compiled:
            raise RuntimeError("the measured window compiled: the gap would include it")
        gaps[name] = round(gap, 3)
    result["worst_inter_token_gap_s"] = gaps
    return result
