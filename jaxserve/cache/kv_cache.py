"""The paged KV cache: one preallocated pytree, stacked over layers, donated to every step."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.errors import UserError


def storage_dtype(kv_cache_dtype: str, model_dtype: jnp.dtype) -> jnp.dtype:
    """What the cache arrays hold: the model's dtype ("auto"), or bfloat16 as raw bits in uint16
    words. Given a bfloat16 cache, XLA:CPU converts the whole cache every step; bits converted after
    the page gather cost only the gathered blocks, and half the bytes of float32 to gather."""
    if kv_cache_dtype == "auto" or jnp.dtype(model_dtype) == jnp.bfloat16:
        return jnp.dtype(model_dtype)
    return jnp.dtype(jnp.uint16)


def to_cache(x: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    """Values as the cache stores them."""
    if dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(dtype)


def from_cache(x: jnp.ndarray) -> jnp.ndarray:
    """Stored cache entries as values (bfloat16 for bit-stored caches)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


@flax.struct.dataclass
class KVCache:
    k: jnp.ndarray  # [Hkv, L, num_pages, page_size, D]: head-major, see ops/attention.py
    v: jnp.ndarray  # [Hkv, L, num_pages, page_size, D]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
        shape = (cfg.num_kv_heads, cfg.num_layers, num_pages, page_size, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def page_bytes(cfg: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """Bytes of K and V one page holds across all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for_memory(bytes_per_page: int, memory: float) -> int:
    """Pages (including the null page) of `bytes_per_page` (`page_bytes`, summed over the caches that
    share page numbers) that fit in `memory`: bytes when > 1, else a fraction of the accelerator
    memory still free now (after weights are placed)."""
    if memory <= 1:
        stats = jax.devices()[0].memory_stats()
        if not stats or "bytes_limit" not in stats:
            raise UserError(
                f"kv_cache_memory {memory} is a fraction of free accelerator memory, which "
                f"{jax.default_backend()} does not report; give a size in bytes"
            )
        memory = memory * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    pages = int(memory // bytes_per_page)
    if pages < 2:
        raise UserError(f"kv_cache_memory of {int(memory)} bytes holds {pages} pages; at least 2 are needed")
    return pages
