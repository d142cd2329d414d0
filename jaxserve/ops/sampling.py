"""Batched on-device sampling with per-row parameters.

Randomness for row b is `fold_in(PRNGKey(seed[b]), position[b])`: a seeded request samples the same
tokens whatever else shares the batch. Greedy rows (temperature 0) take the argmax. Penalties and
logit bias come as dense per-row arrays, built on the host only for steps that need them.
Constrained rows carry a bitmask of the tokens their grammar allows (bit t of word t // 32); every
row always has one, all ones when unconstrained, so the sampler has one shape and never recompiles.
Log-probabilities are always those of the unmodified model distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.ops.reduce import ordered_sum

if TYPE_CHECKING:
    from jaxserve.sampling_params import SamplingParams


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's allowed-token bitmask."""
    return -(-vocab_size // 32)


@flax.struct.dataclass
class SamplingArrays:
    temperature: jnp.ndarray  # [B] float32; 0 = greedy
    top_k: jnp.ndarray  # [B] int32; <= 0 = off
    top_p: jnp.ndarray  # [B] float32; 1 = off
    min_p: jnp.ndarray  # [B] float32; 0 = off
    seed: jnp.ndarray  # [B] uint32
    allowed: jnp.ndarray  # [B, ceil(V / 32)] int32 bitmask of the tokens a row may take; -1 = all

    @classmethod
    def greedy(cls, rows: int, vocab: int) -> SamplingArrays:
        """Host arrays for `rows` greedy, unconstrained rows with every filter off (padding; filled in
        per request)."""
        return cls(
            temperature=np.zeros(rows, np.float32),
            top_k=np.full(rows, -1, np.int32),
            top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32),
            seed=np.zeros(rows, np.uint32),
            allowed=np.full((rows, bitmask_words(vocab)), -1, np.int32),
        )

    def set_row(self, row: int, params: SamplingParams, seed: int) -> None:
        """One row's filters and noise seed from a request's parameters (host arrays)."""
        self.temperature[row], self.top_p[row], self.min_p[row], self.top_k[row] = params.temperature, params.top_p, params.min_p, params.top_k
        self.seed[row] = seed


@flax.struct.dataclass
class LogitAdjust:
    """Per-row logit changes, applied before temperature: repetition scaling, then an additive bias."""

    repetition: jnp.ndarray  # [B, V] float32; penalty for tokens seen in prompt or output, else 1
    bias: jnp.ndarray  # [B, V] float32; logit_bias - presence - frequency * count, -inf for banned tokens


def adjust_logits(logits: jnp.ndarray, a: LogitAdjust) -> jnp.ndarray:
    """HF-style repetition penalty (positive logits divided, negative multiplied), then the bias."""
    return jnp.where(logits > 0, logits / a.repetition, logits * a.repetition) + a.bias


def mask_logits(logits: jnp.ndarray, allowed: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, V] with the tokens outside each row's bitmask [B, ceil(V / 32)] set to -inf."""
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    keep = bits.reshape(allowed.shape[0], -1)[:, : logits.shape[-1]].astype(bool)
    return jnp.where(keep, logits, -jnp.inf)


