"""`jaxserve rollout`: move a model's traffic to a new version in stages through a server's admin API,
and roll back when the canary does worse than production.

At each stage the canary gets its share (`{production: 1 - s, canary: s}`), then after `interval`
seconds its outcomes over that interval (the admin stats route) are compared with production's: an
error rate more than `max_error_rate_increase` above production's, or a p99 latency more than
`max_p99_ratio` times production's, stops the rollout and rolls back. At 100% production has no
traffic, so the canary is judged against production's figures from the stage before. With fewer than
`min_requests` canary requests in a stage there is nothing to judge, and the stage passes (the report
says so); but a stage fails when the server shows the canary unhealthy (its engines stopped, or it
failed or is going away), or when the canary has no requests at all while production had too many for
that to be chance (it took none of its share). After the last stage (100) passes, the canary is promoted.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from jaxserve.errors import UserError


@dataclass(frozen=True)
class RolloutPlan:
    model: str
    to: str  # the canary version
    stages: tuple[float, ...] = (10.0, 50.0, 100.0)  # the canary's percent of traffic at each stage, rising to 100
    interval: float = 300.0  # seconds each stage runs before it is judged
    max_error_rate_increase: float = 0.01  # canary error rate may exceed production's by this much (absolute)
    max_p99_ratio: float = 1.5  # canary p99 latency may be this many times production's
    min_requests: int = 20  # canary requests a stage needs before it is judged
    latency: str = "e2e"  # which p99: "e2e" (arrival to last token) or "ttft"
    load_timeout: float = 600.0  # seconds to wait for the canary to finish loading

    def __post_init__(self) -> None:
        if not self.stages or any(not 0 < s <= 100 for s in self.stages) or list(self.stages) != sorted(self.stages) or self.stages[-1] != 100:
            raise UserError(f"--stages must rise within (0, 100] and end at 100, got {','.join(f'{s:g}' for s in self.stages)}")
        if self.interval <= 0 or self.max_p99_ratio <= 0 or self.max_error_rate_increase < 0 or self.min_requests < 0:
            raise UserError("--interval and --max-p99-ratio must be > 0, --max-error-rate-increase and --min-requests >= 0")
        if self.latency not in ("e2e", "ttft"):
            raise UserError(f"--latency must be e2e or ttft, got {self.latency!r}")


class AdminClient:
    """The admin API of one server, over HTTP."""

    def __init__(self, url: str, key: str, timeout: float = 60.0) -> None:
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout

    def call(self, method: str, path: str, body: object = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise UserError(f"{method} {path}: {e.code} {message}") from None
        except OSError as e:
            raise UserError(f"{method} {self.url}{path}: {e}") from None


def judge(plan: RolloutPlan, production: dict, canary: dict) -> str | None:
    """Why the canary fails against production's figures (None: it passes)."""
    if canary["error_rate"] > production["error_rate"] + plan.max_error_rate_increase:
        return (f"error rate {canary['error_rate']:.4f} exceeds production's {production['error_rate']:.4f} "
                f"by more than {plan.max_error_rate_increase:g}")
    key = f"{plan.latency}_p99"
    if canary[key] is not None and production[key] is not None and canary[key] > production[key] * plan.max_p99_ratio:
        return f"p99 {plan.latency} latency {canary[key]:.3f} s exceeds {plan.max_p99_ratio:g}x production's {production[key]:.3f} s"
    return None


def run_rollout(plan: RolloutPlan, admin: AdminClient, sleep: Callable[[float], None] = time.sleep,
                say: Callable[[dict], None] = lambda event: None) -> dict:
    """Drive the stages; the report (`outcome`: "promoted" or "rolled_back", and each stage's figures).
    Interrupted (Ctrl-C, an error), it rolls back before re-raising."""
    path = f"/admin/models/{plan.model}"
    production = _wait_ready(plan, admin, sleep)
    baseline: dict | None = None  # production's latest figures over enough requests (at 100% it has none: those of the stage before)
    stages = []
    try:
        for percent in plan.stages:
            share = percent / 100
            admin.call("PUT", f"{path}/traffic", {production: round(1 - share, 12), plan.to: share} if share < 1 else {plan.to: 1.0})
            say({"stage": percent, "traffic": {production: 1 - share, plan.to: share}})
            sleep(plan.interval)
            figures = admin.call("GET", f"{path}/stats?window={plan.interval}")["versions"]
            canary, prod = figures[plan.to], figures.get(production)
            if share < 1 and prod is not None and prod["requests"] >= max(plan.min_requests, 1):  # at 100% it serves only stragglers
                baseline = prod
            reason = _unserved(plan, admin.call("GET", path), share, canary, prod)
            if reason is not None:
                note = reason
            elif canary["requests"] < plan.min_requests or baseline is None:
                note = f"too few requests to judge ({canary['requests']} canary)"
            else:
                reason = judge(plan, baseline, canary)
                note = reason or "passed"
            stage = {"stage": percent, "canary": canary, "production": baseline, "verdict": note}
            stages.append(stage)
            say(stage)
            if reason is not None:
                admin.call("POST", f"{path}/rollback")
                return {"model": plan.model, "to": plan.to, "production": production, "outcome": "rolled_back", "reason": reason, "stages": stages}
        admin.call("POST", f"{path}/promote", {"version": plan.to})
    except BaseException:
        admin.call("POST", f"{path}/rollback")
        raise
    return {"model": plan.model, "to": plan.to, "previous": production, "outcome": "promoted", "stages": stages}


_BAD_LUCK = 0.001  # below this chance, a canary given a share that gets no request while production gets some is broken


def _unserved(plan: RolloutPlan, state: dict, share: float, canary: dict, production: dict | None) -> str | None:
    """Why the canary failed the stage without its figures being judged: the server shows it unhealthy
    (every engine stopped after an error, its load failed, it is going away), or it had no requests
    while production had so many that a `share` split would send none its way by chance less than
    `_BAD_LUCK` of the time (at 100%, any)."""
    version = next((v for v in state["versions"] if v["version"] == plan.to), None)
    if version is None:
        return f"version '{plan.to}' is no longer served"
    if version.get("healthy", True) is False or version["state"] in ("failed", "draining"):
        return f"the canary is unhealthy ({version['state']}): {version.get('engine_error') or version.get('error') or 'its engines stopped'}"
    served = production["requests"] if production is not None else 0
    if canary["requests"] == 0 and served > 0 and (1 - share) ** served < _BAD_LUCK:
        return f"the canary had no requests while production had {served}: it took none of its {share:.0%} share"
    return None


def _wait_ready(plan: RolloutPlan, admin: AdminClient, sleep: Callable[[float], None]) -> str:
    """Production's version, once the canary is loaded."""
    deadline = time.monotonic() + plan.load_timeout
    while True:
        state = admin.call("GET", f"/admin/models/{plan.model}")
        versions = {v["version"]: v for v in state["versions"]}
        if plan.to not in versions:
            raise UserError(f"model '{plan.model}' has no version '{plan.to}' (it has {', '.join(versions)}); load it first")
        if plan.to == state["production"]:
            raise UserError(f"'{plan.to}' is already production")
        if versions[plan.to]["state"] == "ready":
            return state["production"]
        if versions[plan.to]["state"] != "loading" or time.monotonic() > deadline:
            raise UserError(f"version '{plan.to}' is {versions[plan.to]['state']}: {versions[plan.to]['error'] or 'not ready'}")
        sleep(1.0)
