"""How a model's traffic is split over its versions.

A request with a sticky key (its `user`, or an `X-Session-Id` header) goes where the key's hash
falls on [0, 1): the versions' shares laid end to end in the order they were loaded. The hash is
SHA-256, so a user stays on one version across requests, replicas and restarts; and a canary loaded
last keeps its users as its share grows (its interval only widens leftwards). Requests without a key
are split at random by the same weights.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from jaxserve.errors import UserError

_TOLERANCE = 1e-6


def key_point(model: str, key: str) -> float:
    """Where a sticky key falls on [0, 1) for `model` (another model splits its users independently)."""
    digest = hashlib.sha256(f"{model}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class TrafficSplit:
    """(version, share) in load order; shares sum to 1."""

    shares: tuple[tuple[str, float], ...]

    @classmethod
    def only(cls, version: str) -> TrafficSplit:
        return cls(((version, 1.0),))

    @classmethod
    def parse(cls, body: Any, versions: Sequence[str]) -> TrafficSplit:
        """`{"v1": 0.9, "v2": 0.1}` over known `versions` (load order); UserError for unknown versions,
        shares outside [0, 1], or a sum other than 1."""
        if not isinstance(body, dict) or not body:
            raise UserError('the split must be a JSON object of version -> share, e.g. {"v1": 0.9, "v2": 0.1}')
        unknown = sorted(set(body) - set(versions))
        if unknown:
            raise UserError(f"unknown version(s) {', '.join(map(repr, unknown))}; this model has {', '.join(map(repr, versions))}", param="version")
        for version, share in body.items():
            if not isinstance(share, (int, float)) or isinstance(share, bool) or not math.isfinite(share) or not 0 <= share <= 1:
                raise UserError(f"the share of {version!r} must be a number in [0, 1], got {share!r}", param=version)
        total = math.fsum(body.values())
        if abs(total - 1) > _TOLERANCE:
            raise UserError(f"the shares sum to {total:g}; they must sum to 1")
        return cls(tuple((v, float(body[v])) for v in versions if body.get(v, 0) > 0))

    def share(self, version: str) -> float:
        return dict(self.shares).get(version, 0.0)

    def without(self, version: str) -> TrafficSplit:
        """The split with `version` taken out and the others scaled up to sum to 1 (some must remain)."""
        rest = [(v, s) for v, s in self.shares if v != version]
        total = math.fsum(s for _, s in rest)
        return TrafficSplit(tuple((v, s / total) for v, s in rest))

    def pick(self, model: str, key: str | None, rng: random.Random) -> str:
        """The version for a request: by its sticky key's hash, or at random without one."""
        point = key_point(model, key) if key is not None else rng.random()
        edge = 0.0
        for version, share in self.shares:
            edge += share
            if point < edge:
                return version
        return self.shares[-1][0]  # rounding left the point past the last edge

    def as_dict(self) -> dict[str, float]:
        return dict(self.shares)
