"""Copies of KV-cache pages between the device caches and a host pool, in fixed-size chunks (one
compiled program each way): what swapping and the host prefix tier share."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxserve.cache.host_pool import HostPool
from jaxserve.engine.runner import SWAP_CHUNK, ModelRunner


class PageCopier:
    """Moves pages between the `runners`' caches (the same page numbers: the model's, then a draft
    model's) and host pools that mirror them."""

    def __init__(self, runners: Sequence[ModelRunner]) -> None:
        self.runners = list(runners)
        for runner in self.runners:
            runner.host_copies = True  # warm-up compiles the copies

    def to_host(self, pool: HostPool, device: Sequence[int], host: Sequence[int]) -> None:
        """Copy device pages into the paired host pages of `pool`."""
        for i, runner in enumerate(self.runners):
            for dev, hst in _chunks(device, host):
                data = runner.read_pages(_padded(dev))
                pool.store(i, hst, {name: x[:, :, : len(hst)] for name, x in data.items()})

    def to_device(self, pool: HostPool, device: Sequence[int], host: Sequence[int]) -> None:
        """Copy host pages of `pool` into the paired device pages."""
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
