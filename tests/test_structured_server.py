"""Structured output and tool calling through the real server and the `openai` client, with SmolLM2:
outputs parse and validate whatever the small model would have written by itself."""

from __future__ import annotations

import ast
import asyncio
import json
import random
import re

import aiohttp
import jsonschema
import openai
import pytest

from tests.server_process import SERVER_KEY, ServerProcess, get, post, until

MODEL = "smollm2-135m-instruct"

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
MEETING = {
    "name": "schedule_meeting",
    "description": "Put a meeting in the calendar",
    "parameters": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "day": {"type": "string", "pattern": "^2026-[0-9]{2}-[0-9]{2}$"},
            "attendees": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
            "minutes": {"type": "integer", "minimum": 15, "maximum": 120},
        },
        "required": ["title", "day", "attendees", "minutes"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, MEETING)]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, MEETING)}


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    """Runs a coroutine function with a fresh async client (a client's connections belong to one event loop)."""

    def run(work):
        async def main():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0) as c:
                return await work(c)

        return asyncio.run(main())

    return run


def _schemas(count: int) -> list[dict]:
    """Varied schemas: nested objects, arrays, enums, bounded numbers, patterns, optional fields."""
    fields = {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "status": {"enum": ["active", "paused", "closed"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 24}, "number": {"type": "integer", "minimum": 1, "maximum": 999}},
            "required": ["street", "number"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    }
    rng = random.Random(7)
    out = []
    for _ in range(count):
        names = rng.sample(sorted(fields), rng.randint(2, 5))
        required = [n for n in names if rng.random() < 0.7] or names[:1]
        out.append({"type": "object", "properties": {n: fields[n] for n in names}, "required": required, "additionalProperties": False})
    return out


async def _chat(client: openai.AsyncOpenAI, stream: bool, **kw) -> tuple[str | None, str, list]:
    """(content, finish_reason, tool calls as dicts), whole or assembled from stream chunks."""
    if not stream:
        r = await client.chat.completions.create(model=MODEL, **kw)
        choice = r.choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []]
        return choice.message.content, choice.finish_reason, calls
    content, finish, calls = "", None, {}
    async for chunk in await client.chat.completions.create(model=MODEL, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
            entry["name"] += c.function.name or ""
            entry["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, finish, list(calls.values())


def test_fifty_json_schemas_parse_and_validate(client) -> None:
    subjects = ["a customer", "an order", "a city", "a pet", "a book", "a song", "a car", "a shop", "a planet", "a team"]

    async def one(c: openai.AsyncOpenAI, i: int, schema: dict) -> tuple[str, dict]:
        greedy, stream = i % 2 == 0, i % 4 >= 2
        kw = dict(max_tokens=256, temperature=0.0 if greedy else 0.9, seed=i)
        messages = [{"role": "user", "content": f"Describe {subjects[i % len(subjects)]} as JSON."}]
        if i % 5 == 4:  # the vLLM-style extension field, on the completions endpoint
            r = await c.completions.create(model=MODEL, prompt=messages[0]["content"], extra_body={"guided_json": schema}, **kw)
            return r.choices[0].text, {"finish": r.choices[0].finish_reason}
        response_format = {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True}}
        content, finish, _ = await _chat(c, stream, messages=messages, response_format=response_format, **kw)
        return content, {"finish": finish}

    async def run(c: openai.AsyncOpenAI) -> list:
        return await asyncio.gather(*(one(c, i, s) for i, s in enumerate(schemas)))

    schemas = _schemas(50)
    for schema, (text, info) in zip(schemas, client(run)):
        assert info["finish"] == "stop", (text, info)
        jsonschema.validate(json.loads(text), schema)


def _arithmetic(text: str) -> bool:
    """Whether `text` is a sentence of ARITHMETIC: checked with Python's parser, independently of the
    grammar engine."""
    if not re.fullmatch(r"[0-9+\-*/()]+", text) or re.search(r"[0-9]{4}", text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    return all(isinstance(node, allowed) for node in ast.walk(tree))


ARITHMETIC = """start: expr
expr: term | term OP term | term OP term OP term
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*" | "/"
NUMBER: /[1-9][0-9]{0,2}/
"""


def test_regex_choice_and_lark_grammar_outputs_match(client) -> None:
    date, phone = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    colours = ["red", "green", "blue", "light yellow"]

    async def completion(c: openai.AsyncOpenAI, prompt: str, seed: int, **extra) -> tuple[str, str]:
        r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=1.0, seed=seed, extra_body=extra)
        return r.choices[0].text, r.choices[0].finish_reason

    async def run(c: openai.AsyncOpenAI) -> list:
        jobs = [completion(c, "The meeting is on", s, guided_regex=date) for s in range(6)]
        jobs += [completion(c, "Call me at", s, guided_regex=phone) for s in range(6)]
        jobs += [completion(c, "My favourite colour is", s, guided_choice=colours) for s in range(6)]
        jobs += [completion(c, "A sum:", s, guided_grammar=ARITHMETIC) for s in range(8)]
        jobs += [completion(c, "Ready?", 0, guided_grammar='root ::= ("yes" | "no") " sir"')]  # GBNF, as llama.cpp takes it
        jobs += [completion(c, "The meeting is on", 1, structured_outputs={"regex": date})]  # vLLM's newer field
        return await asyncio.gather(*jobs)

    results = client(run)
    assert all(finish == "stop" for _, finish in results), results
    texts = [text for text, _ in results]
    assert all(re.fullmatch(date, t) for t in texts[:6]), texts[:6]
    assert all(re.fullmatch(phone, t) for t in texts[6:12]), texts[6:12]
    assert all(t in colours for t in texts[12:18]), texts[12:18]
    assert all(_arithmetic(t) for t in texts[18:26]), texts[18:26]
    assert len(set(texts[18:26])) > 1  # sampled: not one sentence forced eight times
    assert texts[26] in ("yes sir", "no sir") and re.fullmatch(date, texts[27]), texts[26:]


def test_tool_calls_required_and_named_validate(client) -> None:
    """`required` asks for one call (parallel_tool_calls false): with parallel calls allowed, SmolLM2
    repeats its call until max_tokens."""
    asks = [
        "What's the weather in Paris?", "Is it cold in Oslo today?", "Book a sync with Ana and Bo on March 3rd.",
        "Set up a 30 minute review with the team.", "How hot is it in Cairo?",
    ]

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, list, str | None]:
        named = i >= 10
        choice = {"type": "function", "function": {"name": (WEATHER, MEETING)[i % 2]["name"]}} if named else "required"
        _, finish, calls = await _chat(
            c, i % 3 == 0, messages=[{"role": "user", "content": asks[i % len(asks)]}], tools=TOOLS, tool_choice=choice,
            max_tokens=200, temperature=0.0 if i % 2 else 0.8, seed=i, parallel_tool_calls=False,
        )
        return finish, calls, choice["function"]["name"] if named else None

    async def run(c: openai.AsyncOpenAI) -> list:
        return await asyncio.gather(*(one(c, i) for i in range(20)))

    for finish, calls, name in client(run):
        assert finish == ("stop" if name else "tool_calls") and len(calls) == 1  # OpenAI: "stop" for a forced function
        for call in calls:
            assert call["id"].startswith("call_") and (name is None or call["name"] == name)
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_tool_round_trip(client, server) -> None:
    user = {"role": "user", "content": "What's the weather in Paris?"}

    async def run(c: openai.AsyncOpenAI) -> tuple:
        r = await c.chat.completions.create(model=MODEL, messages=[user], tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0.0)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        call = message.tool_calls[0]
        result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}
        history = [user, message.model_dump(exclude_none=True), result]
        final = await c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=60, temperature=0.0)
        return call, history, final

    call, history, final = client(run)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    # The model saw its call and the tool's result (the template has no tool support: Hermes text).
    status, body = post(server.url + "/tokenize", {"model": MODEL, "messages": history, "tools": TOOLS}, SERVER_KEY)
    prompt = get_text(server, json.loads(body)["tokens"])
    assert status == 200 and "<tool_response>" in prompt and '"sky": "sunny"' in prompt
    assert f'"name": "{call.function.name}"' in prompt and "get_weather" in prompt.split("<tools>\n")[1]


