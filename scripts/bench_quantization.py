"""Weight quantization against float on the default model: teacher-forced next-token agreement and mean
KL over two held-out passages, calibration seconds, and the decoder layers' bytes in memory; prints
and saves JSON.

Formats: int8 (W8A8, SmoothQuant), and int4 at each `--group-sizes` both with plain rounding (RTN) and
with the AWQ-style scales `--quantization int4` calibrates (a group size that does not divide a
layer is reported as refused). The float reference is the model as loaded (float32).

Checkpoints on disk: the model saved in float32 and bfloat16, and converted with
`jaxserve convert --quantization int4` from the model (AWQ at group 32) and, for a registry model,
from its GGUF (4-bit blocks kept as stored); each int4 checkpoint is loaded back and compared too.

    python scripts/bench_quantization.py                      # about 6 minutes on 2 CPU cores
    python scripts/bench_quantization.py --group-sizes 32 64 128 --out bench_results/quantization.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the held-out passages and the logits helper of the tests

from jaxserve.checkpoint import registry  # noqa: E402
from jaxserve.checkpoint.loader import convert, load_model  # noqa: E402
from jaxserve.checkpoint.native import folder_bytes, save_checkpoint  # noqa: E402
from jaxserve.errors import UserError  # noqa: E402
from jaxserve.models.quantize import CALIBRATION_TEXT, DENSE, check_group_size, quantize_model  # noqa: E402
from jaxserve.ops.quant import quantize_int4  # noqa: E402
from tests.test_kv_quantization import HELD_OUT  # noqa: E402
from tests.test_quantization import PASSAGE  # noqa: E402
from tests.tiny_models import prefill_logits  # noqa: E402


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement and mean KL(ref || got) of logits [T, V]."""
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return {"agreement": round(float(np.mean(ref.argmax(-1) == got.argmax(-1))), 3),
            "mean_kl": round(float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))), 4)}


def checkpoints(spec: str, model, measure_logits) -> dict:
    """Bytes on disk of the model's float32, bfloat16 and int4 checkpoints, the int4 ones loaded back and measured."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = {}
        for dtype in ("float32", "bfloat16"):
            save_checkpoint(tmp / dtype, model.cfg, jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)), model.params), model.tokenizer)
            out[dtype] = {"bytes": folder_bytes(tmp / dtype)}
        sources = {"int4_awq_g32": spec}
        if spec in registry.REGISTRY:
            sources["int4_gguf_blocks"] = registry.download_gguf(registry.REGISTRY[spec], tmp / "source.gguf")
        for name, src in sources.items():
            start = time.perf_counter()
            convert(src, tmp / name, "int4")
            seconds = round(time.perf_counter() - start, 1)
            loaded = load_model(str(tmp / name), "float32", unroll_layers=False)
            size = folder_bytes(tmp / name)
            out[name] = {"bytes": size, "x_under_bfloat16": round(out["bfloat16"]["bytes"] / size, 2), "convert_s": seconds,
                         **measure_logits(loaded.params)}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--out", type=Path, default=Path("bench_results/quantization.json"))
    args = parser.parse_args()

    model = load_model(args.model, dtype="float32", unroll_layers=False)  # stacked: each variant compiles fast
    texts = {"held_out": model.tokenizer.encode(HELD_OUT), "passage": model.tokenizer.encode(PASSAGE)}
    refs = {name: prefill_logits(model.cfg, model.params, ids).astype(np.float64) for name, ids in texts.items()}
    calibration = model.tokenizer.encode(CALIBRATION_TEXT)
    dense_float = sum(model.params["layers"][k].size for k in DENSE if k in model.params["layers"])

    def measure_logits(params) -> dict:
        return {name: compare(refs[name], prefill_logits(model.cfg, params, ids).astype(np.float64)) for name, ids in texts.items()}

    def measure(params, seconds: float | None) -> dict:
        row = measure_logits(params)
        dense = sum(x.nbytes for k in DENSE if k in params["layers"] for x in jax.tree.leaves(params["layers"][k]))
        return {**row, "calibration_s": seconds, "dense_bytes": dense, "x_under_bfloat16": round(2 * dense_float / dense, 2)}

    result = {"model": args.model, "tokens": {name: len(ids) for name, ids in texts.items()}, "formats": {}}
    start = time.perf_counter()
    result["formats"]["int8"] = measure(quantize_model(model.params, model.cfg, calibration, "int8"), round(time.perf_counter() - start, 1))
    for group in args.group_sizes:
        try:
            check_group_size(model.params, group)
        except UserError as e:
            result["formats"][f"int4_g{group}"] = {"refused": str(e)}
            continue
        rtn = {**model.params, "layers": {k: quantize_int4(v, group) if k in DENSE else v for k, v in model.params["layers"].items()}}
        result["formats"][f"int4_g{group}_rtn"] = measure(rtn, None)
        start = time.perf_counter()
        awq = quantize_model(model.params, model.cfg, calibration, "int4", group)
        result["formats"][f"int4_g{group}_awq"] = measure(awq, round(time.perf_counter() - start, 1))
    result["checkpoints"] = checkpoints(args.model, model, measure_logits)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
