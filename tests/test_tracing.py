"""OpenTelemetry tracing: a real `jaxserve serve` posts its spans to an OTLP/HTTP receiver started
in this test, continuing the caller's W3C trace, nested and attributed as the GenAI conventions say."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.server_process import DEADLINE, SERVER_ARGS, SERVER_KEY, ServerProcess, free_port, wait_for

MODEL = "smollm2-135m-instruct"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: collects every span posted to /v1/traces."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list = []
        self.loop = asyncio.new_event_loop()

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def __enter__(self) -> Receiver:
        app = web.Application()
        app.add_routes([web.post("/v1/traces", self._traces)])
        self.runner = web.AppRunner(app)

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracing")
    with Receiver() as receiver:
        args = [*SERVER_ARGS, "--otlp-traces-endpoint", f"http://127.0.0.1:{receiver.port}/v1/traces", "--no-warmup"]
        with ServerProcess(args, folder / "log.txt", env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
            yield server, receiver


def test_spans_continue_the_callers_trace_nested_with_genai_attributes(traced) -> None:
    server, receiver = traced
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=12, temperature=0,
                                           extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    names = {"POST /v1/chat/completions", "generate_response", "queue", "prefill", "decode", "detokenize"}
    wait_for(lambda: names <= {s.name for s in receiver.spans if s.trace_id.hex() == TRACE_ID}, "every span of the request exported")
    spans = [s for s in receiver.spans if s.trace_id.hex() == TRACE_ID]
    by_name = {s.name: s for s in spans}
    root, gen = by_name["POST /v1/chat/completions"], by_name["generate_response"]
    assert root.parent_span_id.hex() == PARENT_ID and root.kind == root.SPAN_KIND_SERVER
    assert gen.parent_span_id == root.span_id
    for name in ("queue", "prefill", "decode", "detokenize"):
        assert by_name[name].parent_span_id == gen.span_id, name
    attrs = _attrs(gen)
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert attrs["gen_ai.request.max_tokens"] == 12 and attrs["gen_ai.request.temperature"] == 0.0
    assert attrs["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert attrs["jaxserve.tenant"] == "default"
    assert _attrs(root)["http.response.status_code"] == 200
    prefill_tokens = sum(_attrs(s)["jaxserve.prompt_tokens"] for s in spans if s.name == "prefill")
    assert prefill_tokens + reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens  # each uncached token once
    # phases in order, within the request
    queue, decode = by_name["queue"], by_name["decode"]
    first_prefill = min(s.start_time_unix_nano for s in spans if s.name == "prefill")
    assert root.start_time_unix_nano <= queue.start_time_unix_nano <= queue.end_time_unix_nano <= first_prefill
    assert first_prefill <= decode.start_time_unix_nano <= decode.end_time_unix_nano <= root.end_time_unix_nano
    # the JSON logs carry the trace id
    wait_for(lambda: any(r.get("msg") == "request" and r.get("trace_id") == TRACE_ID for r in server.log_records()), "the request's log line")


def test_a_bad_traceparent_starts_a_new_trace_and_grammar_compiles_are_spans(traced) -> None:
    server, receiver = traced
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0)
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A colour as JSON."}], max_tokens=20, temperature=0,
                                           response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                                           extra_headers={"traceparent": "00-not-a-trace-id-01"})
    json.loads(reply.choices[0].message.content)
    spans = wait_for(lambda: [s for s in receiver.spans if s.name == "grammar_compile"], "the grammar compile span")
    trace = spans[0].trace_id
    assert trace.hex() not in (TRACE_ID, "0" * 32)
    roots = wait_for(lambda: [s for s in receiver.spans if s.trace_id == trace and s.name == "POST /v1/chat/completions"], "its server span")
    assert roots[0].parent_span_id == b""  # a new trace: the malformed parent was ignored


def test_each_websocket_request_is_a_server_span_of_its_own(traced) -> None:
    """Requests on `/v1/stream` are traced one by one under the handshake's `traceparent`: a finished
    one is a 200 with its `generate_response` child, a refused one its 4xx, a cancelled one 499."""
    server, receiver = traced
    trace = "5cf92f3577b34da6a3ce929d0e0e4737"

    async def run() -> list[dict]:
        headers = {"Authorization": f"Bearer {SERVER_KEY}", "traceparent": f"00-{trace}-{PARENT_ID}-01"}
        done = []
        async with aiohttp.ClientSession(headers=headers) as s, s.ws_connect(server.url + "/v1/stream") as ws:
            for message in (
                {"type": "completions", "id": "ok", "body": {"model": MODEL, "prompt": "Hello", "max_tokens": 4}},
                {"type": "completions", "id": "bad", "body": {"model": MODEL, "prompt": "Hello", "max_tokens": -1}},
                {"type": "completions", "id": "cut", "body": {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}},
            ):
                await ws.send_json(message)
                while (event := await ws.receive_json(timeout=DEADLINE)).get("type") != "done":
                    if message["id"] == "cut" and event.get("choices"):
                        await ws.send_json({"type": "cancel"})
                done.append(event)
        return done

    assert [d["outcome"] for d in asyncio.run(run())] == ["finished", "refused", "cancelled"]
    roots = wait_for(lambda: (r := [s for s in receiver.spans if s.trace_id.hex() == trace and s.name == "GET /v1/stream"]) and len(r) == 3 and r,
                     "a server span for each socket request")
    assert all(r.parent_span_id.hex() == PARENT_ID and _attrs(r)["jaxserve.stream.type"] == "completions" for r in roots)
    by_status = {_attrs(r)["http.response.status_code"]: r for r in roots}
    assert set(by_status) == {200, 400, 499} and all(r.status.code != r.status.STATUS_CODE_ERROR for r in roots)
    children = wait_for(lambda: [s for s in receiver.spans if s.name == "generate_response" and s.trace_id.hex() == trace and len(s.parent_span_id)],
                        "the requests' generate_response spans")
    parents = {c.parent_span_id for c in children}
    assert by_status[200].span_id in parents and parents <= {by_status[200].span_id, by_status[499].span_id}
