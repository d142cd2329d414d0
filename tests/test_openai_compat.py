"""Drop-in for vLLM and llama.cpp clients: what their own server test suites and clients expect of
the OpenAI surface, vLLM's request extensions and its metric names, against the shared SmolLM2
server with the official `openai` client and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import jsonschema
import openai
import pytest

from tests.server_process import SERVER_ENGINE, SERVER_KEY, get, post

MODEL = "smollm2-135m-instruct"
VOCAB = 49152


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0)


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    status, text = post(server.url + path, {"model": MODEL, **body}, SERVER_KEY)
    return status, json.loads(text)


def _error(server, path: str, body: dict) -> dict:
    status, answer = _post(server, path, body)
    assert status == 400, answer
    return answer["error"]


def _unique(words: int = 80) -> str:
    """A prompt no earlier request shares a page with."""
    return f"[{uuid.uuid4().hex}] " + " ".join(["the lighthouse keeper counted ships"] * (words // 5))


# ---- the OpenAI surface ------------------------------------------------------------------------


def test_chat_streams_start_with_a_role_chunk_and_never_send_an_empty_delta(server) -> None:
    """96 emoji-heavy sampled completions (24 streams of n=4 choices): each choice's first chunk is
    the role alone; no later chunk has an empty content (a token holding half of a UTF-8 character
    waits for the rest)."""
    emoji = "🎉🔥🌈🍕🚀😀🐙🎸🌵🧩"

    async def one(c: openai.AsyncOpenAI, i: int) -> list[list]:
        messages = [{"role": "user", "content": f"Answer only with emoji, no words: {emoji[i % 10:] + emoji[: i % 10]}"}]
        deltas: list[list] = [[] for _ in range(4)]  # per choice
        stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=i, n=4, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                deltas[choice.index].append(choice.delta)
        return deltas

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0) as c:
            limit = asyncio.Semaphore(4)  # 16 choices in flight: the server's batch

            async def bounded(i: int):
                async with limit:
                    return await one(c, i)

            return [d for choices in await asyncio.gather(*(bounded(i) for i in range(24))) for d in choices]

    results = asyncio.run(main())
    assert len(results) == 96
    for deltas in results:
        assert deltas[0].role == "assistant" and not deltas[0].content
        assert all(d.role is None for d in deltas[1:])
        assert all(d.content is None or d.content != "" for d in deltas[1:]), [d.content for d in deltas]
    # The test means something: many replies hold characters that span several tokens.
    texts = ["".join(d.content or "" for d in deltas) for deltas in results]
    print(f"{sum(any(ord(ch) > 0xFFFF for ch in text) for text in texts)} of 200 replies hold emoji")
    assert sum(any(ord(ch) > 0xFFFF for ch in text) for text in texts) >= 20


def test_text_parts_are_joined_with_newlines(server) -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    _, joined = _post(server, "/tokenize", {"messages": [{"role": "user", "content": parts}]})
    _, plain = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "What is\nthe best book"}]})
    assert joined["tokens"] == plain["tokens"]


def test_stream_options_need_stream_and_seeds_are_signed_64_bit(server) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": True}}
    assert _error(server, "/v1/completions", body)["param"] == "stream_options"
    assert _error(server, "/v1/completions", {**body, "stream": False})["param"] == "stream_options"
    for seed in (2**63, -(2**63) - 1):
        error = _error(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "seed": seed})
        assert error["param"] == "seed" and "64-bit" in error["message"]
    for seed in (2**63 - 1, -(2**63)):
        assert _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "seed": seed})[0] == 200


def test_logprobs_zero_returns_the_sampled_tokens_entry(client) -> None:
    out = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) > 0
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {token: chosen}


def test_usage_counts_the_eos_token_and_reports_cached_prompt_tokens(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=200, temperature=0, logprobs=True)
    assert reply.choices[0].finish_reason == "stop"  # ended by EOS: generated, counted, not in the text
    assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.content) + 1
    prompt = _unique()
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens


def test_cache_salt_keeps_prefix_cache_hits_within_one_salt(client) -> None:
    prompt = _unique()

    def cached(**salt) -> int:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, extra_body=salt)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached() == 0
    assert cached(cache_salt="tenant-a") == 0  # the unsalted pages are not visible to a salt
    assert cached(cache_salt="tenant-a") > 0
    assert cached(cache_salt="tenant-b") == 0
    assert cached() > 0


def test_out_of_range_token_ids_are_named_with_the_vocabulary_size(server) -> None:
    cases = [
        ({"prompt": "Hi", "logit_bias": {"60000": 1}}, "logit_bias", 60000),
        ({"prompt": "Hi", "stop_token_ids": [2, 70000]}, "stop_token_ids", 70000),
        ({"prompt": [1, 2, 123456]}, "prompt", 123456),
    ]
    for body, param, token in cases:
        error = _error(server, "/v1/completions", {"max_tokens": 2, **body})
        assert error["param"] == param and str(token) in error["message"] and str(VOCAB) in error["message"], error


ADDRESS_TOOL = {
    "type": "function",
    "function": {
        "name": "ship_order",
        "description": "Ship an order to an address",
        "parameters": {
            "type": "object",
            "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False}},
            "properties": {"to": {"$ref": "#/$defs/Address"}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["to", "count"],
            "additionalProperties": False,
        },
    },
}


def test_tool_schemas_with_refs_work_under_required_and_named(client) -> None:
    messages = [{"role": "user", "content": "Ship two books to Paris, 75001."}]
    schema = ADDRESS_TOOL["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "ship_order"}}):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[ADDRESS_TOOL], tool_choice=choice, max_tokens=120, temperature=0)
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "ship_order"
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_tool_call_cut_off_by_max_tokens_is_an_incomplete_call_with_finish_reason_length(client) -> None:
    """The documented shape: finish_reason "length", no content, the call with its name and the
    arguments' JSON text as far as it got (not parseable)."""
    messages = [{"role": "user", "content": "Ship two books to Paris, 75001."}]
    ask = dict(model=MODEL, messages=messages, tools=[ADDRESS_TOOL], tool_choice="required", max_tokens=20, temperature=0)
    reply = client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "ship_order" and call.function.arguments.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
    streamed = {}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                streamed = {"name": tc.function.name, "arguments": tc.function.arguments}
            if c.finish_reason:
                assert c.finish_reason == "length"
    assert streamed == {"name": "ship_order", "arguments": call.function.arguments}


