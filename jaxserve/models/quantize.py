"""Int8 (W8A8) conversion of a Llama-family model, calibrated with SmoothQuant.

One int8 scale per activation row is coarse where a few channels carry outliers. SmoothQuant moves
part of that range into the weights: input channel j of a dense layer is divided by
s_j = max|x_j|^a / max|w_j|^(1-a) on the activation side (folded into the RMSNorm weight before it,
or into the up projection's column j for the down projection) and multiplied into weight row j,
which is exact in float. The activation maxima come from one float forward pass over a short
built-in text. The LM head stays in float: int8 logits cost more agreement than its speed repays.

On SmolLM2, over a passage unlike the calibration text, next-token choices agree with float at 83%
of positions with plain int8 everywhere, 87% with a float LM head, and 90-95% with smoothing and a
float head (mean KL 0.049, 0.041, 0.013; tests/test_quantization.py checks the last). Which positions
disagree changes with any last-bit change upstream, so single figures move by a few points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxserve.cache.kv_cache import KVCache
from jaxserve.config import ModelConfig
from jaxserve.models.llama import ForwardBatch, Params, forward
from jaxserve.ops.quant import quantize

CALIBRATION_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing in the "
    "night relied on its beam to avoid the rocks along the northern coast.\n"
    "Question: What is the boiling point of water at sea level? Answer: 100 degrees Celsius, or 212 "
    "degrees Fahrenheit.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Dear team, the quarterly report is attached. Revenue grew 12% while costs fell by 3.5%; please send "
    "comments by Friday, 14 March.\n"
    "Photosynthesis converts light energy into chemical energy stored in glucose."
)
SMOOTHING_ALPHA = 0.5
DENSE = ("wq", "wk", "wv", "wqkv", "wo", "w_gate", "w_up", "w_gate_up", "w_down")


def observe_activations(params: Params, cfg: ModelConfig, token_ids: list[int], page_size: int = 16) -> tuple | dict:
    """Per layer, the max |activation| of each channel entering the dense layers over one float
    prefill of `token_ids` (see `forward(observe=True)`)."""
    batch = ForwardBatch.prompt(token_ids, page_size)
    cache = KVCache.create(cfg, batch.page_table.shape[1] + 1, page_size, params["embed"].dtype)
    _, _, observed = jax.jit(functools.partial(forward, cfg=cfg, observe=True))(params, cache, (batch,))
    return observed


def _smoothing(act_max: jnp.ndarray, weights: list[jnp.ndarray], alpha: float) -> jnp.ndarray:
    """Factors s [..., in] for activations [..., in] feeding weights [..., in, out]."""
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(w), axis=-1) for w in weights]), axis=0)  # [..., in]
    s = act_max.astype(jnp.float32) ** alpha / jnp.maximum(w_max.astype(jnp.float32), 1e-8) ** (1 - alpha)
    return jnp.where(act_max > 0, jnp.clip(s, 1e-5, 1e5), 1.0)


def smooth_layer(lp: dict, seen: dict, alpha: float = SMOOTHING_ALPHA) -> dict:
    """One layer's float weights (fused or not, single or stacked [L, ...]) with outlier range moved
    from activations into weights; the layer computes the same function."""
    lp = dict(lp)
    for norm, act, names in (("attn_norm", "attn", ("wqkv", "wq", "wk", "wv")), ("mlp_norm", "mlp", ("w_gate_up", "w_gate", "w_up"))):
        names = [k for k in names if k in lp]
        s = _smoothing(seen[act], [lp[k] for k in names], alpha)  # [..., D]
        lp[norm] = lp[norm] / s.astype(lp[norm].dtype)
        for k in names:
            lp[k] = lp[k] * s[..., :, None].astype(lp[k].dtype)
    s = _smoothing(seen["down"], [lp["w_down"]], alpha)  # [..., F]
    lp["w_down"] = lp["w_down"] * s[..., :, None].astype(lp["w_down"].dtype)
    if "w_gate_up" in lp:  # the up half of the fused matrix produces the down projection's input
        f = lp["w_down"].shape[-2]
        lp["w_gate_up"] = jnp.concatenate([lp["w_gate_up"][..., :f], lp["w_gate_up"][..., f:] / s[..., None, :]], axis=-1)
    else:
        lp["w_up"] = lp["w_up"] / s[..., None, :].astype(lp["w_up"].dtype)
    return lp


def quantize_model(params: Params, cfg: ModelConfig, calibration_ids: list[int]) -> Params:
    """Every dense matrix as int8 (`jaxserve.ops.quant`) after SmoothQuant calibration on
    `calibration_ids`; embeddings, norms, biases and the LM head stay in float."""
    observed = observe_activations(params, cfg, calibration_ids)

    def convert(lp: dict, seen: dict) -> dict:
        return {k: quantize(v) if k in DENSE else v for k, v in smooth_layer(lp, seen).items()}

    layers = params["layers"]
    if isinstance(layers, dict):
        layers = convert(layers, observed)
    else:
        layers = tuple(convert(lp, seen) for lp, seen in zip(layers, observed))
    return {**params, "layers": layers}
