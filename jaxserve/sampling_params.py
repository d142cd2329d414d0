"""Per-request sampling parameters (host side), validated before a request reaches the device."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from jaxserve.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Filled in when `seed` is None so that every draw of an unseeded request is still reproducible
    # from its logged seed.
    effective_seed: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise UserError(f"{name} {why}, got {getattr(self, name)!r}")

        check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool), "max_tokens", "must be an integer")
        check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        check(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature", "must be >= 0")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1 (off) or a positive integer")
        check(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
            "seed",
            "must be an integer",
        )
        if self.effective_seed < 0:
            seed = self.seed if self.seed is not None else random.getrandbits(32)
            object.__setattr__(self, "effective_seed", seed % (1 << 32))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
