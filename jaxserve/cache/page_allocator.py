"""Host-side page bookkeeping: a free list over the cache's pages; page 0 is the reserved null page."""

from __future__ import annotations

from jaxserve.errors import UserError


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise UserError(f"the KV cache needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise UserError(f"the KV cache has {len(self._free)} free pages, {n} are needed")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
