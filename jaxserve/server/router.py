"""Which engines serve a request: models by name, their versions, traffic splits and LoRA adapters.

The router holds every `Deployment` (one version of one model: its engines and their load) and uses
engines only through `AsyncEngine`'s interface. A request's `model` names a model (its traffic split
picks the version, sticky on a key), one version (`NAME@VERSION`), or an adapter served on a base
model. A lazy version loads, off the event loop, on its first request; with `max_loaded` set, the
least recently used idle lazy version is evicted to make room; one whose load failed is tried again
only after a backoff (503 with Retry-After meanwhile). The admin API changes splits,
promotes, rolls back and unloads versions through the methods here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.errors import UserError
from jaxserve.server.deployment import DRAINING, FAILED, LOADING, READY, UNLOADED, Deployment
from jaxserve.server.model_spec import DEFAULT_VERSION, ModelSpec
from jaxserve.server.protocol import ApiError
from jaxserve.server.traffic import TrafficSplit

log = logging.getLogger("jaxserve.router")

LOAD_RETRY_AFTER = 5.0  # seconds a client is asked to wait while a model loads
LOAD_BACKOFF = 30.0  # seconds before a lazy version whose load failed is tried again; doubled after each failure in a row
LOAD_BACKOFF_MAX = 300.0
_DRAIN_POLL = 0.05


class ServedModel:
    """A name clients send: its versions in load order, how traffic splits over them, which version
    is production (what a rollback returns to) and which was before it."""

    def __init__(self, first: Deployment) -> None:
        self.name = first.spec.name
        self.versions: dict[str, Deployment] = {first.version: first}
        self.split = TrafficSplit.only(first.version)
        self.production = first.version
        self.previous: str | None = None

    def version(self, version: str) -> Deployment:
        if version not in self.versions:
            raise ApiError(400, f"model '{self.name}' has no version '{version}' (it has {', '.join(map(repr, self.versions))})", "version")
        return self.versions[version]

    def state(self) -> dict:
        return {"name": self.name, "production": self.production, "previous": self.previous, "traffic": self.split.as_dict(),
                "versions": [{**d.summary(), "share": self.split.share(v)} for v, d in self.versions.items()]}


def _refusal(d: Deployment) -> str | None:
    """Why a split may not give `d` traffic (None: it may). A lazy version that is not loaded, or
    whose load failed, loads on demand; any other must be ready with a running engine."""
    if d.state == DRAINING:
        return "is being unloaded"
    if d.state == READY:
        return None if d.healthy else f"is unhealthy: every engine stopped after an error ({d.engine_error})"
    if d.spec.lazy:
        return None
    return f"is {d.state}, not ready"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter served under its own id on a base model (`NAME` or `NAME@VERSION`)."""

    base: str
    name: str  # the adapter's loaded name in the engines (`Admission.adapter`)
    source: str | None = None  # where it was loaded from (the card's `root`)


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    model: str  # the id a tenant's model list is checked against: the model's name, or the adapter's id
    deployment: Deployment
    adapter: str | None  # the adapter's loaded name (None: the base model)


@dataclass(frozen=True)
class Listing:
    """One `/v1/models` entry: `root` is what it was loaded from, `parent` the base an adapter runs on."""

    id: str
    deployment: Deployment
    root: str
    parent: str | None


