"""Every architecture through GGUF, as llama.cpp writes it.

Each tiny HF checkpoint in tests/data/hf_tiny is converted here the way llama.cpp's
convert_hf_to_gguf.py converts it (its architecture names, gguf-py's tensor names, its metadata keys per
model class, LlamaModel's Q/K permutation, Gemma's 1 + w norms, Phi-3's fused tensors and LongRoPE
factor tensors, experts stacked [E, out, in], float32 tensors), then read back with `read_gguf` and
held to `read_hf` (config and every parameter) and to transformers' reference logits.

A GGUF file cannot say everything config.json says: `LOST` names, per architecture, the fields whose
value then comes from llama.cpp's rules instead (asserted in `INSTEAD`). For the logits, the lost
fields that change the math are given back from the HF config, so the check covers everything else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.checkpoint.hf_reader import read_hf
from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.ops.rope import inv_frequencies
from tests.tiny_models import prefill_logits

DATA = Path(__file__).parent / "data" / "hf_tiny"
ARCHITECTURES = sorted(p.name for p in DATA.iterdir() if (p / "reference.json").exists()) if DATA.is_dir() else []
TOLERANCE = 1e-4
A = gguf.MODEL_ARCH
# HF model type -> the llama.cpp architecture its converter class writes.
LLAMA_CPP = {"llama": A.LLAMA, "mistral": A.LLAMA, "mixtral": A.LLAMA, "qwen2": A.QWEN2, "qwen3": A.QWEN3, "qwen3_moe": A.QWEN3MOE,
             "olmoe": A.OLMOE, "gemma2": A.GEMMA2, "gemma3_text": A.GEMMA3, "phi3": A.PHI3}
# Config fields a llama.cpp GGUF of these checkpoints does not carry.
LOST = {
    "llama": ("rope_scaling",),  # Llama 3's parameters arrive as rope_freqs, the per-frequency factors they make
    "mistral": ("architecture", "layer_types", "sliding_window"),  # written as "llama", which has no window
    "mixtral": ("layer_types", "sliding_window"),
    "gemma2": ("query_pre_attn_scalar",),  # llama.cpp: head_dim (hidden / heads at 27B), never the config's
    "gemma3_text": ("query_pre_attn_scalar", "layer_types"),  # and a window pattern of 6 (this model's is 4)
}
# What they are instead, from the GGUF config and the HF one.
INSTEAD = {
    "llama": lambda g, h: g.rope_scaling.kind == "factors" and np.allclose(inv_frequencies(g), inv_frequencies(h), rtol=1e-6, atol=0),
    "mistral": lambda g, h: (g.architecture, g.layer_types, g.sliding_window) == ("llama", (), None),
    "mixtral": lambda g, h: (g.architecture, g.layer_types, g.sliding_window) == ("mixtral", (), None),
    "gemma2": lambda g, h: g.query_pre_attn_scalar == g.head_dim,
    "gemma3_text": lambda g, h: g.query_pre_attn_scalar == g.head_dim and g.layer_types == ("sliding_attention",) * 4,
}
MATH = ("query_pre_attn_scalar", "layer_types", "sliding_window")  # lost fields given back for the logits check


# ---------------------------------------------------------------------------------------------------
# A small convert_hf_to_gguf.py: the metadata each of its model classes writes, and its tensors.

def _rope_parameters(hf: dict) -> dict:
    """TextModel.__init__'s rope_parameters: transformers 5's, or the hub's rope_scaling with rope_theta."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if "rope_local_base_freq" in hf:
            rope["sliding_attention"] = {"rope_theta": hf["rope_local_base_freq"]}
        rope.setdefault("rope_theta", hf.get("rope_theta"))
        rope.setdefault("rope_type", rope.get("type"))
    return rope


