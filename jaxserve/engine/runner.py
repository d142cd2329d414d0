"""The jit boundary: one step function (forward + sampling) over fixed-shape, bucketed inputs.

Everything that varies per request arrives as arrays; shapes come from a small set of buckets so a
warmed-up runner never recompiles. The cache is donated and returned updated.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cache.kv_cache import KVCache
from jaxserve.config import ModelConfig
from jaxserve.models.llama import ForwardBatch, Params, compute_logits, forward
from jaxserve.ops.sampling import SamplingArrays, sample


def enable_compilation_cache(folder: Path) -> None:
    """JAX's persistent compilation cache: a restarted process loads its step executables from disk."""
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def step(
    params: Params, cache: KVCache, groups: Sequence[ForwardBatch], sampling: SamplingArrays, cfg: ModelConfig
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """Forward the groups and sample one token per row (rows in group order) from its last valid token."""
    hidden, cache = forward(params, cache, groups, cfg)
    last_rows = []
    for g, h in zip(groups, hidden):  # h: [B, T, D]
        last = jnp.clip(g.kv_lens - 1 - g.positions[:, 0], 0, g.tokens.shape[1] - 1)  # [B]
        last_rows.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])  # [B, D]
    logits = compute_logits(params, jnp.concatenate(last_rows), cfg)  # [R, V]
    kv_lens = jnp.concatenate([g.kv_lens for g in groups])  # [R]
    tokens, logprobs = sample(logits, sampling, kv_lens)
    return tokens, logprobs, cache


class ModelRunner:
    """Owns the params, the KV cache and the jitted step; counts compilations."""

    def __init__(self, cfg: ModelConfig, params: Params, num_pages: int, page_size: int) -> None:
        self.cfg = cfg
        self.params = params
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.cache = KVCache.create(cfg, num_pages, page_size, self.dtype)
        self._step = jax.jit(functools.partial(step, cfg=cfg), donate_argnums=(1,))

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    @property
    def num_compiles(self) -> int:
        """Distinct input shapes the step has been traced for."""
        return self._step._cache_size()

    def run(self, groups: Sequence[ForwardBatch], sampling: SamplingArrays) -> tuple[np.ndarray, np.ndarray]:
        """One step; blocks until its tokens [R] and log-probs [R] (one per row, in group order) are on the host."""
        tokens, logprobs, self.cache = self._step(self.params, self.cache, tuple(groups), sampling)
        return np.asarray(tokens), np.asarray(logprobs)
