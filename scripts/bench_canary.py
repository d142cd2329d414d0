"""Canary rollout figures: how exactly a traffic split routes, and a staged rollout under load.

1. The split alone (`jaxserve.server.traffic.TrafficSplit`): for canary shares of 1, 10 and 50% over
   `--users` distinct users, the share routed to the canary; users whose second request went
   elsewhere (must be 0); canary users at 10% still on it at 50% (must be all); microseconds per
   routing decision.
2. A real `jaxserve serve` with an admin key, serving `chat` v1 and (loaded through the admin API)
   v2: tiny random models by default, or `--model SOURCE` for both. `--clients` closed-loop clients,
   each a distinct user, send short completions while `jaxserve.rollout.run_rollout` moves v2
   through 10 -> 50 -> 100% (`--interval` seconds each) and promotes it. Per stage: the share each
   version served against the split, 5xx answers, and both versions' p50/p99 latency from the admin
   stats route. Then `--streams` long streams on v2, a rollback and an unload of v2 while they run:
   streams completed in full, 5xx answers, and seconds until v2 was gone.

    python scripts/bench_canary.py            # about 2 minutes on 2 CPU cores
    python scripts/bench_canary.py --model smollm2-135m-instruct --interval 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tiny random models of the tests

from bench_preemption import Server  # noqa: E402
from jaxserve.bench.report import save_report  # noqa: E402

from jaxserve.rollout import AdminClient, RolloutPlan, run_rollout  # noqa: E402
from jaxserve.server.traffic import TrafficSplit  # noqa: E402
from tests.tiny_models import tiny_config, tiny_params, write_hf_folder  # noqa: E402

ADMIN = "sk-bench-admin"


def split_figures(users: int) -> dict:
    rng = random.Random(0)
    names = [f"user-{i}" for i in range(users)]
    out = {}
    for canary in (0.01, 0.10, 0.50):
        split = TrafficSplit.parse({"v1": 1 - canary, "v2": canary}, ["v1", "v2"])
        first = [split.pick("chat", u, rng) for u in names]
        start = time.perf_counter()
        second = [split.pick("chat", u, rng) for u in names]
        micros = (time.perf_counter() - start) / users * 1e6
        out[f"{canary:.0%}"] = {"canary_share": sum(v == "v2" for v in first) / users, "moved_users": sum(a != b for a, b in zip(first, second)),
                                "microseconds_per_pick": round(micros, 2)}
    ten = TrafficSplit.parse({"v1": 0.9, "v2": 0.1}, ["v1", "v2"])
    half = TrafficSplit.parse({"v1": 0.5, "v2": 0.5}, ["v1", "v2"])
    on_canary = [u for u in names if ten.pick("chat", u, rng) == "v2"]
    out["canary_users_kept_from_10_to_50"] = sum(half.pick("chat", u, rng) == "v2" for u in on_canary) / len(on_canary)
    return out


async def load(url: str, clients: int, stop: asyncio.Event, log: list[tuple[float, str, int, float]]) -> None:
    """Closed-loop clients with distinct users; each answer logged as (time, version, status, seconds)."""
    async with aiohttp.ClientSession() as s:
        async def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                start = time.monotonic()
                body = {"model": "chat", "prompt": f"Note {n} from client {i}:", "max_tokens": 8, "user": f"client-{i}-{n % 50}"}
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    log.append((time.monotonic(), r.headers.get("X-Model-Version", "-"), r.status, time.monotonic() - start))
                n += 1

        await asyncio.gather(*(client(i) for i in range(clients)))


async def unload_under_streams(url: str, admin: AdminClient, streams: int) -> dict:
    """Promote v2, start long streams on it, roll back and unload v2 while they run."""
    await asyncio.to_thread(admin.call, "POST", "/admin/models/chat/promote", {"version": "v2"})
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:
        running = asyncio.Event()
        begun: set[int] = set()

        async def stream(i: int) -> int:
            body = {"model": "chat", "prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True, "user": f"s{i}",
                    "stream_options": {"include_usage": True}}
            tokens = 0
            async with s.post(url + "/v1/completions", json=body) as r:
                statuses.append(r.status)
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    begun.add(i)
                    if len(begun) == streams:
                        running.set()
                    tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
            return tokens

        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        await running.wait()
        await asyncio.to_thread(admin.call, "POST", "/admin/models/chat/rollback")
        start = time.monotonic()
        await asyncio.to_thread(admin.call, "DELETE", "/admin/models/chat/versions/v2")
        for i in range(streams):  # production traffic meanwhile
            async with s.post(url + "/v1/completions", json={"model": "chat", "prompt": f"Meanwhile {i}", "max_tokens": 4}) as r:
                statuses.append(r.status)
        tokens = await asyncio.gather(*tasks)
        while any(v["version"] == "v2" for v in (await asyncio.to_thread(admin.call, "GET", "/admin/models/chat"))["versions"]):
            await asyncio.sleep(0.05)
    return {"streams": streams, "completed_in_full": sum(t == 400 for t in tokens), "answers_5xx": sum(s >= 500 for s in statuses),
            "seconds_until_unloaded": round(time.monotonic() - start, 2)}


async def rollout_under_load(args: argparse.Namespace, folder: Path) -> dict:
    v1, v2 = args.model or str(folder / "v1"), args.model or str(folder / "v2")
    flags = ["--model", f"chat={v1}", "--admin-api-key", ADMIN, "--max-num-seqs", "16", "--max-model-len", "1024", "--num-pages", "1024"]
    async with Server(flags, folder / "server.log") as server:
        admin = AdminClient(server.url, ADMIN)
        await asyncio.to_thread(admin.call, "POST", "/admin/models/chat/versions", {"version": "v2", "model": v2})
        stop, log = asyncio.Event(), []
        traffic = asyncio.create_task(load(server.url, args.clients, stop, log))
        events: list[tuple[float, dict]] = []  # (when, what run_rollout said): a stage's split set, then its verdict
        plan = RolloutPlan("chat", "v2", (10.0, 50.0, 100.0), args.interval, min_requests=5)
        report = await asyncio.to_thread(run_rollout, plan, admin, time.sleep, lambda event: events.append((time.monotonic(), event)))
        stop.set()
        await traffic
        per_stage = []
        for (begin, _), (end, stage) in zip(events[::2], events[1::2]):
            answered = [(v, status, sec) for at, v, status, sec in log if begin <= at < end]
            per_stage.append({"canary_percent": stage["stage"], "requests": len(answered),
                              "served_by_v2": round(sum(v == "v2" for v, _, _ in answered) / max(len(answered), 1), 3),
                              "answers_5xx": sum(status >= 500 for _, status, _ in answered), "verdict": stage["verdict"],
                              "canary": stage["canary"], "production": stage["production"]})
        unload = await unload_under_streams(server.url, admin, args.streams)
    return {"outcome": report["outcome"], "stages": per_stage, "answers": len(log), "answers_5xx": sum(s >= 500 for _, _, s, _ in log),
            "unload_under_streams": unload}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--model", default=None, help="SOURCE served as both v1 and v2 (default: two tiny random models)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--interval", type=float, default=15.0, help="seconds per rollout stage")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench_results/canary.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model is None:
            cfg = tiny_config(max_position_embeddings=1024)
            for seed, name in ((0, "v1"), (1, "v2")):
                write_hf_folder(folder / name, cfg, tiny_params(cfg, seed))
        report = {"split": split_figures(args.users), "server": asyncio.run(rollout_under_load(args, folder)),
                  "model": args.model or "tiny random (2 layers, hidden 64)", "clients": args.clients, "interval": args.interval}
    save_report(report, args.out)


if __name__ == "__main__":
    main()
