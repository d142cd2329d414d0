"""The host prefix tier's copies: blocks the device prefix cache evicts are read out before the step
overwrites their pages (their transfer to host memory runs beside the step), and host hits come back
before the step reads them. Counts, bytes and
fallbacks; saved to and loaded from `--prefix-cache-dir`.

A failed copy never corrupts output: a block that fails to reach host memory is forgotten, and a
sequence whose blocks fail to come back recomputes them (counted as a fallback), the blocks forgotten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence as Seq

from jaxserve.cache.block_manager import BlockHash
from jaxserve.cache.host_prefix import HostPrefixCache
from jaxserve.engine.page_copier import PageCopier
from jaxserve.engine.scheduler import HostCopy
from jaxserve.engine.sequence import Sequence
from jaxserve.errors import UserError

log = logging.getLogger("jaxserve.prefix_tier")


@dataclass
class PrefixTierCounters:
    """Totals since start: blocks found in host memory (after the device missed them), blocks stored
    there, the bytes each way, and copies back that failed (their sequence recomputed)."""

    hits: int = 0
    stored: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    fallbacks: int = 0
    usage: float = 0.0  # fraction of the tier's host pages holding a block


class PrefixTier:
    """Moves evicted blocks to `cache` and host hits back through `copier`; `folder` persists it."""

    def __init__(self, copier: PageCopier, cache: HostPrefixCache, folder: Path | None, fingerprint: str) -> None:
        self.copier, self.cache = copier, cache
        self.folder, self.fingerprint = folder, fingerprint
        self.stored_bytes = self.loaded_bytes = self.fallbacks = 0  # the rest of the counters are the cache's
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                writable = os.access(folder, os.W_OK)
            except OSError as e:
                raise UserError(f"prefix_cache_dir: cannot create {folder}: {e.strerror}") from None
            if not writable:
                raise UserError(f"prefix_cache_dir: {folder} is not writable")
            cache.load(folder, fingerprint)

    @property
    def counters(self) -> PrefixTierCounters:
        return PrefixTierCounters(self.cache.hits, self.cache.stored, self.stored_bytes, self.loaded_bytes, self.fallbacks, self.cache.usage)

    def store(self, evicted: Seq[tuple[int, BlockHash]]) -> None:
        """Copy evicted blocks (device page, hash) to host memory; ones already there are only made recent."""
        pairs: dict[int, tuple[int, BlockHash]] = {}  # host page -> (device page, hash); a page reused in the batch keeps the latest
        for page, block_hash in evicted:
            host = self.cache.reserve(block_hash)
            if host is not None:
                pairs[host] = (page, block_hash)
        if not pairs:
            return
        try:
            self.copier.to_host(self.cache.pool, [page for page, _ in pairs.values()], list(pairs), on_fail=self._lose)
        except Exception:  # noqa: BLE001 - the blocks are only forgotten, as without a host tier
            log.exception("copying %d evicted prefix blocks to host memory failed; they are forgotten", len(pairs))
            self.cache.forget(list(pairs))
            return
        self.stored_bytes += len(pairs) * self.cache.pool.page_bytes()

    def _lose(self, pages: Seq[int]) -> None:
        """A copy of blocks to host `pages` failed in flight: forget what they were to hold."""
        log.error("copying %d evicted prefix blocks to host memory failed in flight; they are forgotten", len(pages))
        self.cache.forget(pages)

    def fetch(self, copies: Seq[HostCopy]) -> list[Sequence]:
        """Copy host hits back into their sequences' fresh device pages; returns the sequences whose copy
        failed, which must recompute."""
        failed = []
        for copy in copies:
            try:
                self.copier.to_device(self.cache.pool, copy.device_pages, copy.host_pages)
            except Exception:  # noqa: BLE001 - the sequence recomputes instead
                log.exception("copying prefix blocks of request %s back from host memory failed; it will recompute", copy.seq.request_id)
                failed.append(copy.seq)
                self.cache.forget(copy.host_pages)  # so that its retry recomputes them
            else:
                self.loaded_bytes += len(copy.host_pages) * self.cache.pool.page_bytes()
            finally:
                self.cache.unpin(copy.host_pages)
        self.fallbacks += len(failed)
        return failed

    def close(self) -> None:
        """Save the tier to its folder, if it has one; a failure is logged (the next start finds the
        previous save, or nothing)."""
        if self.folder is not None:
            self.copier.settle()
            try:
                self.cache.save(self.folder, self.fingerprint)
            except OSError:
                log.exception("saving the host prefix cache to %s failed", self.folder)
