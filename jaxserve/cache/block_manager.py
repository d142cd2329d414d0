"""Host-side page bookkeeping: free list, reference counts, and the automatic prefix cache.

A page that holds a full block of tokens is registered under the chained hash of every token up to
its end, so a later sequence with the same prefix reuses it instead of recomputing it. Cached pages
nobody references stay in an LRU and are evicted only when fresh pages run out. Page 0 is the
reserved null page and is never handed out; in a sequence's page list it stands for a page it gave
up (wholly outside a sliding attention window) and is skipped by every reference count.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from jaxserve.errors import UserError

BlockHash = bytes


def salt_hash(salt: str | None, adapter: str | None = None) -> BlockHash:
    """The parent of a sequence's first block hash: empty, or the request's cache salt hashed, so
    requests with different salts never share cached pages (a tenant cannot probe another's prompts
    by timing); with a LoRA adapter (its digest), salted by that too."""
    if adapter is not None:  # a LoRA adapter's K/V differ from the base model's: never shared
        return hashlib.blake2b(b"lora:" + adapter.encode() + b"|" + salt_hash(salt), digest_size=16).digest()
    return b"" if salt is None else hashlib.blake2b(b"salt:" + salt.encode(), digest_size=16).digest()


def block_hashes(tokens: Sequence[int], page_size: int, parent: BlockHash = b"") -> list[BlockHash]:
    """Chained hashes of each full page of `tokens` (a page's hash covers every token before it too)."""
    out = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        block = np.asarray(tokens[start : start + page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_pages: int, enable_prefix_caching: bool = True, record_evictions: bool = False) -> None:
        """`record_evictions`: keep the (page, hash) of every evicted cached block for `take_evicted`."""
        if num_pages < 2:
            raise UserError(f"the KV cache needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._refs = [0] * num_pages
        self._hash_of: dict[int, BlockHash] = {}  # page -> hash of the full block it holds
        self._page_of: dict[BlockHash, int] = {}  # hash -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced pages, LRU first
        self.record_evictions = record_evictions
        self._evicted: list[tuple[int, BlockHash]] = []
        self.prefix_queries = 0  # full blocks looked up
        self.prefix_hits = 0  # of which found

    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by sequences."""
        return 1.0 - self.num_free / (self.num_pages - 1)

    def match_prefix(self, hashes: Sequence[BlockHash], skip: Callable[[int], int] | None = None) -> list[int]:
        """Pages holding the longest cached run of `hashes` (no references taken). With `skip` (blocks
        hit -> how many leading ones of them a hit that long needs no longer: a sliding window's), the
        longest run k whose blocks from skip(k) on are all cached, with the null page 0 for the first
        skip(k) (they may be cached or not)."""
        pages: list[int] = []
        if self.enable_prefix_caching:
            if skip is None:
                for h in hashes:
                    page = self._page_of.get(h)
                    if page is None:
                        break
                    pages.append(page)
            else:
                found = [self._page_of.get(h) for h in hashes]
                best, missing = 0, -1  # the longest run that qualifies; the latest block not cached
                for k in range(1, len(found) + 1):
                    if found[k - 1] is None:
                        missing = k - 1
                    elif missing < skip(k):
                        best = k
                lead = skip(best) if best else 0
                pages = [0] * lead + found[lead:best]
            self.prefix_queries += len(hashes)
            self.prefix_hits += len(pages)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        """Take a reference on cached pages found by `match_prefix`."""
        for page in pages:
            if page:  # the null page stands for a page given up
                self._refs[page] += 1
                self._evictable.pop(page, None)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages with one reference each, evicting least-recently-used cached pages if needed;
        None (and nothing taken) when fewer than n can be had."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                block_hash = self._hash_of.pop(page)
                del self._page_of[block_hash]
                if self.record_evictions:
                    self._evicted.append((page, block_hash))
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference per page; unreferenced pages become evictable (cached) or free."""
        for page in reversed(pages):  # a sequence's tail pages are evicted before its prefix
            if not page:
                continue  # the null page stands for a page given up
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def take_evicted(self) -> list[tuple[int, BlockHash]]:
        """The cached blocks evicted since the last call, as (page, hash); their pages still hold them
        until the next step writes."""
        out, self._evicted = self._evicted, []
        return out

    def cached_blocks(self) -> list[tuple[int, BlockHash]]:
        """Every cached block as (page, hash), least recently used first: idle ones in LRU order, then
        those in use."""
        idle = [(page, self._hash_of[page]) for page in self._evictable]
        return idle + [(page, h) for page, h in self._hash_of.items() if page not in self._evictable]

    def register(self, page: int, block_hash: BlockHash) -> None:
        """Record that `page` now holds the full block `block_hash` (its K/V are written)."""
        if not self.enable_prefix_caching or not page or page in self._hash_of or block_hash in self._page_of:
            return
        self._hash_of[page] = block_hash
        self._page_of[block_hash] = page

    def check_consistency(self) -> None:
        """Every usable page is exactly one of: referenced, evictable, free (for tests)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        for page in range(1, self.num_pages):
            referenced = self._refs[page] > 0
            assert referenced + (page in free) + (page in evictable) == 1, page
