"""Loaders and our checkpoint format: GGUF (every writable quant type, Q/K permutation undone), HF
safetensors (single and sharded), and round trips through `convert` with identical logits."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.checkpoint.hf_reader import read_hf
from jaxserve.checkpoint.layout import unpermute_rope
from jaxserve.checkpoint.loader import convert
from jaxserve.checkpoint.native import load_checkpoint
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
