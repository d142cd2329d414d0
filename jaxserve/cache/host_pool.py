"""Host-memory pages: where a preempted sequence's KV cache waits (`--swap-space`) instead of being
recomputed.

The pool mirrors the device caches that share page numbers (the model's, and a draft model's): per
cache and array, `[Hkv, L, host_pages, ...]` in host RAM, so a host page holds what a device page
holds, scales included. Arrays are allocated lazily by the OS (zeros), so a large pool costs memory
only as it fills. Host page ids run from 0; the pool knows nothing of sequences, only which pages are
taken.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jaxserve.cache.kv_cache import KVCache, cache_arrays
from jaxserve.errors import UserError

GIB = 2**30


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_host_memory(wants: dict[str, float]) -> None:
    """A UserError naming the numbers when the GiB asked for under each name add up to more host memory
    than is available."""
    asked = {name: gib for name, gib in wants.items() if gib}
    have = available_host_memory()
    if sum(asked.values()) * GIB > have:
        what = " + ".join(f"{name} of {gib:g} GiB" for name, gib in asked.items())
        raise UserError(f"{what} exceeds the {have / GIB:.1f} GiB of host memory available")


def host_pages(gib: float, bytes_per_page: int, what: str) -> int:
    """Pages of `bytes_per_page` in `gib` GiB of host memory; a UserError when not even one fits."""
    pages = int(gib * GIB) // bytes_per_page
    if pages < 1:
        raise UserError(f"{what} of {gib:g} GiB holds no page of {bytes_per_page} bytes")
    return pages


class HostPool:
    """`num_pages` host pages for each of `caches` (the device caches' shapes and dtypes), and their
    free list."""

    def __init__(self, caches: Sequence[KVCache], num_pages: int) -> None:
        self.num_pages = num_pages
        self.arrays = [
            {name: np.zeros((*a.shape[:2], num_pages, *a.shape[3:]), a.dtype) for name, a in cache_arrays(c).items()} for c in caches
        ]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of host pages taken."""
        return 1.0 - self.num_free / self.num_pages if self.num_pages else 0.0

    def allocate(self, n: int) -> list[int] | None:
        """n host pages, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))

    def store(self, cache: int, pages: Sequence[int], data: dict[str, np.ndarray]) -> None:
        """Write `data` (per array, `[Hkv, L, n, ...]`) into host `pages` of cache number `cache`."""
        for name, x in data.items():
            self.arrays[cache][name][:, :, pages] = x

    def load(self, cache: int, pages: Sequence[int]) -> dict[str, np.ndarray]:
        """Copies of host `pages` of cache number `cache`, per array `[Hkv, L, n, ...]`."""
        return {name: a[:, :, pages] for name, a in self.arrays[cache].items()}

    def page_bytes(self) -> int:
        """Bytes one host page holds over every cache."""
        return sum(a[:, :, :1].nbytes for arrays in self.arrays for a in arrays.values())

    def check_consistency(self) -> None:
        """No page is free twice (for tests)."""
        assert len(set(self._free)) == len(self._free) and all(0 <= p < self.num_pages for p in self._free)

