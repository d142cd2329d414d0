"""Weighted fair share of the engine across tenants, by tokens computed (`--scheduling-policy fair`).

An active tenant (one with a sequence waiting or running) has a normalized usage: the tokens computed
for it, divided by its weight. Within a priority class the scheduler serves the least-served tenant
first, so over time a tenant of weight 3 gets three tokens for another's one, whatever the number or
length of their requests. A tenant that becomes active is set to the lowest usage among the active
ones: it cannot bank credit while idle (and then flood the engine when it returns), and its history
cannot starve it either (it starts level with the least-served tenant, not behind it).
"""

from __future__ import annotations

from typing import Callable

from jaxserve.engine.sequence import Sequence


class FairShare:
    """Tokens computed per tenant, and the normalized usage of the active ones."""

    def __init__(self) -> None:
        self._computed: dict[str, int] = {}  # every tenant seen, since start
        self._normalized: dict[str, float] = {}  # active tenants, as of the latest `sync`

    def sync(self, active: set[str]) -> None:
        """Forget the tenants that went idle; set the newly active ones to the lowest usage among the rest."""
        kept = {t: u for t, u in self._normalized.items() if t in active}
        floor = min(kept.values(), default=0.0)
        self._normalized = {t: kept.get(t, floor) for t in active}

    def charge(self, seq: Sequence, tokens: int) -> None:
        """Count `tokens` computed for `seq`, in its tenant's units (tokens / weight) when it is tracked."""
        self._computed[seq.tenant] = self._computed.get(seq.tenant, 0) + tokens
        if seq.tenant in self._normalized:
            self._normalized[seq.tenant] += tokens / seq.weight

    def normalized(self, tenant: str) -> float:
        """A tenant's tokens computed / weight, comparable across the active tenants (0 when not tracked)."""
        return self._normalized.get(tenant, 0.0)

    def usage(self) -> dict[str, int]:
        """A snapshot of the tokens computed per tenant since start (recomputed ones included)."""
        return dict(self._computed)


def policy_key(policy: str, share: FairShare) -> Callable[[Sequence], tuple]:
    """The scheduling order of `policy` (`EngineConfig.scheduling_policy`), first served first: fcfs
    by arrival; priority by priority, then arrival; fair by priority, then the tenant's normalized
    usage, then arrival (a priority class outranks fair share)."""
    if policy == "fcfs":
        return lambda s: (s.arrival,)
    if policy == "priority":
        return lambda s: s.order
    return lambda s: (s.priority, share.normalized(s.tenant), s.arrival)
