"""Structured-output benchmark against a running jaxserve server; prints and saves JSON.

One run, one server: 32 concurrent clients (closed loop, `--rounds` requests each) at every level,
with 0, 1, 8 and 32 of them JSON-schema constrained. Every request generates exactly
`--output-tokens` tokens (unconstrained ones ignore EOS; the schema's long array cannot close
sooner), so the levels differ only in the constraint work. Also measured: grammar compile time for
fresh typical schemas (from the server's `jaxserve:grammar_compile_seconds`), the first-token time
of a request with a new schema against one whose grammar is cached, mask time per step, and the
number of programs compiled during the run (`jaxserve:num_compiles`; 0 means no recompiles).

    jaxserve serve --max-num-seqs 32 &
    python scripts/bench_structured.py --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp

from jaxserve.bench.report import save_report

# Runs past any output length: the array needs 40 items before the object can close.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 20},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["name", "qty"],
                "additionalProperties": False,
            },
            "minItems": 40,
        },
    },
    "required": ["store", "items"],
    "additionalProperties": False,
}


def typical_schema(tag: str) -> dict:
    """A person record with nesting, enums, bounds and an array; `tag` makes it new to the cache."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "pattern": r"^[a-z0-9.]+@[a-z0-9]+\.[a-z]{2,4}$"},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"],
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
            tag: {"type": "boolean"},
        },
        "required": ["name", "age", "role", "address"],
    }


async def metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("jaxserve:") and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.split()[-1])
    return out


async def chat(session: aiohttp.ClientSession, base: str, model: str, max_tokens: int, schema: dict | None, stream: bool = False) -> dict:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": "List what the store sells, as JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    else:
        body["ignore_eos"] = True
    start = time.perf_counter()
    if not stream:
        async with session.post(base + "/v1/chat/completions", json=body) as r:
            data = await r.json()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {data}")
        return {"tokens": data["usage"]["completion_tokens"], "finish": data["choices"][0]["finish_reason"]}
    async with session.post(base + "/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                return {"ttft_s": time.perf_counter() - start}
    raise RuntimeError("no token streamed")


async def level(session: aiohttp.ClientSession, base: str, model: str, constrained: int, args: argparse.Namespace) -> dict:
    before = await metrics(session, base)

    async def client(i: int) -> list[dict]:
        schema = LONG_SCHEMA if i < constrained else None
        return [await chat(session, base, model, args.output_tokens, schema) for _ in range(args.rounds)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(args.concurrency))) for r in rs]
    wall = time.perf_counter() - start
    after = await metrics(session, base)
    tokens = sum(r["tokens"] for r in results)
    masks = after.get("jaxserve:grammar_mask_seconds_count", 0) - before.get("jaxserve:grammar_mask_seconds_count", 0)
    mask_sum = after.get("jaxserve:grammar_mask_seconds_sum", 0) - before.get("jaxserve:grammar_mask_seconds_sum", 0)
    steps = after.get("jaxserve:batch_size_count", 0) - before.get("jaxserve:batch_size_count", 0)
    return {
        "constrained": constrained,
        "requests": len(results),
        "output_tokens": tokens,
        "all_full_length": all(r["tokens"] == args.output_tokens for r in results),
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "steps": int(steps),
        "ms_per_step": round(1e3 * wall / steps, 2) if steps else None,
        "mask_ms_per_step": round(1e3 * mask_sum / masks, 3) if masks else None,
    }


async def main_async(args: argparse.Namespace) -> dict:
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        base = args.base_url.rstrip("/")
        async with session.get(base + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        await asyncio.gather(*(chat(session, base, model, 8, LONG_SCHEMA if i % 2 else None) for i in range(4)))  # first-request effects
        start_metrics = await metrics(session, base)
        report: dict = {"base_url": base, "model": model, "concurrency": args.concurrency, "output_tokens": args.output_tokens, "levels": []}
        for constrained in args.constrained:
            report["levels"].append(await level(session, base, model, constrained, args))
            print(json.dumps(report["levels"][-1]), flush=True)
        by = {lv["constrained"]: lv["output_tokens_per_s"] for lv in report["levels"]}
        if 0 in by and args.concurrency in by:
            report["all_constrained_over_none"] = round(by[args.concurrency] / by[0], 3)

        # Compile time: fresh typical schemas, one at a time (the server's own measurement).
        before = await metrics(session, base)
        fresh = [await chat(session, base, model, 4, typical_schema(f"x{uuid.uuid4().hex[:8]}"), stream=True) for _ in range(args.fresh_schemas)]
        after = await metrics(session, base)
        n = after["jaxserve:grammar_compile_seconds_count"] - before.get("jaxserve:grammar_compile_seconds_count", 0)
        total = after["jaxserve:grammar_compile_seconds_sum"] - before.get("jaxserve:grammar_compile_seconds_sum", 0)
        tag = f"x{uuid.uuid4().hex[:8]}"
        first = await chat(session, base, model, 4, typical_schema(tag), stream=True)
        cached = await chat(session, base, model, 4, typical_schema(tag), stream=True)
        report["grammar"] = {
            "fresh_schemas": int(n),
            "compile_ms_mean": round(1e3 * total / n, 2) if n else None,
            "ttft_fresh_schemas_ms_mean": round(1e3 * sum(f["ttft_s"] for f in fresh) / len(fresh), 1),
            "ttft_new_schema_ms": round(1e3 * first["ttft_s"], 1),
            "ttft_same_schema_cached_ms": round(1e3 * cached["ttft_s"], 1),
        }
        end_metrics = await metrics(session, base)
        report["programs_compiled_during_run"] = int(end_metrics["jaxserve:num_compiles"] - start_metrics["jaxserve:num_compiles"])
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (not /v1)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--constrained", type=int, nargs="+", default=[0, 1, 8, 32], help="constrained clients per level")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--fresh-schemas", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench_results/structured.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    save_report(report, args.out)


if __name__ == "__main__":
    main()
