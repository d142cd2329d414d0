"""One load level's figures: throughput, latency percentiles and goodput under an SLO.

Latencies are in milliseconds, as vLLM's benchmark reports them and as `--goodput` takes them: TTFT
(time to the first text), TPOT (each request's time per output token after the first), ITL (every
gap between text chunks, all requests pooled) and E2E (request start to end of stream)."""

from __future__ import annotations

import argparse
import math

import numpy as np

from jaxserve.bench.client import Outcome

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")
SLO_ALIASES = {"e2el": "e2e"}  # vLLM's name for end-to-end latency


def parse_slo(text: str) -> tuple[str, float]:
    """An argparse type: METRIC:MS, a request's most milliseconds of ttft, tpot or e2e (vLLM's e2el too)."""
    metric, _, value = text.partition(":")
    metric = SLO_ALIASES.get(metric, metric)
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if metric not in SLO_METRICS or not ms > 0 or math.isinf(ms):
        raise argparse.ArgumentTypeError(f"{text!r} is not an SLO: give METRIC:MS with METRIC one of {', '.join(SLO_METRICS)} and MS > 0")
    return metric, ms


def tpot(o: Outcome) -> float | None:
    """Seconds per output token after the first (None for a one-token request)."""
    return (o.e2e - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else None


def distribution_ms(seconds: list[float]) -> dict[str, float | None]:
    """Mean and percentiles, in ms (None when there is nothing to measure)."""
    ms = np.asarray(seconds, dtype=float) * 1000
    figures = {"mean": float(ms.mean()) if ms.size else None}
    figures |= {f"p{q}": float(np.percentile(ms, q)) if ms.size else None for q in PERCENTILES}
    return {k: None if v is None else round(v, 2) for k, v in figures.items()}


def meets(o: Outcome, slo: dict[str, float]) -> bool:
    """Whether a completed request kept within every SLO (ms)."""
    measured = {"ttft": o.ttft, "tpot": tpot(o), "e2e": o.e2e}
    return all(measured[m] is None or measured[m] * 1000 <= limit for m, limit in slo.items())


def summarise(outcomes: list[Outcome], duration: float, slo: dict[str, float]) -> dict:
    """A level's figures, per second of its wall time `duration`. Goodput is the requests that
    completed within `slo` (None without one), as vLLM's `--goodput` counts them."""
    done = [o for o in outcomes if o.ok]
    output = sum(o.output_tokens for o in done)
    prompt = None if any(o.prompt_tokens is None for o in done) else sum(o.prompt_tokens for o in done)
    good = sum(meets(o, slo) for o in done) if slo else None
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 3),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "output_throughput": round(output / duration, 2),
        "total_token_throughput": None if prompt is None else round((prompt + output) / duration, 2),
        "ttft_ms": distribution_ms([o.ttft for o in done]),
        "tpot_ms": distribution_ms([t for o in done if (t := tpot(o)) is not None]),
        "itl_ms": distribution_ms([x for o in done for x in o.itls]),
        "e2e_ms": distribution_ms([o.e2e for o in done]),
        "goodput": None if good is None else {"slo_ms": slo, "requests": good, "fraction": round(good / len(outcomes), 4) if outcomes else None,
                                              "request_throughput": round(good / duration, 3)},
    }


def against(level: dict, first: dict) -> dict[str, float | None]:
    """A level's output throughput and TTFT p50 over the first target's at the same level."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    return {"output_throughput": ratio(level["output_throughput"], first["output_throughput"]),
            "ttft_p50": ratio(level["ttft_ms"]["p50"], first["ttft_ms"]["p50"])}
