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
import time

import aiohttp
import pytest

from jaxserve.config import EngineConfig, ServerConfig
from tests.server_process import ServerProcess, free_port, get, post

SMALL = ["--max-num-seqs", "1", "--max-num-batched-tokens", "128", "--num-pages", "64", "--max-model-len", "512"]


async def _complete(session: aiohttp.ClientSession, url: str, **body) -> tuple[int, dict]:
    async with session.post(url + "/v1/completions", json={"prompt": "Tell me about the sea.", **body}) as r:
        return r.status, await r.json()


def test_warmup_then_429_then_sigterm_drains(tmp_path) -> None:
    # A context length no earlier run used: its step shapes are not in the compile cache, so warm-up
    # takes long enough to be observed.
    max_len = 640 + 128 * (time.time_ns() // 1000 % 40)
    args = [*SMALL[:-1], str(max_len), "--max-waiting", "1", "--drain-timeout", "60"]
    server = ServerProcess(args, tmp_path / "log.txt")
    try:
        # While warming up the server is alive but not ready, and refuses inference with 503.
        server.wait("/health")
        refused_while_warming = 0
        while get(server.url + "/ready")[0] != 200:
            status, body = post(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            if get(server.url + "/ready")[0] != 200:  # still warming after the request was answered
                assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable"
                refused_while_warming += 1
            time.sleep(0.2)
        assert refused_while_warming > 0
        logs = server.log_records()
        assert any(r["msg"] == "listening" for r in logs) and any(r["msg"] == "ready" for r in logs)

        async def crowd() -> list[tuple[int, dict]]:
            async with aiohttp.ClientSession() as s:
                first = asyncio.create_task(_complete(s, server.url, max_tokens=60, ignore_eos=True))
                await asyncio.sleep(0.5)  # running (one slot)
                second = asyncio.create_task(_complete(s, server.url, max_tokens=60, ignore_eos=True))
                await asyncio.sleep(0.5)  # waiting (the queue holds one)
                async with s.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                    third = (r.status, await r.json(), r.headers.get("Retry-After"))
                return [await first, await second, third]

        first, second, third = asyncio.run(crowd())
        assert first[0] == 200 and second[0] == 200
        assert third[0] == 429 and third[1]["error"]["type"] == "rate_limit_error" and third[2] == "1"

        # SIGTERM while a request is in flight: it still completes, new requests get 503, exit code 0.
        async def drain() -> tuple[tuple[int, dict], int]:
            async with aiohttp.ClientSession() as s:
                running = asyncio.create_task(_complete(s, server.url, max_tokens=40, ignore_eos=True))
                await asyncio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with s.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}) as r:
                    late = r.status
                return await running, late

        (status, body), late = asyncio.run(drain())
        assert status == 200 and body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 40
        assert late == 503
        assert server.proc.wait(timeout=60) == 0
        assert any(r["msg"] == "drained" and r["unfinished"] == 0 for r in server.log_records())
        assert all("request_id" in r for r in server.log_records() if r["msg"] == "request")
    finally:
        server.stop()


def test_a_failing_request_gets_500_and_the_others_finish(smollm2, monkeypatch) -> None:
    """Inject a host-side failure into one request (its stop-string check raises) while others run."""
    from aiohttp import web

    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.server.app import Server

    original = LLMEngine._match_stop

    def flaky(self, seq, before):
        if "BOOM" in seq.params.stop:
            raise RuntimeError("injected failure")
        return original(self, seq, before)

    monkeypatch.setattr(LLMEngine, "_match_stop", flaky)
    port = free_port()
    server = Server(smollm2, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, num_pages=64, max_model_len=512), ServerConfig(port=port, warmup=False))
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def run_server() -> web.AppRunner:
        runner = web.AppRunner(server.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await server.start()
        started.set()
        return runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(run_server(), loop).result(timeout=120)
    url = f"http://127.0.0.1:{port}"
    try:
        async def clients() -> list[tuple[int, dict]]:
            async with aiohttp.ClientSession() as s:
                good = [_complete(s, url, max_tokens=12, ignore_eos=True, seed=i) for i in range(3)]
                bad = _complete(s, url, max_tokens=12, stop=["BOOM"], ignore_eos=True)
                return await asyncio.gather(*good, bad)

        *good, bad = asyncio.run(clients())
        assert bad[0] == 500 and "injected failure" in bad[1]["error"]["message"]
        assert all(status == 200 and body["usage"]["completion_tokens"] == 12 for status, body in good)
        status, body = asyncio.run(_once(url))
        assert status == 200 and body["choices"][0]["text"] is not None
        assert server.llm.blocks.usage == 0.0
    finally:
        asyncio.run_coroutine_threadsafe(server.engine.shutdown(), loop).result(timeout=60)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)


async def _once(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        return await _complete(s, url, max_tokens=3)


@pytest.mark.parametrize("env,args,expected", [({"JAXSERVE_PORT": "notaport"}, [], "JAXSERVE_PORT"), ({}, ["--max-waiting", "0"], "max_waiting")])
def test_bad_server_configuration_is_a_clear_error(tmp_path, env, args, expected) -> None:
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 2 and expected in proc.stderr
