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
import json
import logging
import math
import signal
import time
from importlib.metadata import version
from typing import AsyncIterator, Awaitable, Callable, Sequence

import jax
from aiohttp import web

from jaxserve.config import ServerConfig
from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from jaxserve.engine.interface import Admission, CheckedRequest
from jaxserve.engine.outputs import StepOutput
from jaxserve.errors import UserError
from jaxserve.logs import TRACE_ID
from jaxserve.parallel.distributed import PeerLostError
from jaxserve.server.metrics import Metrics, RequestMetrics
from jaxserve.server.quota import Quotas, TenantQuota
from jaxserve.server.tenants import ANONYMOUS, KeyTable, Tenant, key_id, load_keys, with_priority
from jaxserve.server.tracing import RequestTrace, Tracing, finish_server_span, trace_id
from jaxserve.server.usage import UsageLedger
from jaxserve.server.protocol import ApiError, Request, chat_prompt, parse_chat, parse_completion
from jaxserve.server.render import Renderer, renderer, sse
from jaxserve.server.responses import ResponsesRenderer, ResponseStore, chat_body

log = logging.getLogger("jaxserve.server")

_OPEN_PATHS = {"/health", "/ready"}  # answered without an API key (probes)
_INFERENCE = {"/v1/completions", "/v1/chat/completions"}
_TRACED = _INFERENCE | {"/v1/responses"}
TENANT = web.RequestKey("tenant", Tenant)  # whose request it is (set by the auth middleware)
KEY_ID = web.RequestKey("key_id", str)  # how logs name the key it came with
SPAN = web.RequestKey("span", object)  # its server span (tracing on)


