"""Functional decoder over a paged KV cache: the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2)
and the named variations other families switch on (`ModelConfig`; `jaxserve.models.architectures`):
sliding windows per layer, q/k norms, sandwich norms, GeGLU, soft-caps, partial RoPE, MoE blocks.

Params are a plain pytree; per-layer weights are stacked on a leading [L] axis and the layers run
under `jax.lax.scan`, so compile time does not grow with depth. Weights are stored [in, out].

    params = {
      "embed": [V, D],
      "layers": {"attn_norm": [L, D], "wq": [L, D, Hq*Dh], "wk": [L, D, Hkv*Dh], "wv": [L, D, Hkv*Dh],
                 "wo": [L, Hq*Dh, D], ("bq": [L, Hq*Dh], "bk", "bv": [L, Hkv*Dh],)
                 ("q_norm": [L, Dh or Hq*Dh], "k_norm": [L, Dh or Hkv*Dh],)  # qk_norm "head" or "full"
                 ("post_attn_norm", "post_mlp_norm": [L, D],)  # sandwich_norm
                 "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]
                 # or, with experts: "router": [L, D, E], "we_gate", "we_up": [L, E, D, Fe], "we_down": [L, E, Fe, D]
                },
      "final_norm": [D],
      ("lm_head": [D, V])  # absent when embeddings are tied
    }
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cache.kv_cache import KVCache
from jaxserve.config import ModelConfig
from jaxserve.ops.norm import rms_norm
from jaxserve.models.lora import TARGETS, Tables, lora_product, slot_mask
from jaxserve.models.moe import moe_mlp
from jaxserve.ops.attention import causal_attention, decode_attention, paged_attention, use_decode_kernel, write_slots
from jaxserve.ops.quant import linear, matmul
from jaxserve.ops.rope import apply_rope, inv_frequencies, rope_tables

Params = dict[str, Any]


@flax.struct.dataclass
class ForwardBatch:
    """Fixed-shape token batch: row b holds new tokens of one sequence, padded to T."""

    tokens: jnp.ndarray  # [B, T] int32
    positions: jnp.ndarray  # [B, T] int32, absolute position of each token
    page_table: jnp.ndarray  # [B, P] int32, pages of each sequence (0 = null page)
    kv_lens: jnp.ndarray  # [B] int32, sequence length after this step; tokens at positions >= it are padding
    adapter: jnp.ndarray | None = None  # [B] int32, each row's LoRA slot (-1: the base model); None without LoRA tables

    @classmethod
    def prompt(cls, token_ids: Sequence[int], page_size: int) -> ForwardBatch:
        """One row holding a whole prompt on pages 1..n in order (the null page stays 0): for one-off
        passes such as calibration, outside the engine's allocator."""
        n = len(token_ids)
        pages = -(-n // page_size)
        return cls(
            tokens=np.asarray([token_ids], np.int32),
            positions=np.arange(n, dtype=np.int32)[None],
            page_table=np.arange(1, pages + 1, dtype=np.int32)[None],
            kv_lens=np.asarray([n], np.int32),
        )


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter: the one description shared by init, loaders and sharding."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, q),
        "wk": (L, D, kv),
        "wv": (L, D, kv),
        "wo": (L, q, D),
        "mlp_norm": (L, D),
    }
    if cfg.num_experts:
        E, Fe = cfg.num_experts, cfg.moe_intermediate_size
        layers.update(router=(L, D, E), we_gate=(L, E, D, Fe), we_up=(L, E, D, Fe), we_down=(L, E, Fe, D))
    else:
        layers.update(w_gate=(L, D, F), w_up=(L, D, F), w_down=(L, F, D))
    if cfg.qkv_bias:
        layers.update(bq=(L, q), bk=(L, kv), bv=(L, kv))
    if cfg.qk_norm:
        head = cfg.qk_norm == "head"
        layers.update(q_norm=(L, cfg.head_dim if head else q), k_norm=(L, cfg.head_dim if head else kv))
    if cfg.sandwich_norm:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    shapes: Params = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random parameters (for tests and benchmarks): norms near 1, weights ~ N(0, 1/fan_in)."""
    flat, treedef = jax.tree.flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))

    def init(name: str, shape: tuple[int, ...], k: jax.Array) -> jnp.ndarray:
        noise = jax.random.normal(k, shape)
        if name.endswith("norm"):
            return 1.0 + 0.1 * noise
        if name in ("bq", "bk", "bv"):
            return 0.1 * noise
        if name == "embed":
            return noise
        return noise / np.sqrt(shape[-2])

    return jax.tree.unflatten(treedef, [init(p[-1].key, s, k).astype(dtype) for (p, s), k in zip(flat, keys)])


def _channel_stats(name: str, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per channel of x [N, C]: max |x| under `name`, mean x^2 under `name`_sq."""
    xf = x.astype(jnp.float32)
    return {name: jnp.max(jnp.abs(xf), axis=0), f"{name}_sq": jnp.mean(jnp.square(xf), axis=0)}