class ModelRouter:
    def __init__(self, build: Callable[[ModelSpec], list[AsyncEngine]] | None = None, max_loaded: int | None = None, warmup: bool = True) -> None:
        """`build`: a spec's engines (blocking; `EngineFactory.build`), for lazy and admin-loaded
        versions. `max_loaded`: versions holding engines at once (None: no limit)."""
        self.build = build
        self.max_loaded = max_loaded
        self.warmup = warmup
        self.on_loaded: Callable[[Deployment], None] = lambda d: None  # on the event loop, as a version's engines get ready (the server's metrics)
        self.models: dict[str, ServedModel] = {}
        self.adapters: dict[str, Adapter] = {}
        self.rng = random.Random()
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def of_engines(cls, name: str, engines: Sequence[AsyncEngine], warmup: bool = True) -> ModelRouter:
        """One model's replicas, already built (a plain single-model server)."""
        router = cls(warmup=warmup)
        router.add(ModelSpec(name, engines[0].info.name), engines)
        return router

    # ---- what is served --------------------------------------------------------------------

    def add(self, spec: ModelSpec, engines: Sequence[AsyncEngine] = ()) -> Deployment:
        """Serve a version loaded at start (`engines`), or one to load on its first request (lazy)."""
        if spec.name in self.adapters:
            raise UserError(f"model name '{spec.name}' is already an adapter's id")
        deployment = Deployment(spec, engines)
        model = self.models.get(spec.name)
        if model is None:
            self.models[spec.name] = ServedModel(deployment)
        elif spec.version in model.versions:
            raise UserError(f"model '{spec.name}' is given version '{spec.version}' twice")
        else:
            model.versions[spec.version] = deployment
        return deployment

    @property
    def default(self) -> str:
        """The model a request without a `model` field gets: the first one given."""
        return next(iter(self.models))

    def deployments(self) -> Iterator[Deployment]:
        for model in self.models.values():
            yield from model.versions.values()

    def engines(self) -> list[AsyncEngine]:
        return [e for d in self.deployments() for e in d.engines]

    def listing(self) -> list[Listing]:
        """Every id a request may name: each model (its production version's card), each named
        version as NAME@VERSION, each adapter."""
        out = []
        for model in self.models.values():
            production = model.versions[model.production]
            out.append(Listing(model.name, production, production.spec.source, None))
            out += [Listing(f"{model.name}@{v}", d, d.spec.source, None) for v, d in model.versions.items() if v != DEFAULT_VERSION]
        out += [Listing(served_id, self._base(a.base), a.source or a.name, a.base) for served_id, a in self.adapters.items() if self._serves(a.base)]
        return out

    def _serves(self, served: str) -> bool:
        try:
            self._target(served)
        except UserError:
            return False
        return True

    def add_adapter(self, served_id: str, base: str, adapter: str, source: str | None = None) -> None:
        """Serve `adapter` (its loaded name in the base's engines) as `served_id` on `base`: NAME follows
        the model's split (the adapter must be loaded in each version's engines), NAME@VERSION pins one."""
        if served_id in self.models or served_id in self.adapters:
            raise UserError(f"'{served_id}' is already served")
        self._target(base)
        self.adapters[served_id] = Adapter(base, adapter, source)

    def remove_adapter(self, served_id: str) -> None:
        if self.adapters.pop(served_id, None) is None:
            raise UserError(f"no adapter is served as '{served_id}'")

    # ---- routing ---------------------------------------------------------------------------

    def route(self, model_id: str | None, key: str | None, visible: Callable[[str], bool] = lambda m: True) -> Route:
        """The version (and adapter) for a request naming `model_id` (default: the first model) with
        sticky `key`; 404 for an unknown id, naming the `visible` ones. `ensure_ready` says whether it
        can run now."""
        served = model_id or self.default
        adapter = self.adapters.get(served)
        base = adapter.base if adapter else served
        try:
            model = self._target(base)
        except UserError:
            available = ", ".join(f"'{x.id}'" for x in self.listing() if visible(x.id.partition("@")[0]))
            raise ApiError(404, f"the model '{served}' does not exist; this server serves {available}", "model", "not_found_error",
                           "model_not_found") from None
        if base not in self.models:
            deployment = self._base(base)
        else:  # a version gone from `versions` never stays in the split; production, should one ever be missing
            deployment = model.versions.get(model.split.pick(model.name, key, self.rng)) or model.versions.get(model.production)
            if deployment is None:
                raise ApiError(503, f"the model '{model.name}' has no version to serve this request", type="service_unavailable")
        return Route(served if adapter else model.name, deployment, adapter.name if adapter else None)

    def _target(self, served: str) -> ServedModel:
        """The model `served` names (NAME or NAME@VERSION); UserError for none."""
        if served in self.models:
            return self.models[served]
        name, _, version = served.rpartition("@")
        model = self.models.get(name)
        if model is None or version not in model.versions or model.versions[version].state == DRAINING:
            raise UserError(f"no model '{served}'")
        return model

    def _base(self, served: str) -> Deployment:
        """The version a NAME@VERSION names, or a NAME's production version."""
        model = self._target(served)
        return model.versions[model.production] if served in self.models else model.versions[served.rpartition("@")[2]]

    def ensure_ready(self, d: Deployment) -> None:
        """Nothing for a ready version with a running engine (now its latest use); else the 503 to
        answer, with Retry-After while it loads (a lazy version starts loading here) or while a lazy
        version whose load failed waits out its backoff."""
        if d.state == READY:
            if d.replica() is None:
                raise ApiError(503, f"the engine of {d.spec.id} stopped after an error: {d.engine_error}", type="service_unavailable")
            d.last_used = time.monotonic()
            return
        if d.state == FAILED and d.spec.lazy:
            wait = d.retry_at - time.monotonic()
            if wait > 0:  # no load, and so no eviction, until the backoff is over
                raise ApiError(503, f"the model {d.spec.id} failed to load: {d.error}; it is tried again in {math.ceil(wait)} s",
                               type="service_unavailable", retry_after=wait)
        if d.state == UNLOADED or (d.state == FAILED and d.spec.lazy):
            self._load_soon(d)
        if d.state == LOADING:
            raise ApiError(503, f"the model {d.spec.id} is loading; retry shortly", type="service_unavailable", retry_after=LOAD_RETRY_AFTER)
        raise ApiError(503, f"the model {d.spec.id} failed to load: {d.error}", type="service_unavailable")

    # ---- loading and unloading ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the engines given at start and compile their step shapes (off the event loop)."""
        loop = asyncio.get_running_loop()
        starting = [d for d in self.deployments() if d.state == LOADING]
        for d in starting:
            for engine in d.engines:
                engine.start()
        if self.warmup:
            await asyncio.gather(*(loop.run_in_executor(None, e.warmup) for d in starting for e in d.engines))
        for d in starting:
            d.loaded(d.engines)
            self.on_loaded(d)

    async def shutdown(self) -> None:
        """Stop every engine; requests still running end with finish_reason "abort"."""
        await asyncio.gather(*(e.shutdown() for e in self.engines()))

    def _load_soon(self, d: Deployment) -> None:
        """Start loading `d` in the background, evicting idle lazy versions first if over `max_loaded`
        (503 when too few are idle)."""
        if self.build is None:
            raise ApiError(503, f"the model {d.spec.id} is not loaded and this server cannot load models", type="service_unavailable")
        retired = [e for victim in self._room_for(d) for e in victim.unloaded()]
        d.state = LOADING
        self._spawn(self._load(d, retired))

    def _room_for(self, d: Deployment) -> list[Deployment]:
        """The least recently used idle lazy versions to evict so that `d` fits under `max_loaded`."""
        if self.max_loaded is None:
            return []
        holding = [x for x in self.deployments() if x is not d and x.state in (LOADING, READY, DRAINING)]
        excess = len(holding) + 1 - self.max_loaded
        if excess <= 0:
            return []
        idle = sorted((x for x in holding if x.spec.lazy and x.state == READY and x.in_flight == 0), key=lambda x: x.last_used)
        if len(idle) < excess:
            raise ApiError(503, f"{len(holding)} model versions are loaded (--max-loaded-models {self.max_loaded}) and too few are idle "
                           f"to make room for {d.spec.id}; retry later", type="service_unavailable", retry_after=LOAD_RETRY_AFTER)
        for victim in idle[:excess]:
            log.info("evicting", extra={"model": victim.spec.id, "for": d.spec.id})
        return idle[:excess]

    async def _load(self, d: Deployment, retired: list[AsyncEngine]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(e.shutdown() for e in retired))  # their memory first
        started = time.monotonic()
        engines: list[AsyncEngine] = []
        try:
            engines = await loop.run_in_executor(None, self.build, d.spec)
            for engine in engines:
                engine.start()
            if self.warmup:
                await asyncio.gather(*(loop.run_in_executor(None, e.warmup, False) for e in engines))
        except Exception as e:  # a bad path, too little memory, a failed compile: this version fails, the server carries on
            log.error("loading %s failed: %s", d.spec.id, e)
            await asyncio.gather(*(x.shutdown() for x in engines if x is not None))
            d.unloaded(FAILED, f"{type(e).__name__}: {e}")
            d.failed_loads += 1
            d.retry_at = time.monotonic() + min(LOAD_BACKOFF * 2 ** (d.failed_loads - 1), LOAD_BACKOFF_MAX)
            return
        d.loaded(engines)
        self.on_loaded(d)
        log.info("loaded", extra={"model": d.spec.id, "seconds": round(time.monotonic() - started, 2)})

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the admin API's verbs -------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(404, f"no model '{name}' (served: {', '.join(map(repr, self.models))})", "model", "not_found_error", "model_not_found")
        return self.models[name]

    def load_version(self, spec: ModelSpec) -> Deployment:
        """Add a version (a new model if the name is new) and start loading it unless it is lazy; it
        gets no traffic until a split gives it some (a new model's only version gets all)."""
        model = self.models.get(spec.name)
        if model is not None and spec.version in model.versions:
            raise ApiError(409, f"model '{spec.name}' already has version '{spec.version}'", "version", code="version_exists")
        if spec.name in self.adapters:
            raise ApiError(409, f"'{spec.name}' is an adapter's id", "name")
        d = self.add(spec)
        if not spec.lazy:
            try:
                self._load_soon(d)
            except ApiError:  # no room: as if never asked
                del self.models[spec.name].versions[spec.version]
                if not self.models[spec.name].versions:
                    del self.models[spec.name]
                raise
        return d

    def set_split(self, name: str, body: object) -> None:
        model = self.model(name)
        try:
            split = TrafficSplit.parse(body, list(model.versions))
        except UserError as e:
            raise ApiError(400, str(e), e.param) from None
        for version, _ in split.shares:
            refusal = _refusal(model.versions[version])
            if refusal is not None:
                raise ApiError(409, f"version '{version}' of '{name}' {refusal}: it may not be given traffic", "version")
        model.split = split
        log.info("traffic split", extra={"model": name, "traffic": split.as_dict()})

    def promote(self, name: str, version: str) -> None:
        """All traffic to `version`, now production; the old production is what a rollback returns to."""
        model = self.model(name)
        d = model.version(version)
        if d.state != READY:
            raise ApiError(409, f"version '{version}' of '{name}' is {d.state}, not ready", "version")
        if not d.healthy:
            raise ApiError(409, f"version '{version}' of '{name}' is unhealthy: every engine stopped after an error ({d.engine_error})", "version")
        if version != model.production:
            model.previous, model.production = model.production, version
        model.split = TrafficSplit.only(version)
        log.info("promoted", extra={"model": name, "version": version, "previous": model.previous})

    def rollback(self, name: str) -> str:
        """A canary's traffic back to production; or, with none, production back to the version before
        it. The version now taking all traffic."""
        model = self.model(name)
        if model.split == TrafficSplit.only(model.production):
            back = model.previous
            if back is None or back not in model.versions or model.versions[back].state == DRAINING:
                raise ApiError(409, f"'{name}' has nothing to roll back to: all traffic is on '{model.production}' and no earlier version is loaded")
            model.production, model.previous = back, None
        model.split = TrafficSplit.only(model.production)
        log.info("rolled back", extra={"model": name, "version": model.production})
        return model.production

    def unload(self, name: str, version: str) -> None:
        """Take `version` out of the split (the others scaled up) and unload it once its requests have
        finished. 409 for the only version receiving traffic, or one still loading."""
        model = self.model(name)
        if version not in model.versions:
            raise ApiError(404, f"model '{name}' has no version '{version}'", "version", "not_found_error")
        d = model.versions[version]
        if d.state == DRAINING:
            return
        split = model.split
        if split.share(version) > 0:
            if len(split.shares) == 1:
                raise ApiError(409, f"version '{version}' is the only one of '{name}' receiving traffic; shift the traffic first", "version",
                               code="only_version_with_traffic")
            split = split.without(version)
        if d.state == LOADING:
            raise ApiError(409, f"version '{version}' of '{name}' is still loading; unload it once it is loaded", "version")
        model.split = split
        if model.production == version:
            model.production = max(split.shares, key=lambda s: s[1])[0]
        if model.previous == version:
            model.previous = None
        d.state = DRAINING
        self._spawn(self._drain(model, d))

    async def _drain(self, model: ServedModel, d: Deployment) -> None:
        while d.in_flight:
            await asyncio.sleep(_DRAIN_POLL)
        if model.split.share(d.version) > 0:  # never (a draining version is refused traffic), but a split must not name a version gone
            model.split = model.split.without(d.version) if len(model.split.shares) > 1 else TrafficSplit.only(model.production)
        del model.versions[d.version]
        await asyncio.gather(*(e.shutdown() for e in d.unloaded(DRAINING)))
        log.info("unloaded", extra={"model": d.spec.id})
