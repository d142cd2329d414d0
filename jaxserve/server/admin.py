"""The admin API: model versions at runtime (load, traffic split, promote, roll back, unload, stats).

Its routes exist only when the server has an admin key (`--admin-api-key`), which is separate from
the API keys: without one they answer 404 like any unknown path, and without the right key 401. The
key is kept as a SHA-256 digest and compared in constant time; it is never logged.

| route | |
|---|---|
| `GET /admin/models` | every model: versions with state, health, share of traffic, requests in flight |
| `GET /admin/models/{name}` | one model |
| `POST /admin/models/{name}/versions` | load a version (a `ModelSpec` mapping with `version` and `model`): 202 |
| `PUT /admin/models/{name}/traffic` | `{"v1": 0.9, "v2": 0.1}`: shares summing to 1 over known versions |
| `POST /admin/models/{name}/promote` | `{"version": "v2"}`: all traffic to it; it becomes production |
| `POST /admin/models/{name}/rollback` | traffic back to production (or production back to the version before) |
| `DELETE /admin/models/{name}/versions/{version}` | unload once its requests finish: 202 |
| `GET /admin/models/{name}/stats?window=300` | per version: requests, errors, error rate, p50/p99 latency and TTFT |
"""

from __future__ import annotations

import hmac
import math
from typing import Awaitable, Callable

from aiohttp import web

from jaxserve.errors import UserError
from jaxserve.server.model_spec import ModelSpec
from jaxserve.server.protocol import ApiError, parse_json
from jaxserve.server.router import ModelRouter
from jaxserve.server.tenants import digest

Handler = Callable[[web.Request], Awaitable[web.Response]]


async def read_json(request: web.Request) -> object:
    """An admin request's JSON body (an empty body is {}); 400 when it is not JSON."""
    return parse_json(await request.read() or b"{}", "the request body")


class AdminApi:
    def __init__(self, router: ModelRouter, key: str) -> None:
        self.router = router
        self._digest = digest(key)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/admin/models", self.guarded(self.list_models)),
            web.get("/admin/models/{name}", self.guarded(self.show)),
            web.post("/admin/models/{name}/versions", self.guarded(self.load)),
            web.delete("/admin/models/{name}/versions/{version}", self.guarded(self.unload)),
            web.put("/admin/models/{name}/traffic", self.guarded(self.traffic)),
            web.post("/admin/models/{name}/promote", self.guarded(self.promote)),
            web.post("/admin/models/{name}/rollback", self.guarded(self.rollback)),
            web.get("/admin/models/{name}/stats", self.guarded(self.stats)),
        ]

    def guarded(self, handler: Handler) -> Handler:
        """`handler` behind the admin key (401 without it)."""
        async def guarded(request: web.Request) -> web.Response:
            header = request.headers.get("Authorization", "")
            presented = digest(header[7:] if header.startswith("Bearer ") else "")
            if not hmac.compare_digest(presented, self._digest):
                raise ApiError(401, "missing or invalid admin key (send 'Authorization: Bearer <admin key>')", type="authentication_error",
                               code="invalid_admin_key")
            return await handler(request)

        return guarded

    def _state(self, name: str, status: int = 200) -> web.Response:
        return web.json_response(self.router.model(name).state(), status=status)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [m.state() for m in self.router.models.values()]})

    async def show(self, request: web.Request) -> web.Response:
        return self._state(request.match_info["name"])

    async def load(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await read_json(request)
        if not isinstance(body, dict) or "version" not in body:
            raise ApiError(400, "send the version as an object with at least 'version' and 'model'", "version")
        try:
            spec = ModelSpec.from_mapping({**body, "name": name}, f"model {name}")
        except UserError as e:
            raise ApiError(400, str(e), e.param) from None
        self.router.load_version(spec)
        return self._state(name, 202)

    async def unload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.router.unload(name, request.match_info["version"])
        return self._state(name, 202)

    async def traffic(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.router.set_split(name, await read_json(request))
        return self._state(name)

    async def promote(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise ApiError(400, "send {\"version\": ...}: the version to promote", "version")
        self.router.promote(name, body["version"])
        return self._state(name)

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.router.rollback(name)
        return self._state(name)

    async def stats(self, request: web.Request) -> web.Response:
        """Outcomes of each version's requests that ended in the last `window` seconds (default 300)."""
        name = request.match_info["name"]
        try:
            window = float(request.query.get("window", 300))
        except ValueError:
            window = math.nan
        if not math.isfinite(window) or window <= 0:
            raise ApiError(400, "'window' must be a number of seconds > 0", "window")
        model = self.router.model(name)
        return web.json_response({"name": name, "window": window, "production": model.production, "traffic": model.split.as_dict(),
                                  "versions": {v: d.stats(window) for v, d in model.versions.items()}})
