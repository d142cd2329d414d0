"""The OpenAI-compatible server, started for real on 127.0.0.1 and driven by the official `openai`
client and raw aiohttp requests, against SmolLM2."""

from __future__ import annotations

import asyncio
import functools
import json
import math

import aiohttp
import openai
import pytest

from jaxserve.engine.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.server_process import SERVER_ENGINE, SERVER_KEY, get, until

KEY = SERVER_KEY
MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(smollm2) -> LLM:
    return LLM(smollm2, SERVER_ENGINE)


def test_greedy_completions_equal_offline_sync_async_streaming(client, server, offline, smollm2) -> None:
    expected = [o.outputs[0] for o in offline.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)]
    whole = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in whole.choices] == [e.text for e in expected]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.prompt_tokens == sum(len(smollm2.tokenizer.encode(p)) for p in PROMPTS)
    assert whole.usage.completion_tokens == sum(e.num_generated for e in expected)  # an EOS that ended one counts
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == MODEL

    pieces: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index] = pieces.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [pieces[i] for i in range(3)] == [e.text for e in expected]
    assert [finish[i] for i in range(3)] == [e.finish_reason for e in expected]
    assert usage.completion_tokens == whole.usage.completion_tokens

    async def async_run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        results = await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0) for p in PROMPTS))
        await aclient.close()
        return [r.choices[0].text for r in results]

    assert asyncio.run(async_run()) == [e.text for e in expected]


def test_chat_equals_offline_streaming_and_not(client, server, offline, smollm2) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    ids = smollm2.tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    expected = offline.generate([ids], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)[0].outputs[0]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == expected.num_generated
    assert reply.choices[0].finish_reason == expected.finish_reason

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason

    async def async_stream() -> str:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        text = ""
        async for chunk in await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True):
            text += chunk.choices[0].delta.content or ""
        await aclient.close()
        return text

    assert asyncio.run(async_stream()) == expected.text


def test_n_samples_with_a_seed_are_distinct_and_reproducible(client) -> None:
    ask = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3, seed=7)
    first = [c.text for c in client.completions.create(**ask).choices]
    again = [c.text for c in client.completions.create(**ask).choices]
    assert len(set(first)) == 3 and first == again
    other = [c.text for c in client.completions.create(**{**ask, "seed": 8}).choices]
    assert other != first


