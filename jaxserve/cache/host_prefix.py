"""The host-memory prefix tier (`--host-prefix-cache`): full blocks the device prefix cache evicts wait
here, in an LRU keyed by their chained block hash, so a later prompt with the same prefix copies them
back instead of recomputing them. Optionally persisted to a folder (`--prefix-cache-dir`), so that a
restarted server keeps long system prompts warm.

Bookkeeping only (which host page holds which block); the copies are the engine's. Entries matched for
a step are pinned until their copy back is done, so that storing other blocks in the same step never
evicts them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxserve.cache.block_manager import BlockHash
from jaxserve.cache.host_pool import HostPool

log = logging.getLogger("jaxserve.prefix_tier")

FORMAT = 1  # the on-disk layout's version
_MANIFEST, _PAGES = "manifest.json", "pages.npz"


class HostPrefixCache:
    """Block hash -> host page of `pool`, least recently used first; a pinned page is never evicted."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self._page_of: OrderedDict[BlockHash, int] = OrderedDict()
        self._pins: dict[int, int] = {}  # host page -> pins taken by `match`
        self.hits = 0  # blocks found here (after the device cache missed them)
        self.stored = 0  # blocks stored

    def __len__(self) -> int:
        return len(self._page_of)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._page_of

    @property
    def usage(self) -> float:
        """Fraction of the tier's host pages holding a block."""
        return len(self._page_of) / self.pool.num_pages if self.pool.num_pages else 0.0

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Host pages holding the longest run of `hashes`, pinned until `unpin`, and made most recent."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            self._page_of.move_to_end(h)
            self._pins[page] = self._pins.get(page, 0) + 1
            pages.append(page)
        self.hits += len(pages)
        return pages

    def unpin(self, pages: Sequence[int]) -> None:
        """Drop the pins `match` took (the copy back is done, or was never made)."""
        for page in pages:
            self._pins[page] -= 1
            if not self._pins[page]:
                del self._pins[page]

    def reserve(self, block_hash: BlockHash) -> int | None:
        """A host page to store `block_hash` in (evicting the least recent unpinned block if the tier is
        full), entered under that hash; None when the block is here already or every page is pinned."""
        if block_hash in self._page_of:
            self._page_of.move_to_end(block_hash)
            return None
        fresh = self.pool.allocate(1)
        if fresh is not None:
            page = fresh[0]
        else:
            victim = next((h for h, p in self._page_of.items() if p not in self._pins), None)
            if victim is None:
                return None
            page = self._page_of.pop(victim)
        self._page_of[block_hash] = page
        self.stored += 1
        return page

    def forget(self, pages: Sequence[int]) -> None:
        """Drop the entries held in host `pages` (a copy to or from them failed: they may hold nothing usable)."""
        drop = set(pages)
        for block_hash in [h for h, p in self._page_of.items() if p in drop]:
            self.pool.release([self._page_of.pop(block_hash)])

    # ---- persistence ---------------------------------------------------------------------

    def save(self, folder: Path, fingerprint: str) -> None:
        """Write every entry (least recent first) to `folder`, replacing what was there; readable only
        by this user, since it holds what prompts computed."""
        folder.mkdir(parents=True, exist_ok=True)
        pages = list(self._page_of.values())
        arrays = {f"{i}.{name}": a[:, :, pages] for i, cache in enumerate(self.pool.arrays) for name, a in cache.items()}
        tmp = folder / (_PAGES + ".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / _PAGES)
        manifest = {"format": FORMAT, "fingerprint": fingerprint, "blocks": [h.hex() for h in self._page_of]}
        tmp = folder / (_MANIFEST + ".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, folder / _MANIFEST)
        log.info("host prefix cache: saved %d blocks to %s", len(pages), folder)

    def load(self, folder: Path, fingerprint: str) -> int:
        """Enter the blocks saved in `folder` (the most recent ones, as many as fit); a folder that is
        missing counts as empty, and one that is corrupt or was written for another model or cache
        layout is ignored with a warning. Returns the blocks loaded."""
        if not (folder / _MANIFEST).exists():
            return 0
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
            if manifest.get("format") != FORMAT or manifest.get("fingerprint") != fingerprint:
                log.warning("host prefix cache: ignoring %s: it was written for another model, KV cache layout or format", folder)
                return 0
            blocks = [bytes.fromhex(h) for h in manifest["blocks"]]
            with np.load(folder / _PAGES, allow_pickle=False) as saved:
                arrays = {key: saved[key] for key in saved.files}
            expected = {f"{i}.{name}": a for i, cache in enumerate(self.pool.arrays) for name, a in cache.items()}
            for key, a in expected.items():
                x = arrays.get(key)
                if x is None or x.dtype != a.dtype or x.shape != (*a.shape[:2], len(blocks), *a.shape[3:]):
                    raise ValueError(f"array {key} is missing or has the wrong shape or dtype")
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            log.warning("host prefix cache: ignoring the corrupt %s: %s", folder, e)
            return 0
        keep = range(max(0, len(blocks) - self.pool.num_free), len(blocks))  # the most recent that fit
        pages = self.pool.allocate(len(keep))
        for key, a in expected.items():
            a[:, :, pages] = arrays[key][:, :, keep.start :]
        for j, page in zip(keep, pages):
            self._page_of[blocks[j]] = page
        log.info("host prefix cache: loaded %d blocks from %s", len(pages), folder)
        return len(pages)

    def check_consistency(self) -> None:
        """Nothing pinned between steps; every pool page is free or holds one entry (for tests)."""
        assert not self._pins, self._pins
        taken = set(self._page_of.values())
        assert len(taken) == len(self._page_of) and len(taken) + self.pool.num_free == self.pool.num_pages
        self.pool.check_consistency()
