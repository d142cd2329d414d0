"""Priority by swap: how long a priority-0 request waits while low-priority streams fill the KV cache,
with preemption by swap against recompute; prints and saves JSON.

For each `--preemption-mode`, starts `jaxserve serve` (SmolLM2 by default) with a KV cache too small
for the streams and `--swap-space`, then over streaming `/v1/completions`:
1. idle: the priority-0 request alone, `--probes` times: its time to first token (TTFT);
2. loaded: `--streams` seeded low-priority (priority 1) streams fill the cache; once every stream has
   its first token, the same priority-0 request arrives, `--probes` times a few seconds apart;
3. unloaded: the same streams again with nothing arriving, to check that preemption changed none
   of their texts.
Reports per mode the median TTFT idle and loaded and their ratio (target: at most 2), the streams'
output tokens/s, whether their texts were unchanged, and the server's swap and preemption counters.

    python scripts/bench_preemption.py                         # swap and recompute, about 10 minutes on 2 CPU cores
    python scripts/bench_preemption.py --preemption-mode swap --streams 16 --out bench_results/preemption.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

WORDS = "river stone light window garden letter music winter harbour engine candle forest bridge market silver".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`jaxserve serve` in a subprocess on 127.0.0.1, stopped on leaving."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "jaxserve", "serve", "--port", self.url.rsplit(":", 1)[1], *args]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)

    async def __aenter__(self) -> Server:
        async with aiohttp.ClientSession() as s:
            for _ in range(3600):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
                try:
                    async with s.get(self.url + "/ready") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError("server never got ready")

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def complete(session: aiohttp.ClientSession, url: str, body: dict, first: asyncio.Event | None = None) -> dict:
    """One streamed completion: its TTFT, text and output tokens (sets `first` at the first token)."""
    start, ttft, text, tokens = time.perf_counter(), None, [], 0
    async with session.post(url + "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if ttft is None:
                    ttft = time.perf_counter() - start
                    if first is not None:
                        first.set()
                text.append(chunk["choices"][0]["text"])
    return {"ttft": ttft, "text": "".join(text), "tokens": tokens, "seconds": time.perf_counter() - start}


async def counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's swap and preemption counters from /metrics."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    names = ("num_preemptions_total", "kv_swap_out_total", "kv_swap_in_total", "kv_swap_out_bytes_total", "kv_swap_fallbacks_total")
    return {name: float(line.split()[-1]) for line in text.splitlines() for name in names if line.startswith(f"jaxserve:{name}{{")}


async def run_mode(mode: str, args: argparse.Namespace, log: Path) -> dict:
    flags = ["--model", args.model, "--max-num-seqs", str(args.streams), "--num-pages", str(args.num_pages), "--max-model-len", "2048",
             "--swap-space", str(args.swap_space), "--preemption-mode", mode, "--warmup"]
    rng = random.Random(0)
    streams = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(args.prompt_words)), "max_tokens": args.output_tokens, "temperature": 0.8,
                "seed": i, "ignore_eos": True, "priority": 1} for i in range(args.streams)]
    probe = {"prompt": "Name three colours.", "max_tokens": 8, "temperature": 0, "priority": 0}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with Server(flags, log) as server, aiohttp.ClientSession(timeout=timeout) as s:
        idle = [(await complete(s, server.url, probe))["ttft"] for _ in range(args.probes)]
        started = [asyncio.Event() for _ in streams]
        t0 = time.perf_counter()
        loaded_streams = [asyncio.create_task(complete(s, server.url, body, ev)) for body, ev in zip(streams, started)]
        await asyncio.gather(*(ev.wait() for ev in started))
        loaded = []
        for _ in range(args.probes):
            loaded.append((await complete(s, server.url, probe))["ttft"])
            await asyncio.sleep(args.probe_gap)
        interrupted = await asyncio.gather(*loaded_streams)
        wall = time.perf_counter() - t0
        metrics = await counters(s, server.url)
        alone = await asyncio.gather(*(complete(s, server.url, body) for body in streams))
    ratio = statistics.median(loaded) / statistics.median(idle)
    return {
        "preemption_mode": mode,
        "ttft_idle_s": [round(x, 4) for x in idle],
        "ttft_loaded_s": [round(x, 4) for x in loaded],
        "ttft_ratio_median": round(ratio, 2),
        "ttft_target_met": ratio <= 2.0,
        "streams_output_tokens_per_s": round(sum(r["tokens"] for r in interrupted) / wall, 1),
        "streams_unchanged": sum(a["text"] == b["text"] for a, b in zip(interrupted, alone)),
        "streams": len(streams),
        **metrics,
    }


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        modes = [await run_mode(mode, args, Path(tmp) / f"{mode}.log") for mode in args.preemption_mode]
    return {"model": args.model, "num_pages": args.num_pages, "swap_space_gib": args.swap_space, "prompt_words": args.prompt_words,
            "output_tokens": args.output_tokens, "modes": modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--preemption-mode", nargs="+", default=["swap", "recompute"], choices=["auto", "swap", "recompute"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=200, help="KV-cache pages of 16 tokens: fewer than the streams need at their end")
    parser.add_argument("--swap-space", type=float, default=1.0)
    parser.add_argument("--prompt-words", type=int, default=150)
    parser.add_argument("--output-tokens", type=int, default=96)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--probe-gap", type=float, default=2.0, help="seconds between loaded probes")
    parser.add_argument("--out", type=Path, default=Path("bench_results/preemption.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
