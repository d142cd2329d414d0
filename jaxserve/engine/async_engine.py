"""The engine for servers, and the one interface they use (`jaxserve.engine.interface`):
`checked = await engine.check(prompts, params)`, then `async for i, out in engine.generate(id, checked)`,
with device work off the event loop.

One background thread owns the `LLMEngine` and runs its step loop; asyncio callers talk to it only
through a thread-safe command queue (add, abort) and receive outputs through per-request asyncio
queues filled with `call_soon_threadsafe`. Requests are checked once, in the caller (a new grammar
compiles in a worker thread), so a bad one raises before it reaches the engine thread. A caller that
stops iterating (a client that went away) aborts its request, and its pages are freed before the
next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from jax.sharding import Mesh

from jaxserve.checkpoint.loader import LoadedModel, load_draft
from jaxserve.config import EngineConfig
from jaxserve.engine.interface import Admission, CheckedRequest, EngineLimits, EngineStats, ModelInfo, StepReport
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.outputs import FAILED, StepOutput
from jaxserve.parallel.distributed import StepChannel
from jaxserve.errors import UserError
from jaxserve.models.lora import LoraAdapter
from jaxserve.sampling_params import SamplingParams
from jaxserve.structured.matchers import GrammarCompiler

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight got this error and no new ones are accepted."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; the engine and every other request carry on."""


class RequestRejectedError(RequestFailedError):
    """What one request asked for could not go on (its constraint outgrew the matcher's limits): the
    request's fault, not the engine's."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
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
        self._observers: list[Callable[[StepReport], None]] = []
        self.error: BaseException | None = None

    # ---- what it serves, holds and has done -------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._engine.info

    @property
    def limits(self) -> EngineLimits:
        return self._engine.limits

    def stats(self) -> EngineStats:
        """A snapshot of queue depths, cache use and counters (cheap; safe from any thread)."""
        return self._engine.stats()

    def subscribe(self, observer: Callable[[StepReport], None]) -> None:
        """Call `observer` on the engine thread after every step."""
        self._observers.append(observer)

    def warmup(self, progress: bool = True) -> None:
        """Compile every step shape (blocking: run it in a worker thread), before `start`'s loop sees requests."""
        self._engine.warmup(progress)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread (requests still running end with finish_reason "abort"), then close the
        engine (it saves what outlives the process)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        await asyncio.get_running_loop().run_in_executor(None, self._engine.close)

    # ---- requests ------------------------------------------------------------------------

    @property
    def adapters(self) -> frozenset[str]:
        """The names of the LoRA adapters requests may name."""
        return frozenset(list(self._engine.adapters))

    def read_adapter(self, name: str, path: str) -> LoraAdapter:
        """A PEFT adapter folder read for this engine's model (blocking file reads: run it in a worker
        thread); UserError naming what is wrong with it."""
        return self._engine.read_adapter(name, path)

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Let requests name `adapter` (UserError if it does not fit, or its name is taken); nothing
        recompiles: its values go into a device slot when a step first needs them."""
        self._engine.load_adapter(adapter)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for an adapter; those already accepted finish with it."""
        self._engine.unload_adapter(name)

    async def check(self, prompts: Sequence[Sequence[int]], params: SamplingParams, adapter: str | None = None) -> CheckedRequest:
        """Every check of a request, once, before any of its prompts starts; UserError (with its
        `param`) for a bad one. A new grammar compiles in a worker thread: neither the event loop nor
        the engine step waits for it. `adapter`: the LoRA adapter it names, which must be loaded."""
        lora = self._engine.adapter(adapter)
        seconds = None
        if params.guide is not None:
            seconds = await asyncio.get_running_loop().run_in_executor(None, self._engine.compile_guide, params)
        for prompt in prompts:
            self._engine.check_request(list(prompt), params)
        return CheckedRequest(tuple(tuple(p) for p in prompts), params, seconds, lora)

    async def generate(self, request_id: str, request: CheckedRequest, admission: Admission = Admission()) -> AsyncIterator[tuple[int, StepOutput]]:
        """(prompt index, output) of every sample of every prompt as steps produce them, merged, until
        all have finished; each output carries `request_id`. Leaving early aborts what still runs."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        if request_id in self._active:
            raise UserError(f"request id {request_id!r} is already in use")
        self._active.add(request_id)
        merged: asyncio.Queue = asyncio.Queue()

        async def run(i: int, prompt: tuple[int, ...]) -> None:
            try:
                async for out in self._one(request_id, list(prompt), request, admission):
                    await merged.put((i, out))
                await merged.put((i, None))
            except BaseException as e:
                await merged.put((i, e))
                raise

        tasks = [asyncio.create_task(run(i, p)) for i, p in enumerate(request.prompts)]
        try:
            pending = len(tasks)
            while pending:
                i, item = await merged.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._active.discard(request_id)

    async def _one(self, request_id: str, prompt_ids: list[int], request: CheckedRequest, admission: Admission) -> AsyncIterator[StepOutput]:
        """One prompt's outputs (its n samples), under an engine id of its own."""
        engine_id = f"{request_id}#{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = stream
        self._send(("add", engine_id, prompt_ids, request.params, admission, request.adapter))
        unfinished = set(range(request.params.n))
        try:
            while unfinished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    unfinished.clear()
                    raise out
                if out.finish_reason in FAILED:
                    unfinished.clear()
                    raise (RequestRejectedError if out.finish_reason == "rejected" else RequestFailedError)(out.text)
                if out.finish_reason:
                    unfinished.discard(out.index)
                yield dataclasses.replace(out, request_id=request_id)
        finally:
            self._streams.pop(engine_id, None)
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
                _, engine_id, prompt_ids, params, admission, adapter = command
                try:
                    self._engine.enqueue(engine_id, prompt_ids, params, admission, adapter)
                except UserError as e:
                    self._post(engine_id, e)
            else:
                for out in self._engine.abort(command[1]):
                    self._post(out.request_id, out)

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while not self._stopping:
                self._apply_commands()
                if not self._engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self._engine.step()
                for out in outputs:
                    self._post(out.request_id, out)
                for observer in self._observers:
                    observer(self._engine.last_step)
            self._apply_commands()
            for engine_id in list(self._engine.seqs):  # shutting down: end what still runs
                for out in self._engine.abort(engine_id):
                    self._post(out.request_id, out)
        except BaseException as e:  # the engine's state is unknown now: fail everything in flight
            log.exception("engine loop failed")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine stopped after an error: {e}"))


def engine_replicas(
    model: LoadedModel, engine_config: EngineConfig, meshes: Sequence[Mesh | None] = (None,), channel: StepChannel | None = None
) -> list[AsyncEngine]:
    """One engine per mesh (data-parallel replicas of `model`; `jaxserve.parallel.mesh.replica_meshes`),
    sharing one grammar cache, so a schema compiles once for all of them. `channel`: process 0's step
    channel of a multi-host group (one replica only)."""
    grammars = GrammarCompiler(model.tokenizer, model.cfg.vocab_size)
    draft = load_draft(model, engine_config.speculative)
    configs = [engine_config] * len(meshes)
    if engine_config.prefix_cache_dir and len(meshes) > 1:  # each replica saves its own host prefix tier
        configs = [dataclasses.replace(engine_config, prefix_cache_dir=str(Path(engine_config.prefix_cache_dir) / f"replica{i}")) for i in range(len(meshes))]
    return [
        AsyncEngine(LLMEngine(model.cfg, model.params, c, model.tokenizer, mesh=m, grammars=grammars, model_name=model.name,
                              channel=channel, draft=draft))
        for m, c in zip(meshes, configs)
    ]
