"""What each tenant used: totals since start and per-minute tallies for `GET /v1/usage`, plus cost.

The server records every event once, here (admission, each generated token, each error or 429);
the per-tenant Prometheus counters and the usage endpoint both read this ledger, so they agree.
Cost, with `--cost-per-hour`, is what the machine cost since the server became ready, spread over
the tokens it processed (prompt and generated alike): a measured cost per million tokens, and each
tenant's share by its tokens.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Callable

KEEP_MINUTES = 24 * 60  # per-minute tallies kept for window queries (a day)


@dataclass
class Tally:
    requests: int = 0  # admitted inference requests
    prompt_tokens: int = 0
    generated_tokens: int = 0
    errors: int = 0  # answers with a 4xx or 5xx status other than 429
    rate_limited: int = 0  # 429s

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


class UsageLedger:
    """Tallies by tenant and model (the model its requests were routed to; "" for answers refused
    before routing)."""

    def __init__(self, cost_per_hour: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cost_per_hour = cost_per_hour
        self.clock = clock
        self.since = clock()  # reset by `start` when the server becomes ready
        self.totals: dict[tuple[str, str], Tally] = {}  # (tenant, model) -> since start
        self._minutes: dict[tuple[str, str], OrderedDict[int, Tally]] = {}

    def start(self) -> None:
        self.since = self.clock()

    def record(self, tenant: str, model: str, **counts: int) -> None:
        """Add counts (Tally's fields) for `tenant`'s use of `model` now."""
        event = Tally(**counts)
        self.totals.setdefault((tenant, model), Tally()).add(event)
        minutes = self._minutes.setdefault((tenant, model), OrderedDict())
        minute = int(self.clock() // 60)
        minutes.setdefault(minute, Tally()).add(event)
        while next(iter(minutes)) < minute - KEEP_MINUTES:
            minutes.popitem(last=False)

    def window(self, start: float, end: float) -> dict[tuple[str, str], Tally]:
        """Each (tenant, model)'s tally over the minutes that overlap [start, end) (Unix seconds)."""
        first, last = int(start // 60), int(end // 60)
        out: dict[tuple[str, str], Tally] = {}
        for key, minutes in self._minutes.items():
            tally = Tally()
            for minute, t in minutes.items():
                if first <= minute <= last:
                    tally.add(t)
            out[key] = tally
        return out

    def cost_per_million_tokens(self) -> float | None:
        """USD per million tokens at the throughput measured since start (None without a price or tokens)."""
        tokens = sum(t.tokens for t in self.totals.values())
        if self.cost_per_hour is None or not tokens:
            return None
        return self.cost_per_hour * (self.clock() - self.since) / 3600 / tokens * 1e6

    def cost(self, tally: Tally) -> float | None:
        """USD share of `tally`'s tokens."""
        per_million = self.cost_per_million_tokens()
        return None if per_million is None else per_million * tally.tokens / 1e6
