"""Serving benchmark against any OpenAI-compatible endpoint; prints and saves JSON.

Streams `/v1/completions` requests of ~`--prompt-tokens` random words and `--output-tokens` tokens
(`ignore_eos`, so every request generates the same amount), either closed-loop (`--concurrency`
clients, each sending its next request when the last finishes) or open-loop (`--rate` requests/s,
Poisson arrivals). Per level: time to first token and inter-token latency (p50/p99), output
tokens/s over the level's wall time, and errors. Given several endpoints (two servers that differ
in one setting), or several `--mix` model sets on one server (the base model against LoRA adapters
mixed request by request), the closed-loop levels run against each in turn, `--rounds` times, so a
noisy machine slows all alike, and the report divides each one's figures by the first's.

    jaxserve serve --max-num-seqs 32 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --concurrency 1 4 16 32
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --rate 2 --num-requests 64
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 http://127.0.0.1:8001/v1 --rounds 3   # off against on
    python scripts/bench_serving.py --concurrency 16 --mix base --mix a0,a1,a2,a3 --rounds 2   # adapters against the base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench_report import save_report

WORDS = "time person year way day thing man world life hand part child eye woman place work week case point government company number group problem fact".split()


@dataclass
class Result:
    ok: bool = False
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, output_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, start, last = Result(), time.perf_counter(), None
    try:
        async with session.post(url + "/completions", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return result
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.ok = result.ttft is not None
        if not result.output_tokens:  # a server that sends no usage: one token per text chunk
            result.output_tokens = len(result.itls) + result.ok
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarise(results: list[Result], wall: float) -> dict:
    ttfts = [r.ttft for r in results if r.ok]
    itls = [x for r in results if r.ok for x in r.itls]
    tokens = sum(r.output_tokens for r in results if r.ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
    }


async def closed_loop(session, url, models: list[str], prompts: list[str], output_tokens: int, concurrency: int) -> tuple[list[Result], float]:
    """Request i names models[i % len(models)]."""
    queue = list(enumerate(prompts))
    results: list[Result] = []

    async def client() -> None:
        while queue:
            i, prompt = queue.pop()
            results.append(await one_request(session, url, models[i % len(models)], prompt, output_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def open_loop(session, url, model, prompts: list[str], output_tokens: int, rate: float, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    for prompt in prompts:
        tasks.append(asyncio.create_task(one_request(session, url, model, prompt, output_tokens)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


async def model_name(session: aiohttp.ClientSession, url: str, model: str | None) -> str:
    if model is not None:
        return model
    async with session.get(url + "/models") as r:
        return (await r.json())["data"][0]["id"]


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        # What is compared: each endpoint with its model, or each model mix on the first endpoint.
        if args.mix:
            targets = {f"{args.base_url[0]} [{mix}]": (args.base_url[0], mix.split(",")) for mix in args.mix}
        else:
            targets = {url: (url, [await model_name(session, url, args.model)]) for url in args.base_url}
        urls = list(targets)
        models = {key: models for key, (_, models) in targets.items()}
        endpoint = {key: url for key, (url, _) in targets.items()}
        warm = make_prompts(4, args.prompt_tokens, seed=99)
        for url in urls:
            await closed_loop(session, endpoint[url], models[url], warm, args.output_tokens, 4)  # first-request effects
        report: dict = {"base_url": urls[0], "model": ",".join(models[urls[0]]), "prompt_words": args.prompt_tokens, "output_tokens": args.output_tokens, "levels": {}}
        if args.rate:
            prompts = make_prompts(args.num_requests or 64, args.prompt_tokens, seed=0)
            results, wall = await open_loop(session, endpoint[urls[0]], models[urls[0]][0], prompts, args.output_tokens, args.rate, seed=1)
            report["levels"][f"rate_{args.rate}"] = summarise(results, wall)
            print(json.dumps({f"rate {args.rate}/s": report["levels"][f"rate_{args.rate}"]}), flush=True)
            return report
        per_url: dict[str, dict] = {url: {} for url in urls}
        for c in args.concurrency:
            prompts = make_prompts(args.num_requests or max(8, 3 * c), args.prompt_tokens, seed=c)
            runs: dict[str, tuple[list[Result], float]] = {url: ([], 0.0) for url in urls}
            for r in range(args.rounds):  # the endpoints take turns, in reversed order every other round
                for url in urls if r % 2 == 0 else urls[::-1]:
                    results, wall = await closed_loop(session, endpoint[url], models[url], prompts, args.output_tokens, c)
                    runs[url] = (runs[url][0] + results, runs[url][1] + wall)
            for url in urls:
                per_url[url][f"concurrency_{c}"] = summarise(*runs[url])
            print(json.dumps({f"concurrency {c}": {url: per_url[url][f"concurrency_{c}"] for url in urls}}), flush=True)
        report["levels"] = per_url[urls[0]]
        levels = report["levels"]
        if "concurrency_1" in levels and "concurrency_16" in levels:
            report["throughput_16_over_1"] = round(levels["concurrency_16"]["output_tokens_per_s"] / levels["concurrency_1"]["output_tokens_per_s"], 2)
        if len(urls) > 1:
            report["rounds"] = args.rounds
            report["compared"] = {
                url: {
                    "levels": per_url[url],
                    "against_first": {
                        level: {
                            "output_tokens_per_s": round(s["output_tokens_per_s"] / levels[level]["output_tokens_per_s"], 3),
                            "ttft_p50_s": round(s["ttft_p50_s"] / levels[level]["ttft_p50_s"], 3) if s["ttft_p50_s"] and levels[level]["ttft_p50_s"] else None,
                        }
                        for level, s in per_url[url].items()
                    },
                }
                for url in urls[1:]
            }
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", nargs="+", default=["http://127.0.0.1:8000/v1"],
                        help="endpoint(s); with several (say, speculation off and on), each level runs against each in turn and the report gives the others' figures against the first's")
    parser.add_argument("--rounds", type=int, default=1, help="turns per endpoint and level (the order alternates): more rounds even out a noisy machine")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--mix", action="append", default=[],
                        help="comma-separated model ids (LoRA adapters, say) that requests cycle through, on the first endpoint; "
                        "repeat to compare mixes against the first")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s instead of closed loop")
    parser.add_argument("--num-requests", type=int, default=None, help="per level (default: max(8, 3 x concurrency); 64 with --rate)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="words per prompt (about one token each)")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench_results/serving.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    save_report(report, args.out)


if __name__ == "__main__":
    main()
