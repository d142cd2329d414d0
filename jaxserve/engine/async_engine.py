"""The engine for servers: `async for out in engine.generate(...)`, with device work off the event loop.

One background thread owns the `LLMEngine` and runs its step loop; asyncio callers talk to it only
through a thread-safe command queue (add, abort) and receive outputs through per-request asyncio
queues filled with `call_soon_threadsafe`. Requests are checked in the caller, so a bad one raises
before it reaches the engine thread. A caller that stops iterating (a client that went away) aborts
its request, and its pages are freed before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.outputs import StepOutput
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight got this error and no new ones are accepted."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; the engine and every other request carry on."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        # Streams by engine-side id: each call gets a fresh one, so outputs still in flight for an
        # ended request can never reach a new request that reuses its id.
        self._streams: dict[str, asyncio.Queue] = {}
        self._active: set[str] = set()  # caller request ids in flight
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.on_step: Callable[[LLMEngine], None] | None = None  # called on the engine thread after each step

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread; requests still running end with finish_reason "abort"."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- requests ------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[StepOutput]:
        """Outputs of every sample of one request as steps produce them, until all have finished."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        if request_id in self._active:
            raise UserError(f"request id {request_id!r} is already in use")
        engine_id = f"{request_id}#{next(self._ids)}"
        self.engine.check_request(engine_id, prompt_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = stream
        self._active.add(request_id)
        self._send(("add", engine_id, prompt_ids, params, priority))
        unfinished = set(range(params.n))
        try:
            while unfinished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    unfinished.clear()
                    raise out
                if out.finish_reason == "error":
                    unfinished.clear()
                    raise RequestFailedError(out.text)
                if out.finish_reason:
                    unfinished.discard(out.index)
                yield dataclasses.replace(out, request_id=request_id)
        finally:
            self._streams.pop(engine_id, None)
            self._active.discard(request_id)
            if unfinished:  # the caller stopped listening: free the request's pages
                self._send(("abort", engine_id))

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its pages free at the next step."""
        for engine_id in [e for e in self._streams if e.rpartition("#")[0] == request_id]:
            self._send(("abort", engine_id))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------

    def _deliver(self, engine_id: str, item: StepOutput | BaseException) -> None:
        """On the event loop: hand an output to its request's stream, if anyone still listens."""
        stream = self._streams.get(engine_id)
        if stream is not None:
            stream.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        """On the event loop: end every stream with `error` (registration happens on this thread too,
        so no stream can slip in between)."""
        for stream in self._streams.values():
            stream.put_nowait(error)

    def _post(self, engine_id: str, item: StepOutput | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, engine_id, item)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, engine_id, prompt_ids, params, priority = command
                try:
                    self.engine.add_request(engine_id, prompt_ids, params, priority)
                except UserError as e:  # checked in the caller already; only a race gets here
                    self._post(engine_id, e)
            else:
                for out in self.engine.abort(command[1]):
                    self._post(out.request_id, out)

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                for out in outputs:
                    self._post(out.request_id, out)
                if self.on_step is not None:
                    self.on_step(self.engine)
            self._apply_commands()
            for engine_id in list(self.engine.seqs):  # shutting down: end what still runs
                for out in self.engine.abort(engine_id):
                    self._post(out.request_id, out)
        except BaseException as e:  # the engine's state is unknown now: fail everything in flight
            log.exception("engine loop failed")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine stopped after an error: {e}"))
