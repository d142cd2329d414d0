"""Start `jaxserve serve` as a real process on 127.0.0.1 and wait until it answers."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from jaxserve.config import EngineConfig

DEADLINE = 60.0  # seconds any wait in a test may take: generous, since a loaded machine is slow, never a check of speed
HTTP_TIMEOUT = 600.0  # seconds one request may take: it may compile step shapes first


# One shape set for every SmolLM2 server in the tests and the offline engines they are compared with:
# the first warm-up compiles it, the others load it from the compile cache. Room for 16 running
# requests; a small prefill budget keeps the set small.
SERVER_ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=128, num_pages=256, max_model_len=2048)


def engine_flags(cfg: EngineConfig) -> list[str]:
    """`jaxserve serve` flags for an engine's limits."""
    names = ("max_num_seqs", "max_num_batched_tokens", "num_pages", "max_model_len")
    return [x for name in names for x in (f"--{name.replace('_', '-')}", str(getattr(cfg, name)))]


SERVER_KEY = "sk-test-key"
# The shared SmolLM2 server's command line (conftest's `smollm2_server`): the test servers' limits, an
# API key and a body limit small enough to test.
SERVER_ARGS = [*engine_flags(SERVER_ENGINE), "--api-key", SERVER_KEY, "--max-body-bytes", "200000"]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something true (returned); fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f} s: {what}")
        time.sleep(interval)
    return value


async def until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """`wait_for` on an event loop: `condition` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f} s: {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: dict, key: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "jaxserve", "serve", "--port", str(self.port), *args]
        # Stacked layers unless a test says otherwise: a short-lived server compiles ~9x faster.
        env = {"JAXSERVE_UNROLL_LAYERS": "false", **os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> ServerProcess:
        """Wait until ready; the process is stopped on leaving, or if it never gets ready."""
        try:
            self.wait()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, path: str = "/ready", timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if get(self.url + path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not answering {path}:\n{self.log.read_text()[-3000:]}")

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class InProcessServer:
    """A `Server` on a free port in a background event loop of this process, so a test can reach
    into it (inject faults, read engine state). Use as a context manager."""

    def __init__(self, model, engine_cfg, wait_ready: bool = True, **server_options) -> None:
        """`wait_ready`: enter once the server is ready (else as soon as it listens)."""
        from jaxserve.config import ServerConfig
        from jaxserve.engine.async_engine import engine_replicas
        from jaxserve.server.app import Server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready = wait_ready
        self.server = Server(engine_replicas(model, engine_cfg), ServerConfig(port=self.port, **{"warmup": False, **server_options}))

    def __enter__(self) -> InProcessServer:
        import threading

        from aiohttp import web

        async def start() -> web.AppRunner:
            runner = web.AppRunner(self.server.app(), handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.started = asyncio.ensure_future(self.server.start())
            return runner

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = self._run(start())
        if self.wait_ready:
            self._run(self._started())
        return self

    async def _started(self) -> None:
        await self.started

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self.started.cancel()
            await self.server.shutdown()

        self._run(stop())
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
