"""Server lifecycle and robustness: 503 while warming up, 429 when the queue is full, SIGTERM drains,
one failing request leaves the others running, structured logs name request ids."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

import aiohttp
import pytest

from tests.server_process import DEADLINE, SERVER_ENGINE, InProcessServer, ServerProcess, get, post, until, wait_for

SMALL = ["--max-num-seqs", "1", "--max-num-batched-tokens", "128", "--num-pages", "64", "--max-model-len", "512"]


async def _complete(session: aiohttp.ClientSession, url: str, **body) -> tuple[int, dict]:
    async with session.post(url + "/v1/completions", json={"prompt": "Tell me about the sea.", **body}) as r:
        return r.status, await r.json()


def test_503_while_warming_up_then_ready(smollm2, monkeypatch) -> None:
    """While warming up the server is alive but not ready, and refuses inference with 503. The
    warm-up is held on an event, so the test sees that state whatever the machine's speed."""
    from jaxserve.engine.llm_engine import LLMEngine

    release = threading.Event()
    monkeypatch.setattr(LLMEngine, "warmup", lambda self, progress=True: release.wait(DEADLINE))
    with InProcessServer(smollm2, SERVER_ENGINE, wait_ready=False, warmup=True) as live:
        assert get(live.url + "/health")[0] == 200
        status, body = get(live.url + "/ready")
        assert status == 503 and json.loads(body)["status"] == "warming up"
        status, body = post(live.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable"
        release.set()
        wait_for(lambda: get(live.url + "/ready")[0] == 200, "ready once warm-up is done")
        status, body = post(live.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def test_429_when_full_then_sigterm_drains(tmp_path) -> None:
    args = [*SMALL, "--max-waiting", "8", "--drain-timeout", "60", "--no-warmup"]
    with ServerProcess(args, tmp_path / "log.txt") as server:
        logs = server.log_records()
        assert any(r["msg"] == "listening" for r in logs) and any(r["msg"] == "ready" for r in logs)

        # A burst of 100 requests against one running slot and 8 waiting places: the excess gets 429
        # with Retry-After, and every accepted request completes.
        async def burst() -> list[tuple[int, dict, str | None]]:
            async with aiohttp.ClientSession() as s:

                async def one(i: int) -> tuple[int, dict, str | None]:
                    async with s.post(server.url + "/v1/completions", json={"prompt": f"Number {i}:", "max_tokens": 4, "ignore_eos": True}) as r:
                        return r.status, await r.json(), r.headers.get("Retry-After")

                # The first request is admitted (running, or already done) before the other 99
                # arrive, so it and the 8 waiting places are accepted whatever the timing.
                first = asyncio.create_task(one(0))
                await until(lambda: first.done() or server_running(server.url), "the first request runs")
                return [await first, *await asyncio.gather(*(one(i) for i in range(1, 100)))]

        results = asyncio.run(burst())
        accepted = [body for status, body, _ in results if status == 200]
        refused = [(body, retry) for status, body, retry in results if status == 429]
        assert len(accepted) + len(refused) == 100 and len(refused) > 50 and len(accepted) >= 9
        assert all(body["usage"]["completion_tokens"] == 4 for body in accepted)
        assert all(body["error"]["type"] == "rate_limit_error" and retry == "1" for body, retry in refused)

        # SIGTERM once 8 streams are admitted (one running, seven waiting): they all finish, new
        # requests get 503, the process exits 0.
        async def drain() -> tuple[list, int]:
            async with aiohttp.ClientSession() as s:
                streams = [asyncio.create_task(_stream(s, server.url, i)) for i in range(8)]
                await until(lambda: server_admitted(server.url) == 8, "8 streams admitted")
                server.proc.send_signal(signal.SIGTERM)
                await until(lambda: get(server.url + "/ready")[0] == 503, "draining")
                async with s.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}) as r:
                    late = r.status
                return await asyncio.gather(*streams), late

        streams, late = asyncio.run(drain())
        assert late == 503
        assert all(finish == "length" and tokens == 16 for finish, tokens in streams), streams
        assert server.proc.wait(timeout=120) == 0
        assert any(r["msg"] == "drained" and r["unfinished"] == 0 for r in server.log_records())
        assert all("request_id" in r for r in server.log_records() if r["msg"] == "request")


def _metric(url: str, name: str) -> int:
    text = get(url + "/metrics")[1]
    return int(float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + "{"))))


def server_running(url: str) -> int:
    """Sequences in the server's running batch (its metric)."""
    return _metric(url, "jaxserve:num_requests_running")


def server_admitted(url: str) -> int:
    """Requests running or waiting (the metrics)."""
    return server_running(url) + _metric(url, "jaxserve:num_requests_waiting")


