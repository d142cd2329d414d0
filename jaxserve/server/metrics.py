"""Prometheus metrics, named in vLLM's style under a `jaxserve:` prefix.

Request-level figures (latencies, token counts, outcomes) are recorded by the HTTP handlers; engine
state (queue depths, KV-cache use, prefix-cache hits, preemptions, compiles) is read from each
engine's stats snapshot at scrape time by a collector, so it is never stale and costs nothing between
scrapes; per-step figures come from the engines' step reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from jaxserve.engine.interface import EngineStats, StepReport
from jaxserve.engine.outputs import StepOutput
from jaxserve.engine.prefix_tier import PrefixTierCounters
from jaxserve.server.deployment import Deployment
from jaxserve.server.usage import UsageLedger

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_MASK = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)  # vLLM's 1-2-5 series
_N = (1, 2, 5, 10, 20)
_REQUEST_TIME = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _tier(stats: EngineStats) -> PrefixTierCounters:
    """The host prefix tier's counters (zeros when there is none)."""
    return stats.prefix_tier or PrefixTierCounters()


_ENGINE_LABELS = ["model_name", "version", "engine"]


class _EngineCollector(Collector):
    """Engine state of every loaded model version's data-parallel replicas, one sample each under
    `model_name`, `version` and `engine` labels."""

    def __init__(self, deployments: Callable[[], Iterable[Deployment]]) -> None:
        self.deployments = deployments

    def collect(self) -> Iterator:
        families: dict[str, tuple[str, str, Callable[[EngineStats], float]]] = {
            "num_requests_running": ("gauge", "Sequences in the running batch.", lambda s: s.running),
            "num_requests_waiting": ("gauge", "Sequences waiting to be scheduled.", lambda s: s.waiting),
            "kv_cache_usage_perc": ("gauge", "Fraction of KV-cache pages in use (0-1).", lambda s: s.kv_cache_usage),
            "prefix_cache_queries": ("counter", "Full blocks looked up in the prefix cache.", lambda s: s.prefix_cache_queries),
            "prefix_cache_hit_rate": (
                "gauge",
                "Prefix-cache hits (device and host tiers) / queries since start (0-1).",
                lambda s: (s.prefix_cache_hits + _tier(s).hits) / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            ),
            "num_preemptions": ("counter", "Sequences preempted (recomputed or swapped out) since start.", lambda s: s.preemptions),
            "kv_swap_out": ("counter", "Preempted sequences whose KV cache was copied to host memory.", lambda s: s.swap.swap_outs if s.swap else 0),
            "kv_swap_in": ("counter", "Swapped sequences whose KV cache was copied back to the device.", lambda s: s.swap.swap_ins if s.swap else 0),
            "kv_swap_out_bytes": ("counter", "Bytes of KV cache copied to host memory.", lambda s: s.swap.swap_out_bytes if s.swap else 0),
            "kv_swap_in_bytes": ("counter", "Bytes of KV cache copied back from host memory.", lambda s: s.swap.swap_in_bytes if s.swap else 0),
            "kv_swap_fallbacks": ("counter", "Host copies that failed; their sequence recomputed instead.", lambda s: s.swap.fallbacks if s.swap else 0),
            "host_kv_cache_usage_perc": ("gauge", "Fraction of the host swap pool's pages in use (0-1).", lambda s: s.host_kv_cache_usage),
            "host_prefix_cache_usage_perc": ("gauge", "Fraction of the host prefix tier's pages holding a block (0-1).", lambda s: _tier(s).usage),
            "prefix_cache_host_stored": ("counter", "Blocks evicted from the device prefix cache and stored in the host tier.", lambda s: _tier(s).stored),
            "prefix_cache_host_stored_bytes": ("counter", "Bytes of KV cache copied to the host prefix tier.", lambda s: _tier(s).stored_bytes),
            "prefix_cache_host_loaded_bytes": ("counter", "Bytes of KV cache copied back from the host prefix tier.", lambda s: _tier(s).loaded_bytes),
            "prefix_cache_host_fallbacks": ("counter", "Copies back from the host prefix tier that failed; their sequence recomputed.",
                                            lambda s: _tier(s).fallbacks),
            "num_compiles": ("gauge", "Programs compiled since start (flat after warm-up).", lambda s: s.compiles),
        }
        rows = [([d.spec.name, d.version, str(i)], e, e.stats()) for d in self.deployments() for i, e in enumerate(d.engines)]
        for name, (kind, doc, read) in families.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"jaxserve:{name}", doc, labels=_ENGINE_LABELS)
            for labels, _, stats in rows:
                family.add_metric(labels, read(stats))
            yield family
        hits = CounterMetricFamily("jaxserve:prefix_cache_hits", "Full blocks found in the prefix cache, by tier (device first, then host).",
                                   labels=[*_ENGINE_LABELS, "tier"])
        for labels, _, stats in rows:
            hits.add_metric([*labels, "device"], stats.prefix_cache_hits)
            hits.add_metric([*labels, "host"], _tier(stats).hits)
        yield hits
        yield from self._speculation([(labels, stats) for labels, _, stats in rows])
        info = GaugeMetricFamily("jaxserve:cache_config_info", "KV-cache configuration of each engine (value 1; the labels say it).", labels=[
            *_ENGINE_LABELS, "block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"])
        quant = GaugeMetricFamily("jaxserve:quantization_info", "How each engine stores weights and KV cache (value 1; the labels say it).",
                                  labels=[*_ENGINE_LABELS, "weights", "kv_cache_dtype", "kv_cache_scales"])
        for labels, engine, _ in rows:
            lim = engine.limits
            info.add_metric([*labels, str(lim.page_size), str(lim.kv_cache_tokens // lim.page_size), lim.kv_cache_dtype,
                             str(lim.enable_prefix_caching)], 1.0)
            quant.add_metric([*labels, engine.info.weights, lim.kv_cache_dtype, lim.kv_cache_scales or "none"], 1.0)
        yield info
        yield quant
        state = GaugeMetricFamily("jaxserve:model_version_state", "Each model version's state (value 1; the labels say it).",
                                  labels=["model_name", "version", "state"])
        healthy = GaugeMetricFamily("jaxserve:model_version_healthy", "1 while a version serves or can load, 0 once its engines have all "
                                    "stopped after an error or its load failed.", labels=["model_name", "version"])
        for d in self.deployments():
            state.add_metric([d.spec.name, d.version, d.state], 1.0)
            healthy.add_metric([d.spec.name, d.version], float(d.healthy))
        yield state
        yield healthy

    def _speculation(self, rows: Sequence[tuple[list[str], EngineStats]]) -> Iterator:
        """vLLM's spec-decode counters, per engine that speculates: drafts, drafted and accepted
        tokens, accepted tokens at each draft position, and a histogram of accepted drafts per pass."""
        engines = [(labels, s.spec) for labels, s in rows if s.spec is not None]
        if not engines:
            return
        for name, doc, read in (
            ("num_drafts", "Verify passes that carried drafts.", lambda c: c.num_drafts),
            ("num_draft_tokens", "Tokens drafted.", lambda c: c.num_draft_tokens),
            ("num_accepted_tokens", "Drafted tokens accepted (equal to the model's own).", lambda c: c.num_accepted_tokens),
        ):
            family = CounterMetricFamily(f"jaxserve:spec_decode_{name}", doc, labels=_ENGINE_LABELS)
            for labels, c in engines:
                family.add_metric(labels, read(c))
            yield family
        per_pos = CounterMetricFamily("jaxserve:spec_decode_num_accepted_tokens_per_pos", "Drafts accepted at each draft position.",
                                      labels=[*_ENGINE_LABELS, "position"])
        lengths = HistogramMetricFamily("jaxserve:spec_decode_acceptance_length", "Drafts accepted per verify pass.", labels=_ENGINE_LABELS)
        for labels, c in engines:
            for pos, n in enumerate(c.accepted_per_position):
                per_pos.add_metric([*labels, str(pos)], n)
            cumulative = [sum(c.acceptance_lengths[: k + 1]) for k in range(len(c.acceptance_lengths))]
            buckets = [(str(k), cumulative[k]) for k in range(len(cumulative))] + [("+Inf", cumulative[-1])]
            lengths.add_metric(labels, buckets, sum_value=c.num_accepted_tokens)
        yield per_pos
        yield lengths


class _TenantCollector(Collector):
    """Per-tenant usage of each model from the server's ledger (the same one `/v1/usage` reads), and
    cost; `model_name` is "" for answers refused before a model was chosen."""

    def __init__(self, usage: UsageLedger) -> None:
        self.usage = usage

    def collect(self) -> Iterator:
        totals = sorted(self.usage.totals.items())
        for name, doc, read in (
            ("requests", "Admitted inference requests per tenant.", lambda t: t.requests),
            ("prompt_tokens", "Prompt tokens of admitted requests per tenant.", lambda t: t.prompt_tokens),
            ("generation_tokens", "Generated tokens delivered per tenant.", lambda t: t.generated_tokens),
            ("errors", "Answers with a 4xx or 5xx status other than 429 per tenant.", lambda t: t.errors),
            ("rate_limited", "Requests refused with 429 per tenant.", lambda t: t.rate_limited),
        ):
            family = CounterMetricFamily(f"jaxserve:tenant_{name}", doc, labels=["model_name", "tenant"])
            for (tenant, model), tally in totals:
                family.add_metric([model, tenant], read(tally))
            yield family
        per_million = self.usage.cost_per_million_tokens()
        if per_million is None:
            return
        yield GaugeMetricFamily("jaxserve:cost_per_million_tokens", "USD per million tokens (prompt and generated) at the throughput "
                                "measured since start, from --cost-per-hour.", value=per_million, labels=None)
        share = GaugeMetricFamily("jaxserve:tenant_cost_usd", "Each tenant's share of the machine's cost since start, by its tokens.",
                                  labels=["model_name", "tenant"])
        for (tenant, model), tally in totals:
            share.add_metric([model, tenant], self.usage.cost(tally))
        yield share


class Metrics:
    def __init__(self, deployments: Callable[[], Iterable[Deployment]], usage: UsageLedger) -> None:
        """`deployments`: every model version (read at scrape time)."""
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name", "version"]  # request figures per version, so a canary compares with production
        self.requests = Counter("jaxserve:request_success", "Finished samples by finish reason; \"abort\": ended without one (the client "
                                "went away or cancelled, a timeout, a failure).", m + ["finished_reason"], registry=r)
        self.ready = Gauge("jaxserve:server_ready", "1 from the end of warm-up until draining starts, else 0.", registry=r)
        self.http = Counter("jaxserve:http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.routed = Counter("jaxserve:routed_requests", "Inference requests routed to each model version.", m, registry=r)
        self.errors = Counter("jaxserve:request_errors", "Routed requests that failed: a 5xx answer, or a failure sent inside a stream.",
                              m, registry=r)
        self.ttft = Histogram("jaxserve:time_to_first_token_seconds", "Time to first token.", m, buckets=_LATENCY, registry=r)
        self.itl = Histogram("jaxserve:inter_token_latency_seconds", "Time between tokens of one stream.", m, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("jaxserve:e2e_request_latency_seconds", "Request latency, arrival to last token.", m, buckets=_LATENCY, registry=r)
        t = ["model_name", "tenant"]  # the same latencies per tenant (its service, whichever version served it)
        self.tenant_ttft = Histogram("jaxserve:tenant_time_to_first_token_seconds", "Time to first token, per tenant.", t, buckets=_LATENCY, registry=r)
        self.tenant_e2e = Histogram("jaxserve:tenant_e2e_request_latency_seconds", "Request latency, arrival to last token, per tenant.", t,
                                    buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("jaxserve:prompt_tokens", "Prompt tokens of admitted requests.", m, registry=r)
        self.generation_tokens = Counter("jaxserve:generation_tokens", "Generated tokens.", m, registry=r)
        self.batch_size = Histogram("jaxserve:batch_size", "Sequences per engine step.", m, buckets=_BATCH, registry=r)
        self.structured = Counter("jaxserve:structured_requests", "Requests with constrained output, by the field that asked.", m + ["kind"], registry=r)
        self.grammar_compile = Histogram("jaxserve:grammar_compile_seconds", "Compiling a new grammar (cached ones are free).", m, buckets=_LATENCY, registry=r)
        self.grammar_mask = Histogram("jaxserve:grammar_mask_seconds", "Computing a step's grammar token masks (steps with constrained rows).", m, buckets=_MASK, registry=r)
        # vLLM's per-step and per-request histograms, same names and buckets (a request here is one prompt).
        self.iteration_tokens = Histogram("jaxserve:iteration_tokens_total", "Tokens computed per engine step.", m, buckets=_TOKENS, registry=r)
        self.request_prompt_tokens = Histogram("jaxserve:request_prompt_tokens", "Prompt tokens per request.", m, buckets=_TOKENS, registry=r)
        self.request_generation_tokens = Histogram("jaxserve:request_generation_tokens", "Generated tokens per request (all n samples).", m, buckets=_TOKENS, registry=r)
        self.request_params_n = Histogram("jaxserve:request_params_n", "The n parameter of each request.", m, buckets=_N, registry=r)
        self.request_params_max_tokens = Histogram("jaxserve:request_params_max_tokens", "The max_tokens parameter of each request.", m, buckets=_TOKENS, registry=r)
        seconds = {
            "queue": "Waiting before first running.",
            "inference": "Running: first scheduled to finished.",
            "prefill": "First scheduled to first token.",
            "decode": "First token to finished.",
        }
        self.request_time = {
            k: Histogram(f"jaxserve:request_{k}_time_seconds", doc, m, buckets=_REQUEST_TIME, registry=r) for k, doc in seconds.items()
        }
        r.register(_EngineCollector(deployments))
        r.register(_TenantCollector(usage))

    def attach(self, deployment: Deployment) -> None:
        """Observe the steps of a version's engines (once they are loaded)."""
        labels = (deployment.spec.name, deployment.version)
        for engine in deployment.engines:
            engine.subscribe(lambda step: self._on_step(labels, step))

    def _on_step(self, labels: tuple[str, str], step: StepReport) -> None:
        """Called on an engine thread after each step."""
        self.batch_size.labels(*labels).observe(step.batch_size)
        if step.num_tokens:
            self.iteration_tokens.labels(*labels).observe(step.num_tokens)
        if step.mask_seconds is not None:
            self.grammar_mask.labels(*labels).observe(step.mask_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class _Prompt:
    """One prompt's clock and counts (its n samples together)."""

    arrival: float
    scheduled: float | None = None  # arrival + the engine's queue time
    first_token: float | None = None
    last: float | None = None  # when the latest token came
    tokens: int = 0
    finished: int = 0


class RequestMetrics:
    """Token, latency and outcome metrics of one HTTP request to one model version, fed its outputs in order."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str], tenant: str, prompts: Sequence[Sequence[int]], n: int, max_tokens: int) -> None:
        """`labels`: the model's name and version; `tenant`: whose request it is."""
        self.m, self.n, self.labels, self.tenant_labels = metrics, n, labels, (labels[0], tenant)
        now = time.perf_counter()
        self.prompts = [_Prompt(now) for _ in prompts]
        metrics.prompt_tokens.labels(*labels).inc(sum(map(len, prompts)))
        for prompt in prompts:
            metrics.request_prompt_tokens.labels(*labels).observe(len(prompt))
            metrics.request_params_n.labels(*labels).observe(n)
            metrics.request_params_max_tokens.labels(*labels).observe(max_tokens)

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token of any prompt (None: no token yet)."""
        first = [p.first_token for p in self.prompts if p.first_token is not None]
        return min(first) - self.prompts[0].arrival if first else None

    def aborted(self, samples: int) -> None:
        """Samples that ended without a finish reason."""
        self.m.requests.labels(*self.labels, "abort").inc(samples)

    def output(self, i: int, out: StepOutput) -> None:
        m, name, p, now = self.m, self.labels, self.prompts[i], time.perf_counter()
        if out.queue_seconds is not None and p.scheduled is None:
            p.scheduled = p.arrival + out.queue_seconds
            m.request_time["queue"].labels(*name).observe(out.queue_seconds)
        generated = out.num_generated
        if generated:  # a stop token counts too: it came when it came, though it is not part of the text
            m.generation_tokens.labels(*name).inc(generated)
            p.tokens += generated
            if p.last is None:
                m.ttft.labels(*name).observe(now - p.arrival)
                m.tenant_ttft.labels(*self.tenant_labels).observe(now - p.arrival)
                p.first_token = now
                m.request_time["prefill"].labels(*name).observe(now - (p.scheduled or p.arrival))
            else:
                m.itl.labels(*name).observe(now - p.last)
            p.last = now
        if out.finish_reason:
            m.requests.labels(*name, out.finish_reason).inc()
            m.e2e.labels(*name).observe(now - p.arrival)
            m.tenant_e2e.labels(*self.tenant_labels).observe(now - p.arrival)
            p.finished += 1
            if p.finished == self.n:  # the prompt's last sample
                m.request_generation_tokens.labels(*name).observe(p.tokens)
                m.request_time["inference"].labels(*name).observe(now - (p.scheduled or p.arrival))
                m.request_time["decode"].labels(*name).observe(now - (p.first_token or now))
