"""The OpenAI-compatible HTTP server on aiohttp.

Every inference request is parsed and checked in full before anything reaches the engine (a bad one
gets a 400 and touches nothing), then streamed from the `AsyncEngine`. A client that goes away cancels
its handler, which aborts its requests and frees their pages. SIGTERM drains: new requests get 503,
requests in flight get up to `drain_timeout` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import jax
from aiohttp import WSCloseCode, WSMsgType, web

from jaxserve.config import ServerConfig
from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError, RequestRejectedError
from jaxserve.engine.interface import Admission, CheckedRequest
from jaxserve.engine.outputs import StepOutput
from jaxserve.errors import UserError
from jaxserve.logs import TRACE_ID
from jaxserve.parallel.distributed import PeerLostError
from jaxserve.server.adapters import ROUTES as LORA_ROUTES
from jaxserve.server.adapters import AdapterRegistry
from jaxserve.server.admin import AdminApi
from jaxserve.server.deployment import READY, Outcome
from jaxserve.server.metrics import Metrics, RequestMetrics
from jaxserve.server.quota import Quotas, TenantQuota
from jaxserve.server.tenants import ANONYMOUS, KeyTable, Tenant, digest, key_id, load_keys, with_priority
from jaxserve.server.tracing import RequestTrace, Tracing, finish_server_span, trace_id
from jaxserve.server.usage import Tally, UsageLedger
from jaxserve.server.protocol import ApiError, Request, chat_prompt, parse_chat, parse_completion, parse_json
from jaxserve.server import reasoning
from jaxserve.server.render import Renderer, renderer
from jaxserve.server.responses import ResponsesRenderer, ResponseStore, chat_body
from jaxserve.server.router import ModelRouter, Route

log = logging.getLogger("jaxserve.server")

UI_DIR = Path(__file__).parent / "ui"  # the playground: a static page, its script and its style sheet
UI_ASSETS = {"/": ("index.html", "text/html"), "/ui/playground.js": ("playground.js", "text/javascript"),
             "/ui/playground.css": ("playground.css", "text/css")}  # path: (file, type, not left to the system's MIME table)
# The playground loads only its own script and style sheet and talks only to this server.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}
STREAM_PATH = "/v1/stream"  # the WebSocket stream
SOCKET_PROTOCOL = "jaxserve.v1"  # the subprotocol the stream answers with
KEY_PROTOCOL = "openai-insecure-api-key."  # a browser's API key, sent as a subprotocol (as OpenAI's Realtime API takes it)
SOCKET_CLOSE_TIMEOUT = 2.0  # seconds a closing socket waits for the client's close frame
ENDPOINTS = {"completions": "/v1/completions", "chat.completions": "/v1/chat/completions", "responses": "/v1/responses"}
_OPEN_PATHS = {"/health", "/ready"}  # answered without an API key (probes)
_TRACED = set(ENDPOINTS.values())
TENANT = web.RequestKey("tenant", Tenant)  # whose request it is (set by the auth middleware)
KEY_ID = web.RequestKey("key_id", str)  # how logs name the key it came with
KEY_DIGEST = web.RequestKey("key_digest", bytes)  # the key's digest (a socket checks it again for each request)
SPAN = web.RequestKey("span", object)  # its server span (tracing on)
ROUTED = web.RequestKey("routed", str)  # the model a request was routed to (its errors count in the tenant's usage of it)
CLIENT_CLOSED = 499  # a traced request's status when its client went away first (nginx's code): not a server error
SESSION_HEADER = "X-Session-Id"  # a sticky key for the traffic split, before the body's `user`
VERSION_HEADER = "X-Model-Version"  # on every routed answer: the version that served it


@dataclass
class _Call:
    """One routed inference request: where it went and how it is going."""

    route: Route
    started: float = field(default_factory=time.monotonic)
    record: RequestMetrics | None = None
    failed: bool = False  # a 5xx, or a failure sent inside a stream

    @property
    def labels(self) -> tuple[str, str]:
        return self.route.deployment.spec.name, self.route.deployment.version


class Server:
    def __init__(self, models: ModelRouter | Sequence[AsyncEngine], cfg: ServerConfig, reasoning_parser: str | None = None) -> None:
        """`models`: a router over every model and version, or the replicas of one model
        (`jaxserve.engine.async_engine.engine_replicas`). Engines are used only through their
        interface; a request goes, whole, to the least loaded replica of the version it is routed to.
        `reasoning_parser`: how chat replies are split into reasoning and content
        (`jaxserve.server.reasoning`; None: not at all)."""
        self.cfg = cfg
        self.reasoning_parser = reasoning_parser
        self._reasoning = reasoning.reasoning_parser(reasoning_parser)  # UserError for an unknown name
        self.router = models if isinstance(models, ModelRouter) else ModelRouter.of_engines(
            cfg.served_model_name or models[0].info.name, models, cfg.warmup)
        self.keys = load_keys(cfg.api_keys_file) if cfg.api_keys_file else KeyTable.unlimited(cfg.api_keys) if cfg.api_keys else None
        if self.keys is not None:
            self._check_admin_key(self.keys)
        self.quotas = Quotas()
        self.usage = UsageLedger(cfg.cost_per_hour)
        self.metrics = Metrics(self.router.deployments, self.usage)
        self.router.on_loaded = self.metrics.attach  # each version's steps, from when its engines run
        self.admin = AdminApi(self.router, cfg.admin_api_key) if cfg.admin_api_key else None
        self.adapters = AdapterRegistry(self.router, cfg.enable_lora)
        self.tracing = Tracing(cfg.otlp_traces_endpoint) if cfg.otlp_traces_endpoint else None
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        self.response_store = ResponseStore()  # conversations behind previous_response_id
        self._sockets: set[web.WebSocketResponse] = set()  # open WebSocket streams, closed when draining ends
        # Routes answered without an API key: the probes, the playground, and the root path's redirect.
        self._open_paths = _OPEN_PATHS | (UI_ASSETS.keys() if cfg.ui else set()) | ({cfg.root_path} if cfg.root_path else set())

    # ---- application ---------------------------------------------------------------------

    def app(self) -> web.Application:
        traced = [self._trace] if self.tracing is not None else []
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[*traced, self._errors, self._cors, self._auth])
        routes = [
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/responses", self.responses),
            web.get(STREAM_PATH, self.stream_socket),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/health", self.health),
            web.get("/ready", self.ready_probe),
            web.get("/metrics", self.metrics_page),
            web.get("/version", self.version),
            web.get("/v1/usage", self.usage_page),
        ]
        if self.cfg.ui:
            routes += [web.get(path, self.playground) for path in UI_ASSETS]
        if self.admin is not None:  # without an admin key the admin routes do not exist
            routes += self.admin.routes() + self.adapters.routes(self.admin.guarded)
        app.add_routes(routes)
        root = self.cfg.root_path
        if root:  # behind a proxy that keeps its prefix: every route also answers under it (and without it, for one that strips it)
            app.add_routes([web.RouteDef(r.method, root + r.path, r.handler, r.kwargs) for r in routes])
            if self.cfg.ui:
                app.add_routes([web.get(root, self._to_root)])
        app.on_response_prepare.append(self._rate_headers)
        return app

    def _endpoint(self, request: web.Request) -> str | None:
        """The route the request matched, as `app` names it (without the root path); None: no route.
        Auth, tracing and metrics go by it, never by the path's text."""
        resource = request.match_info.route.resource
        return self._unrooted(resource.canonical) if resource is not None else None

    def _unrooted(self, path: str) -> str:
        """A path without the root path (`--root-path`), as the routes name it."""
        root = self.cfg.root_path
        return path[len(root):] if root and path.startswith(root + "/") else path

    def reload_keys(self) -> None:
        """Read the keys file again (SIGHUP); a bad file leaves the old one in force. Requests in flight
        keep the tenant they were admitted as; spent budgets carry over to the new limits."""
        if not self.cfg.api_keys_file:
            log.warning("SIGHUP: no --api-keys-file to reload")
            return
        try:
            keys = load_keys(self.cfg.api_keys_file)
            self._check_admin_key(keys)
        except UserError as e:
            log.error("keys file not reloaded; the previous one stays in force: %s", e)
            return
        self.keys = keys
        self.quotas.reload(self.keys.tenants.values())
        log.info("keys file reloaded", extra={"keys": len(self.keys.entries), "tenants": len(self.keys.tenants)})

    def _check_admin_key(self, keys: KeyTable) -> None:
        """UserError when the admin key is also a tenant's API key (compared as digests: a keys file may
        hold only digests)."""
        if self.cfg.admin_api_key is None:
            return
        admin = digest(self.cfg.admin_api_key)
        if sum(hmac.compare_digest(admin, entry) for entry, _ in keys.entries):  # every entry compared
            raise UserError("the admin API key is also an API key in the keys file; give the admin API its own key")

    async def start(self) -> None:
        """Start the engines loaded at start, compile every step shape (off the event loop) and become
        ready; lazy models load later, on their first request."""
        await self.router.start()
        self.ready = True
        self.metrics.ready.set(1)
        self.usage.start()
        first = next((d for d in self.router.deployments() if d.engines), None)
        log.info("ready", extra={"models": list(self.router.models), "compiles": first.engines[0].stats().compiles if first else 0})

    @property
    def engines(self) -> list[AsyncEngine]:
        """Every loaded engine, of every model and version."""
        return self.router.engines()

    async def drain(self) -> None:
        """Refuse new requests, give those in flight up to drain_timeout, then stop the engine."""
        self.draining = True
        self.metrics.ready.set(0)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", extra={"unfinished": self.in_flight})
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"the server is shutting down") for ws in list(self._sockets)))
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every engine; requests still running end with finish_reason "abort". Then export the spans still buffered."""
        await self.router.shutdown()
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    @property
    def in_flight(self) -> int:
        """Engine requests (one per prompt) accepted and not yet answered, over all models and replicas."""
        return sum(d.in_flight for d in self.router.deployments())

    @property
    def engine_error(self) -> BaseException | None:
        """The first error of any engine of any version (`serve`'s watch: it ends a multi-host group);
        the probes judge each model by its own versions instead (`_health`)."""
        return next((e.error for e in self.engines if e.error is not None), None)

    def _health(self) -> dict[str, dict]:
        """Per model: whether its production version is healthy, and ready (loaded, or lazy: loaded on
        demand), and each version's state, health and error (a dead canary shows here without taking
        the others out of service)."""
        out = {}
        for m in self.router.models.values():
            production = m.versions.get(m.production)
            healthy = production is not None and production.healthy
            out[m.name] = {"healthy": healthy, "ready": healthy and (production.state == READY or production.spec.lazy),
                           "production": m.production, "versions": {v: d.health() for v, d in m.versions.items()}}
        return out

    # ---- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every failure becomes an OpenAI error body; every answer is counted."""
        try:
            response = await handler(request)
        except ApiError as e:
            response = self._error(e)
        except web.HTTPException as e:
            kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}.get(e.status, "invalid_request_error")
            message = f"no route {request.method} {request.path}" if e.status == 404 else e.reason
            if e.status == 413:
                message = f"request body larger than {self.cfg.max_body_bytes} bytes"
            response = self._error(ApiError(e.status, message, type=kind))
        except ConnectionResetError:  # the client went away while we answered: nothing to send, nothing failed
            self._count(self._endpoint(request) or "unmatched", CLIENT_CLOSED, request.get(TENANT))
            raise
        except Exception as e:
            response = self._error(_unexpected(e, request.path))
        self._count(self._endpoint(request) or "unmatched", response.status, request.get(TENANT), request.get(ROUTED, ""))
        return response

    def _count(self, endpoint: str, status: int, tenant: Tenant | None, model: str = "") -> None:
        """One answer in the HTTP metrics and, if it is an error, in its tenant's usage of `model`
        ("": refused before it was routed)."""
        self.metrics.http.labels(endpoint, str(status)).inc()
        if tenant is not None and status >= 400 and status not in (429, CLIENT_CLOSED):  # a tenant's 429s are counted where its quota refused
            self.usage.record(tenant.name, model, errors=1)

    @web.middleware
    async def _trace(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """A server span for each inference request (tracing on); its logs carry the trace id."""
        path = self._endpoint(request)
        if path not in _TRACED:
            return await handler(request)

        async def answer(span: Any) -> tuple[web.StreamResponse, int]:
            request[SPAN] = span
            response = await handler(request)
            return response, response.status

        return await self._in_span(request.method, path, request.headers, answer)

    async def _in_span(self, method: str, route: str, headers: Any, run: Callable[[Any], Awaitable[tuple[Any, int]]]) -> Any:
        """What `run(span)` returns first, run under a server span that its logs name by trace id;
        `run` also returns the HTTP status the span ends with. A client that went away first makes it
        499, anything else raised 500."""
        assert self.tracing is not None
        span = self.tracing.server_span(method, route, headers)
        token = TRACE_ID.set(trace_id(span))
        status = 500
        try:
            result, status = await run(span)
            return result
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            finish_server_span(span, status)
            TRACE_ID.reset(token)

    def _origin_allowed(self, origin: str) -> bool:
        """Whether `--cors-origin` lets pages of `origin` use the API."""
        return "*" in self.cfg.cors_origins or origin in self.cfg.cors_origins

    @web.middleware
    async def _cors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and self._origin_allowed(origin)
        if allowed and request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Find the key's tenant before anything reads the body: an unknown key costs no more than its
        headers. Without keys, every request is the one anonymous tenant's."""
        keys, path = self.keys, self._endpoint(request) or request.path
        if keys is None:
            request[TENANT] = ANONYMOUS
        elif path not in self._open_paths and not path.startswith("/admin/") and path not in LORA_ROUTES:  # admin routes check their own key
            header = request.headers.get("Authorization", "")
            found = keys.find(header[7:]) if header.startswith("Bearer ") else None
            if found is None and path == STREAM_PATH:  # a browser cannot set headers on a WebSocket
                found = next((keys.find(p[len(KEY_PROTOCOL):]) for p in self._protocols(request) if p.startswith(KEY_PROTOCOL)), None)
            if found is None:
                raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", type="authentication_error", code="invalid_api_key")
            request[KEY_ID], request[KEY_DIGEST], request[TENANT] = key_id(found[0]), found[0], found[1]
        return await handler(request)

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """OpenAI's `x-ratelimit-*` headers on every answer to a tenant with limits."""
        tenant: Tenant | None = request.get(TENANT)
        if tenant is not None and tenant.limited:
            response.headers.update(self.quotas.of(tenant).headers(self.quotas.clock()))

    def _error(self, e: ApiError) -> web.Response:
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after or 1)))} if e.status == 429 or e.retry_after is not None else None
        return web.json_response(e.body(), status=e.status, headers=headers)

    # ---- inference -----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        """The JSON object sent, over the server's default sampling fields."""
        return self._with_defaults(_json_object(await request.read(), "the request body"))

    def _with_defaults(self, body: dict) -> dict:
        return {**dict(self.cfg.default_sampling), **{k: v for k, v in body.items() if v is not None}}

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="service_unavailable")

    def _route(self, body: dict, request: web.Request) -> Route:
        """Where the request goes, and the refusals that come before parsing: draining or warming up,
        an unknown model or one the tenant may not use, a version still loading, queue full."""
        self._refuse_while_draining()
        if not self.ready:
            raise ApiError(503, "the model is still warming up; retry when /ready answers 200", type="service_unavailable")
        route = self._target(body, request, inference=True)
        waiting = self.in_flight - sum(e.stats().running for e in self.engines)
        if waiting >= self.cfg.max_waiting:
            raise ApiError(429, f"too many requests waiting ({waiting}); retry later", type="rate_limit_error")
        return route

    def _target(self, body: dict, request: web.Request, inference: bool = False) -> Route:
        """The ready version the body's `model` names for this tenant (sticky on the session header or
        `user`): 404 unknown, 403 not allowed, 503 while it loads or when its engines have stopped. An
        inference request's 503 here is an outcome of the version it was routed to: an error in its
        stats (what a rollout judges) and metrics."""
        tenant: Tenant = request[TENANT]
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        user = body.get("user")
        key = request.headers.get(SESSION_HEADER) or (user if isinstance(user, str) and user else None)
        route = self.router.route(model, key, tenant.may_use)
        request[ROUTED] = route.deployment.spec.name
        if not tenant.may_use(route.model):
            raise ApiError(403, f"this API key may not use the model '{route.model}'", "model", "permission_error", "model_not_allowed")
        try:
            self.router.ensure_ready(route.deployment)
        except ApiError as e:
            if inference and e.status >= 500:
                self._refused(route)
            raise
        return route

    def _refused(self, route: Route) -> None:
        """Count a request routed to a version that could not take it."""
        deployment = route.deployment
        labels = deployment.spec.name, deployment.version
        self.metrics.routed.labels(*labels).inc()
        self.metrics.errors.labels(*labels).inc()
        deployment.record(Outcome(time.monotonic(), 0.0, None, True))

    async def _check(self, req: Request, engine: AsyncEngine, trace: RequestTrace | None, call: _Call) -> CheckedRequest:
        """Every engine-level check (grammar, context length, token ids) of every prompt, once, before
        any starts; a 400 naming the request's own field for a bad one."""
        try:
            checked = await engine.check(req.prompts, req.params, call.route.adapter)
        except UserError as e:
            prompt = "prompt" if req.kind == "completion" else "input" if req.responses is not None else "messages"
            param = {"guide": req.guide_param, "prompt": prompt}.get(e.param, e.param)
            raise ApiError(400, str(e), param, code=e.code) from None
        if checked.grammar_seconds is not None:
            self.metrics.grammar_compile.labels(*call.labels).observe(checked.grammar_seconds)
            if trace is not None:
                trace.grammar_compile(checked.grammar_seconds)
        return checked

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat.completions")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "responses")

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """An inference request over HTTP: streamed as server-sent events or answered whole."""
        body = await self._body(request)
        route = self._route(body, request)

        async def deliver(req: Request, outputs: AsyncIterator[tuple[int, StepOutput]], call: _Call) -> web.StreamResponse:
            return await (self._stream(request, req, outputs, call) if req.stream else self._whole(req, outputs, call))

        return await self._serve(request, self._parse(endpoint, body, route, request[TENANT]), route, deliver, request.get(SPAN))

    def _parse(self, endpoint: str, body: dict, route: Route, tenant: Tenant) -> Request:
        """The request a body makes for an endpoint (`ENDPOINTS`); the Responses API's is the chat
        request it amounts to (continuing and stored in `tenant`'s conversations)."""
        info = route.deployment.info
        model = body.get("model") or route.model
        if endpoint == "completions":
            return parse_completion(body, info.tokenizer, model, info.max_model_len)
        if endpoint == "chat.completions":
            return parse_chat(body, info.tokenizer, model, info.max_model_len)
        chat, extra = chat_body(body, self.response_store, tenant.name)
        return dataclasses.replace(parse_chat(chat, info.tokenizer, model, info.max_model_len), responses=extra)

    def _grant(self, request: web.Request, req: Request, route: Route) -> tuple[TenantQuota, Admission]:
        """The tenant's quota, taken for this request (429 when a limit says no, 400 when it never
        could say yes), and the request's admission."""
        tenant: Tenant = request[TENANT]
        quota = self.quotas.of(tenant)
        now = self.quotas.clock()
        refusal = quota.refusal(req.prompt_tokens, now)
        if refusal is not None and refusal.status == 400:
            raise ApiError(400, refusal.message, "prompt", code="exceeds_tenant_limit")
        if refusal is not None:
            self.usage.record(tenant.name, route.deployment.spec.name, rate_limited=1)
            raise ApiError(429, refusal.message, type="rate_limit_error", code="rate_limit_exceeded", retry_after=refusal.retry_after)
        quota.admit(req.prompt_tokens, now)
        return quota, Admission(priority=with_priority(tenant, req.priority), tenant=tenant.name, weight=tenant.weight, adapter=route.adapter)

    async def _serve(self, request: web.Request, req: Request, route: Route, deliver: Callable[..., Awaitable[Any]], span: Any) -> Any:
        """Admit, check and run one request, traced under its server `span` (None: tracing off);
        `deliver(req, outputs, call)` sends its outputs, and what it returns is returned."""
        # Counted from here (no await since the routing), so a burst cannot overshoot max_waiting and
        # an unloading version sees every request routed to it.
        quota, admission = self._grant(request, req, route)
        admission = dataclasses.replace(admission, timeline=span is not None and span.is_recording())
        deployment, call = route.deployment, _Call(route)
        replica = deployment.replica()
        engine = deployment.engines[replica]
        deployment.load[replica] += len(req.prompts)
        self.metrics.routed.labels(*call.labels).inc()
        trace = error = None
        try:
            trace = self._request_trace(span, req, admission, route)
            try:
                checked = await self._check(req, engine, trace, call)
            except ApiError:  # the engine refused it: it costs its tenant nothing
                quota.refund(req.prompt_tokens, self.quotas.clock())
                raise
            self.usage.record(admission.tenant, call.labels[0], requests=1, prompt_tokens=req.prompt_tokens)
            if req.params.guide is not None:
                self.metrics.structured.labels(*call.labels, req.guide_param).inc()
            log.info("request", extra={"request_id": req.request_id, "kind": req.kind, "prompts": len(req.prompts), "n": req.params.n,
                                       "stream": req.stream, "priority": admission.priority, "tenant": admission.tenant,
                                       "key_id": request.get(KEY_ID), "model": deployment.spec.id})
            return await deliver(req, self._outputs(req, checked, engine, admission, quota, trace, call), call)
        except ApiError as e:
            call.failed = call.failed or e.status >= 500
            error = f"ApiError: {e}"
            raise
        except BaseException as e:
            hang_up = isinstance(e, (asyncio.CancelledError, ConnectionResetError))  # not the version's fault, nor an error of the request
            call.failed = call.failed or not hang_up
            error = None if hang_up else f"{type(e).__name__}: {e}"
            raise
        finally:
            deployment.load[replica] -= len(req.prompts)
            quota.in_flight -= 1
            if call.failed:
                self.metrics.errors.labels(*call.labels).inc()
            deployment.record(Outcome(time.monotonic(), time.monotonic() - call.started, call.record.ttft if call.record else None, call.failed))
            if trace is not None:
                trace.end(error)

    def _request_trace(self, span: Any, req: Request, admission: Admission, route: Route) -> RequestTrace | None:
        if span is None:
            return None
        p = req.params
        response_id = req.responses.id if req.responses is not None else f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{req.request_id}"
        return self.tracing.request(span, req.kind, route.model, admission.tenant, response_id, p.max_tokens, p.temperature, p.top_p,
                                    req.prompt_tokens)

    async def _whole(self, req: Request, outputs: AsyncIterator[tuple[int, StepOutput]], call: _Call) -> web.Response:
        render = self._renderer(req, call)
        try:
            async with asyncio.timeout(self.cfg.request_timeout), contextlib.aclosing(outputs):
                async for i, out in outputs:
                    render.add(i, out)
        except (TimeoutError, RequestFailedError, EngineDeadError) as e:
            raise self._failed(e, req) from None
        return web.json_response(render.response(), headers={VERSION_HEADER: call.route.deployment.version})

    async def _outputs(self, req: Request, checked: CheckedRequest, engine: AsyncEngine, admission: Admission,
                       quota: TenantQuota, trace: RequestTrace | None, call: _Call) -> AsyncIterator[tuple[int, StepOutput]]:
        """(prompt index, step output) of every prompt, as the engine merges them; records latency
        and token metrics, and spends the tenant's generated tokens as they come: when its bucket runs
        dry, every unfinished sample ends with `length` (after its last whole token). Leaving early
        aborts every prompt's request."""
        record = call.record = RequestMetrics(self.metrics, call.labels, admission.tenant, req.prompts, req.params.n, req.params.max_tokens)
        unfinished = {(i, k) for i in range(len(req.prompts)) for k in range(req.params.n)}
        generated = 0  # delivered, recorded in the usage ledger once at the end

        def note(i: int, out: StepOutput) -> None:
            record.output(i, out)
            if trace is not None:
                trace.output(i, out)
            if out.finish_reason:
                unfinished.discard((i, out.index))

        try:
            async with contextlib.aclosing(engine.generate(req.request_id, checked, admission)) as outputs:
                async for i, out in outputs:
                    if out.num_generated and not quota.spend_generated(out.num_generated, self.quotas.clock()):
                        for j, k in sorted(unfinished):
                            final = StepOutput(req.request_id, k, None, 0.0, "length")
                            note(j, final)
                            yield j, final
                        return
                    generated += out.num_generated
                    note(i, out)
                    yield i, out
        finally:
            if unfinished:
                record.aborted(len(unfinished))
            self.usage.record(admission.tenant, call.labels[0], generated_tokens=generated)

    async def _stream(self, request: web.Request, req: Request, outputs: AsyncIterator[tuple[int, StepOutput]], call: _Call) -> web.StreamResponse:
        """Server-sent events: the request's events, then [DONE] (the Responses API has none)."""
        render = self._renderer(req, call)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               VERSION_HEADER: call.route.deployment.version})
        await response.prepare(request)

        async def send(frames: list[str]) -> None:
            if frames:
                await response.write("".join(frames).encode())

        await self._relay(render, outputs, call, lambda events: send([render.sse(e) for e in events]))
        await send(render.sse_end())
        await response.write_eof()
        return response

    async def _relay(self, render: Renderer, outputs: AsyncIterator[tuple[int, StepOutput]], call: _Call,
                     send: Callable[[list[dict]], Awaitable[None]]) -> ApiError | None:
        """Send a streamed request's events as they come: the renderer's opening, its events for each
        step output, then its closing (usage if asked; the Responses API's own events), or a failure:
        the error it sent, if it did."""
        await send(render.opening())
        try:
            async with asyncio.timeout(self.cfg.request_timeout), contextlib.aclosing(outputs):
                async for i, out in outputs:
                    await send(render.frames(i, out))
            await send(render.closing())
        except (TimeoutError, RequestFailedError, EngineDeadError) as e:
            error = self._failed(e, render.req)
            call.failed = error.status >= 500  # a request's own fault is not its version's
            await send(render.failure(error))
            return error
        return None

    def _failed(self, e: Exception, req: Request) -> ApiError:
        """The error of a request that failed after it was admitted."""
        if isinstance(e, TimeoutError):
            return ApiError(504, f"the request took longer than {self.cfg.request_timeout} s", type="timeout_error")
        if isinstance(e, RequestRejectedError):
            return ApiError(400, str(e), req.guide_param)
        if isinstance(e, EngineDeadError):
            return ApiError(503, str(e), type="service_unavailable")
        return ApiError(500, f"the request failed: {e}", type="internal_server_error")

    def _renderer(self, req: Request, call: _Call) -> Renderer:
        tokenizer = call.route.deployment.info.tokenizer
        return ResponsesRenderer(req, tokenizer) if req.responses is not None else renderer(req, tokenizer, self._reasoning)

    # ---- the WebSocket stream -------------------------------------------------------------

    @staticmethod
    def _protocols(request: web.Request) -> list[str]:
        return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]

    async def stream_socket(self, request: web.Request) -> web.WebSocketResponse:
        """`/v1/stream`: requests one after another on one socket, each answered with the events its
        SSE stream would carry (one message each) and then a `done` message. A client message is
        `{"type": "completions" | "chat.completions" | "responses", "id": ANY, "body": {...}}` or
        `{"type": "cancel"}`; cancelling, or closing the socket, aborts the running request."""
        ws = web.WebSocketResponse(protocols=(SOCKET_PROTOCOL,), max_msg_size=self.cfg.max_body_bytes, timeout=SOCKET_CLOSE_TIMEOUT)
        if not ws.can_prepare(request).ok:
            raise ApiError(400, f"{STREAM_PATH} is a WebSocket: open it with a WebSocket client")
        self._check_handshake(request)
        await ws.prepare(request)
        self._sockets.add(ws)
        running: asyncio.Task | None = None
        try:
            async for message in ws:
                if message.type == WSMsgType.ERROR:  # a frame over the limit (closed with 1009) or a broken one
                    break
                try:
                    if message.type != WSMsgType.TEXT:
                        raise ApiError(400, "send each request as a JSON text message")
                    sent = _json_object(message.data.encode(), "the message")
                except ApiError as e:
                    await self._socket_error(ws, request, None, e)
                    continue
                if sent.get("type") == "cancel":
                    if running is not None and not running.done():
                        running.cancel()
                        await asyncio.wait({running})  # its `done` comes before anything sent after the cancel
                    continue
                if running is not None and not running.done():
                    await self._socket_error(ws, request, sent.get("id"), ApiError(
                        409, "a request is running on this socket: wait for its 'done' message or send {\"type\": \"cancel\"}", "type"))
                    await ws.send_json({"type": "done", "id": sent.get("id"), "outcome": "refused"})
                    continue
                running = asyncio.create_task(self._socket_request(ws, request, sent))
                await asyncio.sleep(0)  # let it begin: a task cancelled before its first step never runs, so never sends its `done`
        except ConnectionResetError:  # the socket closed while answering
            pass
        finally:
            if running is not None:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            self._sockets.discard(ws)
        return ws

    def _check_handshake(self, request: web.Request) -> None:
        """Refuse a socket while draining, one that does not offer our subprotocol (a client offering
        only its key would see no subprotocol chosen), and one opened by a web page of another origin
        that `--cors-origin` does not allow (browsers apply no CORS to WebSockets)."""
        self._refuse_while_draining()
        offered = self._protocols(request)
        if offered and SOCKET_PROTOCOL not in offered:
            raise ApiError(400, f"offer the subprotocol '{SOCKET_PROTOCOL}' (beside '{KEY_PROTOCOL}<key>', if the key goes that way)")
        origin = request.headers.get("Origin")
        try:
            same_host = origin is not None and urlsplit(origin).netloc == request.host
        except ValueError:  # not a URL (say, "http://["): no site of ours
            same_host = False
        if origin is not None and not same_host and not self._origin_allowed(origin):
            raise ApiError(403, f"WebSocket connections from the origin {origin} are not allowed (see --cors-origin)", type="permission_error")

    async def _socket_request(self, ws: web.WebSocketResponse, request: web.Request, sent: dict) -> None:
        """One request from the socket, to its `done` message."""
        try:
            outcome = await self._socket_answer(ws, request, sent)
        except asyncio.CancelledError:  # a cancel message, or the socket closed: the request was aborted
            outcome = "cancelled"
        except ConnectionResetError:  # the socket closed while sending
            return
        if not ws.closed:
            with contextlib.suppress(ConnectionResetError):
                await ws.send_json({"type": "done", "id": sent.get("id"), "outcome": outcome})

    async def _socket_answer(self, ws: web.WebSocketResponse, request: web.Request, sent: dict) -> str:
        """Stream one request's events, or its error; its outcome: finished, failed or refused. With
        tracing on, each request is a server span of its own, continuing the handshake's `traceparent`."""
        if self.tracing is None:
            return (await self._socket_outcome(ws, request, sent, None))[0]

        async def answer(span: Any) -> tuple[str, int]:
            span.set_attribute("jaxserve.stream.type", sent["type"] if sent.get("type") in ENDPOINTS else "invalid")
            return await self._socket_outcome(ws, request, sent, span)

        return await self._in_span(request.method, STREAM_PATH, request.headers, answer)

    async def _socket_outcome(self, ws: web.WebSocketResponse, request: web.Request, sent: dict, span: Any) -> tuple[str, int]:
        """`_socket_answer`'s outcome, and the HTTP status it amounts to (a failure inside the stream: its error's)."""
        request.pop(ROUTED, None)  # the socket's previous request's
        try:
            endpoint, body = sent.get("type"), sent.get("body")
            if endpoint not in ENDPOINTS:
                raise ApiError(400, f"'type' must be one of {sorted(ENDPOINTS)} or 'cancel', got {endpoint!r}", "type")
            if not isinstance(body, dict):
                raise ApiError(400, "'body' must be the request object of the endpoint 'type' names", "body")
            self._recheck_key(request)
            body = {**self._with_defaults(body), "stream": True}
            route = self._route(body, request)

            async def deliver(req: Request, outputs: AsyncIterator[tuple[int, StepOutput]], call: _Call) -> ApiError | None:
                async def send(events: list[dict]) -> None:
                    for event in events:
                        await ws.send_json(event)

                return await self._relay(self._renderer(req, call), outputs, call, send)

            failure = await self._serve(request, self._parse(endpoint, body, route, request[TENANT]), route, deliver, span)
            self._count(STREAM_PATH, 200, request[TENANT])
            return ("failed", failure.status) if failure is not None else ("finished", 200)
        except ApiError as e:
            await self._socket_error(ws, request, sent.get("id"), e, request.get(ROUTED, ""))
            return "refused", e.status
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # the socket carries on
            error = _unexpected(e, STREAM_PATH)
            await self._socket_error(ws, request, sent.get("id"), error, request.get(ROUTED, ""))
            return ("refused", error.status) if error.status < 500 else ("failed", 500)

    def _recheck_key(self, request: web.Request) -> None:
        """A socket's key is checked again for each request: a keys file reloaded since may have
        revoked it or changed its tenant."""
        entry = request.get(KEY_DIGEST)
        if self.keys is None or entry is None:
            return
        found = self.keys.by_digest(entry)
        if found is None:
            raise ApiError(401, "the API key this socket was opened with is no longer valid", type="authentication_error", code="invalid_api_key")
        request[TENANT] = found[1]

    async def _socket_error(self, ws: web.WebSocketResponse, request: web.Request, tag, e: ApiError, model: str = "") -> None:
        """An error on the socket (of a request routed to `model`, if it was), counted as its HTTP answer would be."""
        self._count(STREAM_PATH, e.status, request[TENANT], model)
        await ws.send_json({"type": "error", "id": tag, "status": e.status, **e.body()})

    # ---- the playground ------------------------------------------------------------------

    async def playground(self, request: web.Request) -> web.FileResponse:
        """The web playground (`UI_DIR`): a static page that talks to this server by relative URLs,
        so it works under any root path."""
        name, kind = UI_ASSETS[self._endpoint(request)]
        return web.FileResponse(UI_DIR / name, headers={**UI_HEADERS, "Content-Type": f"{kind}; charset=utf-8"})

    async def _to_root(self, request: web.Request) -> web.Response:
        """The root path without its slash: the playground's relative URLs need it."""
        return web.Response(status=308, headers={"Location": self.cfg.root_path + "/"})

    # ---- other endpoints -----------------------------------------------------------------

    def _cards(self, tenant: Tenant) -> list[dict]:
        """vLLM's model cards: each model, each named version (NAME@VERSION) and each adapter, with
        `root` (what it was loaded from) and `parent` (an adapter's base model); those the tenant may use."""
        cards = []
        for entry in self.router.listing():
            if not tenant.may_use(entry.id.partition("@")[0]):
                continue
            d, metadata = entry.deployment, None
            if d.state == READY:
                limits, info = d.engines[0].limits, d.info
                metadata = {"weights": info.weights, "kv_cache_dtype": limits.kv_cache_dtype, "kv_cache_tokens": limits.kv_cache_tokens,
                            "kv_cache_scales": limits.kv_cache_scales}
            cards.append({"id": entry.id, "object": "model", "created": self.created, "owned_by": "jaxserve", "root": entry.root,
                          "parent": entry.parent, "version": d.version, "state": d.state,
                          "max_model_len": d.info.max_model_len if d.state == READY else None, "metadata": metadata})
        return cards

    async def models(self, request: web.Request) -> web.Response:
        """Every model, version and adapter the key's tenant may use."""
        return web.json_response({"object": "list", "data": self._cards(request[TENANT])})

    async def model(self, request: web.Request) -> web.Response:
        card = next((c for c in self._cards(request[TENANT]) if c["id"] == request.match_info["model"]), None)
        if card is None:
            raise ApiError(404, f"the model '{request.match_info['model']}' does not exist", "model", "not_found_error", "model_not_found")
        return web.json_response(card)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        info = self._target(body, request).deployment.info
        tokenizer = info.tokenizer
        if isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True) is not False)
        elif "messages" in body:
            ids = chat_prompt(body, tokenizer)[0]  # exactly what /v1/chat/completions renders
        else:
            raise ApiError(400, "send 'prompt' (a string) or 'messages'", "prompt")
        out = {"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len}
        if body.get("return_token_strs") is True:
            out["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        info = self._target(body, request).deployment.info
        ids = body.get("tokens")
        vocab = info.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ApiError(400, f"'tokens' must be an array of token ids in [0, {vocab})", "tokens")
        return web.json_response({"prompt": info.tokenizer.decode(ids, skip_special_tokens=False)})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 503 only when no model's production version is healthy (every engine it has
        stopped after an error, or its load failed); a dead canary or lazy model is reported, not fatal."""
        models = self._health()
        if not any(m["healthy"] for m in models.values()):
            error = next((m["versions"][m["production"]]["error"] for m in models.values() if m["production"] in m["versions"]), None)
            return web.json_response({"status": "engine failed", "error": error, "models": models}, status=503)
        return web.json_response({"status": "ok", "models": models})

    async def ready_probe(self, request: web.Request) -> web.Response:
        """200 once every model loaded at start is warm (lazy ones load later) while some model's
        production version is healthy; per model, whether it can serve and each version's state and health."""
        models = self._health()
        ok = self.ready and not self.draining and any(m["ready"] for m in models.values())
        status = "ready" if ok else ("draining" if self.draining else "warming up" if not self.ready else "engine failed")
        return web.json_response({"status": status, "models": models}, status=200 if ok else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._need_admin(request, "reading metrics")  # they hold every tenant's usage
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    def _need_admin(self, request: web.Request, what: str) -> None:
        if self.keys is not None and not request[TENANT].admin:
            raise ApiError(403, f"{what} needs an admin key", type="permission_error", code="admin_required")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": version("jaxserve")})

    async def usage_page(self, request: web.Request) -> web.Response:
        """Each tenant's totals over a window: `?tenant=NAME` (default: all), `start` and `end` (Unix
        seconds; default: since the server started), or `window` (seconds back from now). Only admin
        keys may read it."""
        self._need_admin(request, "reading usage")
        q, now = request.query, self.usage.clock()
        try:
            window = float(q["window"]) if "window" in q else None
            end = float(q.get("end", now))
            start = end - window if window is not None else float(q.get("start", self.usage.since))
        except ValueError:
            raise ApiError(400, "'start', 'end' and 'window' must be numbers (Unix seconds; window in seconds)") from None
        if not (math.isfinite(start) and math.isfinite(end)) or start > end or (window is not None and window <= 0):
            raise ApiError(400, "the window must have start <= end (and a positive 'window')")
        tenants: dict[str, dict[str, Tally]] = {}
        for (name, model), tally in sorted(self.usage.window(start, end).items()):
            tenants.setdefault(name, {})[model] = tally
        if "tenant" in q:
            if q["tenant"] not in tenants:
                raise ApiError(404, f"no usage recorded for tenant '{q['tenant']}'", "tenant", "not_found_error")
            tenants = {q["tenant"]: tenants[q["tenant"]]}
        data = []
        for name, models in tenants.items():
            total = Tally()
            for tally in models.values():
                total.add(tally)
            by_model = {model: self._usage_row(t) for model, t in models.items() if model}  # "": refused before routing
            data.append({"tenant": name, **self._usage_row(total), "models": by_model})
        return web.json_response({"object": "usage", "start": start, "end": end, "granularity_seconds": 60,
                                  "cost_per_million_tokens": self.usage.cost_per_million_tokens(), "data": data})

    def _usage_row(self, t: Tally) -> dict:
        return {"requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens, "total_tokens": t.tokens,
                "errors": t.errors, "rate_limited": t.rate_limited, "cost_usd": self.usage.cost(t)}


def _unexpected(e: Exception, path: str) -> ApiError:
    """The answer to an exception no handler expected: a 400 for input nested past Python's recursion
    limit (a schema walked recursively), else a 500 for a bug in one request (logged); the server
    carries on."""
    if isinstance(e, RecursionError):
        return ApiError(400, "the request is nested too deeply")
    log.exception("unhandled error", extra={"path": path})
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error")


def _json_object(raw: bytes, what: str) -> dict:
    """A JSON object sent by a client; a 400 naming what is wrong with it."""
    body = parse_json(raw, what)
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    return body


async def serve(server: Server) -> int:
    """Listen, warm up, serve until SIGTERM or SIGINT, then drain and stop; the exit status. A lost
    multi-host peer also stops the server (status 1): the group cannot compute without it."""
    cfg = server.cfg
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    log.info("listening", extra={"url": f"http://{cfg.host}:{cfg.port}", "models": list(server.router.models),
                                 "reasoning_parser": server.reasoning_parser})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    warm = asyncio.create_task(server.start())
    status = 0

    async def watch() -> None:  # a failed warm-up, or any engine failure in a multi-host group, ends the process
        nonlocal status
        group = jax.process_count() > 1
        while True:
            error = server.engine_error or (warm.exception() if warm.done() and not warm.cancelled() else None)
            if error is not None and (group or not server.ready or isinstance(error, PeerLostError)):
                log.error("stopping after an error: %s", error)
                status = 1
                stop.set()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    await stop.wait()
    watcher.cancel()
    log.info("draining", extra={"in_flight": server.in_flight})
    if not warm.done():
        warm.cancel()
    await server.drain()
    await runner.cleanup()
    return status
