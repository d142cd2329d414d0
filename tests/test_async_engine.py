"""AsyncEngine: concurrent streams equal offline results, aborts free pages, the event loop keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.llm import LLM
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from tests.server_process import DEADLINE, SERVER_ENGINE, until
from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params


def _tiny_engine() -> LLMEngine:
    cfg = tiny_config("llama", max_position_embeddings=512)
    return LLMEngine(cfg, tiny_params(cfg), TINY_ENGINE, eos_token_ids=(2,))


async def _stream(engine: AsyncEngine, request_id: str, ids: list[int], sp: SamplingParams):
    """The outputs of a one-prompt request, checked as a server checks it."""
    async with contextlib.aclosing(engine.generate(request_id, await engine.check([ids], sp))) as outputs:
        async for _, out in outputs:
            yield out


async def _collect(engine: AsyncEngine, request_id: str, ids: list[int], sp: SamplingParams) -> list:
    return [out async for out in _stream(engine, request_id, ids, sp)]


def test_concurrent_streams_equal_the_offline_engine() -> None:
    prompts = [[5 + i, 6, 7 + i] * (i + 1) for i in range(6)]
    params = [SamplingParams(max_tokens=6 + i, temperature=0.8, seed=i, n=1 + i % 2, ignore_eos=True) for i in range(6)]
    offline = _tiny_engine()
    for i, (ids, sp) in enumerate(zip(prompts, params)):
        offline.add_request(str(i), ids, sp)
    expected: dict[tuple[str, int], list[int]] = {}
    while offline.has_unfinished():
        for out in offline.step():
            if out.token_id is not None:
                expected.setdefault((out.request_id, out.index), []).append(out.token_id)

    async def main() -> dict:
        engine = AsyncEngine(_tiny_engine())
        engine.start()
        streams = await asyncio.gather(*(_collect(engine, str(i), ids, sp) for i, (ids, sp) in enumerate(zip(prompts, params))))
        await engine.shutdown()
        got: dict[tuple[str, int], list[int]] = {}
        for outs in streams:
            for out in outs:
                if out.token_id is not None:
                    got.setdefault((out.request_id, out.index), []).append(out.token_id)
            assert {o.index for o in outs if o.finish_reason} == set(range(params[int(outs[0].request_id)].n))
        return got

    assert asyncio.run(main()) == expected


def test_abort_and_disconnect_free_pages_and_bad_requests_raise_in_the_caller() -> None:
    async def main() -> None:
        inner = _tiny_engine()
        engine = AsyncEngine(inner)
        engine.start()
        sp = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        with pytest.raises(UserError, match="prompt is empty"):
            await engine.check([[5], []], sp)
        # Abort from outside: the stream ends with finish_reason "abort".
        outs = []
        async for out in _stream(engine, "a", [5, 6, 7], sp):
            outs.append(out)
            if len(outs) == 3:
                engine.abort("a")
        assert outs[-1].finish_reason == "abort" and len(outs) < 400
        # A caller that stops listening (a client that went away) aborts its request.
        async with contextlib.aclosing(_stream(engine, "b", [5, 6, 7], sp)) as stream:
            async for out in stream:
                break
        await until(lambda: not inner.has_unfinished(), "the abandoned request is aborted")
        assert inner.blocks.usage == 0.0
        # The engine still serves.
        outs = await _collect(engine, "c", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert outs[-1].finish_reason == "length"
        await engine.shutdown()

    asyncio.run(main())


def test_device_work_never_blocks_the_event_loop(smollm2) -> None:
    """While SmolLM2 prefills long prompts and decodes, a 5 ms ticker on the event loop ticks inside
    every long engine step: an order of events, not a speed (a loop blocked by a step could not tick
    until that step ended)."""
    llm = LLM(smollm2, SERVER_ENGINE)  # the test servers' limits, so all use the same compiled steps
    # Compile first: tracing is host work, which the server finishes at warm-up before it is ready;
    # this test is about device work.
    llm.engine.warmup(progress=False)
    ids = smollm2.tokenizer.encode("a long and winding road " * 150)[:900]
    steps: list[tuple[float, float]] = []  # (start, end) of each engine step, timed on the engine thread
    step = llm.engine.step

    def timed_step() -> list:
        start = time.perf_counter()
        outputs = step()
        steps.append((start, time.perf_counter()))
        return outputs

    llm.engine.step = timed_step

    async def main() -> list[float]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        compiles = llm.engine.runner.num_compiles
        ticks, running = [], True

        async def ticker() -> None:
            while running:
                await asyncio.sleep(0.005)
                ticks.append(time.perf_counter())

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(_collect(engine, f"r{i}", ids[i:], sp) for i in range(4)))
        running = False
        await tick
        await engine.shutdown()
        assert llm.engine.runner.num_compiles == compiles
        return ticks

    ticks = asyncio.run(main())
    long_steps = [(a, b) for a, b in steps if b - a > 0.1]  # the 900-token prefills: real device work
    assert long_steps
    assert all(any(a < t < b for t in ticks) for a, b in long_steps), long_steps


def test_shutdown_ends_streams_in_flight_and_ids_can_be_reused() -> None:
    async def main() -> None:
        inner = _tiny_engine()
        engine = AsyncEngine(inner)
        engine.start()
        sp = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        # An id whose earlier request was just abandoned starts clean (no stale abort reaches it).
        async with contextlib.aclosing(_stream(engine, "x", [5, 6, 7], sp)) as stream:
            await anext(stream)
        outs = await _collect(engine, "x", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]

        async def long_stream() -> list:
            return await _collect(engine, "long", [5, 6, 7], sp)

        task = asyncio.create_task(long_stream())
        await until(lambda: inner.num_computed_tokens >= 20, "the long request runs")
        await engine.shutdown()
        outs = await asyncio.wait_for(task, timeout=DEADLINE)
        assert outs[-1].finish_reason == "abort" and len(outs) < 400
        with pytest.raises(RuntimeError, match="not running"):
            await anext(_stream(engine, "after", [5], sp))

    asyncio.run(main())
