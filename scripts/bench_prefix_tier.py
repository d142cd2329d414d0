"""The host prefix tier: tenants whose long system prompts rotate through a device prefix cache too
small for all of them, with `--host-prefix-cache` against without; prints and saves JSON.

Starts `jaxserve serve` (SmolLM2 by default) with a device KV cache of `--num-pages` pages, then sends
streamed chat completions, one at a time: each of `--tenants` tenants has its own system prompt of
about `--system-words` words, followed by a fresh question; tenant after tenant for `--rounds`
rounds. The first round fills the caches; the rounds after it are measured: their TTFT p50 and
prefix-hit rate (full blocks found on the device or in host memory / blocks looked up, from
/metrics). Without the tier each returning tenant finds most of its prompt evicted; with it, the
evicted blocks come back from host memory. Targets: hit rate >= 0.8 with the tier, and TTFT p50 at
most half of the run without. Outputs must be equal either way.

With the tier the server also runs with `--prefix-cache-dir`: it is stopped, started again, and sends
one more round, whose hit rate and TTFT p50 say whether the restarted server kept the prompts warm.

    python scripts/bench_prefix_tier.py                     # about 15 minutes on 2 CPU cores
    python scripts/bench_prefix_tier.py --tenants 24 --rounds 3 --out bench_results/prefix_tier.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench_preemption import WORDS, Server

METRICS = ("prefix_cache_queries_total", "prefix_cache_hits_total", "prefix_cache_host_stored_total", "prefix_cache_host_loaded_bytes_total")


async def chat(session: aiohttp.ClientSession, url: str, system: str, question: str) -> dict:
    """One streamed chat completion: its TTFT and text."""
    loop = asyncio.get_running_loop()
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
            "stream": True}
    start, ttft, text = loop.time(), None, []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                ttft = ttft if ttft is not None else loop.time() - start
                text.append(delta)
    return {"ttft": ttft, "text": "".join(text)}


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The prefix-cache counters from /metrics, summed over engines and tiers."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].removeprefix("jaxserve:")
        if name in out:
            out[name] += float(line.split()[-1])
    return out


async def rounds(session: aiohttp.ClientSession, url: str, tenants: list[str], first: int, count: int) -> list[dict]:
    """`count` rounds of one request per tenant, from round number `first` (the question depends on it)."""
    out = []
    for r in range(first, first + count):
        for t, system in enumerate(tenants):
            out.append(await chat(session, url, system, f"Question {r} from tenant {t}: which word comes first?"))
    return out


def summary(results: list[dict], before: dict[str, float], after: dict[str, float]) -> dict:
    d = {k: after[k] - before[k] for k in METRICS}
    return {
        "requests": len(results),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 4),
        "prefix_hit_rate": round(d["prefix_cache_hits_total"] / d["prefix_cache_queries_total"], 3) if d["prefix_cache_queries_total"] else 0.0,
        "host_blocks_stored": int(d["prefix_cache_host_stored_total"]),
        "host_bytes_loaded": int(d["prefix_cache_host_loaded_bytes_total"]),
    }


async def run(args: argparse.Namespace, tenants: list[str], tier: bool, folder: Path, log: Path) -> dict:
    flags = ["--model", args.model, "--num-pages", str(args.num_pages), "--max-model-len", "2048", "--warmup"]
    if tier:
        flags += ["--host-prefix-cache", str(args.host_prefix_cache), "--prefix-cache-dir", str(folder)]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with Server(flags, log) as server:
            await rounds(s, server.url, tenants, 0, 1)  # fills the caches
            before = await metrics(s, server.url)
            measured = await rounds(s, server.url, tenants, 1, args.rounds - 1)
            out = {"host_prefix_cache_gib": args.host_prefix_cache if tier else 0, **summary(measured, before, await metrics(s, server.url))}
        if tier:  # stopped (which saved the tier), started again: one more round
            async with Server(flags, log.with_suffix(".restart.log")) as server:
                before = await metrics(s, server.url)
                again = await rounds(s, server.url, tenants, args.rounds, 1)
                out["after_restart"] = summary(again, before, await metrics(s, server.url))
    out["texts"] = [r["text"] for r in measured]
    return out


async def main_async(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    tenants = [f"You are assistant {t}. Remember these words: " + " ".join(rng.choice(WORDS) for _ in range(args.system_words)) for t in range(args.tenants)]
    with tempfile.TemporaryDirectory() as tmp:
        without = await run(args, tenants, False, Path(tmp) / "tier", Path(tmp) / "without.log")
        with_tier = await run(args, tenants, True, Path(tmp) / "tier", Path(tmp) / "with.log")
    equal = sum(a == b for a, b in zip(without.pop("texts"), with_tier.pop("texts")))
    ratio = with_tier["ttft_p50_s"] / without["ttft_p50_s"]
    return {
        "model": args.model, "tenants": args.tenants, "system_words": args.system_words, "rounds": args.rounds,
        "device_kv_tokens": (args.num_pages - 1) * 16,
        "without_tier": without, "with_tier": with_tier,
        "ttft_p50_ratio": round(ratio, 3),
        "targets_met": with_tier["prefix_hit_rate"] >= 0.8 and ratio <= 0.5,
        "outputs_equal": f"{equal}/{args.tenants * (args.rounds - 1)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tenants", type=int, default=24)
    parser.add_argument("--system-words", type=int, default=950, help="words per system prompt (about one token each)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one request per tenant; the first fills the caches")
    parser.add_argument("--num-pages", type=int, default=513, help="device KV-cache pages of 16 tokens: about a third of the tenants' prompts")
    parser.add_argument("--host-prefix-cache", type=float, default=2.0, help="GiB")
    parser.add_argument("--out", type=Path, default=Path("bench_results/prefix_tier.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