async def _stream(session: aiohttp.ClientSession, url: str, i: int) -> tuple[str | None, int]:
    """Finish reason and token count of a streamed completion."""
    finish, usage = None, 0
    body = {"prompt": f"Story {i}:", "max_tokens": 16, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    finish = chunk["choices"][0]["finish_reason"] or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
    return finish, usage


def test_a_failing_request_gets_500_and_the_others_finish(smollm2, monkeypatch) -> None:
    """Inject a host-side failure into one request (its stop-string check raises) while others run."""
    from jaxserve.engine.llm_engine import LLMEngine

    original = LLMEngine._match_stop

    def flaky(self, seq, before):
        if "BOOM" in seq.params.stop:
            raise RuntimeError("injected failure")
        return original(self, seq, before)

    monkeypatch.setattr(LLMEngine, "_match_stop", flaky)
    with InProcessServer(smollm2, SERVER_ENGINE) as live:

        async def clients() -> list[tuple[int, dict]]:
            async with aiohttp.ClientSession() as s:
                good = [_complete(s, live.url, max_tokens=12, ignore_eos=True, seed=i) for i in range(3)]
                bad = _complete(s, live.url, max_tokens=12, stop=["BOOM"], ignore_eos=True)
                return await asyncio.gather(*good, bad)

        *good, bad = asyncio.run(clients())
        assert bad[0] == 500 and "injected failure" in bad[1]["error"]["message"]
        assert all(status == 200 and body["usage"]["completion_tokens"] == 12 for status, body in good)
        status, body = asyncio.run(_once(live.url))
        assert status == 200 and body["choices"][0]["text"] is not None
        assert live.server.engines[0].stats().kv_cache_usage == 0.0


def test_every_check_runs_once_per_prompt(smollm2, monkeypatch) -> None:
    """A request's prompts are checked once each, before any starts, and never again on the way in."""
    from jaxserve.engine.llm_engine import LLMEngine

    checked, original = [], LLMEngine.check_request
    monkeypatch.setattr(LLMEngine, "check_request", lambda self, prompt_ids, params: (checked.append(list(prompt_ids)), original(self, prompt_ids, params))[1])
    with InProcessServer(smollm2, SERVER_ENGINE) as live:
        status, body = post(live.url + "/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "n": 2})
        assert status == 200 and len(json.loads(body)["choices"]) == 4
        assert checked == [[5, 6, 7], [8, 9]]
        checked.clear()
        too_long = [8] * SERVER_ENGINE.max_model_len
        status, body = post(live.url + "/v1/completions", {"prompt": [[5, 6, 7], too_long], "max_tokens": 2})
        assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
        assert checked == [[5, 6, 7], too_long] and live.server.engines[0].stats().running == 0


def test_request_timeout_and_cors(smollm2) -> None:
    with InProcessServer(smollm2, SERVER_ENGINE, request_timeout=0.5, cors_origins=("http://app.example",)) as live:

        async def run() -> tuple:
            async with aiohttp.ClientSession() as s:
                slow = await _complete(s, live.url, max_tokens=400, ignore_eos=True)
                text = ""
                body = {"prompt": "Go on:", "max_tokens": 400, "ignore_eos": True, "stream": True}
                async with s.post(live.url + "/v1/completions", json=body) as r:
                    text = await r.text()
                preflight = await s.options(live.url + "/v1/completions", headers={"Origin": "http://app.example"})
                allowed = await s.get(live.url + "/health", headers={"Origin": "http://app.example"})
                other = await s.get(live.url + "/health", headers={"Origin": "http://evil.example"})
                return slow, text, preflight, allowed, other

        (status, body), stream, preflight, allowed, other = asyncio.run(run())
        assert status == 504 and body["error"]["type"] == "timeout_error"
        events = [line[6:] for line in stream.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "longer than 0.5 s" in json.loads(events[-2])["error"]["message"]
        assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert allowed.headers.get("Access-Control-Allow-Origin") == "http://app.example"
        assert "Access-Control-Allow-Origin" not in other.headers
        # the timed-out requests were aborted: their pages come back
        stats = live.server.engines[0].stats
        wait_for(lambda: stats().kv_cache_usage == 0.0 and stats().running + stats().waiting == 0, "the timed-out requests' pages are free")


async def _once(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        return await _complete(s, url, max_tokens=3)


@pytest.mark.parametrize("env,args,expected", [({"JAXSERVE_PORT": "notaport"}, [], "JAXSERVE_PORT"), ({}, ["--max-waiting", "0"], "max_waiting")])
def test_bad_server_configuration_is_a_clear_error(tmp_path, env, args, expected) -> None:
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 2 and expected in proc.stderr
