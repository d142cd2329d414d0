"""Draft heads: a few small layers on the model's last hidden state that propose its next k tokens.

Medusa's heads read the hidden state h_t and guess x_{t+2}, x_{t+3}, ... each on its own, blind to
the token sampled at t+1 and to each other's guesses. A draft is only worth anything when every draft
before it was accepted, so these heads are chained instead (as Hydra's are): head i updates a
residual state from head i-1 with the embedding of the token before its own (the token just sampled,
then the drafts), and reads its guess through the model's own final norm and LM head:

    s_0 = h_t                                       # [B, D], before the final norm
    s_i = s_{i-1} + silu([n(s_{i-1}); n(E[x_{t+i}])] @ w_in[i]) @ w_out[i]
    logits_i = rms_norm(s_i, final_norm) @ head[:, vocab]          # guess of x_{t+i+1}

n() is a parameter-free RMS norm and E the model's input embedding. The LM head is read over a draft
vocabulary: the `vocab` ids most frequent in the training text (8192 of SmolLM2's 49152 cover 96% of
its chat answers), as FR-Spec does, because reading the whole LM head k times per step would cost a
large part of the model step it is meant to save. `w_out` starts at zero, so an untrained head
repeats the model's own next-token guess.

    heads = {"w_in": [K, 2D, D], "w_out": [K, D, D]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.llama import Params
from jaxserve.ops.norm import rms_norm
from jaxserve.ops.quant import Int8Weight, linear, matmul

HeadParams = dict[str, Any]


@dataclass(frozen=True)
class HeadsConfig:
    """What the heads were trained for; `jaxserve.checkpoint.heads` checks it against the model."""

    num_heads: int
    hidden_size: int
    vocab_size: int  # the model's
    draft_vocab_size: int  # ids the heads can propose
    rms_norm_eps: float


@dataclass
class DraftHeads:
    """Trained heads, ready to attach to an engine: weights, their draft vocabulary [N] and config."""

    config: HeadsConfig
    params: HeadParams
    vocab: np.ndarray  # [N] int32 model token ids


def init_heads(num_heads: int, hidden_size: int, key: jax.Array) -> HeadParams:
    """w_in ~ N(0, 1/fan_in), w_out zero (each head starts as the identity on the state)."""
    d = hidden_size
    return {
        "w_in": jax.random.normal(key, (num_heads, 2 * d, d), jnp.float32) / np.sqrt(2 * d),
        "w_out": jnp.zeros((num_heads, d, d), jnp.float32),
    }


def draft_table(params: Params, vocab: np.ndarray | jnp.ndarray) -> jnp.ndarray:
    """The columns [D, N] of the model's output projection (the embedding, transposed, when tied)
    for the draft vocabulary's ids [N]."""
    head = params["lm_head"] if "lm_head" in params else params["embed"].T  # [D, V]
    return jnp.take(head, jnp.asarray(vocab), axis=1)


def _unit(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def advance(heads: HeadParams, i: int, state: jnp.ndarray, embedded: jnp.ndarray) -> jnp.ndarray:
    """Head i's state [B, D] from the previous state [B, D] and the embedding [B, D] of the token before
    its guess."""
    x = jnp.concatenate([_unit(state), _unit(embedded)], axis=-1)  # [B, 2D]
    return state + matmul(jax.nn.silu(matmul(x, heads["w_in"][i])), heads["w_out"][i])


def draft_logits(state: jnp.ndarray, final_norm: jnp.ndarray, table: jnp.ndarray | Int8Weight, eps: float) -> jnp.ndarray:
    """Logits [B, N] over the draft vocabulary from float32 states [B, D]; `table` is the LM head's
    columns [D, N] (int8 when serving)."""
    return linear(rms_norm(state, final_norm, eps), table)


def chain_logits(heads: HeadParams, hidden: jnp.ndarray, embedded: jnp.ndarray, final_norm: jnp.ndarray, table: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Every head's logits [B, K, N] from hidden states [B, D] and the embeddings [B, K, D] of the
    tokens each head follows (training feeds the real ones)."""
    state, out = hidden.astype(jnp.float32), []
    for i in range(heads["w_in"].shape[0]):
        state = advance(heads, i, state, embedded[:, i])
        out.append(draft_logits(state, final_norm, table, eps))
    return jnp.stack(out, axis=1)