def get_text(server: ServerProcess, tokens: list[int]) -> str:
    return json.loads(post(server.url + "/detokenize", {"tokens": tokens}, SERVER_KEY)[1])["prompt"]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}}, "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}}, "response_format", "not"),
    ({"response_format": {"type": "xml"}}, "response_format", "must be"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
    ({"guided_regex": "(ab"}, "guided_regex", "regex"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"guided_grammar": 'start: "a" (('}, "guided_grammar", "grammar"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"regex": "[0-9]+", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice", "launch_rocket"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integr"}}}], "tool_choice": "required"}, "tools", "Invalid type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$defs": "x"}}}], "tool_choice": "required"}, "tools", "$defs"),
    # compiles, but outgrows the matcher's limits at the first token: the request's fault, said without the matcher's state
    ({"guided_choice": ["a"] * 10000}, "guided_choice", "could not be followed"),
]


def test_bad_constraints_get_400_while_sixteen_requests_run(server, client) -> None:
    async def running(c: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        r = await c.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=48, temperature=0.0, extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason, r.usage.completion_tokens

    async def bad(session: aiohttp.ClientSession, extra: dict) -> tuple[int, dict]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}
        async with session.post(server.url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.json()

    async def run(c: openai.AsyncOpenAI) -> tuple[list, list]:
        tasks = [asyncio.create_task(running(c, i)) for i in range(16)]
        async def all_running() -> bool:
            text = (await asyncio.to_thread(get, server.url + "/metrics", SERVER_KEY))[1]
            return "jaxserve:num_requests_running" in text and _metric(text, "jaxserve:num_requests_running") == 16

        await until(all_running, "16 requests running")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {SERVER_KEY}"}) as session:
            answers = [await bad(session, extra) for extra, _, _ in BAD]
        return answers, await asyncio.gather(*tasks)

    answers, finished = client(run)
    for (extra, param, words), (status, body) in zip(BAD, answers):
        assert status == 400 and body["error"]["param"] == param and words in body["error"]["message"], (extra, body)
        assert body["error"]["type"] == "invalid_request_error"
    assert finished == [("length", 48)] * 16


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def test_structured_metrics_and_no_recompiles(server) -> None:
    text = get(server.url + "/metrics", SERVER_KEY)[1]
    assert _metric(text, "jaxserve:structured_requests_total") >= 50 + 28 + 21
    assert _metric(text, "jaxserve:grammar_compile_seconds_count") >= 50  # fifty distinct schemas
    assert _metric(text, "jaxserve:grammar_mask_seconds_count") > 100
    warm = [r for r in server.log_records() if r.get("msg") == "ready"][0]["compiles"]
    assert _metric(text, "jaxserve:num_compiles") == warm