def test_tokenize_renders_what_chat_completions_renders(server, client) -> None:
    history = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "The fruit I pick is"}]
    _, open_turn = _post(server, "/tokenize", {"messages": history[:1], "return_token_strs": True})
    _, closed = _post(server, "/tokenize", {"messages": history[:1], "add_generation_prompt": False})
    _, cont = _post(server, "/tokenize", {"messages": history, "add_generation_prompt": False, "continue_final_message": True})
    text = lambda ids: json.loads(post(server.url + "/detokenize", {"tokens": ids}, SERVER_KEY)[1])["prompt"]  # noqa: E731
    assert text(open_turn["tokens"]).endswith("<|im_start|>assistant\n") and not text(closed["tokens"]).endswith("assistant\n")
    assert text(cont["tokens"]).endswith("The fruit I pick is")
    assert len(open_turn["token_strs"]) == open_turn["count"] and "".join(open_turn["token_strs"]) == text(open_turn["tokens"])
    body = {"messages": history[:1], "tools": [ADDRESS_TOOL]}
    _, with_tools = _post(server, "/tokenize", body)
    reply = client.chat.completions.create(model=MODEL, max_tokens=1, **body)
    assert reply.usage.prompt_tokens == with_tools["count"]
    error = _error(server, "/tokenize", {"messages": history, "continue_final_message": True})
    assert error["param"] == "continue_final_message"
    # chat_template_kwargs reach the template (SmolLM2's ignores unknown ones); reserved names are refused.
    assert _post(server, "/tokenize", {"messages": history[:1], "chat_template_kwargs": {"enable_thinking": False}})[1]["tokens"] == open_turn["tokens"]
    assert _error(server, "/v1/chat/completions", {"messages": history[:1], "chat_template_kwargs": {"messages": []}})["param"] == "chat_template_kwargs"