class Server:
    def __init__(self, engines: Sequence[AsyncEngine], cfg: ServerConfig) -> None:
        """`engines`: the replicas of one model (`jaxserve.engine.async_engine.engine_replicas`), used
        only through their interface. A request goes, whole, to the least loaded replica."""
        self.cfg = cfg
        self.engines = list(engines)
        model = self.engines[0].info  # the same in every replica
        self.model_name = cfg.served_model_name or model.name
        self.tokenizer = model.tokenizer
        self.max_model_len = model.max_model_len
        self.vocab_size = model.vocab_size
        self.keys = load_keys(cfg.api_keys_file) if cfg.api_keys_file else KeyTable.unlimited(cfg.api_keys) if cfg.api_keys else None
        self.quotas = Quotas()
        self.usage = UsageLedger(cfg.cost_per_hour)
        self.metrics = Metrics(self.engines, self.model_name, self.usage)
        self.tracing = Tracing(cfg.otlp_traces_endpoint) if cfg.otlp_traces_endpoint else None
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        self.response_store = ResponseStore()  # conversations behind previous_response_id
        self.load = [0] * len(self.engines)  # engine requests (one per prompt) accepted and not yet answered, per replica

    # ---- application ---------------------------------------------------------------------

    def app(self) -> web.Application:
        traced = [self._trace] if self.tracing is not None else []
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[*traced, self._errors, self._cors, self._auth])
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/responses", self.responses),
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
        )
        app.on_response_prepare.append(self._rate_headers)
        return app

    def reload_keys(self) -> None:
        """Read the keys file again (SIGHUP); a bad file leaves the old one in force. Requests in flight
        keep the tenant they were admitted as; spent budgets carry over to the new limits."""
        if not self.cfg.api_keys_file:
            log.warning("SIGHUP: no --api-keys-file to reload")
            return
        try:
            self.keys = load_keys(self.cfg.api_keys_file)
        except UserError as e:
            log.error("keys file not reloaded; the previous one stays in force: %s", e)
            return
        self.quotas.reload(self.keys.tenants.values())
        log.info("keys file reloaded", extra={"keys": len(self.keys.entries), "tenants": len(self.keys.tenants)})

    async def start(self) -> None:
        """Start the engine, then compile every step shape (off the event loop) and become ready."""
        for engine in self.engines:
            engine.start()
        if self.cfg.warmup:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(None, e.warmup) for e in self.engines))
        self.ready = True
        self.metrics.ready.set(1)
        self.usage.start()
        log.info("ready", extra={"model": self.model_name, "compiles": self.engines[0].stats().compiles})

    async def drain(self) -> None:
        """Refuse new requests, give those in flight up to drain_timeout, then stop the engine."""
        self.draining = True
        self.metrics.ready.set(0)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", extra={"unfinished": self.in_flight})
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every engine; requests still running end with finish_reason "abort". Then export the spans still buffered."""
        await asyncio.gather(*(e.shutdown() for e in self.engines))
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    @property
    def in_flight(self) -> int:
        """Engine requests (one per prompt) accepted and not yet answered, over all replicas."""
        return sum(self.load)

    @property
    def engine_error(self) -> BaseException | None:
        return next((e.error for e in self.engines if e.error is not None), None)

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
        except Exception as e:  # a bug in one request: a 500 for it, the server carries on
            log.exception("unhandled error", extra={"path": request.path})
            response = self._error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error"))
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        self.metrics.http.labels(endpoint, str(response.status)).inc()
        tenant: Tenant | None = request.get(TENANT)
        if tenant is not None and response.status >= 400 and response.status != 429:  # a tenant's 429s are counted where its quota refused
            self.usage.record(tenant.name, errors=1)
        return response

    @web.middleware
    async def _trace(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """A server span for each inference request (tracing on); its logs carry the trace id."""
        if request.path not in _TRACED:
            return await handler(request)
        assert self.tracing is not None
        span = self.tracing.server_span(request.method, request.path, request.headers)
        request[SPAN] = span
        token = TRACE_ID.set(trace_id(span))
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            finish_server_span(span, status)
            TRACE_ID.reset(token)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in self.cfg.cors_origins or origin in self.cfg.cors_origins)
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
        keys = self.keys
        if keys is None:
            request[TENANT] = ANONYMOUS
        elif request.path not in _OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            found = keys.find(header[7:]) if header.startswith("Bearer ") else None
            if found is None:
                raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", type="authentication_error", code="invalid_api_key")
            request[KEY_ID], request[TENANT] = key_id(found[0]), found[1]
        return await handler(request)

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """OpenAI's `x-ratelimit-*` headers on every answer to a tenant with limits."""
        tenant: Tenant | None = request.get(TENANT)
        if tenant is not None and tenant.limited:
            response.headers.update(self.quotas.of(tenant).headers(self.quotas.clock()))

    def _error(self, e: ApiError) -> web.Response:
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after or 1)))} if e.status == 429 else None
        return web.json_response(e.body(), status=e.status, headers=headers)

    # ---- inference -----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        """The JSON object sent, over the server's default sampling fields."""
        try:
            raw = await request.read()
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return {**dict(self.cfg.default_sampling), **{k: v for k, v in body.items() if v is not None}}

    def _admit(self, body: dict, request: web.Request) -> None:
        """Refusals that come before parsing: not ready, draining, unknown model or one the tenant may not
        use, queue full."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="service_unavailable")
        if not self.ready:
            raise ApiError(503, "the model is still warming up; retry when /ready answers 200", type="service_unavailable")
        if self.engine_error is not None:
            raise ApiError(503, f"the engine stopped after an error: {self.engine_error}", type="service_unavailable")
        self._admit_model(body)
        tenant: Tenant = request[TENANT]
        if not tenant.may_use(self.model_name):
            raise ApiError(403, f"this API key may not use the model '{self.model_name}'", "model", "permission_error", "model_not_allowed")
        waiting = self.in_flight - sum(e.stats().running for e in self.engines)
        if waiting >= self.cfg.max_waiting:
            raise ApiError(429, f"too many requests waiting ({waiting}); retry later", type="rate_limit_error")

    async def _check(self, req: Request, engine: AsyncEngine, trace: RequestTrace | None) -> CheckedRequest:
        """Every engine-level check (grammar, context length, token ids) of every prompt, once, before
        any starts; a 400 naming the request's own field for a bad one."""
        try:
            checked = await engine.check(req.prompts, req.params)
        except UserError as e:
            prompt = "prompt" if req.kind == "completion" else "input" if req.responses is not None else "messages"
            param = {"guide": req.guide_param, "prompt": prompt}.get(e.param, e.param)
            raise ApiError(400, str(e), param, code=e.code) from None
        if checked.grammar_seconds is not None:
            self.metrics.grammar_compile.labels(self.model_name).observe(checked.grammar_seconds)
            if trace is not None:
                trace.grammar_compile(checked.grammar_seconds)
        return checked

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._admit(body, request)
        return await self._serve(request, parse_completion(body, self.tokenizer, self.model_name, self.max_model_len))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._admit(body, request)
        return await self._serve(request, parse_chat(body, self.tokenizer, self.model_name, self.max_model_len))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API, computed as the chat request it amounts to."""
        body = await self._body(request)
        self._admit(body, request)
        chat, extra = chat_body(body, self.response_store)
        req = parse_chat(chat, self.tokenizer, self.model_name, self.max_model_len)
        return await self._serve(request, dataclasses.replace(req, responses=extra))

    def _grant(self, request: web.Request, req: Request) -> tuple[TenantQuota, Admission]:
        """The tenant's quota, taken for this request (429 when a limit says no, 400 when it never
        could say yes), and the request's admission."""
        tenant: Tenant = request[TENANT]
        quota = self.quotas.of(tenant)
        now = self.quotas.clock()
        refusal = quota.refusal(req.prompt_tokens, now)
        if refusal is not None and refusal.status == 400:
            raise ApiError(400, refusal.message, "prompt", code="exceeds_tenant_limit")
        if refusal is not None:
            self.usage.record(tenant.name, rate_limited=1)
            raise ApiError(429, refusal.message, type="rate_limit_error", code="rate_limit_exceeded", retry_after=refusal.retry_after)
        quota.admit(req.prompt_tokens, now)
        return quota, Admission(priority=with_priority(tenant, req.priority), tenant=tenant.name, weight=tenant.weight)

    async def _serve(self, request: web.Request, req: Request) -> web.StreamResponse:
        # Counted from here (no await since the admission check), so a burst cannot overshoot max_waiting.
        quota, admission = self._grant(request, req)
        span = request.get(SPAN)
        admission = dataclasses.replace(admission, timeline=span is not None and span.is_recording())
        replica = min(range(len(self.engines)), key=self.load.__getitem__)
        engine = self.engines[replica]
        self.load[replica] += len(req.prompts)
        trace = error = None
        try:
            trace = self._request_trace(request, req, admission)
            try:
                checked = await self._check(req, engine, trace)
            except ApiError:  # the engine refused it: it costs its tenant nothing
                quota.refund(req.prompt_tokens, self.quotas.clock())
                raise
            self.usage.record(admission.tenant, requests=1, prompt_tokens=req.prompt_tokens)
            if req.params.guide is not None:
                self.metrics.structured.labels(self.model_name, req.guide_param).inc()
            log.info("request", extra={"request_id": req.request_id, "kind": req.kind, "prompts": len(req.prompts), "n": req.params.n,
                                       "stream": req.stream, "priority": admission.priority, "tenant": admission.tenant,
                                       "key_id": request.get(KEY_ID)})
            outputs = self._outputs(req, checked, engine, admission, quota, trace)
            if req.stream:
                return await self._stream(request, req, outputs)
            return await self._whole(req, outputs)
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.load[replica] -= len(req.prompts)
            quota.in_flight -= 1
            if trace is not None:
                trace.end(error)

    def _request_trace(self, request: web.Request, req: Request, admission: Admission) -> RequestTrace | None:
        span = request.get(SPAN)
        if span is None:
            return None
        p = req.params
        response_id = req.responses.id if req.responses is not None else f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{req.request_id}"
        return self.tracing.request(span, req.kind, self.model_name, admission.tenant, response_id, p.max_tokens, p.temperature, p.top_p,
                                    req.prompt_tokens)

    async def _whole(self, req: Request, outputs: AsyncIterator[tuple[int, StepOutput]]) -> web.Response:
        render = self._renderer(req)
        try:
            async with asyncio.timeout(self.cfg.request_timeout), contextlib.aclosing(outputs):
                async for i, out in outputs:
                    render.add(i, out)
        except TimeoutError:
            raise ApiError(504, f"the request took longer than {self.cfg.request_timeout} s", type="timeout_error") from None
        except RequestFailedError as e:
            raise ApiError(500, f"the request failed: {e}", type="internal_server_error") from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), type="service_unavailable") from None
        return web.json_response(render.response())

    async def _outputs(self, req: Request, checked: CheckedRequest, engine: AsyncEngine, admission: Admission,
                       quota: TenantQuota, trace: RequestTrace | None) -> AsyncIterator[tuple[int, StepOutput]]:
        """(prompt index, step output) of every prompt, as the engine merges them; records latency
        and token metrics, and spends the tenant's generated tokens as they come: when its bucket runs
        dry, every unfinished sample ends with `length` (after its last whole token). Leaving early
        aborts every prompt's request."""
        record = RequestMetrics(self.metrics, req.prompts, req.params.n, req.params.max_tokens)
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
            self.usage.record(admission.tenant, generated_tokens=generated)

    async def _stream(self, request: web.Request, req: Request, outputs: AsyncIterator[tuple[int, StepOutput]]) -> web.StreamResponse:
        """Server-sent events: the renderer's opening, its frames for each step output, then its
        closing (usage if asked, [DONE]; the Responses API's own events)."""
        render = self._renderer(req)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(frames: list[str]) -> None:
            if frames:
                await response.write("".join(frames).encode())

        await send(render.opening())
        try:
            async with asyncio.timeout(self.cfg.request_timeout), contextlib.aclosing(outputs):
                async for i, out in outputs:
                    await send(render.frames(i, out))
            await send(render.closing())
        except (TimeoutError, RequestFailedError, EngineDeadError) as e:
            message = f"the request took longer than {self.cfg.request_timeout} s" if isinstance(e, TimeoutError) else str(e)
            await send(render.failure(message) + ([sse("[DONE]")] if req.responses is None else []))
        await response.write_eof()
        return response

    def _renderer(self, req: Request) -> Renderer:
        return ResponsesRenderer(req, self.tokenizer) if req.responses is not None else renderer(req, self.tokenizer)

    # ---- other endpoints -----------------------------------------------------------------

    def _model_card(self) -> dict:
        limits, info = self.engines[0].limits, self.engines[0].info
        metadata = {"weights": info.weights, "kv_cache_dtype": limits.kv_cache_dtype, "kv_cache_tokens": limits.kv_cache_tokens,
                    "kv_cache_scales": limits.kv_cache_scales}
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "jaxserve", "max_model_len": self.max_model_len,
                "metadata": metadata}

    async def models(self, request: web.Request) -> web.Response:
        """The served model, unless the key's tenant may not use it."""
        cards = [self._model_card()] if request[TENANT].may_use(self.model_name) else []
        return web.json_response({"object": "list", "data": cards})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name or not request[TENANT].may_use(self.model_name):
            raise ApiError(404, f"the model '{request.match_info['model']}' does not exist", "model", "not_found_error", "model_not_found")
        return web.json_response(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._admit_model(body)
        if isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True) is not False)
        elif "messages" in body:
            ids = chat_prompt(body, self.tokenizer)[0]  # exactly what /v1/chat/completions renders
        else:
            raise ApiError(400, "send 'prompt' (a string) or 'messages'", "prompt")
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}
        if body.get("return_token_strs") is True:
            out["token_strs"] = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._admit_model(body)
        ids = body.get("tokens")
        vocab = self.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ApiError(400, f"'tokens' must be an array of token ids in [0, {vocab})", "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)})

    def _admit_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'", "model", "not_found_error", "model_not_found")

    async def health(self, request: web.Request) -> web.Response:
        if self.engine_error is not None:
            return web.json_response({"status": "engine failed", "error": str(self.engine_error)}, status=503)
        return web.json_response({"status": "ok"})

    async def ready_probe(self, request: web.Request) -> web.Response:
        ok = self.ready and not self.draining and self.engine_error is None
        status = "ready" if ok else ("draining" if self.draining else "warming up")
        return web.json_response({"status": status}, status=200 if ok else 503)

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
        tallies = self.usage.window(start, end)
        if "tenant" in q:
            if q["tenant"] not in tallies:
                raise ApiError(404, f"no usage recorded for tenant '{q['tenant']}'", "tenant", "not_found_error")
            tallies = {q["tenant"]: tallies[q["tenant"]]}
        data = [{"tenant": name, "requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
                 "total_tokens": t.tokens, "errors": t.errors, "rate_limited": t.rate_limited, "cost_usd": self.usage.cost(t)}
                for name, t in sorted(tallies.items())]
        return web.json_response({"object": "usage", "start": start, "end": end, "granularity_seconds": 60,
                                  "cost_per_million_tokens": self.usage.cost_per_million_tokens(), "data": data})


async def serve(server: Server) -> int:
    """Listen, warm up, serve until SIGTERM or SIGINT, then drain and stop; the exit status. A lost
    multi-host peer also stops the server (status 1): the group cannot compute without it."""
    cfg = server.cfg
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    log.info("listening", extra={"url": f"http://{cfg.host}:{cfg.port}", "model": server.model_name})
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
