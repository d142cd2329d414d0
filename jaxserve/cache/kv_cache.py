"""The paged KV cache: one preallocated pytree, stacked over layers, donated to every step."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from jaxserve.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jnp.ndarray  # [L, Hkv, num_pages, page_size, D]: head-major, see ops/attention.py
    v: jnp.ndarray  # [L, Hkv, num_pages, page_size, D]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
        shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