def _order_key(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> int32 keys in the same order (-0.0 just below +0.0), so thresholds can be bisected
    over integers."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _smallest_key(keys: jnp.ndarray, holds) -> jnp.ndarray:
    """Per row, the smallest int32 key k in [row min, row max] with holds(k) [B] true, for a predicate
    that is monotone in k and true at the row max: 32 halvings of the key range."""
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)  # [B]

    def halve(_: int, bounds: tuple) -> tuple:
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = holds(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def filtered_logits(logits: jnp.ndarray, s: SamplingArrays) -> jnp.ndarray:
    """Temperature-scaled logits [B, V] with tokens outside top-k / top-p / min-p set to -inf.

    Order as in HF: temperature, then top-k, then top-p over the renormalised top-k set, then min-p.
    Each filter keeps the tokens at or above a threshold value. The top-k and top-p thresholds are
    bisected over the values (a count, and a mass summed in one order: `ops/reduce.py`) rather than
    found by sorting the vocabulary, which costs XLA:CPU ~15 ms a row; each runs only when a row of
    the batch asks for it, and a row that does not gets the same result either way.
    """
    vocab = logits.shape[-1]
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp  # [B, V]
    keys = _order_key(scaled)  # [B, V]
    lowest = keys.min(axis=-1)  # [B]: keeps every token
    top_k_on, top_p_on = (s.top_k > 0) & (s.top_k < vocab), s.top_p < 1

    def kth_largest(_: None) -> jnp.ndarray:  # the smallest key with fewer than k keys above it
        above = lambda k: jnp.sum(keys > k[:, None], axis=-1) < s.top_k
        return jnp.where(top_k_on, _smallest_key(keys, above), lowest)

    k_threshold = jax.lax.cond(jnp.any(top_k_on), kth_largest, lambda _: lowest, None)  # [B]
    in_top_k = keys >= k_threshold[:, None]

    def nucleus(_: None) -> jnp.ndarray:  # the smallest key with less than top_p of the mass above it
        top = jnp.max(scaled, axis=-1, keepdims=True)
        weights = jnp.where(in_top_k, jnp.exp(scaled - top), 0.0)  # [B, V]
        probs = weights / ordered_sum(weights, axis=-1)
        above = lambda k: ordered_sum(jnp.where(keys > k[:, None], probs, 0.0), axis=-1)[:, 0] < s.top_p
        return jnp.where(top_p_on, _smallest_key(keys, above), lowest)

    threshold = jnp.maximum(k_threshold, jax.lax.cond(jnp.any(top_p_on), nucleus, lambda _: lowest, None))
    min_p_value = jnp.max(scaled, axis=-1) + jnp.log(jnp.maximum(s.min_p, 1e-30))  # [B]
    threshold = jnp.where(s.min_p > 0, jnp.maximum(threshold, _order_key(min_p_value)), threshold)
    return jnp.where(keys >= threshold[:, None], scaled, -jnp.inf)


def gumbel_noise(seed: jnp.ndarray, positions: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """Each row's Gumbel noise [B, V] over the vocabulary, from `fold_in(PRNGKey(seed), position)`:
    the sampler's, and the draft proposers' (a draft sampled with the target's noise at its position
    is the token the target itself is likeliest to sample there)."""
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.PRNGKey(seed), pos))(seed, positions)
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def sample(
    logits: jnp.ndarray,  # [B, V] float32
    s: SamplingArrays,
    positions: jnp.ndarray,  # [B] int32, position the sampled token will occupy
    adjust: LogitAdjust | None = None,
    num_top: int = 0,
) -> tuple[jnp.ndarray, ...]:
    """Next tokens [B] int32 and their log-probabilities [B]; with num_top > 0 also the top token ids
    [B, num_top] and their log-probabilities [B, num_top]."""
    raw, top = logits, jnp.max(logits, axis=-1, keepdims=True)  # [B, V], [B, 1]
    # Summed in one order: a row's log-probs have the same bits in every sampler variant and batch.
    lse = top + jnp.log(ordered_sum(jnp.exp(raw - top), axis=-1))  # [B, 1]
    if adjust is not None:
        logits = adjust_logits(logits, adjust)
    logits = mask_logits(logits, s.allowed)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_: None) -> jnp.ndarray:
        drawn = jnp.argmax(filtered_logits(logits, s) + gumbel_noise(s.seed, positions, logits.shape[-1]), axis=-1).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda _: greedy, None)
    chosen = (jnp.take_along_axis(raw, tokens[:, None], axis=-1) - lse)[:, 0]
    if not num_top:
        return tokens, chosen
    top_logits, top_ids = jax.lax.top_k(raw, num_top)
    return tokens, chosen, top_ids.astype(jnp.int32), top_logits - lse