# ---- vLLM's request extensions -----------------------------------------------------------------


def test_prompt_logprobs_and_return_token_ids(server, client) -> None:
    prompt = "The capital of France is"
    ids = _post(server, "/tokenize", {"prompt": prompt})[1]["tokens"]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    choice = out.choices[0].model_dump()
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == out.usage.completion_tokens - (choice["finish_reason"] == "stop")
    scored = choice["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    for token, entry in zip(ids[1:], scored[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in entry.values())
        ranked = sorted((v for v in entry.values() if v["rank"] is not None), key=lambda v: v["rank"])
        assert [v["logprob"] for v in ranked] == sorted((v["logprob"] for v in ranked), reverse=True)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, extra_body={"return_token_ids": True, "prompt_logprobs": 0})
    body = chat.model_dump()
    assert body["prompt_token_ids"] == _post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})[1]["tokens"]
    assert len(body["prompt_logprobs"]) == chat.usage.prompt_tokens and len(body["choices"][0]["token_ids"]) >= 1


def test_truncate_prompt_tokens_and_continuous_usage_stats(server, client) -> None:
    out = client.completions.create(model=MODEL, prompt=_unique(), max_tokens=2, temperature=0, extra_body={"truncate_prompt_tokens": 20})
    assert out.usage.prompt_tokens == 20
    assert _error(server, "/v1/completions", {"prompt": "Hi", "truncate_prompt_tokens": 0})["param"] == "truncate_prompt_tokens"
    assert _error(server, "/v1/completions", {"prompt": "Hi", "cache_salt": 5})["param"] == "cache_salt"
    usages = [
        chunk.usage.completion_tokens
        for chunk in client.completions.create(model=MODEL, prompt="Count:", max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    ]
    assert usages[-1] == 6 and usages == sorted(usages) and len(usages) >= 6


def test_chat_echo_with_continue_final_message(client) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "The fruit I pick is"}]
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body=extra)
    assert reply.choices[0].message.content.startswith("The fruit I pick is")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True, extra_body=extra) if c.choices)
    assert streamed == reply.choices[0].message.content


def test_beam_search_over_http(server, client) -> None:
    ask = dict(model=MODEL, prompt="The capital of France is", max_tokens=6)
    beams = client.completions.create(**ask, n=3, extra_body={"use_beam_search": True})
    assert [c.index for c in beams.choices] == [0, 1, 2] and len({c.text for c in beams.choices}) == 3
    one = client.completions.create(**ask, n=1, extra_body={"use_beam_search": True})
    assert one.choices[0].text == client.completions.create(**ask, temperature=0).choices[0].text  # one beam is greedy
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=5, n=2,
                                          extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    streamed = [c for chunk in client.completions.create(**ask, n=2, stream=True, extra_body={"use_beam_search": True}) for c in chunk.choices]
    assert {c.index for c in streamed} == {0, 1}
    for bad, param in (({"temperature": 0.7}, "temperature"), ({"n": 11}, "n"), ({"stop": ["."]}, "stop"), ({"length_penalty": "x"}, "length_penalty")):
        assert _error(server, "/v1/completions", {"prompt": "Hi", "use_beam_search": True, **bad})["param"] == param


# ---- vLLM's metric names -----------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name) if "_bucket" not in name else name] = float(value)
    return out