def test_logprobs_are_consistent_with_scoring(client, offline, smollm2) -> None:
    prompt = "The sun rises in the"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    eos = out.choices[0].finish_reason == "stop"  # counted in usage, not part of the text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens - eos
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3 and math.isclose(max(top.values()), chosen, abs_tol=1e-5)  # greedy picks the best
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    # Scoring prompt + completion (echo, max_tokens 0) gives the completion's tokens the same log-probs.
    prompt_ids = smollm2.tokenizer.encode(prompt)
    generated = offline.generate([prompt_ids], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert "".join(lp.tokens) == generated.text == out.choices[0].text
    scored = client.completions.create(model=MODEL, prompt=prompt_ids + generated.token_ids, max_tokens=0, echo=True, logprobs=1)
    s = scored.choices[0].logprobs
    assert s.token_logprobs[0] is None and len(s.token_logprobs) == len(prompt_ids) + len(generated.token_ids)
    for a, b in zip(s.token_logprobs[len(prompt_ids) :], lp.token_logprobs, strict=True):
        assert math.isclose(a, b, abs_tol=1e-3)
    assert scored.choices[0].text == prompt + generated.text and scored.usage.completion_tokens == 0

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_models_tokenize_detokenize_version_metrics(server, client, smollm2) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    headers = {"Authorization": f"Bearer {KEY}"}

    async def run() -> str:
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.post(server.url + "/tokenize", json={"prompt": "hello world"}) as r:
                body = await r.json()
                assert body["tokens"] == smollm2.tokenizer.encode("hello world") and body["count"] == len(body["tokens"])
            async with s.post(server.url + "/detokenize", json={"tokens": body["tokens"]}) as r:
                assert (await r.json())["prompt"] == "hello world"
            async with s.get(server.url + "/version") as r:
                assert "version" in await r.json()
            async with s.get(server.url + "/metrics") as r:
                return await r.text()

    text = asyncio.run(run())
    for name in (
        "jaxserve:request_success_total",
        "jaxserve:time_to_first_token_seconds_bucket",
        "jaxserve:inter_token_latency_seconds_bucket",
        "jaxserve:e2e_request_latency_seconds_bucket",
        "jaxserve:prompt_tokens_total",
        "jaxserve:generation_tokens_total",
        "jaxserve:num_requests_running",
        "jaxserve:num_requests_waiting",
        "jaxserve:kv_cache_usage_perc",
        "jaxserve:prefix_cache_hit_rate",
        "jaxserve:batch_size_bucket",
        "jaxserve:num_preemptions_total",
        "jaxserve:num_compiles",
        "jaxserve:kv_swap_out_total",
        "jaxserve:kv_swap_in_total",
        "jaxserve:kv_swap_out_bytes_total",
        "jaxserve:kv_swap_in_bytes_total",
        "jaxserve:kv_swap_fallbacks_total",
        "jaxserve:host_kv_cache_usage_perc",
        'jaxserve:prefix_cache_hits_total{engine="0",model_name="smollm2-135m-instruct",tier="device",version="default"}',
        'jaxserve:prefix_cache_hits_total{engine="0",model_name="smollm2-135m-instruct",tier="host",version="default"}',
        "jaxserve:host_prefix_cache_usage_perc",
        "jaxserve:prefix_cache_host_stored_total",
        "jaxserve:prefix_cache_host_stored_bytes_total",
        "jaxserve:prefix_cache_host_loaded_bytes_total",
        "jaxserve:prefix_cache_host_fallbacks_total",
        "jaxserve:quantization_info",
    ):
        assert name in text, name
    compiles = [line for line in text.splitlines() if line.startswith("jaxserve:num_compiles")]
    warm = [r for r in server.log_records() if r.get("msg") == "ready"][0]["compiles"]
    assert float(compiles[0].split()[-1]) == warm  # nothing compiled after warm-up


def test_auth(server) -> None:
    assert get(server.url + "/health")[0] == 200  # open without a key
    assert get(server.url + "/ready")[0] == 200
    status, body = get(server.url + "/v1/models")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert get(server.url + "/v1/models", key="wrong")[0] == 401
    assert get(server.url + "/v1/models", key=KEY)[0] == 200


LONG = "word " * 3000
BAD_REQUESTS = [
    # (name, path, raw body or JSON-able, expected status, expected param or None)
    ("malformed json", "/v1/completions", b'{"prompt": "hi",', 400, None),
    ("not an object", "/v1/completions", [1, 2], 400, None),
    ("bad utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("huge body", "/v1/completions", {"prompt": "x" * 300000}, 413, None),
    ("unknown model", "/v1/completions", {"model": "gpt-5", "prompt": "hi"}, 404, "model"),
    ("priority not an integer", "/v1/completions", {"prompt": "hi", "priority": "high"}, 400, "priority"),
    ("priority out of range", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": 2**40}, 400, "priority"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty prompt string", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("mixed prompt list", "/v1/completions", {"prompt": ["a", 1]}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("max_tokens string", "/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero without echo", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("beyond the context", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "prompt"),
    ("prompt longer than context", "/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("temperature negative", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("temperature string", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top_k below -1", "/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("n zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("n a float", "/v1/completions", {"prompt": "hi", "n": 1.5}, 400, "n"),
    ("logprobs too many", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("seed a string", "/v1/completions", {"prompt": "hi", "seed": "abc"}, 400, "seed"),
    ("stop a number", "/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("stop list of numbers", "/v1/completions", {"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("presence penalty out of range", "/v1/completions", {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("logit_bias not a map", "/v1/completions", {"prompt": "hi", "logit_bias": [1]}, 400, "logit_bias"),
    ("logit_bias bad key", "/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("stream not a bool", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("invalid role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ("message not an object", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs too many", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ("nested too deeply", "/v1/completions", b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400, None),
    ("tool call arguments not an object", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[]"}}]}]}, 400, "messages"),
    ("tool message without id", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "21 C"}]}, 400, "messages"),
    ("unknown route", "/v1/engines", {"prompt": "hi"}, 404, None),
    ("detokenize bad ids", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    # each of these once stopped the engine, took the process down, or answered 500
    ("top_k beyond int32", "/v1/completions", {"prompt": "hi", "top_k": 2**31}, 400, "top_k"),
    ("n beyond the limit", "/v1/completions", {"prompt": "hi", "n": 2**70}, 400, "n"),
    ("temperature infinite", "/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("lone surrogate prompt", "/v1/completions", b'{"prompt": "\\ud800"}', 400, None),
    ("lone surrogate in a message", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00x"}]}', 400, None),
    ("lone surrogate to tokenize", "/tokenize", b'{"prompt": "\\ud800"}', 400, None),
    ("chat_template_kwargs self", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"self": 1}},
     400, "chat_template_kwargs"),
    ("temperature of 400 digits", "/v1/completions", b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", 400, "temperature"),
    ("prompts times n beyond the limit", "/v1/completions", {"prompt": [[5]] * 600, "n": 2}, 400, "n"),
    ("lone surrogate in tool call arguments", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]}]}, 400, "messages"),
    ("tool schema nested past the recursion limit", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "f", "parameters": functools.reduce(lambda inner, _: {"items": inner}, range(900), {})}}]}, 400, None),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client) -> None:
    assert len(BAD_REQUESTS) >= 30

    async def run() -> list[tuple[str, int, dict]]:
        results = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            for name, path, body, _, _ in BAD_REQUESTS:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                async with s.post(server.url + path, data=data, headers={"Content-Type": "application/json"}) as r:
                    results.append((name, r.status, await r.json(content_type=None)))
        return results

    for (name, _, _, status, param), (_, got, body) in zip(BAD_REQUESTS, asyncio.run(run())):
        assert got == status, (name, got, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, body)
        if param is not None:
            assert error["param"] == param, (name, body)
    assert client.completions.create(model=MODEL, prompt="Still alive?", max_tokens=3).choices[0].text is not None
    assert client.with_options(max_retries=0).completions.create(prompt="ok", model=MODEL, max_tokens=2, extra_body={"unknown_field": 1}).choices


async def _stream_text(session: aiohttp.ClientSession, url: str, body: dict, stop_after: int | None = None) -> tuple[str, str | None]:
    """Text and finish reason of a streamed completion; with stop_after, hang up after that many events."""
    text, finish, events = "", None, 0
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status == 200
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            events += 1
            if stop_after is not None and events > stop_after:
                r.close()  # hang up mid-stream
                break
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            choice = json.loads(data)["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


def _metric_values(text: str) -> dict[str, float]:
    return {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("jaxserve:") and "{" in line}


def test_64_concurrent_streams_equal_offline_and_16_hangups_free_the_cache(server, offline) -> None:
    words = "the quick brown fox jumps over a lazy dog while curious cats watch".split()
    prompts = [" ".join(words[i % 7 : i % 7 + 2 + i % 5]) + f" {i}" for i in range(64)]
    expected = [o.outputs[0] for o in offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)]

    async def run() -> tuple[list, dict[str, float], int]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            streams = [_stream_text(s, server.url, {"prompt": p, "max_tokens": 12, "temperature": 0}) for p in prompts]
            hangups = [_stream_text(s, server.url, {"prompt": f"Count slowly to {i}00:", "max_tokens": 1000, "ignore_eos": True}, stop_after=3) for i in range(16)]
            results = await asyncio.gather(*streams, *hangups)
            async def idle() -> dict[str, float] | None:  # pages come back within an engine step of each hang-up
                async with s.get(server.url + "/metrics") as m:
                    values = _metric_values(await m.text())
                return values if values["jaxserve:num_requests_running"] == 0 and values["jaxserve:num_requests_waiting"] == 0 else None

            values = await until(idle, "no request running or waiting after the hang-ups")
            async with s.get(server.url + "/health") as h:
                health = h.status
        return results[:64], values, health

    results, values, health = asyncio.run(run())
    assert [(t, f) for t, f in results] == [(e.text, e.finish_reason) for e in expected]
    assert values["jaxserve:num_requests_running"] == 0 and values["jaxserve:kv_cache_usage_perc"] == 0.0
    assert health == 200