def forward(
    params: Params,
    cache: KVCache | None,
    groups: Sequence[ForwardBatch],
    cfg: ModelConfig,
    decode_kernel: bool | None = None,
    observe: bool = False,
    lora: Tables | None = None,
    lora_dropout: tuple[jax.Array, float] | None = None,
) -> tuple:
    """Run the decoder over one or more token groups, writing their K/V into the cache.

    Groups differ in shape (e.g. a few prefill chunks [Bp, Tp] beside many decodes [Bd, 1]): the
    dense layers run over all their tokens at once, so weights are read once per step, while attention
    runs per group at its own shape. One-token groups use the Pallas decode kernel when
    `decode_kernel` (default: on GPU). Returns each group's hidden states [B, T, D] and the cache;
    with `observe`, also per layer the max |activation| and mean square of each channel entering the
    dense layers, {"attn": [D], "attn_sq": [D], "mlp", "mlp_sq": [D], "down", "down_sq": [F]} (stacked
    [L, ...] under scan), which int8 and int4 calibrate on.

    `lora`: adapter slot tables laid out like the params' layers (`jaxserve.models.lora`); each row
    adds the product of its group's `adapter` slot. `lora_dropout` (key, rate), for training: dropout
    on each adapter's input, as PEFT applies it. Without a cache (training), attention is dense and
    causal within each row and nothing is written; the returned cache is None.
    """
    windowed = any(cfg.sliding_layers)
    # The Pallas kernel has no windows or soft-caps: such models decode through the reference.
    kernel = (use_decode_kernel() if decode_kernel is None else decode_kernel) and not windowed and cfg.attn_logit_softcap is None
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    attention = dict(scale=scale, softcap=cfg.attn_logit_softcap)

    def attend(q, cache, i, g, window):  # q: [B, T, Hq, Dh]
        if kernel and q.shape[1] == 1:
            return decode_attention(q, cache, i, g.page_table, g.kv_lens, scale)
        return paged_attention(q, cache, i, g.page_table, g.positions, g.kv_lens, window=window, **attention)

    dtype = params["embed"].dtype
    shapes = [g.tokens.shape for g in groups]
    sizes = [b * t for b, t in shapes]
    splits = np.cumsum(sizes)[:-1].tolist()
    flat = lambda xs: jnp.concatenate([x.reshape(-1, *x.shape[2:]) for x in xs])  # [B, T, ...] -> [N, ...]
    positions = flat([g.positions for g in groups])  # [N]
    factor = cfg.rope_scaling.attention_factor if cfg.rope_scaling else 1.0
    rope = rope_tables(positions[None], inv_frequencies(cfg), factor)  # cos, sin [1, N, 1, rotary_dim/2]
    local_rope = rope_tables(positions[None], inv_frequencies(cfg, local=True)) if cfg.rope_local_theta is not None else rope
    if cache is not None:
        slots = [write_slots(g.page_table, g.positions, g.positions < g.kv_lens[:, None], cache.page_size) for g in groups]
        page, offset = flat([p for p, _ in slots]), flat([o for _, o in slots])  # [N]
    h = params["embed"][flat([g.tokens for g in groups])].astype(dtype)  # [N, D]
    if cfg.embed_scale != 1.0:
        h = h * jnp.asarray(cfg.embed_scale, dtype)
    n = h.shape[0]
    if lora is not None:
        a = (lora if isinstance(lora, dict) else lora[0])["wq"]["a"]  # [(L,) in, S, r]
        token_slots = flat([jnp.broadcast_to(g.adapter[:, None], g.tokens.shape) for g in groups])  # [N]
        mask = slot_mask(token_slots, a.shape[-2], a.shape[-1], dtype)  # [N, S * r]

    def adapt(name: str, x: jnp.ndarray, y: jnp.ndarray, ll: Any, i: Any) -> jnp.ndarray:
        """y = x @ W, plus each token's adapter product (LoRA on)."""
        if ll is None:
            return y
        if lora_dropout is not None:
            key, rate = lora_dropout
            keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, i), TARGETS.index(name)), 1 - rate, x.shape)
            x = jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)
        return y + lora_product(x, ll[name], mask)

    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    eps = cfg.rms_norm_eps
    sliding = jnp.asarray(cfg.sliding_layers)  # [L]
    act = jax.nn.silu if cfg.hidden_act == "silu" else partial(jax.nn.gelu, approximate=True)

    def qk_norm(x, w, heads):  # x: [N, heads * Dh]
        if cfg.qk_norm == "full":
            return rms_norm(x, w, eps)
        return rms_norm(x.reshape(n, heads, cfg.head_dim), w, eps).reshape(n, -1)

    def layer(h, cache, lp, ll, i):  # ll: this layer's LoRA tables (None: off)
        window = jnp.where(sliding[i], cfg.sliding_window or 0, jnp.iinfo(jnp.int32).max) if windowed else None
        cos, sin = jax.tree.map(lambda a, b: jnp.where(sliding[i], a, b), local_rope, rope) if local_rope is not rope else rope
        x = rms_norm(h, lp["attn_norm"], eps)
        seen = _channel_stats("attn", x) if observe else {}
        if "wqkv" in lp:  # fused layout (see unstack_layers)
            qkv = linear(x, lp["wqkv"]) + (lp["bqkv"] if cfg.qkv_bias else 0)
            q, k, v = jnp.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
        else:
            q, k, v = linear(x, lp["wq"]), linear(x, lp["wk"]), linear(x, lp["wv"])
            if cfg.qkv_bias:
                q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        q, k, v = adapt("wq", x, q, ll, i), adapt("wk", x, k, ll, i), adapt("wv", x, v, ll, i)
        if cfg.qk_norm:
            q, k = qk_norm(q, lp["q_norm"], cfg.num_heads), qk_norm(k, lp["k_norm"], cfg.num_kv_heads)
        q = apply_rope(q.reshape(1, n, cfg.num_heads, cfg.head_dim), cos, sin)[0]  # [N, Hq, Dh]
        k = apply_rope(k.reshape(1, n, cfg.num_kv_heads, cfg.head_dim), cos, sin)[0]
        v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        if cache is None:  # training: dense causal attention within each row
            attn = [
                causal_attention(*(t.reshape(*shape, *t.shape[1:]) for t in qkv_g), g.positions, g.kv_lens, window=window, **attention).reshape(size, -1)
                for *qkv_g, shape, size, g in zip(jnp.split(q, splits), jnp.split(k, splits), jnp.split(v, splits), shapes, sizes, groups)
            ]
        else:
            cache = cache.write(i, page, offset, k.swapaxes(0, 1), v.swapaxes(0, 1))  # [Hkv, N, Dh] each
            attn = [
                attend(qg.reshape(*shape, *qg.shape[1:]), cache, i, g, window).reshape(size, -1)
                for qg, shape, size, g in zip(jnp.split(q, splits), shapes, sizes, groups)
            ]
        o = jnp.concatenate(attn).astype(dtype)
        o = adapt("wo", o, linear(o, lp["wo"]), ll, i)
        h = h + (rms_norm(o, lp["post_attn_norm"], eps) if cfg.sandwich_norm else o)
        x = rms_norm(h, lp["mlp_norm"], eps)
        if cfg.num_experts:
            y = moe_mlp(x, lp, cfg, act)
        else:
            if "w_gate_up" in lp:
                gate, up = jnp.split(linear(x, lp["w_gate_up"]), 2, axis=-1)
            else:
                gate, up = linear(x, lp["w_gate"]), linear(x, lp["w_up"])
            gate, up = adapt("w_gate", x, gate, ll, i), adapt("w_up", x, up, ll, i)
            hidden = act(gate) * up
            if observe:
                seen.update(_channel_stats("mlp", x), **_channel_stats("down", hidden))
            y = adapt("w_down", hidden, linear(hidden, lp["w_down"]), ll, i)
        h = h + (rms_norm(y, lp["post_mlp_norm"], eps) if cfg.sandwich_norm else y)
        return h, cache, seen

    if isinstance(params["layers"], dict):  # stacked [L, ...]: one traced layer, looped by scan
        def scan_body(carry, xs):
            *carry, seen = layer(*carry, *xs)
            return tuple(carry), seen

        xs = (params["layers"], lora, jnp.arange(cfg.num_layers))
        (h, cache), observed = jax.lax.scan(scan_body, (h, cache), xs)  # values [L, ...]
    else:  # per-layer buffers: unrolled, so no layer's weights are sliced (copied) out of a stack
        observed = []
        for i, lp in enumerate(params["layers"]):
            h, cache, seen = layer(h, cache, lp, None if lora is None else lora[i], i)
            observed.append(seen)
        observed = tuple(observed)
    hidden = tuple(x.reshape(*shape, -1) for x, shape in zip(jnp.split(h, splits), shapes))
    out = (hidden, cache)
    return (*out, observed) if observe else out


