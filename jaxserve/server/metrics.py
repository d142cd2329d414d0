"""Prometheus metrics, named in vLLM's style under a `jaxserve:` prefix.

Request-level figures (latencies, token counts, outcomes) are recorded by the HTTP handlers; engine
state (queue depths, KV-cache use, prefix-cache hits, preemptions, compiles) is read from each
engine's stats snapshot at scrape time by a collector, so it is never stale and costs nothing between
scrapes; per-step figures come from the engines' step reports.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.interface import EngineStats, StepReport

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_MASK = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _EngineCollector(Collector):
    """Engine state of every data-parallel replica, one sample each under an `engine` label."""

    def __init__(self, engines: Sequence[AsyncEngine], model: str) -> None:
        self.engines, self.model = engines, model

    def collect(self) -> Iterator:
        families: dict[str, tuple[str, str, Callable[[EngineStats], float]]] = {
            "num_requests_running": ("gauge", "Sequences in the running batch.", lambda s: s.running),
            "num_requests_waiting": ("gauge", "Sequences waiting to be scheduled.", lambda s: s.waiting),
            "kv_cache_usage_perc": ("gauge", "Fraction of KV-cache pages in use (0-1).", lambda s: s.kv_cache_usage),
            "prefix_cache_queries": ("counter", "Full blocks looked up in the prefix cache.", lambda s: s.prefix_cache_queries),
            "prefix_cache_hits": ("counter", "Full blocks found in the prefix cache.", lambda s: s.prefix_cache_hits),
            "prefix_cache_hit_rate": (
                "gauge",
                "Prefix-cache hits / queries since start (0-1).",
                lambda s: s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            ),
            "num_preemptions": ("counter", "Sequences preempted (recomputed later) since start.", lambda s: s.preemptions),
            "num_compiles": ("gauge", "Programs compiled since start (flat after warm-up).", lambda s: s.compiles),
        }
        snapshots = [e.stats() for e in self.engines]
        for name, (kind, doc, read) in families.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"jaxserve:{name}", doc, labels=["model_name", "engine"])
            for i, stats in enumerate(snapshots):
                family.add_metric([self.model, str(i)], read(stats))
            yield family


class Metrics:
    def __init__(self, engines: Sequence[AsyncEngine], model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r, m = self.registry, ["model_name"]
        self.requests = Counter("jaxserve:request_success", "Finished requests by finish reason.", m + ["finished_reason"], registry=r)
        self.http = Counter("jaxserve:http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("jaxserve:time_to_first_token_seconds", "Time to first token.", m, buckets=_LATENCY, registry=r)
        self.itl = Histogram("jaxserve:inter_token_latency_seconds", "Time between tokens of one stream.", m, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("jaxserve:e2e_request_latency_seconds", "Request latency, arrival to last token.", m, buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("jaxserve:prompt_tokens", "Prompt tokens of admitted requests.", m, registry=r)
        self.generation_tokens = Counter("jaxserve:generation_tokens", "Generated tokens.", m, registry=r)
        self.batch_size = Histogram("jaxserve:batch_size", "Sequences per engine step.", m, buckets=_BATCH, registry=r)
        self.structured = Counter("jaxserve:structured_requests", "Requests with constrained output, by the field that asked.", m + ["kind"], registry=r)
        self.grammar_compile = Histogram("jaxserve:grammar_compile_seconds", "Compiling a new grammar (cached ones are free).", m, buckets=_LATENCY, registry=r)
        self.grammar_mask = Histogram("jaxserve:grammar_mask_seconds", "Computing a step's grammar token masks (steps with constrained rows).", m, buckets=_MASK, registry=r)
        r.register(_EngineCollector(engines, model))
        for engine in engines:
            engine.subscribe(self._on_step)

    def _on_step(self, step: StepReport) -> None:
        """Called on an engine thread after each step."""
        self.batch_size.labels(self.model).observe(step.batch_size)
        if step.mask_seconds is not None:
            self.grammar_mask.labels(self.model).observe(step.mask_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
