"""Loaders and our checkpoint format: GGUF (every writable quant type, Q/K permutation undone), HF
safetensors (single and sharded), and round trips through `convert` with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.checkpoint.hf_reader import read_hf
from jaxserve.checkpoint.layout import unpermute_rope
from jaxserve.checkpoint.loader import convert, load_model
from jaxserve.checkpoint.native import load_checkpoint
from jaxserve.errors import UserError
from jaxserve.ops.quant import Int4Weight, weight_format
from tests.tiny_models import permute_rope, prefill_logits, tiny_config, tiny_params, write_gguf, write_hf_folder

Q = gguf.GGMLQuantizationType
PROMPT = [5, 77, 140, 3, 200, 9, 33, 251, 1, 60]
VARIANTS = {
    "llama-untied": tiny_config("llama"),
    "llama-tied": tiny_config("llama", tie_word_embeddings=True),
    "qwen2-bias-tied": tiny_config("qwen2", tie_word_embeddings=True),
    "mistral-mha": tiny_config("mistral", num_kv_heads=4),
}


def _assert_same_params(a, b) -> None:
    flat_a, flat_b = jax.tree.flatten_with_path(a)[0], jax.tree.flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert not np.array_equal(permute_rope(w, 8), w)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(w, 8), 8), w)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gguf_f32_loads_exact_weights(tmp_path: Path, name: str) -> None:
    cfg = VARIANTS[name]
    params = tiny_params(cfg)
    loaded_cfg, loaded, tokenizer = read_gguf(write_gguf(tmp_path / "m.gguf", cfg, params))
    assert loaded_cfg == cfg
    _assert_same_params(params, loaded)
    assert tokenizer.encode("the theme") == [119, 260, 261, 112, 104]  # t he | Ġthe m e (bytes are 3 + b)
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_gguf_quantized_weights_dequantize(tmp_path: Path, qtype) -> None:
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=256, num_heads=8, num_kv_heads=4, head_dim=32)
    params = tiny_params(cfg)
    _, loaded, _ = read_gguf(write_gguf(tmp_path / "q.gguf", cfg, params, qtype))
    wq = params["layers"]["wq"][1].T  # HF [out, in]
    expected = unpermute_rope(gguf.quants.dequantize(gguf.quants.quantize(permute_rope(wq, 8), qtype), qtype), 8)
    np.testing.assert_array_equal(loaded["layers"]["wq"][1], expected.T)
    # Quantization error stays small, so the permutation really was undone.
    assert np.abs(loaded["layers"]["wq"][1] - params["layers"]["wq"][1]).mean() < 0.05


def _q4k_bytes(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks [rows, cols / 256 * 144] with finite float16 super-block scales."""
    blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = rng.uniform(0.001, 0.01, (rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_4bit_blocks_are_kept_as_stored(tmp_path: Path, qtype) -> None:
    """Kept packed, every block dequantizes to gguf's own floats to the bit (Q/K rows unpermuted with
    their scales); a parameter one layer stores in another type (layer 0's ffn_down in Q8_0, as
    Q4_K_M files mix in Q6_K) is read as float."""
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=256, num_heads=8, num_kv_heads=4, head_dim=32)
    params = tiny_params(cfg)
    raw = {"blk.0.ffn_down.weight": (gguf.quants.quantize(params["layers"]["w_down"][0].T, Q.Q8_0), Q.Q8_0)}
    if qtype == Q.Q4_K:  # gguf cannot write Q4_K: random blocks are valid ones
        rng = np.random.default_rng(0)
        rows = {"attn_q": 256, "attn_k": 128, "attn_v": 128, "attn_output": 256, "ffn_gate": 256, "ffn_up": 256, "ffn_down": 256}
        for i in range(cfg.num_layers):
            raw.update({f"blk.{i}.{n}.weight": (_q4k_bytes(rng, r, 256), qtype) for n, r in rows.items() if (i, n) != (0, "ffn_down")})
    path = write_gguf(tmp_path / "q.gguf", cfg, params, None if qtype == Q.Q4_K else qtype, raw=raw)
    _, floats, _ = read_gguf(path)
    _, packed, _ = read_gguf(path, keep_int4=True)
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up"):
        w = packed["layers"][name]
        assert isinstance(w, Int4Weight) and w.group == 32, name
        assert w.scale.dtype == (np.float32 if qtype == Q.Q4_K else np.float16)  # Q4_K's d * sc needs 17 bits
        np.testing.assert_array_equal(np.asarray(w.dequantize()), floats["layers"][name], err_msg=name)
    np.testing.assert_array_equal(packed["layers"]["w_down"], floats["layers"]["w_down"])


def _int4_source(tmp_path: Path, source: str) -> Path:
    """A tiny tied llama as GGUF: float32, or Q4_1 blocks with layer 1's ffn_down in Q8_0."""
    cfg = tiny_config("llama", tie_word_embeddings=True)
    params = tiny_params(cfg)
    if source == "f32":
        return write_gguf(tmp_path / "f32.gguf", cfg, params)
    raw = {"blk.1.ffn_down.weight": (gguf.quants.quantize(params["layers"]["w_down"][1].T, Q.Q8_0), Q.Q8_0)}
    return write_gguf(tmp_path / "q4_1.gguf", cfg, params, Q.Q4_1, raw=raw)


def test_int4_load_keeps_gguf_blocks_and_rounds_the_rest(tmp_path: Path) -> None:
    src = _int4_source(tmp_path, "q4_1")
    _, floats, _ = read_gguf(src)
    model = load_model(str(src), "float32", unroll_layers=False, quantization="int4")
    layers = model.params["layers"]
    np.testing.assert_array_equal(np.asarray(layers["wq"].dequantize()), floats["layers"]["wq"])
    np.testing.assert_array_equal(np.asarray(layers["attn_norm"]), floats["layers"]["attn_norm"])  # no scales folded in
    down = layers["w_down"]  # float in the file (mixed types): rounded to 4 bits, within half a step
    step = np.asarray(down.scale, np.float32).repeat(32, axis=-2)
    assert np.all(np.abs(np.asarray(down.dequantize()) - floats["layers"]["w_down"]) <= step / 2 + 1e-6)
    unrolled = load_model(str(src), "float32", quantization="int4")  # q/k/v fused field by field
    assert isinstance(unrolled.params["layers"][0]["wqkv"], Int4Weight)
    np.testing.assert_allclose(prefill_logits(unrolled.cfg, unrolled.params, PROMPT), prefill_logits(model.cfg, model.params, PROMPT), atol=1e-5)


@pytest.mark.parametrize(("source", "quantization"), [("f32", "int4"), ("q4_1", "int4"), ("f32", "int8")])
def test_quantized_checkpoint_is_served_as_converted(tmp_path: Path, source: str, quantization: str) -> None:
    """Calibrated (float source) or kept (4-bit blocks) once at convert: loading the checkpoint gives
    the dense layers and norms load-time quantization gives, to the bit; the embedding comes back
    from 8-bit blocks within half a step."""
    src = _int4_source(tmp_path, source)
    ref = load_model(str(src), "float32", unroll_layers=False, quantization=quantization)
    convert(src, tmp_path / "q", quantization)
    assert json.loads((tmp_path / "q" / "jaxserve.json").read_text())["weights"] == quantization
    got = load_model(str(tmp_path / "q"), "float32", unroll_layers=False)
    assert weight_format(got.params) == quantization
    _assert_same_params(got.params["layers"], ref.params["layers"])
    embed, ref_embed = np.asarray(got.params["embed"]), np.asarray(ref.params["embed"])
    half_step = np.abs(ref_embed).reshape(-1, 32).max(-1).repeat(32).reshape(embed.shape) / 127 / 2
    assert np.all(np.abs(embed - ref_embed) <= half_step * 1.01)
    logits, ref_logits = prefill_logits(got.cfg, got.params, PROMPT), prefill_logits(ref.cfg, ref.params, PROMPT)
    np.testing.assert_allclose(logits, ref_logits, atol=0.02 * np.abs(ref_logits).max())  # the embedding's rounding, amplified by random weights
    # Served as stored: another quantization or group size is refused, the same one is a no-op.
    other = "int8" if quantization == "int4" else "int4"
    with pytest.raises(UserError, match=f"holds {quantization} weights, which cannot be re-quantized to {other}"):
        load_model(str(tmp_path / "q"), "float32", quantization=other)
    if quantization == "int4":
        with pytest.raises(UserError, match="holds int4 weights in groups of 32, not 64"):
            load_model(str(tmp_path / "q"), "float32", quantization="int4", group_size=64)
    again = load_model(str(tmp_path / "q"), "float32", unroll_layers=False, quantization=quantization)
    _assert_same_params(again.params["layers"], got.params["layers"])


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_safetensors_loads_exact_weights(tmp_path: Path, shards: int) -> None:
    cfg = tiny_config("llama")
    params = tiny_params(cfg)
    loaded_cfg, loaded, tokenizer = read_hf(write_hf_folder(tmp_path / "hf", cfg, params, shards))
    assert loaded_cfg == cfg
    _assert_same_params(params, loaded)
    assert tokenizer.encode("the theme") == [119, 260, 261, 112, 104]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_convert_round_trip_gives_identical_logits(tmp_path: Path, source: str) -> None:
    cfg = tiny_config("qwen2") if source == "hf" else tiny_config("llama", tie_word_embeddings=True)
    params = tiny_params(cfg)
    src = write_gguf(tmp_path / "m.gguf", cfg, params) if source == "gguf" else write_hf_folder(tmp_path / "hf", cfg, params, 2)
    src_cfg, src_params, src_tok = read_gguf(src) if source == "gguf" else read_hf(src)
    convert(src, tmp_path / "ckpt")
    ck_cfg, ck_params, ck_tok = load_checkpoint(tmp_path / "ckpt")
    assert ck_cfg == src_cfg
    np.testing.assert_array_equal(prefill_logits(ck_cfg, ck_params, PROMPT), prefill_logits(src_cfg, src_params, PROMPT))
    np.testing.assert_array_equal(prefill_logits(ck_cfg, ck_params, PROMPT), prefill_logits(cfg, params, PROMPT))
    text = "<|im_start|>the theme ünïcode 🦙"
    assert ck_tok.encode(text) == src_tok.encode(text)
    assert ck_tok.chat_template == src_tok.chat_template


def test_smollm2_gguf_to_checkpoint_round_trip(smollm2, tmp_path: Path) -> None:
    """The cached SmolLM2 checkpoint was converted from the GGUF; converting it again is lossless."""
    from jaxserve.checkpoint import registry

    ckpt = registry.checkpoint_dir(registry.DEFAULT_MODEL)
    convert(ckpt, tmp_path / "again")
    cfg, params, _ = load_checkpoint(tmp_path / "again")
    ids = smollm2.tokenizer.encode("The capital of France is")
    # Same layout as the loaded model (stacked), so the same arithmetic.
    np.testing.assert_array_equal(prefill_logits(cfg, params, ids), prefill_logits(smollm2.cfg, smollm2.params, ids))


def test_warm_load_does_not_touch_the_gguf(smollm2, monkeypatch) -> None:
    import jaxserve.checkpoint.loader as loader
    from jaxserve.checkpoint import registry

    assert not list((registry.cache_dir() / "downloads").glob("*.gguf"))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("warm load read a GGUF or downloaded")

    monkeypatch.setattr(loader, "read_gguf", forbidden)
    monkeypatch.setattr(registry, "download_gguf", forbidden)
    model = loader.load_model(registry.DEFAULT_MODEL)
    assert model.cfg == smollm2.cfg
