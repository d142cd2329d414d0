"""Copies of KV-cache pages between the device caches and a host pool, in fixed-size chunks (one
compiled program each way): what swapping and the host prefix tier share.

Copies to the host overlap the step: `to_host` only dispatches them (a gather on the device, then a
transfer into pinned host memory that the device's copy engine runs beside the next program), and
the data lands in the pool when `settle` waits for it: after the step, before a copy back that
needs those pages, or when more than `MAX_IN_FLIGHT_BYTES` are on their way (each gathered chunk
holds device memory until its transfer is done). A transfer that fails there is reported through
the `on_fail` its copy was given, with the host pages it was for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from jaxserve.cache.host_pool import HostPool
from jaxserve.engine.runner import SWAP_CHUNK, ModelRunner

MAX_IN_FLIGHT_BYTES = 256 << 20  # device memory that gathered pages on their way to the host may hold


class CopyError(RuntimeError):
    """Pages asked for hold nothing usable: their copy to host memory failed."""


@dataclass(frozen=True, eq=False)
class _InFlight:
    """One chunk's transfer to host pages of `pool` (cache number `cache`), not yet waited for."""

    pool: HostPool
    cache: int
    host: Sequence[int]
    data: dict[str, jax.Array]  # per array [Hkv, L, SWAP_CHUNK, ...], in host memory once ready
    on_fail: Callable[[Sequence[int]], None]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.data.values())


class PageCopier:
    """Moves pages between the `runners`' caches (the same page numbers: the model's, then a draft
    model's) and host pools that mirror them."""

    def __init__(self, runners: Sequence[ModelRunner]) -> None:
        self.runners = list(runners)
        self.in_flight: list[_InFlight] = []  # in dispatch order: a page written twice lands in that order
        for runner in self.runners:
            runner.host_copies = True  # warm-up compiles the copies

    def to_host(self, pool: HostPool, device: Sequence[int], host: Sequence[int], on_fail: Callable[[Sequence[int]], None]) -> None:
        """Start copying device pages into the paired host pages of `pool`; `on_fail(pages)` runs for
        host pages whose transfer fails after this returns (see `settle`). When a copy cannot start,
        none of it does: the caller falls back once."""
        started = [_InFlight(pool, i, hst, runner.read_pages(_padded(dev)), on_fail)
                   for i, runner in enumerate(self.runners) for dev, hst in _chunks(device, host)]
        self.in_flight += started
        while sum(c.nbytes for c in self.in_flight) > MAX_IN_FLIGHT_BYTES and len(self.in_flight) > 1:
            self._land(self.in_flight[:1])

    def settle(self, pool: HostPool | None = None, host: Sequence[int] = ()) -> int:
        """Wait for the copies in flight to `host` pages of `pool` (and those to `pool` dispatched
        before them; all copies, without arguments) and store their data in dispatch order; returns how
        many failed, each reported to its `on_fail`."""
        wanted = set(host)
        last = max((k for k, c in enumerate(self.in_flight) if pool is None or (c.pool is pool and wanted.intersection(c.host))), default=-1)
        return self._land([c for c in self.in_flight[: last + 1] if pool is None or c.pool is pool])

    def _land(self, due: list[_InFlight]) -> int:
        """Store the data of copies in flight, in order; how many failed."""
        self.in_flight = [c for c in self.in_flight if c not in due]
        failed = 0
        for copy in due:
            try:
                copy.pool.store(copy.cache, copy.host, {name: np.asarray(x)[:, :, : len(copy.host)] for name, x in copy.data.items()})
            except Exception:  # noqa: BLE001 - the owner falls back (recompute, or forget the blocks)
                failed += 1
                copy.on_fail(copy.host)
        return failed

    def to_device(self, pool: HostPool, device: Sequence[int], host: Sequence[int]) -> None:
        """Copy host pages of `pool` into the paired device pages (waiting first for copies to them still
        in flight); a CopyError when one of those failed."""
        if self.settle(pool, host):
            raise CopyError(f"host pages {list(host)} hold no data: their copy to host memory failed")
        for i, runner in enumerate(self.runners):
            for dev, hst in _chunks(device, host):
                pad = SWAP_CHUNK - len(hst)
                data = {name: np.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)) for name, x in pool.load(i, hst).items()}
                runner.write_pages(_padded(dev), data)


def _padded(pages: Sequence[int]) -> np.ndarray:
    """Pages padded with the null page to one copy chunk."""
    out = np.zeros(SWAP_CHUNK, np.int32)
    out[: len(pages)] = pages
    return out


def _chunks(device: Sequence[int], host: Sequence[int]) -> list[tuple[Sequence[int], Sequence[int]]]:
    """Paired device and host pages, SWAP_CHUNK at a time."""
    return [(device[i : i + SWAP_CHUNK], host[i : i + SWAP_CHUNK]) for i in range(0, len(host), SWAP_CHUNK)]
