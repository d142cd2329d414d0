"""The WebSocket stream `/v1/stream` against SmolLM2 on a real server, driven by aiohttp's WebSocket
client; and the routes that a root path (`--root-path`) and `--no-ui` change."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.server_process import SERVER_ENGINE, SERVER_KEY, InProcessServer, until

MODEL = "smollm2-135m-instruct"
AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24, "temperature": 0,
        "stream_options": {"include_usage": True}}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
LONG = {"model": MODEL, "prompt": "Count slowly to one thousand:", "max_tokens": 1000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


async def _request(ws: aiohttp.ClientWebSocketResponse, kind: str, body: dict, tag: str = "r") -> tuple[list[dict], dict]:
    """Send one request; every message up to its `done`, and the `done`."""
    await ws.send_json({"type": kind, "id": tag, "body": body})
    return await _request_rest(ws)


async def _request_rest(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict], dict]:
    """The messages of a request already sent, up to its `done`, and the `done`."""
    events = []
    while (event := await ws.receive_json(timeout=600)).get("type") != "done":
        events.append(event)
    return events, event


async def _sse(session: aiohttp.ClientSession, url: str, path: str, body: dict) -> list[dict]:
    """The data events of an SSE stream, up to [DONE]."""
    events = []
    async with session.post(url + path, json={**body, "stream": True}) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                events.append(json.loads(line[6:]))
    return events


def _choices(events: list[dict]) -> list:
    return [e["choices"] for e in events]


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("jaxserve:")}


def _total(values: dict[str, float], name: str, label: str = "") -> float:
    """A metric summed over its series (those whose labels include `label`)."""
    return sum(v for k, v in values.items() if k.split("{")[0] == name and label in k)


def _aborted(values: dict[str, float]) -> float:
    return _total(values, "jaxserve:request_success_total", 'finished_reason="abort"')


async def _idle(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    values = await _metrics(session, url)
    return values if _total(values, "jaxserve:num_requests_running") == 0 and _total(values, "jaxserve:kv_cache_usage_perc") == 0 else None


def test_socket_streams_equal_sse_one_request_after_another(server) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as s:  # (salted apart: each prefills its prompt whole)
            sse_chat = await _sse(s, server.url, "/v1/chat/completions", {**CHAT, "cache_salt": "sse"})
            sse_completion = await _sse(s, server.url, "/v1/completions", {**COMPLETION, "cache_salt": "sse"})
            async with s.ws_connect(server.url + "/v1/stream") as ws:
                chat, chat_done = await _request(ws, "chat.completions", {**CHAT, "cache_salt": "socket"}, "a")
                completion, completion_done = await _request(ws, "completions", {**COMPLETION, "stream": False, "cache_salt": "socket"}, "b")
                responses, _ = await _request(ws, "responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 4}, "c")
        assert chat_done == {"type": "done", "id": "a", "outcome": "finished"}
        assert completion_done == {"type": "done", "id": "b", "outcome": "finished"}
        # The same chunks as SSE's (ids and times aside): the role chunk, the text, the finish, the usage.
        assert _choices(chat) == _choices(sse_chat) and len(chat) > 5
        assert chat[0]["object"] == "chat.completion.chunk" and chat[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chat[-1]["usage"] == sse_chat[-1]["usage"] and chat[-1]["usage"]["completion_tokens"] > 0
        assert _choices(completion) == _choices(sse_completion)  # streamed whatever `stream` says
        assert "".join(c["choices"][0]["text"] for c in completion) == "".join(c["choices"][0]["text"] for c in sse_completion) != ""
        assert [e["type"] for e in responses][:2] == ["response.created", "response.in_progress"]
        assert responses[-1]["type"] == "response.incomplete"  # 4 tokens: cut short

    asyncio.run(run())


def test_cancel_and_closing_the_socket_abort_and_free_the_pages(server) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as s:
            before = _aborted(await _metrics(s, server.url))
            async with s.ws_connect(server.url + "/v1/stream") as ws:
                await ws.send_json({"type": "completions", "id": "long", "body": LONG})
                for _ in range(4):  # the role-less completion stream: text chunks
                    assert "choices" in await ws.receive_json(timeout=600)
                await ws.send_json({"type": "cancel"})
                while (event := await ws.receive_json(timeout=600)).get("type") != "done":
                    assert event["choices"][0]["finish_reason"] is None  # nothing finishes it but the cancel
                assert event == {"type": "done", "id": "long", "outcome": "cancelled"}
                values = await until(lambda: _idle(s, server.url), "the cancelled request's pages free")
                assert _aborted(values) == before + 1
                # The socket goes on: the next request runs to its end, even sent right behind a cancel.
                await ws.send_json({"type": "completions", "id": "again", "body": LONG})
                assert "choices" in await ws.receive_json(timeout=600)
                await ws.send_json({"type": "cancel"})
                await ws.send_json({"type": "completions", "id": "next", "body": COMPLETION})
                events = []
                while not (events and events[-1] == {"type": "done", "id": "next", "outcome": "finished"}):
                    events.append(await ws.receive_json(timeout=600))
                dones = [e for e in events if e.get("type") in ("done", "error")]
                assert dones == [{"type": "done", "id": "again", "outcome": "cancelled"}, events[-1]]
                assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")

            async with s.ws_connect(server.url + "/v1/stream") as ws:
                await ws.send_json({"type": "completions", "body": LONG})
                assert "choices" in await ws.receive_json(timeout=600)
            # Closed mid-stream: aborted like an HTTP hang-up.
            values = await until(lambda: _idle(s, server.url), "the abandoned request's pages free")
            assert _aborted(values) == before + 3

            async with s.ws_connect(server.url + "/v1/stream") as ws:  # cancelled right behind its request, before it began
                for attempt in range(3):
                    await ws.send_json({"type": "completions", "id": f"at-once-{attempt}", "body": LONG})
                    await ws.send_json({"type": "cancel"})
                    _, done = await _request(ws, "completions", COMPLETION, "after")
                    assert done == {"type": "done", "id": f"at-once-{attempt}", "outcome": "cancelled"}  # before the next request's
                    events, done = await _request_rest(ws)
                    assert done == {"type": "done", "id": "after", "outcome": "finished"}
                    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    asyncio.run(run())


def test_socket_auth_validation_and_limits_are_http_s(server) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(server.url + "/v1/stream")
            assert refused.value.status == 401
            for protocols, origin, status in (
                (("jaxserve.v1", "openai-insecure-api-key.wrong"), None, 401),
                ((f"openai-insecure-api-key.{SERVER_KEY}",), None, 400),  # ours not offered: the key would go unanswered
                (("jaxserve.v1", f"openai-insecure-api-key.{SERVER_KEY}"), "http://elsewhere.example", 403),  # another site's page
                (("jaxserve.v1", f"openai-insecure-api-key.{SERVER_KEY}"), "http://[", 403),  # not a URL: no page of ours
            ):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await s.ws_connect(server.url + "/v1/stream", protocols=protocols, origin=origin)
                assert refused.value.status == status, protocols
            async with s.get(server.url + "/v1/stream", headers=AUTH) as r:  # not a WebSocket handshake
                assert r.status == 400 and "WebSocket" in (await r.json())["error"]["message"]
            # A browser's key, as a subprotocol, from a page of this server; the stream answers with its own subprotocol.
            async with s.ws_connect(server.url + "/v1/stream", protocols=("jaxserve.v1", f"openai-insecure-api-key.{SERVER_KEY}"),
                                    origin=server.url) as ws:
                assert ws.protocol == "jaxserve.v1"
                await ws.send_str("not json")
                bad = await ws.receive_json(timeout=60)
                assert bad["type"] == "error" and bad["status"] == 400 and "not valid JSON" in bad["error"]["message"]
                # A request HTTP would refuse is refused the same way, then done; the socket stays open.
                for kind, body, param in (("completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"), ("completions", {**COMPLETION, "model": "nope"}, "model"),
                                          ("completions", [], "body"), ("embeddings", {}, "type")):
                    events, done = await _request(ws, kind, body, "bad")
                    assert done == {"type": "done", "id": "bad", "outcome": "refused"}
                    assert len(events) == 1 and events[0]["id"] == "bad" and events[0]["status"] in (400, 404) and events[0]["error"]["param"] == param, events
                # One request at a time: a second is refused while the first goes on to its end.
                await ws.send_json({"type": "completions", "id": "first", "body": {**COMPLETION, "max_tokens": 64, "ignore_eos": True}})
                second, done = await _request(ws, "completions", COMPLETION, "second")
                assert done["id"] == "second" and done["outcome"] == "refused"
                assert [e["status"] for e in second if e.get("type") == "error"] == [409]
                while (event := await ws.receive_json(timeout=600)).get("type") != "done":
                    pass
                assert event == {"type": "done", "id": "first", "outcome": "finished"}
            async with s.ws_connect(server.url + "/v1/stream", headers=AUTH) as ws:  # the body limit is HTTP's
                await ws.send_json({"type": "completions", "body": {**COMPLETION, "prompt": "x" * 300_000}})
                closed = await ws.receive(timeout=60)
                assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    asyncio.run(run())
    assert not [r for r in server.log_records() if r["level"] == "error"]  # (the closed socket is not a failure)


def test_root_path_serves_every_route_under_the_prefix_and_the_playground(smollm2) -> None:
    with InProcessServer(smollm2, SERVER_ENGINE, root_path="/llm") as live:
        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                for path in ("/llm/v1/models", "/v1/models"):  # a proxy that keeps the prefix, and one that strips it
                    async with s.get(live.url + path) as r:
                        assert r.status == 200 and (await r.json())["data"][0]["id"] == MODEL
                async with s.post(live.url + "/llm/v1/completions", json={**COMPLETION, "max_tokens": 2}) as r:
                    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
                async with s.ws_connect(live.url + "/llm/v1/stream") as ws:
                    _, done = await _request(ws, "completions", {**COMPLETION, "max_tokens": 2})
                    assert done["outcome"] == "finished"
                async with s.get(live.url + "/llm", allow_redirects=False) as r:  # relative URLs need the slash
                    assert r.status == 308 and r.headers["Location"] == "/llm/"
                for path, kind in (("/llm/", "text/html"), ("/llm/ui/playground.js", "text/javascript"), ("/llm/ui/playground.css", "text/css")):
                    async with s.get(live.url + path) as r:
                        assert r.status == 200 and r.content_type == kind, path
                        assert "script-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["X-Content-Type-Options"] == "nosniff"
                async with s.get(live.url + "/llm/ui/../app.py") as r:
                    assert r.status == 404
                async with s.get(live.url + "/llm/metrics") as r:  # one endpoint label whichever way a route was reached
                    metrics = await r.text()
                assert 'endpoint="/v1/models",status="200"} 2.0' in metrics and 'endpoint="/llm/v1/models"' not in metrics

        asyncio.run(run())


def test_a_key_revoked_by_a_reload_stops_serving_an_open_socket(smollm2, tmp_path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text('keys:\n  "sk-one":\n    tenant: one\n  "sk-two":\n    tenant: two\n')
    with InProcessServer(smollm2, SERVER_ENGINE, api_keys_file=str(keys)) as live:
        async def run() -> None:
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-one"}) as s:
                async with s.ws_connect(live.url + "/v1/stream") as ws:
                    assert (await _request(ws, "completions", {**COMPLETION, "max_tokens": 2}))[1]["outcome"] == "finished"
                    keys.write_text('keys:\n  "sk-two":\n    tenant: two\n')
                    live.server.reload_keys()  # (what SIGHUP does)
                    events, done = await _request(ws, "completions", {**COMPLETION, "max_tokens": 2})
                    assert done["outcome"] == "refused" and events[0]["status"] == 401

        asyncio.run(run())


def test_no_ui_serves_no_page(smollm2) -> None:
    with InProcessServer(smollm2, SERVER_ENGINE, ui=False, api_keys=("k",)) as live:
        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                for path in ("/", "/ui/playground.js"):
                    async with s.get(live.url + path, headers={"Authorization": "Bearer k"}) as r:
                        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
                async with s.get(live.url + "/health") as r:
                    assert r.status == 200

        asyncio.run(run())
