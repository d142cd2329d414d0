"""What a sharded model looks like on its mesh: each parameter's PartitionSpec, bytes per device,
the collectives XLA inserted, a decode step's time and its HBM roofline. Used by notebooks/sharding.ipynb and
scripts/bench_parallel.py, device_check.py and bench_speculative.py."""

from __future__ import annotations

import collections
import functools
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import ModelConfig
from jaxserve.engine.runner import SWAP_CHUNK, ModelRunner
from jaxserve.models.llama import ForwardBatch, Params, init_params
from jaxserve.parallel.sharding import param_shardings

# The decode benchmarks' accelerator model: Llama-3-8B's shape, random weights.
LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
)
# Its stand-in where the benchmarks run small (CPU smoke runs).
TINY_BENCH = ModelConfig(
    architecture="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=1024,
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def sharding_table(params) -> list[tuple[str, tuple[int, ...], str]]:
    """(parameter path, shape, PartitionSpec) of every placed leaf."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rows.append((name, tuple(leaf.shape), str(leaf.sharding.spec)))
    return rows


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes of `tree`'s shards held by each device."""
    held: dict[jax.Device, int] = collections.defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)


def decode_batch(runner: ModelRunner, rows: int, context: int) -> ForwardBatch:
    """`rows` one-token rows, each at position `context - 1` over its own pages."""
    s, page_size = runner.shapes, runner.cache.page_size
    pages = -(-context // page_size)
    if rows * pages + 1 > runner.cache.num_pages or pages > s.table_width:
        raise ValueError(f"{rows} rows of {context} tokens need {rows * pages + 1} pages; the cache has {runner.cache.num_pages}")
    table = np.zeros((rows, s.table_width), np.int32)
    table[:, :pages] = 1 + np.arange(rows * pages, dtype=np.int32).reshape(rows, pages)
    position = np.full((rows, 1), context - 1, np.int32)
    return ForwardBatch(np.ones((rows, 1), np.int32), position, table, np.full(rows, context, np.int32))


def step_collectives(runner: ModelRunner, batch: ForwardBatch) -> collections.Counter:
    """Collective ops in the compiled step program for `batch`'s shape."""
    ops = re.findall(r"= \S+ (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", runner.step_hlo([batch]))
    return collections.Counter(ops)


def median_seconds(fn: Callable[[], None], iters: int) -> float:
    """Median seconds of `fn()` (which waits for its device work) over `iters` calls, after one call
    that compiles."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_step(runner: ModelRunner, batch: ForwardBatch, iters: int = 10) -> float:
    """Median seconds of one model step on `batch` (compiled first)."""

    def step() -> None:
        runner.forward([batch])
        jax.block_until_ready(runner.logits)

    return median_seconds(step, iters)


def time_swap_overlap(runner: ModelRunner, batch: ForwardBatch, chunks: int, iters: int = 10) -> dict[str, float]:
    """Median seconds of a step with `chunks` chunks of pages on their way to host memory: "serial"
    waits for them before dispatching the step, "overlapped" leaves them in flight beside it (as the
    engine does), "step" has none. `hidden` is the fraction of the copies' cost the overlap hides."""
    pages = np.arange(1, SWAP_CHUNK + 1, dtype=np.int32) % runner.cache.num_pages

    def serial() -> None:
        jax.block_until_ready([runner.read_pages(pages) for _ in range(chunks)])
        runner.forward([batch])
        jax.block_until_ready(runner.logits)

    def overlapped() -> None:
        copies = [runner.read_pages(pages) for _ in range(chunks)]
        runner.forward([batch])
        jax.block_until_ready((runner.logits, copies))

    out = {"step": time_step(runner, batch, iters), "serial": median_seconds(serial, iters), "overlapped": median_seconds(overlapped, iters)}
    cost = out["serial"] - out["step"]
    return {**out, "hidden": (out["serial"] - out["overlapped"]) / cost if cost > 0 else 0.0}


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a device-to-device copy of an `nbytes` array (read + write), median of 20."""
    x = jax.jit(lambda: jnp.zeros(nbytes // 4, jnp.float32))()
    copy = jax.jit(lambda x: x.copy())
    return 2 * nbytes / median_seconds(lambda: jax.block_until_ready(copy(x)), 20)


def device_params(cfg: ModelConfig, mesh: Mesh, dtype: jnp.dtype) -> Params:
    """Random weights made on the device, each in its final sharding: 16 GB never pass the host."""
    init = functools.partial(init_params, cfg, dtype=dtype)
    return jax.jit(init, out_shardings=param_shardings(param_structs(cfg, dtype), mesh, cfg))(jax.random.key(0))


def param_structs(cfg: ModelConfig, dtype: jnp.dtype) -> Params:
    """Shape and dtype of every parameter, allocating nothing."""
    return jax.eval_shape(functools.partial(init_params, cfg, dtype=dtype), jax.random.key(0))


def bytes_read(cfg: ModelConfig, params: Params, batch: int, context: int) -> int:
    """HBM bytes a decode step must read: every weight but the embedding table (a step gathers only
    `batch` rows of it, unless tied to the LM head) plus each row's `context` tokens of K and V."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_word_embeddings:
        weights -= params["embed"].nbytes
    itemsize = params["embed"].dtype.itemsize
    return weights + batch * context * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
