"""Page bookkeeping: reference counts, prefix-cache hits, LRU eviction, and no page ever lost."""

from __future__ import annotations

import random

from jaxserve.cache.block_manager import BlockManager, block_hashes

PS = 4


def test_hashes_chain_over_the_whole_prefix() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], PS)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], PS)
    assert len(a) == 2  # the partial third page has no hash
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], PS) == a


def test_prefix_hit_shares_pages_and_release_keeps_them_cached() -> None:
    bm = BlockManager(8)
    tokens = list(range(10))
    hashes = block_hashes(tokens, PS)
    pages = bm.allocate(3)
    for page, h in zip(pages, hashes):
        bm.register(page, h)
    assert bm.match_prefix(hashes) == pages[:2]
    bm.acquire(pages[:2])  # a second sequence shares the two full pages
    bm.release(pages)  # the first one finishes
    assert bm.num_free == 7 - 2  # the shared pages are still referenced
    bm.release(pages[:2])
    assert bm.num_free == 7 and bm.match_prefix(hashes) == pages[:2]  # cached, evictable
    bm.check_consistency()


def test_eviction_is_lru_and_forgets_the_hash() -> None:
    bm = BlockManager(4)  # 3 usable pages
    h1, h2 = block_hashes(list(range(8)), PS)
    p1, p2 = bm.allocate(2)
    bm.register(p1, h1)
    bm.register(p2, h2)
    bm.release([p1, p2])  # tail first: p2 is older in the LRU than p1
    fresh = bm.allocate(2)  # one free page, then evicts p2
    assert p2 in fresh and p1 not in fresh
    assert bm.match_prefix([h1, h2]) == [p1]
    assert bm.allocate(2) is None  # only p1 left: nothing taken
    bm.check_consistency()


def test_random_stress_returns_every_page() -> None:
    rng = random.Random(0)
    bm = BlockManager(64)
    shared = [rng.randrange(100) for _ in range(24)]
    live: list[list[int]] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            bm.release(live.pop(rng.randrange(len(live))))
            continue
        tokens = (shared if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randrange(1, 20))]
        hashes = block_hashes(tokens, PS)
        hit = bm.match_prefix(hashes)
        need = -(-len(tokens) // PS) - len(hit)
        bm.acquire(hit)
        fresh = bm.allocate(need)
        if fresh is None:
            bm.release(hit)
            continue
        pages = hit + fresh
        for page, h in zip(pages[len(hit) :], hashes[len(hit) :]):
            bm.register(page, h)
        live.append(pages)
        bm.check_consistency()
    for pages in live:
        bm.release(pages)
    bm.check_consistency()
    assert bm.num_free == 63 and bm.usage == 0.0
    assert bm.prefix_hits > 0