def compute_logits(params: Params, hidden: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Final norm and LM head: hidden [..., D] -> float32 logits [..., V]."""
    x = rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]  # [D, V]
    logits = matmul(x, head, jnp.float32)
    cap = cfg.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def layer_at(layers: Any, i: int) -> Any:
    """Layer i's entry of per-layer values: a slice of stacked [L, ...] arrays (a dict of them), or the
    i-th of per-layer dicts (a tuple)."""
    return jax.tree.map(lambda v: v[i], layers) if isinstance(layers, dict) else layers[i]


def unstack_layers(params: Params) -> Params:
    """Stacked [L, ...] layers -> a tuple of per-layer dicts (separate buffers; see `forward`), with
    q/k/v and gate/up each concatenated into one matrix (quantized ones field by field, along their
    output columns): at small batch, XLA:CPU runs a few wide dots much faster than many narrow ones."""
    layers = params["layers"]
    num_layers = next(iter(jax.tree.leaves(layers))).shape[0]

    def fuse(*ws: Any) -> Any:
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *ws)

    fused = []
    for i in range(num_layers):
        lp = layer_at(layers, i)
        lp["wqkv"] = fuse(lp.pop("wq"), lp.pop("wk"), lp.pop("wv"))
        if "bq" in lp:
            lp["bqkv"] = fuse(lp.pop("bq"), lp.pop("bk"), lp.pop("bv"))
        if "w_gate" in lp:
            lp["w_gate_up"] = fuse(lp.pop("w_gate"), lp.pop("w_up"))
        fused.append(lp)
    return {**params, "layers": tuple(fused)}
