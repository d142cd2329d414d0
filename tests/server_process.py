"""Start `jaxserve serve` as a real process on 127.0.0.1 and wait until it answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: dict, key: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "jaxserve", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

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

    def __init__(self, model, engine_cfg, **server_options) -> None:
        from jaxserve.config import ServerConfig
        from jaxserve.server.app import Server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = Server(model, engine_cfg, ServerConfig(port=self.port, warmup=False, **server_options))

    def __enter__(self) -> InProcessServer:
        import asyncio
        import threading

        from aiohttp import web

        async def start() -> web.AppRunner:
            runner = web.AppRunner(self.server.app(), handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            await self.server.start()
            return runner

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = self._run(start())
        return self

    def _run(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def __exit__(self, *exc) -> None:
        import asyncio

        async def stop() -> None:
            await asyncio.gather(*(r.shutdown() for r in self.server.replicas))

        self._run(stop())
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
