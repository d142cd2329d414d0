"""Per-tenant rate limits: token buckets checked at admission, and OpenAI's `x-ratelimit-*` headers.

Each limit is a bucket that refills continuously at its per-minute rate. The requests bucket holds
`max(burst, 1)` requests, so at most `requests_per_minute + max(burst, 1)` are granted in any minute.
A token bucket holds one minute of its rate (a prompt arrives whole, so the bucket must hold at least
one): a tenant idle for a minute may spend a minute's tokens at once, then the steady rate. Prompt
tokens are taken at admission; generated tokens as they are produced, one stream token at a time, so
a tenant never receives more than its bucket grants (a stream whose tenant runs dry ends with
`length`). Refusals are checked for every limit before anything is taken, so a refused request costs
nothing. All of it runs on the event loop: no locks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from jaxserve.server.tenants import Tenant


class TokenBucket:
    """`capacity` units, refilled at `per_minute` / 60 per second, full at start."""

    def __init__(self, per_minute: float, capacity: float, now: float) -> None:
        self.per_minute, self.capacity, self.level, self.updated = per_minute, capacity, capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.level

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def seconds_until(self, amount: float, now: float) -> float:
        """Until `amount` is available (0 if it is now)."""
        missing = min(amount, self.capacity) - self.available(now)
        return max(0.0, missing * 60 / self.per_minute)

    def resize(self, per_minute: float, capacity: float, now: float) -> None:
        """New limits (a keys-file reload), keeping what was spent."""
        self._refill(now)
        self.per_minute, self.capacity = per_minute, capacity
        self.level = min(self.level, capacity)


@dataclass(frozen=True)
class Refusal:
    """Why admission said no: a 429 to retry after `retry_after` seconds, or a 400 for a request that
    can never fit its tenant's limits."""

    message: str
    retry_after: float  # seconds
    status: int = 429


def duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class TenantQuota:
    """One tenant's buckets and its requests in flight."""

    def __init__(self, tenant: Tenant, now: float) -> None:
        self.tenant = tenant
        self.in_flight = 0
        self.requests = self.prompt = self.generated = None
        self.apply(tenant, now)

    def apply(self, tenant: Tenant, now: float) -> None:
        """Take `tenant`'s limits, keeping the state of buckets that stay (a reload)."""
        self.tenant = tenant
        self.requests = _bucket(self.requests, tenant.requests_per_minute, max(tenant.burst, 1), now)
        self.prompt = _bucket(self.prompt, tenant.prompt_tokens_per_minute, tenant.prompt_tokens_per_minute, now)
        self.generated = _bucket(self.generated, tenant.generated_tokens_per_minute, tenant.generated_tokens_per_minute, now)

    def refusal(self, prompt_tokens: int, now: float) -> Refusal | None:
        """Why a request of `prompt_tokens` cannot start now, None if it can."""
        t = self.tenant
        if self.prompt is not None and prompt_tokens > self.prompt.capacity:
            return Refusal(f"the request's {prompt_tokens} prompt tokens exceed its tenant's limit of {t.prompt_tokens_per_minute} "
                           "per minute; it can never be admitted", 0.0, 400)
        if t.max_concurrent is not None and self.in_flight >= t.max_concurrent:
            return Refusal(f"tenant '{t.name}' has {self.in_flight} requests in flight, its limit is {t.max_concurrent}", 1.0)
        if self.requests is not None and self.requests.available(now) < 1:
            return Refusal(f"rate limit reached for requests: {t.requests_per_minute} per minute", self.requests.seconds_until(1, now))
        if self.prompt is not None and self.prompt.available(now) < prompt_tokens:
            return Refusal(f"rate limit reached for prompt tokens: {t.prompt_tokens_per_minute} per minute, "
                           f"{int(self.prompt.available(now))} left, {prompt_tokens} requested", self.prompt.seconds_until(prompt_tokens, now))
        if self.generated is not None and self.generated.available(now) < 1:
            return Refusal(f"rate limit reached for generated tokens: {t.generated_tokens_per_minute} per minute",
                           self.generated.seconds_until(1, now))
        return None

    def admit(self, prompt_tokens: int, now: float) -> None:
        """Take a request that `refusal` let through."""
        self._take(1, prompt_tokens, now)
        self.in_flight += 1

    def refund(self, prompt_tokens: int, now: float) -> None:
        """Give back what `admit` took, for a request the engine then refused (a 400): it cost nothing."""
        self._take(-1, -prompt_tokens, now)

    def _take(self, requests: int, prompt_tokens: int, now: float) -> None:
        if self.requests is not None:
            self.requests.take(requests, now)
        if self.prompt is not None:
            self.prompt.take(prompt_tokens, now)

    def spend_generated(self, tokens: int, now: float) -> bool:
        """Take generated tokens as they come; False (nothing taken) when the bucket cannot give them."""
        if self.generated is None:
            return True
        if self.generated.available(now) < tokens:
            return False
        self.generated.take(tokens, now)
        return True

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits this tenant has; the tokens trio reports its
        tighter token bucket (the smaller remaining fraction)."""
        out: dict[str, str] = {}
        if self.requests is not None:
            out.update(_trio("requests", self.tenant.requests_per_minute, self.requests, now))
        tokens = [(b.available(now) / b.capacity, limit, b) for limit, b in ((self.tenant.prompt_tokens_per_minute, self.prompt),
                                                                          (self.tenant.generated_tokens_per_minute, self.generated)) if b]
        if tokens:
            _, limit, bucket = min(tokens, key=lambda x: x[0])
            out.update(_trio("tokens", limit, bucket, now))
        return out


def _bucket(old: TokenBucket | None, per_minute: int | None, capacity: int | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if old is None:
        return TokenBucket(per_minute, capacity, now)
    old.resize(per_minute, capacity, now)
    return old


def _trio(kind: str, limit: int, bucket: TokenBucket, now: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(bucket.available(now)))),
        f"x-ratelimit-reset-{kind}": duration(bucket.seconds_until(bucket.capacity, now)),
    }


class Quotas:
    """Every tenant's quota by name. Limits change only on `reload` (a request admitted before it may
    still carry its old `Tenant`); spent budgets stay."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_name: dict[str, TenantQuota] = {}

    def of(self, tenant: Tenant) -> TenantQuota:
        quota = self._by_name.get(tenant.name)
        if quota is None:
            quota = self._by_name[tenant.name] = TenantQuota(tenant, self.clock())
        return quota

    def reload(self, tenants: Iterable[Tenant]) -> None:
        """The limits of a reloaded keys file, for the tenants that have a quota already."""
        now = self.clock()
        for tenant in tenants:
            quota = self._by_name.get(tenant.name)
            if quota is not None and quota.tenant != tenant:
                quota.apply(tenant, now)
