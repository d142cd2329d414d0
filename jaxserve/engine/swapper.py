"""Swap instead of recompute: copies of preempted sequences' pages between the device caches and a
host pool, with counts, bytes and fallbacks, and the measured context length from which it pays.

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
from jaxserve.engine.page_copier import PageCopier
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
    """Swaps preempted sequences' pages between the device caches and `pool` through `copier`."""

    def __init__(self, copier: PageCopier, pool: HostPool) -> None:
        self.copier = copier
        self.pool = pool
        self.counters = SwapCounters()
        self._lost: list[Sequence] = []  # swapped out, but their copy failed once in flight

    def run(self, outs: Seq[HostCopy], ins: Seq[HostCopy]) -> list[Sequence]:
        """Start copying `outs` to host memory, then copy `ins` back to the device (releasing their host
        pages); returns the sequences whose copy failed, which must recompute."""
        failed = []
        for copy in outs:
            try:
                self.copier.to_host(self.pool, copy.device_pages, copy.host_pages, on_fail=lambda _, seq=copy.seq: self._lose(seq))
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
                self.copier.to_device(self.pool, copy.device_pages, copy.host_pages)
            except Exception:  # noqa: BLE001
                log.exception("swap-in of request %s failed; it will recompute", copy.seq.request_id)
                failed.append(copy.seq)
            else:
                self.counters.swap_ins += 1
                self.counters.swap_in_bytes += len(copy.host_pages) * self.pool.page_bytes()
            finally:
                self.pool.release(copy.host_pages)
        return self.take_failed(failed)

    def _lose(self, seq: Sequence) -> None:
        log.error("swap-out of request %s failed in flight; it will recompute", seq.request_id)
        self._lost.append(seq)

    def take_failed(self, failed: Seq[Sequence] = ()) -> list[Sequence]:
        """`failed` and the sequences whose swap-out failed in flight (found by `PageCopier.settle`),
        each once and counted as a fallback: they must recompute."""
        out, self._lost = list(dict.fromkeys([*failed, *self._lost])), []
        self.counters.fallbacks += len(out)
        return out


def swap_min_tokens(runner: ModelRunner, page_size: int, repeats: int = 3) -> int | None:
    """The context length from which swapping a sequence out and back costs less than recomputing it,
    measured here: one chunk's round trip against a prefill row's time per token (compiled first,
    timed after). None when copying never pays (a chunk costs more than recomputing its tokens)."""
    row_len, width = runner.shapes.row_len, runner.shapes.table_width
    zeros = np.zeros((1, row_len), np.int32)
    row = ForwardBatch(zeros, zeros, np.zeros((1, width), np.int32), np.zeros(1, np.int32))  # writes only the null page

    def prefill_row() -> None:
        runner.forward([row])
        np.asarray(runner.logits)

    seconds = []
    for fn in (runner.round_trip_null_pages, prefill_row):
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