def _metadata(hf: dict) -> dict[str, tuple]:
    """GGUFWriter method -> its arguments, as the model's converter class calls them (a later call of
    the same method overwrites the earlier, as the writer does)."""
    kind = hf["model_type"]
    rope = _rope_parameters(hf)
    full = rope.get("full_attention", rope)
    heads = hf["num_attention_heads"]
    kv: dict[str, tuple] = {}
    if kind in ("gemma2", "phi3"):  # Gemma2Model and Phi3MiniModel write their own list (no TextModel keys)
        kv.update(add_context_length=(hf["max_position_embeddings"],), add_embedding_length=(hf["hidden_size"],),
                  add_block_count=(hf["num_hidden_layers"],), add_feed_forward_length=(hf["intermediate_size"],),
                  add_head_count=(heads,), add_head_count_kv=(hf.get("num_key_value_heads", heads),),
                  add_layer_norm_rms_eps=(hf["rms_norm_eps"],))
    else:  # TextModel.set_gguf_parameters
        kv.update(add_block_count=(hf["num_hidden_layers"],), add_context_length=(hf["max_position_embeddings"],),
                  add_embedding_length=(hf["hidden_size"],), add_feed_forward_length=(hf["intermediate_size"],),
                  add_head_count=(heads,), add_head_count_kv=(hf["num_key_value_heads"],))
        if full.get("rope_type") == "linear":
            kv.update(add_rope_scaling_type=(gguf.RopeScalingType.LINEAR,), add_rope_scaling_factor=(full["factor"],))
        if full.get("rope_theta") is not None:
            kv["add_rope_freq_base"] = (full["rope_theta"],)
        if rope.get("sliding_attention", {}).get("rope_theta") is not None:
            kv["add_rope_freq_base_swa"] = (rope["sliding_attention"]["rope_theta"],)
        kv["add_layer_norm_rms_eps"] = (hf["rms_norm_eps"],)
        if (experts := hf.get("num_local_experts") or hf.get("num_experts")) is not None:
            kv["add_expert_count"] = (experts,)
        if hf.get("num_experts_per_tok") is not None:
            kv["add_expert_used_count"] = (hf["num_experts_per_tok"],)
        if hf.get("head_dim") is not None:
            kv.update(add_key_length=(hf["head_dim"],), add_value_length=(hf["head_dim"],))
    kv["add_file_type"] = (gguf.LlamaFileType.ALL_F32,)
    if kind in ("llama", "mistral", "mixtral"):  # LlamaModel
        kv.update(add_vocab_size=(hf["vocab_size"],), add_rope_dimension_count=(hf.get("head_dim") or hf["hidden_size"] // heads,))
    elif kind == "qwen3_moe":  # Qwen2MoeModel
        kv["add_expert_feed_forward_length"] = (hf["moe_intermediate_size"],)
    elif kind == "olmoe":
        kv["add_layer_norm_rms_eps"] = (1e-5,)
    elif kind == "gemma2":
        kv.update(add_key_length=(hf["head_dim"],), add_value_length=(hf["head_dim"],),
                  add_attn_logit_softcapping=(hf["attn_logit_softcapping"],),
                  add_final_logit_softcapping=(hf["final_logit_softcapping"],), add_sliding_window=(hf["sliding_window"],))
    elif kind == "gemma3_text":  # Gemma3Model, after TextModel's
        kv.update(add_context_length=(hf.get("max_position_embeddings", 131072),), add_head_count=(heads,),
                  add_layer_norm_rms_eps=(hf.get("rms_norm_eps", 1e-6),), add_key_length=(hf.get("head_dim", 256),),
                  add_value_length=(hf.get("head_dim", 256),), add_rope_freq_base=(full.get("rope_theta", 1e6),),
                  add_head_count_kv=(hf.get("num_key_value_heads", 4),))
        if hf.get("final_logit_softcapping"):
            kv["add_final_logit_softcapping"] = (hf["final_logit_softcapping"],)
        if hf.get("sliding_window_pattern") != 1:
            kv["add_sliding_window"] = (hf["sliding_window"],)
    elif kind == "phi3":
        original = rope["original_max_position_embeddings"]
        kv.update(add_rope_scaling_orig_ctx_len=(original,),
                  add_rope_dimension_count=(int(rope.get("partial_rotary_factor", 1.0) * hf["hidden_size"]) // heads,),
                  add_rope_freq_base=(full["rope_theta"],), add_sliding_window=(hf.get("sliding_window") or 0,))
        if rope.get("long_factor"):  # generate_extra_tensors
            scale = hf["max_position_embeddings"] / original
            kv["add_rope_scaling_attn_factors"] = (float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1 else 1.0,)
    return kv


def _llama3_factors(hf: dict) -> np.ndarray:
    """LlamaModel.generate_extra_tensors' rope_freqs (the original context from rope_parameters, where
    transformers 5 keeps it)."""
    rope = _rope_parameters(hf)
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """LlamaModel.permute: HF's half-split rotary rows -> llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path, hf: dict, per_expert: bool = False) -> dict[str, np.ndarray]:
    """GGUF name -> float32 tensor, as the converter's modify_tensors makes them (with `per_expert`,
    older Mixtral files' one tensor per expert instead of the stacked ones)."""
    kind = hf["model_type"]
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    names = gguf.get_tensor_name_map(LLAMA_CPP[kind], layers)
    hf_tensors = load_file(str(folder / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, w in hf_tensors.items():
        w = np.asarray(w, np.float32)
        if name == "lm_head.weight" and kind in ("gemma2", "gemma3_text"):
            continue  # Gemma's converters skip lm_head: llama.cpp reads its output from token_embd
        if kind in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
            w = w + np.float32(1)  # stored as the 1 + w they scale by
        if kind in ("llama", "mistral", "mixtral") and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, heads)
        elif kind in ("llama", "mistral", "mixtral") and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, hf.get("num_key_value_heads") or heads)
        parts = name.split(".")
        if ".experts." in name:  # model.layers.{i}.(mlp|block_sparse_moe).experts.{e}.{w}.weight
            experts.setdefault((int(parts[2]), parts[-2]), {})[int(parts[-3])] = w
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, f"gguf-py maps no name for {name}"
        out[gguf_name] = w
    for (layer, which), ws in experts.items():
        stacked_name = (f"layers.{layer}.feed_forward.experts.{which}.weight" if kind == "mixtral"
                        else f"model.layers.{layer}.mlp.experts.{which}.weight")
        gguf_name = names.get_name(stacked_name, try_suffixes=(".weight",))
        if per_expert:
            for e, w in ws.items():
                out[gguf_name.replace("_exps.weight", f".{e}.weight")] = w
        else:
            out[gguf_name] = np.stack([ws[e] for e in sorted(ws)])
    rope = _rope_parameters(hf)
    if kind == "llama" and rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = _llama3_factors(hf)
    if kind == "phi3" and rope.get("long_factor"):
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    return out


def _tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """TextModel._set_vocab_gpt2 from the folder's tokenizer.json (byte-level BPE)."""
    tk = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in tk["model"]["vocab"].items()}
    special = {t["id"] for t in tk["added_tokens"] if t["special"]}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [3 if i in special else 1 if i in by_id else 5 for i in range(vocab_size)]  # CONTROL, NORMAL, UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tk["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tk["model"]["vocab"][config["bos_token"]])
    w.add_eos_token_id(tk["model"]["vocab"][config["eos_token"]])
    w.add_add_bos_token(config.get("add_bos_token", False))
    w.add_chat_template(config["chat_template"])


def convert(folder: Path, path: Path, per_expert: bool = False) -> Path:
    hf = json.loads((folder / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[LLAMA_CPP[hf["model_type"]]])
    for method, args in _metadata(hf).items():
        getattr(w, method)(*args)
    _tokenizer(w, folder, hf["vocab_size"])
    for name, tensor in _tensors(folder, hf, per_expert).items():
        w.add_tensor(name, np.ascontiguousarray(tensor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """Equal, floats as the float32 GGUF stores."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and np.float32(a) == np.float32(b)
    return a == b


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gguf_reads_as_hf_and_matches_transformers(tmp_path: Path, arch: str) -> None:
    folder = DATA / arch
    cfg, params, tokenizer = read_gguf(convert(folder, tmp_path / f"{arch}.gguf"))
    hf_cfg, hf_params, _ = read_hf(folder)

    # (a) the config, but for what GGUF cannot carry (and that, as llama.cpp has it)
    lost = LOST.get(arch, ())
    differ = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in lost and not _same(getattr(cfg, f.name), getattr(hf_cfg, f.name))]
    assert not differ, {f: (getattr(cfg, f), getattr(hf_cfg, f)) for f in differ}
    assert arch not in INSTEAD or INSTEAD[arch](cfg, hf_cfg), {f: getattr(cfg, f) for f in lost}

    # (b) every parameter, to the bit
    assert jax.tree.structure(params) == jax.tree.structure(hf_params)
    for (path, got), want in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(hf_params)):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))

    # (c) transformers' logits, with the lost fields that change the math given back
    meta = json.loads((folder / "reference.json").read_text())
    reference = load_file(str(folder / "reference.safetensors"))
    run_cfg = dataclasses.replace(cfg, **{f: getattr(hf_cfg, f) for f in lost if f in MATH})
    jparams = jax.tree.map(jnp.asarray, params)
    errors = [float(np.max(np.abs(prefill_logits(run_cfg, jparams, p["ids"], pad_to=128) - reference[p["logits"]]))) for p in meta["prompts"]]
    assert max(errors) < TOLERANCE, f"{arch}: max |logit error| per prompt {errors}"
    assert [tokenizer.encode(p["text"]) for p in meta["prompts"]] == [p["ids"] for p in meta["prompts"]]


def test_older_mixtral_files_with_one_tensor_per_expert(tmp_path: Path) -> None:
    """llama.cpp's older Mixtral files name each expert's matrices blk.{i}.ffn_gate.{e}.weight..."""
    _, stacked, _ = read_gguf(convert(DATA / "mixtral", tmp_path / "stacked.gguf"))
    path = convert(DATA / "mixtral", tmp_path / "per_expert.gguf", per_expert=True)
    assert "blk.1.ffn_down.3.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    _, per_expert, _ = read_gguf(path)
    jax.tree.map(np.testing.assert_array_equal, per_expert, stacked)


def _meta(arch: str, **keys: Any) -> dict[str, Any]:
    meta = {"general.architecture": arch, f"{arch}.embedding_length": 64, f"{arch}.block_count": 4, f"{arch}.feed_forward_length": 96,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2, "tokenizer.ggml.tokens": ["a"] * 320}
    return {**meta, **{f"{arch}.{k}": v for k, v in keys.items()}}


@pytest.mark.parametrize(
    "arch, layers, hidden, heads, head_dim, scalar",
    [("gemma2", 26, 2304, 8, 256, 256), ("gemma2", 42, 3584, 16, 256, 256), ("gemma2", 46, 4608, 32, 128, 144),
     ("gemma3", 26, 1152, 4, 256, 256), ("gemma3", 34, 2560, 8, 256, 256), ("gemma3", 62, 5376, 32, 128, 168)],
)
def test_gemma_attention_scale_is_llama_cpps(arch: str, layers: int, hidden: int, heads: int, head_dim: int, scalar: int) -> None:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), but at 27B (told by the layer count) by
    1/sqrt(hidden / heads): each published size's query_pre_attn_scalar."""
    meta = _meta(arch, block_count=layers, embedding_length=hidden, **{"attention.head_count": heads, "attention.key_length": head_dim,
                                                                       "attention.sliding_window": 512})
    assert ModelConfig.from_gguf(meta, {"blk.0.attn_q.weight"}).query_pre_attn_scalar == scalar


@pytest.mark.parametrize(
    "arch, keys, sliding",
    [
        ("gemma3", {"attention.sliding_window": 24}, [1, 1, 1, 1]),  # llama.cpp's period 6
        ("gemma3", {"attention.sliding_window": 24, "attention.sliding_window_pattern": 4}, [1, 1, 1, 0]),
        ("gemma3", {"attention.sliding_window": 24, "attention.sliding_window_pattern": [True, False, True, True]}, [1, 0, 1, 1]),
        ("gemma3", {}, [0, 0, 0, 0]),  # no window: none slides
        ("gemma2", {}, [1, 0, 1, 0]),  # llama.cpp's default window 4096, every other layer
        ("phi3", {"attention.sliding_window": 0}, [0, 0, 0, 0]),  # the converter's "no window"
        ("phi3", {"attention.sliding_window": 2047}, [1, 1, 1, 1]),
        ("llama", {"attention.sliding_window": 4096}, [0, 0, 0, 0]),  # llama.cpp's llama has no windows
    ],
)
def test_sliding_windows_as_llama_cpp_sets_them(arch: str, keys: dict, sliding: list[int]) -> None:
    cfg = ModelConfig.from_gguf(_meta(arch, **keys), {"blk.0.attn_q.weight"})
    assert [int(s) for s in cfg.sliding_layers] == sliding


def test_moe_routing_as_llama_cpp_runs_it() -> None:
    """Qwen3-MoE always renormalises its top-k weights, OLMoE never does; a Qwen3-MoE file without an
    expert width gets llama.cpp's n_ff / n_expert_used; a "llama" file with experts is Mixtral."""
    qwen = ModelConfig.from_gguf(_meta("qwen3moe", expert_count=8, expert_used_count=2), set())
    olmoe = ModelConfig.from_gguf(_meta("olmoe", expert_count=8, expert_used_count=2), set())
    mixtral = ModelConfig.from_gguf(_meta("llama", expert_count=8, expert_used_count=2), set())
    assert (qwen.architecture, qwen.norm_topk_prob, qwen.moe_intermediate_size, qwen.qk_norm) == ("qwen3_moe", True, 48, "head")
    assert (olmoe.norm_topk_prob, olmoe.moe_intermediate_size, olmoe.qk_norm) == (False, 96, "full")
    assert (mixtral.architecture, mixtral.norm_topk_prob, mixtral.moe_intermediate_size) == ("mixtral", True, 96)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2moe", "gemma3n"])
def test_an_architecture_we_do_not_run_is_named(tmp_path: Path, arch: str) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError) as e:
        read_gguf(tmp_path / "m.gguf")
    message = str(e.value)
    assert f"unsupported architecture {arch!r}" in message and "\n" not in message
    assert "llama, mistral, qwen2, qwen3, qwen3moe, olmoe, gemma2, gemma3, phi3" in message
