"""Prometheus metrics, named in vLLM's style under a `jaxserve:` prefix.

Request-level figures (latencies, token counts, outcomes) are recorded by the HTTP handlers; engine
state (queue depths, KV-cache use, prefix-cache hits, preemptions, compiles) is read from the engine
at scrape time by a collector, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxserve.engine.async_engine import AsyncEngine

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine, model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator:
        inner = self.engine.engine
        blocks, labels = inner.blocks, [self.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"jaxserve:{name}", doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"jaxserve:{name}", doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        running = len(inner.scheduler.running)
        yield gauge("num_requests_running", "Sequences in the running batch.", running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", len(inner.scheduler.waiting))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).", blocks.usage)
        yield counter("prefix_cache_queries", "Full blocks looked up in the prefix cache.", blocks.prefix_queries)
        yield counter("prefix_cache_hits", "Full blocks found in the prefix cache.", blocks.prefix_hits)
        rate = blocks.prefix_hits / blocks.prefix_queries if blocks.prefix_queries else 0.0
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries since start (0-1).", rate)
        yield counter("num_preemptions", "Sequences preempted (recomputed later) since start.", inner.scheduler.num_preemptions)
        yield gauge("num_compiles", "Programs compiled since start (flat after warm-up).", inner.runner.num_compiles)


class Metrics:
    def __init__(self, engine: AsyncEngine, model: str) -> None:
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
        r.register(_EngineCollector(engine, model))
        engine.on_step = lambda n: self.batch_size.labels(model).observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
