"""Every quant type llama.cpp writes for Llama-family models loads through `read_gguf`: the dense
weights (and the embedding and output head) come back as `gguf.quants.dequantize` of the file's own
bytes, in our [in, out] layout with llama's Q/K rows un-permuted; Q4_0, Q4_1 and Q4_K also kept as
packed 4-bit blocks; a type `gguf` cannot dequantize is refused naming the type.

Types `gguf.quants.quantize` can write are quantized from the tiny model's weights; the rest
(K-quants, IQ types) are random block bytes: random codes (every grid index an IQ type can encode is
in its grid) with finite float16 (super-)block scales."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.checkpoint.layout import unpermute_rope
from jaxserve.errors import UserError
from jaxserve.ops.quant import Int4Weight
from tests.tiny_models import permute_rope, tiny_config, tiny_params, write_gguf

Q = gguf.GGMLQuantizationType
# K-quants and the 256-value IQ types need input dims that are multiples of 256.
CFG = tiny_config("llama", hidden_size=256, intermediate_size=256, num_heads=8, num_kv_heads=4, head_dim=32)
# GGUF layer tensor -> (our parameter, rows of the [out, in] tensor).
DENSE = {
    "attn_q": ("wq", 256), "attn_k": ("wk", 128), "attn_v": ("wv", 128), "attn_output": ("wo", 256),
    "ffn_gate": ("w_gate", 256), "ffn_up": ("w_up", 256), "ffn_down": ("w_down", 256),
}
WRITABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]  # gguf.quants.quantize writes these
# Byte offsets of the float16 (super-)block scales in one block of each type gguf cannot write.
F16_FIELDS = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,),
    Q.IQ1_M: (), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}
FAMILIES = {
    "legacy": WRITABLE,
    "k-quants": [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    "iq2": [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S],
    "iq3": [Q.IQ3_XXS, Q.IQ3_S],
    "iq1": [Q.IQ1_S, Q.IQ1_M],
    "iq4": [Q.IQ4_NL, Q.IQ4_XS],
}


@pytest.fixture(scope="module")
def params():
    return tiny_params(CFG)


def _scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Finite, small float16 scales as their uint16 bits."""
    return rng.uniform(0.001, 0.01, shape).astype(np.float16).view(np.uint16)


def random_blocks(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    """Random valid blocks of `qtype` for a [rows, cols] tensor, as bytes [rows, row_bytes]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        blocks[..., at : at + 2] = _scales(rng, blocks.shape[:2])[..., None].view(np.uint8)
    if qtype == Q.IQ1_M:  # its float16 scale is split in four nibbles, the top nibble of the last 4 uint16s
        tail = np.ascontiguousarray(blocks[..., -8:]).view(np.uint16)  # [rows, nb, 4]
        d = _scales(rng, blocks.shape[:2])[..., None] >> np.array([0, 4, 8, 12], np.uint16)
        blocks[..., -8:] = ((tail & 0x0FFF) | ((d & 0xF) << 12)).astype(np.uint16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _file_tensors(qtype, params, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF tensor name -> (bytes, qtype) for every 2-D tensor: the file's dense layers, embedding and
    output head, in llama.cpp's layout ([out, in], Q/K rows permuted)."""
    torch = {"token_embd.weight": params["embed"], "output.weight": params["lm_head"].T}
    for i in range(CFG.num_layers):
        for name, (param, _) in DENSE.items():
            w = params["layers"][param][i].T
            if name == "attn_q":
                w = permute_rope(w, CFG.num_heads)
            elif name == "attn_k":
                w = permute_rope(w, CFG.num_kv_heads)
            torch[f"blk.{i}.{name}.weight"] = np.ascontiguousarray(w, np.float32)
    if qtype in WRITABLE:
        return {name: (gguf.quants.quantize(w, qtype), qtype) for name, w in torch.items()}
    return {name: (random_blocks(rng, qtype, *w.shape), qtype) for name, w in torch.items()}


def _expected(raw: dict, name: str, num_heads: int | None = None) -> np.ndarray:
    """gguf's own floats for tensor `name`, in our layout: Q/K rows un-permuted, then [in, out]."""
    data, qtype = raw[name]
    w = gguf.quants.dequantize(data, qtype)
    assert np.all(np.isfinite(w)) and np.abs(w).max() > 0, name
    return (unpermute_rope(w, num_heads) if num_heads else w).T


def _write(tmp_path: Path, qtype, params) -> tuple[Path, dict]:
    raw = _file_tensors(qtype, params, np.random.default_rng(int(qtype)))
    return write_gguf(tmp_path / f"{qtype.name}.gguf", CFG, params, raw=raw), raw


def _check_dense(loaded, raw: dict) -> None:
    heads = {"attn_q": CFG.num_heads, "attn_k": CFG.num_kv_heads}
    for name, (param, _) in DENSE.items():
        stack = loaded["layers"][param]
        stack = np.asarray(stack.dequantize()) if isinstance(stack, Int4Weight) else stack  # [layers, in, out]
        for i in range(CFG.num_layers):
            expected = _expected(raw, f"blk.{i}.{name}.weight", heads.get(name))
            np.testing.assert_array_equal(stack[i], expected, err_msg=f"layer {i} {param}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quant_family_loads_as_gguf_dequantizes(tmp_path: Path, params, family: str) -> None:
    for qtype in FAMILIES[family]:
        path, raw = _write(tmp_path, qtype, params)
        cfg, loaded, _ = read_gguf(path)
        assert cfg == CFG, qtype.name
        _check_dense(loaded, raw)
        np.testing.assert_array_equal(loaded["embed"], _expected(raw, "token_embd.weight").T, err_msg=qtype.name)
        np.testing.assert_array_equal(loaded["lm_head"], _expected(raw, "output.weight"), err_msg=qtype.name)
        if qtype in WRITABLE:  # quantized from the model: the Q/K permutation really was undone
            assert np.abs(loaded["layers"]["wq"] - params["layers"]["wq"]).mean() < 0.05, qtype.name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_packed_4bit_blocks_dequantize_to_gguf_floats(tmp_path: Path, params, qtype) -> None:
    path, raw = _write(tmp_path, qtype, params)
    _, packed, _ = read_gguf(path, keep_int4=True)
    for param, _ in DENSE.values():
        assert isinstance(packed["layers"][param], Int4Weight), param
    _check_dense(packed, raw)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K], ids=lambda q: q.name)
def test_type_gguf_cannot_dequantize_is_refused_by_name(tmp_path: Path, params, qtype) -> None:
    """Activation-only block types (never written for weights by llama.cpp) that `gguf` cannot read."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = {"blk.1.ffn_up.weight": (np.zeros((256, 256 // block * size), np.uint8), qtype)}
    path = write_gguf(tmp_path / "bad.gguf", CFG, params, raw=raw)
    with pytest.raises(UserError, match=rf"blk\.1\.ffn_up\.weight has unsupported quantization type {qtype.name}\b"):
        read_gguf(path)
