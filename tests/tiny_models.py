"""Tiny random models written to disk in every source format the loaders read."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.interface import Admission
from jaxserve.models.llama import Params, init_params

# Limits of the tiny-model engines, one step-shape set each, compiled once for all the tests that use
# it: the usual one, and a small cache of 4-token pages (page sharing, forks, preemption).
TINY_ENGINE = EngineConfig(num_pages=64, max_num_seqs=8, max_num_batched_tokens=128, prefill_row_len=32, max_model_len=512)
SMALL_PAGES = EngineConfig(num_pages=48, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, prefill_row_len=32, max_model_len=128)


def byte_level_vocab() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte is one token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_level_vocab() + ["Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    base = dict(
        architecture=architecture,
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        qkv_bias=architecture == "qwen2",
    )
    return ModelConfig(**{**base, **overrides})


def tiny_params(cfg: ModelConfig, seed: int = 0) -> Params:
    return jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed)))


def permute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's conversion permutation (HF half-split rows -> interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _torch_layout(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF tensor names and [out, in] layouts."""
    hf = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = params["lm_head"].T
    names = {
        "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "mlp_norm": "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    }
    for name, stack in params["layers"].items():
        for i in range(cfg.num_layers):
            w = stack[i]
            hf[f"model.layers.{i}.{names[name]}"] = w.T if w.ndim == 2 else w
    return {k: np.ascontiguousarray(v, np.float32) for k, v in hf.items()}


def write_gguf(
    path: Path, cfg: ModelConfig, params: Params, qtype=None, arch: str | None = None, raw: dict | None = None
) -> Path:
    """A GGUF file like llama.cpp's converter writes (Q/K permuted for llama), weights in `qtype`;
    `raw` maps GGUF tensor names to (bytes array, quant type) written as they are."""
    import gguf

    qtype = qtype or gguf.GGMLQuantizationType.F32
    arch = arch or cfg.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
        "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    }
    permute = cfg.architecture in ("llama", "mistral")
    for name, tensor in _torch_layout(cfg, params).items():
        if name in gguf_names:
            out = gguf_names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            out = f"blk.{i}.{layer_names[rest]}"
        if permute and out.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = permute_rope(tensor, cfg.num_heads)
        elif permute and out.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = permute_rope(tensor, cfg.num_kv_heads)
        if raw and out in raw:
            w.add_tensor(out, raw[out][0], raw_dtype=raw[out][1])
        elif tensor.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(out, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_folder(folder: Path, cfg: ModelConfig, params: Params, shards: int = 1) -> Path:
    """config.json + safetensors (sharded with an index when shards > 1) + tokenizer files."""
    from safetensors.numpy import save_file

    from jaxserve.tokenizer import _gguf_byte_level_bpe

    folder.mkdir(parents=True, exist_ok=True)
    hf_config = {
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    (folder / "config.json").write_text(json.dumps(hf_config))
    tensors = _torch_layout(cfg, params)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tk = _gguf_byte_level_bpe(TOKENS, MERGES, "default")
    import tokenizers

    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in TOKENS[:3]])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE})
    )
    return folder


def prefill_logits(
    cfg: ModelConfig, params: Params, ids: list[int], page_size: int = 16, kv_cache_dtype: str = "auto", pad_to: int | None = None
) -> np.ndarray:
    """Logits [T, V] of a prompt run through the paged cache (pages 1..n in order). The row is padded
    to `pad_to`, by default a power of two (at least a page), so prompts of similar lengths share one
    compiled program."""
    import jax.numpy as jnp

    from jaxserve.cache.kv_cache import KVCache, storage_dtype
    from jaxserve.models.llama import ForwardBatch

    n = len(ids)
    batch = ForwardBatch.prompt([*ids, *[0] * ((pad_to or max(page_size, 1 << (n - 1).bit_length())) - n)], page_size)
    batch = batch.replace(kv_lens=np.asarray([n], np.int32))  # the padding is never attended
    dtype = storage_dtype(kv_cache_dtype, jnp.asarray(params["embed"]).dtype)
    cache = KVCache.create(cfg, batch.page_table.shape[1] + 1, page_size, dtype)
    return np.asarray(_prefill_logits(params, cache, batch, cfg))[0, :n]


@functools.partial(jax.jit, static_argnums=3)
def _prefill_logits(params: Params, cache, batch, cfg: ModelConfig) -> jax.Array:
    from jaxserve.models.llama import compute_logits, forward

    (hidden,), _ = forward(params, cache, (batch,), cfg)  # [1, T, D]
    return compute_logits(params, hidden, cfg)  # [1, T, V]


def run_with_aborts(engine, requests: dict, rng: random.Random, priority=lambda rid: 0) -> tuple[dict[str, list], set[str]]:
    """Add `requests` (id -> prompt, params) one at a time with 0-2 engine steps between, aborting a
    random live request after one in ten, checking page accounting at each; then run to the end.
    Returns every request's streamed token ids (None marks a finish) and the aborted ids."""
    results: dict[str, list] = {}
    live: set[str] = set()
    aborted: set[str] = set()

    def step() -> None:
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out.token_id)

    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp, Admission(priority=priority(rid)))
        live.add(rid)
        for _ in range(rng.randint(0, 2)):
            step()
        if rng.random() < 0.1:
            victim = rng.choice(sorted(live - aborted))
            engine.abort(victim)
            aborted.add(victim)
        engine.blocks.check_consistency()
    while engine.has_unfinished():
        step()
    return results, aborted


class BrokenTransfer:
    """Stands for a transfer to host memory that fails when waited for."""

    nbytes = 0

    def __array__(self, *args, **kwargs):
        raise RuntimeError("simulated transfer failure")


def break_first_read(runner, monkeypatch) -> None:
    """The runner's first page read to host memory fails in flight, after the copy was started."""
    read, calls = runner.read_pages, []

    def flaky(pages: np.ndarray) -> dict:
        calls.append(1)
        return {name: BrokenTransfer() for name in read(pages)} if len(calls) == 1 else read(pages)

    monkeypatch.setattr(runner, "read_pages", flaky)
