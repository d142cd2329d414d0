"""One version of a served model: its engines once loaded, their load, and its recent outcomes.

A deployment moves unloaded -> loading -> ready (or failed), ready -> draining -> gone when an admin
unloads it, and ready -> unloaded when a lazy one is evicted. Only a ready one receives requests. A
ready one whose engines have all stopped after an error stays ready but is unhealthy: it answers 503
and may not be given traffic or promoted.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Sequence

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.interface import ModelInfo
from jaxserve.server.model_spec import ModelSpec

UNLOADED, LOADING, READY, FAILED, DRAINING = "unloaded", "loading", "ready", "failed", "draining"
_WINDOW = 20_000  # outcomes kept per version for the admin stats route


@dataclass(frozen=True)
class Outcome:
    """How one inference request to a version ended."""

    at: float  # time.monotonic() when it ended
    seconds: float  # arrival to last byte
    ttft: float | None  # arrival to first token (None: no token came)
    error: bool  # a 5xx, or a failure sent inside a stream


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Deployment:
    def __init__(self, spec: ModelSpec, engines: Sequence[AsyncEngine] = ()) -> None:
        """`engines`: already built (loaded at start); none for a version still to load."""
        self.spec = spec
        self.engines: list[AsyncEngine] = list(engines)
        self.load = [0] * len(self.engines)  # engine requests (one per prompt) accepted and not yet answered, per replica
        self.state = LOADING if self.engines else UNLOADED
        self.error: str | None = None  # why the last load failed
        self.failed_loads = 0  # loads that failed in a row (a lazy version's retry backoff grows with them)
        self.retry_at = 0.0  # time.monotonic() before which a failed lazy version is not loaded again
        self.last_used = time.monotonic()
        self.outcomes: collections.deque[Outcome] = collections.deque(maxlen=_WINDOW)

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def info(self) -> ModelInfo:
        return self.engines[0].info

    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def engine_error(self) -> BaseException | None:
        return next((e.error for e in self.engines if e.error is not None), None)

    @property
    def healthy(self) -> bool:
        """Whether it serves, or will once loaded: False for a ready version whose engines have all
        stopped after an error, one whose load failed, and one going away."""
        if self.state == READY:
            return self.replica() is not None
        return self.state in (LOADING, UNLOADED)

    def health(self) -> dict:
        """Its state and health for the probes: the engines' or the load's error when unhealthy."""
        error = self.engine_error if self.state == READY else None
        return {"state": self.state, "healthy": self.healthy, "error": str(error) if error is not None else self.error}

    def loaded(self, engines: Sequence[AsyncEngine]) -> None:
        self.engines, self.load, self.state, self.error = list(engines), [0] * len(engines), READY, None
        self.failed_loads = 0

    def unloaded(self, state: str = UNLOADED, error: str | None = None) -> list[AsyncEngine]:
        """Forget the engines (returned, for the caller to shut down)."""
        engines, self.engines, self.load, self.state, self.error = self.engines, [], [], state, error
        return engines

    def replica(self) -> int | None:
        """The least-loaded replica whose engine still runs (None: every one has failed)."""
        healthy = [i for i, e in enumerate(self.engines) if e.error is None]
        return min(healthy, key=self.load.__getitem__) if healthy else None

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def stats(self, window: float) -> dict:
        """Requests, errors and latency percentiles over the last `window` seconds."""
        since = time.monotonic() - window
        recent = [o for o in self.outcomes if o.at >= since]
        seconds = sorted(o.seconds for o in recent)
        ttft = sorted(o.ttft for o in recent if o.ttft is not None)
        errors = sum(o.error for o in recent)
        return {"requests": len(recent), "errors": errors, "error_rate": errors / len(recent) if recent else 0.0,
                "e2e_p50": _percentile(seconds, 0.5), "e2e_p99": _percentile(seconds, 0.99),
                "ttft_p50": _percentile(ttft, 0.5), "ttft_p99": _percentile(ttft, 0.99)}

    def summary(self) -> dict:
        failed = sum(e.error is not None for e in self.engines)
        retry_in = max(0.0, self.retry_at - time.monotonic()) if self.state == FAILED and self.spec.lazy else None
        return {"version": self.version, "source": self.spec.source, "state": self.state, "healthy": self.healthy, "lazy": self.spec.lazy,
                "replicas": len(self.engines), "failed_replicas": failed, "in_flight": self.in_flight, "error": self.error,
                "engine_error": str(self.engine_error) if failed else None, "retry_in": retry_in}
