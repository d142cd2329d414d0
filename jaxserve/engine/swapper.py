"""Swap instead of recompute: copies of preempted sequences' pages between the device caches and a
host pool, in fixed-size chunks (one compiled program each way), with counts, bytes and fallbacks.

A failed copy never corrupts output: the sequence behind it falls back to recomputing from its
tokens, and the fallback is counted.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np

from jaxserve.cache.host_pool import HostPool
from jaxserve.engine.runner import SWAP_CHUNK, ModelRunner
from jaxserve.engine.scheduler import HostCopy
from jaxserve.engine.sequence import Sequence
from jaxserve.models.llama import ForwardBatch

log = logging.getLogger("jaxserve.swap")


@dataclass
class SwapCounters:
    """Totals since start: sequences swapped out and in, their bytes, and copies that failed (the
    sequence recomputed instead)."""

    swap_outs: int = 0
    swap_ins: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    fallbacks: int = 0


class Swapper:
    """Moves pages between the `runners`' caches (same page numbers) and `pool`."""

    def __init__(self, runners: Seq[ModelRunner], pool: HostPool) -> None:
        self.runners = list(runners)
        self.pool = pool
        self.counters = SwapCounters()
        for runner in self.runners:
            runner.host_copies = True

    def run(self, outs: Seq[HostCopy], ins: Seq[HostCopy]) -> list[Sequence]:
        """Copy `outs` to host memory, then `ins` back to the device (releasing their host pages);
        returns the sequences whose copy failed, which must recompute."""
        failed = []
        for copy in outs:
            try:
                for i, runner in enumerate(self.runners):
                    for dev, host in _chunks(copy.device_pages, copy.host_pages):
                        data = runner.read_pages(_padded(dev))
                        self.pool.store(i, host, {name: x[:, :, : len(host)] for name, x in data.items()})
            except Exception:  # noqa: BLE001 - any failure: the sequence recomputes instead
                log.exception("swap-out of request %s failed; it will recompute", copy.seq.request_id)
                failed.append(copy.seq)
                continue
            self.counters.swap_outs += 1
            self.counters.swap_out_bytes += len(copy.host_pages) * self.pool.page_bytes()
        for copy in ins:
            if copy.seq in failed:  # swapped out and back in one step, and the way out failed
                self.pool.release(copy.host_pages)
                continue
            try:
                for i, runner in enumerate(self.runners):
                    for dev, host in _chunks(copy.device_pages, copy.host_pages):
                        data = self.pool.load(i, host)
                        pad = SWAP_CHUNK - len(host)
                        runner.write_pages(_padded(dev), {name: np.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)) for name, x in data.items()})
            except Exception:  # noqa: BLE001
                log.exception("swap-in of request %s failed; it will recompute", copy.seq.request_id)
                failed.append(copy.seq)
            else:
                self.counters.swap_ins += 1
                self.counters.swap_in_bytes += len(copy.host_pages) * self.pool.page_bytes()
            finally:
                self.pool.release(copy.host_pages)
        self.counters.fallbacks += len(failed)
        return failed


def swap_min_tokens(runner: ModelRunner, page_size: int, repeats: int = 3) -> int | None:
    """The context length from which swapping a sequence out and back costs less than recomputing it,
    measured here: one chunk's round trip against a prefill row's time per token (compiled first,
    timed after). None when copying never pays (a chunk costs more than recomputing its tokens)."""
    null = np.zeros(SWAP_CHUNK, np.int32)
    row_len, width = runner.shapes.row_len, runner.shapes.table_width
    zeros = np.zeros((1, row_len), np.int32)
    row = ForwardBatch(zeros, zeros, np.zeros((1, width), np.int32), np.zeros(1, np.int32))  # writes only the null page

    def round_trip() -> None:
        runner.write_pages(null, runner.read_pages(null))

    def prefill_row() -> None:
        runner.forward([row])
        np.asarray(runner.logits)

    seconds = []
    for fn in (round_trip, prefill_row):
        fn()  # compile
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        seconds.append((time.perf_counter() - start) / repeats)
    chunk_s, token_s = seconds[0], seconds[1] / row_len
    never = chunk_s / (SWAP_CHUNK * page_size) >= token_s
    threshold = None if never else max(1, math.ceil(chunk_s / token_s))
    log.info(
        "preemption: swapping a chunk of %d pages out and back takes %.2f ms, recomputing a token %.3f ms: %s",
        SWAP_CHUNK, chunk_s * 1e3, token_s * 1e3,
        "contexts always recompute" if never else f"contexts of {threshold} tokens or more swap, shorter ones recompute",
    )
    return threshold


def _padded(pages: Seq[int]) -> np.ndarray:
    """Pages padded with the null page to one copy chunk."""
    out = np.zeros(SWAP_CHUNK, np.int32)
    out[: len(pages)] = pages
    return out


def _chunks(device: Seq[int], host: Seq[int]) -> list[tuple[Seq[int], Seq[int]]]:
    """Paired device and host pages, SWAP_CHUNK at a time."""
    return [(device[i : i + SWAP_CHUNK], host[i : i + SWAP_CHUNK]) for i in range(0, len(host), SWAP_CHUNK)]
