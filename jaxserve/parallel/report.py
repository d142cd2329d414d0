"""What a sharded model looks like on its mesh: each parameter's PartitionSpec, bytes per device,
the collectives XLA inserted, and a decode step's time. Used by notebooks/sharding.ipynb and
scripts/bench_parallel.py."""

from __future__ import annotations

import collections
import re
import time

import jax
import numpy as np

from jaxserve.engine.runner import ModelRunner
from jaxserve.models.llama import ForwardBatch

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


def time_step(runner: ModelRunner, batch: ForwardBatch, iters: int = 10) -> float:
    """Median seconds of one model step on `batch` (compiled first)."""
    runner.forward([batch])
    jax.block_until_ready(runner.logits)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.forward([batch])
        jax.block_until_ready(runner.logits)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
