"""A tenant sending as fast as it can for a measured minute against its quota; prints and saves JSON.

`--clients` loops each send a completion, and on a 429 send the next one at once (no back-off: the
point is to push). Reports what was granted against what the buckets allow over the run (burst or
bucket capacity, plus the per-minute rate times the minutes elapsed), the 429s and their headers,
and, beside it, a second tenant's requests, which must see no 429.

    cat > /tmp/keys.yaml <<'YAML'
    keys:
      sk-limited: {tenant: limited, requests_per_minute: 60, burst: 5, prompt_tokens_per_minute: 2000}
      sk-other: {tenant: other}
    YAML
    jaxserve serve --api-keys-file /tmp/keys.yaml &
    python scripts/bench_quota.py --key sk-limited --other-key sk-other --rpm 60 --burst 5 --prompt-tpm 2000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp

from jaxserve.bench.report import save_report

PROMPT = "Write a short story about a lighthouse keeper and the sea. " * 5


async def main_async(args: argparse.Namespace) -> dict:
    end = time.monotonic() + args.seconds
    granted: list[tuple[float, int]] = []  # (seconds since start at send, prompt tokens)
    refused: Counter = Counter()
    statuses: Counter = Counter()
    other: Counter = Counter()
    last_429_headers: dict = {}
    start = time.monotonic()

    async def post(session: aiohttp.ClientSession, key: str, max_tokens: int) -> tuple[int, dict, dict]:
        body = {"model": args.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        async with session.post(args.base_url + "/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, dict(r.headers), await r.json()

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            sent = time.monotonic() - start
            status, headers, body = await post(session, args.key, 2)
            statuses[status] += 1
            if status == 200:
                granted.append((sent, body["usage"]["prompt_tokens"]))
            elif status == 429:
                refused[body["error"]["message"].split(":")[0]] += 1
                last_429_headers.update({k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit") or k == "Retry-After"})

    async def neighbour(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            other[(await post(session, args.other_key, 2))[0]] += 1
            await asyncio.sleep(1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [client(session) for _ in range(args.clients)] + ([neighbour(session)] if args.other_key else [])
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    tokens = sum(t for _, t in granted)
    report = {
        "seconds": round(elapsed, 1),
        "statuses": dict(statuses),
        "granted_requests": len(granted),
        "allowed_requests": round(max(args.burst, 1) + args.rpm * elapsed / 60, 1) if args.rpm else None,
        "granted_in_first_60s": sum(1 for s, _ in granted if s < 60),
        "granted_prompt_tokens": tokens,
        "allowed_prompt_tokens": round(args.prompt_tpm * (1 + elapsed / 60)) if args.prompt_tpm else None,
        "refusals_by_reason": dict(refused),
        "last_429_headers": last_429_headers,
        "other_tenant_statuses": dict(other),
    }
    report["within_limits"] = all([
        report["allowed_requests"] is None or report["granted_requests"] <= report["allowed_requests"],
        report["allowed_prompt_tokens"] is None or tokens <= report["allowed_prompt_tokens"],
        429 not in other,
    ])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--key", required=True, help="the limited tenant's key")
    parser.add_argument("--other-key", default=None, help="another tenant's key, sending one request a second beside it")
    parser.add_argument("--rpm", type=int, default=None, help="the limited tenant's requests_per_minute")
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--prompt-tpm", type=int, default=None, help="its prompt_tokens_per_minute")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=65.0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/quota.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    save_report(report, args.out)


if __name__ == "__main__":
    main()