def test_vllm_metric_names_and_histograms_count_what_was_sent(server, client) -> None:
    before = _samples(get(server.url + "/metrics", SERVER_KEY)[1])
    prompts = [_unique(40), _unique(60)]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2, temperature=0.8, seed=3)
    text = get(server.url + "/metrics", SERVER_KEY)[1]
    after = _samples(text)
    delta = lambda name: after[name] - before.get(name, 0.0)  # noqa: E731
    names = ["iteration_tokens_total", "request_prompt_tokens", "request_generation_tokens", "request_params_n", "request_params_max_tokens",
             "request_queue_time_seconds", "request_inference_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"]
    for name in names:
        assert f"# TYPE jaxserve:{name} histogram" in text, name
    for name in names[1:]:
        assert delta(f"jaxserve:{name}_count") == 2, name  # one per prompt
    assert delta("jaxserve:request_prompt_tokens_sum") == out.usage.prompt_tokens
    assert delta("jaxserve:request_generation_tokens_sum") == out.usage.completion_tokens
    assert delta("jaxserve:request_params_n_sum") == 4 and delta("jaxserve:request_params_max_tokens_sum") == 10
    assert delta("jaxserve:iteration_tokens_total_sum") >= out.usage.prompt_tokens
    info = [line for line in text.splitlines() if line.startswith("jaxserve:cache_config_info{")]
    assert info and 'block_size="16"' in info[0] and 'enable_prefix_caching="True"' in info[0] and info[0].endswith(" 1.0")
    quant = [line for line in text.splitlines() if line.startswith("jaxserve:quantization_info{")]
    assert quant and 'weights="float32"' in quant[0] and 'kv_cache_dtype="float32"' in quant[0] and 'kv_cache_scales="none"' in quant[0]


def test_models_carry_how_weights_and_kv_cache_are_stored(client) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL and client.models.retrieve(MODEL).model_extra["metadata"] == card.model_extra["metadata"]
    tokens = (SERVER_ENGINE.num_pages - 1) * SERVER_ENGINE.page_size
    assert card.model_extra["metadata"] == {"weights": "float32", "kv_cache_dtype": "float32", "kv_cache_tokens": tokens, "kv_cache_scales": None}


# ---- the Responses API -------------------------------------------------------------------------


def test_responses_api_whole_streamed_and_continued(client) -> None:
    ask = dict(model=MODEL, input="Name a colour.", instructions="Be brief.", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**ask)
    assert whole.id.startswith("resp_") and whole.status in ("completed", "incomplete") and whole.output[0].type == "message"
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0
    )
    assert whole.output_text == chat.choices[0].message.content and whole.usage.input_tokens == chat.usage.prompt_tokens

    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{whole.status}"
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.done", "response.output_item.done"} <= set(kinds)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text == events[-1].response.output_text

    # The next turn sees the stored conversation (instructions are not carried over, as OpenAI does).
    follow = client.responses.create(model=MODEL, previous_response_id=whole.id, input="And another?", max_output_tokens=8, temperature=0)
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": whole.output_text}, {"role": "user", "content": "And another?"}]
    expected = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    assert follow.output_text == expected.choices[0].message.content and follow.previous_response_id == whole.id

    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    for missing in (unstored.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL, previous_response_id=missing, input="Again")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.responses.create(model=MODEL, input=[{"type": "image", "url": "x"}])


def test_responses_api_json_schema_and_function_tools(client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    user = client.responses.create(model=MODEL, input="A user as JSON.", max_output_tokens=60, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "user", "schema": schema}})
    jsonschema.validate(json.loads(user.output_text), schema)
    tool = {"type": "function", **ADDRESS_TOOL["function"]}
    shipped = client.responses.create(model=MODEL, input="Ship two books to Paris, 75001.", tools=[tool], tool_choice="required", max_output_tokens=120, temperature=0)
    (call,) = [item for item in shipped.output if item.type == "function_call"]
    assert call.name == "ship_order" and call.call_id
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    result = client.responses.create(model=MODEL, previous_response_id=shipped.id, max_output_tokens=8, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"shipped": true}'}])
    # The stored turn held the call: the model sees it and its output, as chat would render them.
    history = [
        {"role": "user", "content": "Ship two books to Paris, 75001."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"shipped": true}'},
    ]
    same = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    assert result.usage.input_tokens == same.usage.prompt_tokens and result.output_text == same.choices[0].message.content
