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
from jaxserve.config import INT4_GROUP, ModelConfig
from jaxserve.models.llama import ForwardBatch, Params, forward, layer_at
from jaxserve.errors import UserError
from jaxserve.ops.quant import is_quantized_weight, quantize, quantize_int4

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


INPUTS = (("attn", ("wqkv", "wq", "wk", "wv")), ("mlp", ("w_gate_up", "w_gate", "w_up")), ("down", ("w_down",)))  # dense layers by input


def fold_scales(lp: dict, s: dict[str, jnp.ndarray]) -> dict:
    """One layer's float weights (fused or not, single or stacked [L, ...]) with input channel j of each
    dense input ("attn", "mlp", "down": factors [..., in]) divided by s_j on the activation side (the
    RMSNorm weight before it, or the up projection's column j) and weight row j multiplied by it: the
    layer computes the same function."""
    lp = dict(lp)
    for norm, act in (("attn_norm", "attn"), ("mlp_norm", "mlp")):
        lp[norm] = lp[norm] / s[act].astype(lp[norm].dtype)
        for k in dict(INPUTS)[act]:
            if k in lp:
                lp[k] = lp[k] * s[act][..., :, None].astype(lp[k].dtype)
    down = s["down"]  # [..., F]
    lp["w_down"] = lp["w_down"] * down[..., :, None].astype(lp["w_down"].dtype)
    if "w_gate_up" in lp:  # the up half of the fused matrix produces the down projection's input
        f = lp["w_down"].shape[-2]
        lp["w_gate_up"] = jnp.concatenate([lp["w_gate_up"][..., :f], lp["w_gate_up"][..., f:] / down[..., None, :]], axis=-1)
    else:
        lp["w_up"] = lp["w_up"] / down[..., None, :].astype(lp["w_up"].dtype)
    return lp


def _weights(lp: dict, act: str) -> list[jnp.ndarray]:
    return [lp[k] for k in dict(INPUTS)[act] if k in lp]


def smooth_layer(lp: dict, seen: dict, alpha: float = SMOOTHING_ALPHA) -> dict:
    """SmoothQuant: outlier range moved from activations into weights (see `fold_scales`)."""
    return fold_scales(lp, {act: _smoothing(seen[act], _weights(lp, act), alpha) for act, _ in INPUTS})


AWQ_GRID = tuple(i / 10 for i in range(11))  # exponents tried for the activation-aware scales


def _int4_error(weights: list[jnp.ndarray], s: jnp.ndarray, sq: jnp.ndarray, group: int) -> jnp.ndarray:
    """Activation-weighted int4 error of `weights` [..., in, out] scaled by s [..., in] before rounding:
    sum over rows j of E[x_j^2] * |row j's error|^2, the diagonal of the layer's output error
    E|x (W - W_q)|^2 (cross-channel terms dropped). Returns [...]."""
    err = 0.0
    for w in weights:
        wf = w.astype(jnp.float32)
        back = quantize_int4(wf * s[..., :, None], group).dequantize() / s[..., :, None]
        err = err + jnp.sum(sq[..., :, None] * jnp.square(back - wf), axis=(-2, -1))
    return err


@functools.partial(jax.jit, static_argnames="group")
def awq_scales(lp: dict, seen: dict, group: int) -> dict[str, jnp.ndarray]:
    """AWQ's per-channel scales for each dense input: s = rms(x)^a (normalized), with the exponent a
    from `AWQ_GRID` that minimizes `_int4_error` (a = 0 is plain rounding, so it never does worse),
    chosen per layer. Channels that carry weight in the output get finer steps."""
    out = {}
    for act, _ in INPUTS:
        weights, sq = _weights(lp, act), seen[f"{act}_sq"]  # sq: [..., in]
        rms = jnp.sqrt(sq)
        candidates = []
        for a in AWQ_GRID:
            s = jnp.where(rms > 0, jnp.maximum(rms, 1e-6) ** a, 1.0)
            candidates.append(s / jnp.sqrt(jnp.max(s, axis=-1, keepdims=True) * jnp.min(s, axis=-1, keepdims=True)))
        errors = jnp.stack([_int4_error(weights, s, sq, group) for s in candidates])  # [A, ...]
        best = jnp.argmin(errors, axis=0)  # [...]
        out[act] = jnp.take_along_axis(jnp.stack(candidates), best[None, ..., None], axis=0)[0]  # [..., in]
    return out


def check_group_size(params: Params, group: int) -> None:
    """A UserError naming the first dense layer whose input rows do not split into groups of `group`."""
    layers = params["layers"]
    for i, lp in enumerate([layers] if isinstance(layers, dict) else layers):
        for name in DENSE:
            if name in lp and not is_quantized_weight(lp[name]) and lp[name].shape[-2] % group:
                where = "every layer's" if isinstance(layers, dict) else f"layer {i}'s"
                raise UserError(f"int4 with group size {group}: {where} {name} has {lp[name].shape[-2]} input rows, which do not "
                                f"split into groups of {group} (use a group size that divides it)")


def quantize_model(params: Params, cfg: ModelConfig, calibration_ids: list[int], quantization: str = "int8", group_size: int = INT4_GROUP) -> Params:
    """Every dense matrix quantized after calibrating on `calibration_ids`: "int8" (W8A8, SmoothQuant)
    or "int4" (weight-only in groups of `group_size` input rows, AWQ-style scales); embeddings, norms,
    biases and the LM head stay in float. Layers go one at a time, stacked or not, so calibrating needs
    one layer's temporaries. Where some dense layers come quantized (a GGUF's 4-bit blocks), scales
    cannot fold into their inputs: the float rest is rounded plainly, without calibration."""
    layers = params["layers"]
    if quantization == "int4":
        check_group_size(params, group_size)
    if any(is_quantized_weight(w) for w in jax.tree.leaves(layers, is_leaf=is_quantized_weight)):
        out = [{k: quantize_int4(v, group_size) if k in DENSE and not is_quantized_weight(v) else v for k, v in layer_at(layers, i).items()}
               for i in range(cfg.num_layers)]
    else:
        observed = observe_activations(params, cfg, calibration_ids)

        def convert(lp: dict, seen: dict) -> dict:
            if quantization == "int4":
                return {k: quantize_int4(v, group_size) if k in DENSE else v for k, v in fold_scales(lp, awq_scales(lp, seen, group_size)).items()}
            return {k: quantize(v) if k in DENSE else v for k, v in smooth_layer(lp, seen).items()}

        out = [convert(layer_at(layers, i), layer_at(observed, i)) for i in range(cfg.num_layers)]  # one layer sliced at a time
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *out) if isinstance(layers, dict) else tuple(out)}
