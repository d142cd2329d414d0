"""The load `bench serve` offers: closed-loop clients (each sends its next request when its last one
ends) or Poisson arrivals at a rate, level by level, against each target in turn.

With several targets (servers that differ in one setting, or model mixes on one server), every level
runs against each, `rounds` times with the order reversed every other round, so a noisy machine
slows them alike; all targets get the same requests at a level."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
from tqdm import tqdm

from jaxserve.bench.client import Client, Outcome
from jaxserve.bench.datasets import RequestSpec
from jaxserve.errors import UserError

Send = Callable[[int, RequestSpec], Awaitable[Outcome]]


@dataclass(frozen=True)
class Target:
    """What one set of figures is measured against: a server and the models its requests cycle over."""

    root: str  # the API root, .../v1
    models: tuple[str, ...]  # request i asks for models[i % len(models)]
    mix: bool = False  # models given by --mix (named in the target's label)

    @property
    def label(self) -> str:
        return f"{self.root} [{','.join(self.models)}]" if self.mix else self.root


@dataclass
class Measured:
    """A target's outcomes at one level, pooled over rounds, and the rounds' wall time."""

    outcomes: list[Outcome] = field(default_factory=list)
    duration: float = 0.0


async def closed_loop(send: Send, specs: list[RequestSpec], concurrency: int) -> list[Outcome]:
    """`concurrency` clients, each sending the next unsent request as soon as its last one ends."""
    outcomes: list[Outcome | None] = [None] * len(specs)
    pending = iter(range(len(specs)))

    async def client() -> None:
        for i in pending:
            outcomes[i] = await send(i, specs[i])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


async def open_loop(send: Send, specs: list[RequestSpec], rate: float, rng: random.Random) -> list[Outcome]:
    """Requests sent at Poisson arrivals of `rate` a second, whether or not earlier ones have ended."""
    tasks = []
    for i, spec in enumerate(specs):
        tasks.append(asyncio.create_task(send(i, spec)))
        if i + 1 < len(specs):
            await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


async def resolve_targets(client: Client, roots: list[str], model: str | None, mixes: list[str]) -> list[Target]:
    """The targets: each server with --model (default: the first it lists), or each --mix on the first
    server. Every server is asked for its models first, so a wrong URL fails before any load."""
    listed = {root: await client.models(root) for root in roots}
    if mixes:
        targets = [Target(roots[0], tuple(m.strip() for m in mix.split(",") if m.strip()), mix=True) for mix in mixes]
        if not all(t.models for t in targets):
            raise UserError("--mix takes comma-separated model ids, e.g. --mix a0,a1")
        return targets
    targets = []
    for root in roots:
        if model is None and not listed[root]:
            raise UserError(f"{root}/models lists no models: give --model")
        targets.append(Target(root, (model or listed[root][0],)))
    return targets


async def run_levels(client: Client, targets: list[Target], mode: str, levels: list[float], requests: list[list[RequestSpec]],
                     rounds: int, warmup: list[RequestSpec], seed: int) -> list[list[Measured]]:
    """Each target's measurements at each level (`mode` "concurrency" or "rate"), in the targets' order
    (the same target may be given twice, to see the noise between turns). Before measuring, each
    target gets the `warmup` requests (compiles, first-request effects); a target none of whose
    warm-up requests completes is a UserError naming the first failure."""
    for target in targets:
        failed = [o.error for o in await closed_loop(_sender(client, target), warmup, len(warmup)) if not o.ok]
        if warmup and len(failed) == len(warmup):
            raise UserError(f"{target.label}: every warm-up request failed: {failed[0]}")
    measured = [[Measured() for _ in levels] for _ in targets]
    order = list(range(len(targets)))
    for li, (level, specs) in enumerate(zip(levels, requests)):
        for r in range(rounds):
            for t in order if r % 2 == 0 else order[::-1]:
                target = targets[t]
                name = f"{mode} {level:g}" + (f" {target.label}" if len(targets) > 1 else "") + (f" round {r + 1}" if rounds > 1 else "")
                with tqdm(total=len(specs), desc=name, unit="req", file=sys.stderr) as bar:
                    send = _sender(client, target, bar, f"[{li}.{r}.{t}]")
                    start = time.perf_counter()
                    if mode == "rate":
                        outcomes = await open_loop(send, specs, level, random.Random(f"{seed}-{li}-{r}"))
                    else:
                        outcomes = await closed_loop(send, specs, int(level))
                    m = measured[t][li]
                    m.outcomes += outcomes
                    m.duration += time.perf_counter() - start
    return measured


def _sender(client: Client, target: Target, bar: tqdm | None = None, tag: str = "[warm-up]") -> Send:
    """Sends request i, its prompt opened by the turn's `tag` (level, round, target: no turn finds
    another's prompts in a prefix cache), to the target with its model i, ticking the progress bar
    when it ends."""
    async def send(i: int, spec: RequestSpec) -> Outcome:
        outcome = await client.send(target.root, target.models[i % len(target.models)], spec.tagged(tag))
        if bar is not None:
            bar.update()
        return outcome

    return send


def session(api_key: str | None, timeout: float) -> aiohttp.ClientSession:
    """One HTTP session for the whole run: no connection limit (the load decides), a total timeout per request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), connector=aiohttp.TCPConnector(limit=0))
