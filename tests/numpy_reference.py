"""An independent NumPy (float64) Llama-family forward over a whole sequence: the test oracle.

Written from the published model definitions (HF `modeling_llama` / `modeling_qwen2`), sharing no code
with jaxserve's model: plain causal attention, no cache, no paging.
"""

from __future__ import annotations

import math

import numpy as np


def _inv_freq(cfg) -> np.ndarray:
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    assert rs.kind == "llama3"
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < rs.original_max_position_embeddings / rs.high_freq_factor:
            out.append(f)
        elif wavelen > rs.original_max_position_embeddings / rs.low_freq_factor:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return np.array(out)


def _rope(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    # x: [T, H, D]
    t = x.shape[0]
    freqs = np.outer(np.arange(t), inv)  # [T, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_logits(params, cfg, tokens: list[int]) -> np.ndarray:
    """Logits [T, V] for every position of `tokens`."""
    p = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    h = np.asarray(params["embed"], np.float64)[tokens]
    t = len(tokens)
    inv = _inv_freq(cfg)
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        x = _norm(h, p["attn_norm"][i], cfg.rms_norm_eps)
        q, k, v = x @ p["wq"][i], x @ p["wk"][i], x @ p["wv"][i]
        if cfg.qkv_bias:
            q, k, v = q + p["bq"][i], k + p["bk"][i], v + p["bv"][i]
        q = _rope(q.reshape(t, cfg.num_heads, cfg.head_dim), inv)
        k = _rope(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), inv)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        out = np.zeros((t, cfg.num_heads, cfg.head_dim))
        for head in range(cfg.num_heads):
            kv = head // (cfg.num_heads // cfg.num_kv_heads)
            s = q[:, head] @ k[:, kv].T / math.sqrt(cfg.head_dim)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        h = h + out.reshape(t, -1) @ p["wo"][i]
        x = _norm(h, p["mlp_norm"][i], cfg.rms_norm_eps)
        gate = x @ p["w_gate"][i]
        h = h + (gate / (1 + np.exp(-gate)) * (x @ p["w_up"][i])) @ p["w_down"][i]
    h = _norm(h, np.asarray(params["final_norm"], np.float64), cfg.rms_norm_eps)
    head = np.asarray(params["embed"], np.float64).T if cfg.tie_word_embeddings else np.asarray(params["lm_head"], np.float64)
    return h @ head
