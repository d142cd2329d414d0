"""OpenAI request bodies in, engine requests out (responses: `jaxserve.server.render`).

Parsing checks every field it reads (type and range) and raises `ApiError` naming the parameter, so
a malformed request is answered with a 400 before it reaches the engine. Fields this server does not
know are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxserve.errors import UserError
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxserve.server.tools import ToolError, ToolPlan, call_text, parse_tools, result_text, template_tool
from jaxserve.structured.guide import Guide
from jaxserve.tokenizer import Tokenizer


class ApiError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.retry_after = retry_after  # seconds, sent as Retry-After with a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's \uD800-\uDFFF: halves of a pair, or lone
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes, what: str) -> Any:
    """JSON a client sent; a 400 naming what is wrong with it. Text must be Unicode: an escaped lone
    surrogate ("\\ud800") decodes to a str that no encoder (the tokenizer's, UTF-8) accepts."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, f"{what} is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, f"{what} is nested too deeply") from None
    if _ESCAPED_SURROGATE.search(raw):  # rare: walk the strings only then
        stack = [value]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack += [*x.keys(), *x.values()]
            elif isinstance(x, list):
                stack += x
            elif isinstance(x, str) and _SURROGATE.search(x):
                raise ApiError(400, f"{what} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), which is not text")
    return value


MAX_SAMPLES = 1024  # prompts x n of one request: each sample is a sequence the engine holds

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] checked against `kind` (ints count as floats, bools never as numbers); None when absent
    or null."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(
        isinstance(value, k) and not (isinstance(value, bool) and k is not bool) or (k is float and isinstance(value, int) and not isinstance(value, bool))
        for k in kinds
    )
    if not ok:
        raise ApiError(400, f"'{name}' must be {' or '.join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}", name)
    if kinds != (float,):
        return value
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ApiError(400, f"'{name}' is out of range", name) from None


@dataclass(frozen=True)
class Request:
    """One parsed completions or chat request."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]  # token ids of each prompt (completions may send several)
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: prepend the prompt to the text; chat: the final assistant message to the reply
    logprobs: int | None = None  # top alternatives per token in the response (None: no logprobs)
    drop_generated: bool = False  # max_tokens 0 with echo: score the prompt, return no new tokens
    guide_param: str | None = None  # the field that asked for constrained output (named in errors)
    tools: ToolPlan | None = None  # chat: tool calls to parse from the output
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk
    return_token_ids: bool = False  # vLLM: prompt and output token ids in the response
    prompt_logprobs: int | None = None  # vLLM: log-probs of the prompt tokens in the response (top k + the token)
    echo_text: str = ""  # chat echo: the final assistant message the reply continues
    responses: Any = None  # a Responses API request: its `jaxserve.server.responses.ResponsesRequest`
    priority: int = 0  # lower runs first and may preempt running requests of a higher value (vLLM's field)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


# Fields that constrain the output: OpenAI's, then the extensions vLLM users send (top level, which is
# where the openai client's `extra_body` puts them): the guided_* fields and their newer
# `structured_outputs` object.
_GUIDE_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
_STRUCTURED_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}


def _response_format(value: Any) -> Guide | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide("json_object", "")
    if kind != "json_schema":
        raise ApiError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema' object", "response_format")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ApiError(400, "'response_format.json_schema.name' must be a string", "response_format")
    return Guide.json_schema(spec.get("schema", {"type": "object"}))


def _guided(name: str, value: Any) -> Guide:
    """One guided_* field's constraint."""
    if name == "guided_json":
        return Guide.json_schema(value)
    if name == "guided_choice":
        return Guide.choice(value)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty string", name)
    return Guide("regex" if name == "guided_regex" else "grammar", value)


def _guide(body: dict) -> tuple[Guide | None, str | None]:
    """The request's output constraint and the field that set it (named in errors)."""
    found: list[tuple[str, Guide]] = []
    for name in _GUIDE_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        try:
            if name == "response_format":
                guide = _response_format(value)
                found += [(name, guide)] if guide is not None else []
            elif name == "structured_outputs":
                if not isinstance(value, dict):
                    raise ApiError(400, "'structured_outputs' must be an object", name)
                keys = [k for k in ("json", "regex", "choice", "grammar", "json_object") if value.get(k) not in (None, False)]
                if len(keys) != 1:
                    raise ApiError(400, "'structured_outputs' must set exactly one of json, regex, choice, grammar, json_object", name)
                key = keys[0]
                found.append((name, Guide("json_object", "") if key == "json_object" else _guided(_STRUCTURED_KEYS[key], value[key])))
            else:
                found.append((name, _guided(name, value)))
        except UserError as e:
            raise ApiError(400, f"'{name}': {e}", name) from None
        except ApiError as e:
            raise ApiError(400, e.message, name) from None
    if len(found) > 1:
        raise ApiError(400, f"send at most one of {', '.join(n for n, _ in found)}", found[1][0])
    return (found[0][1], found[0][0]) if found else (None, None)


def _sampling(body: dict, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, guide: Guide | None = None) -> SamplingParams:
    stop = _field(body, "stop", (str, list), ())
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of strings", "stop")
    bias = _field(body, "logit_bias", dict, {})
    beam = _field(body, "use_beam_search", bool, False)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_field(body, "temperature", float, 0.0 if beam else 1.0),
            top_p=_field(body, "top_p", float, 1.0),
            top_k=_field(body, "top_k", int, -1),
            min_p=_field(body, "min_p", float, 0.0),
            seed=_field(body, "seed", int),
            n=_field(body, "n", int, 1),
            presence_penalty=_field(body, "presence_penalty", float, 0.0),
            frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
            repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=_field(body, "min_tokens", int, 0),
            stop=tuple(stop) if isinstance(stop, list) else stop,
            stop_token_ids=tuple(_field(body, "stop_token_ids", list, [])),
            ignore_eos=_field(body, "ignore_eos", bool, False),
            skip_special_tokens=_field(body, "skip_special_tokens", bool, True),
            guide=guide,
            cache_salt=_field(body, "cache_salt", str),
            use_beam_search=beam,
            length_penalty=_field(body, "length_penalty", float, 1.0),
        )
    except UserError as e:
        raise ApiError(400, str(e), e.param) from None


@dataclass(frozen=True)
class _Common:
    """Fields both endpoints read the same way."""

    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    prompt_logprobs: int | None
    truncate: int | None  # truncate_prompt_tokens: keep only the last k prompt tokens
    priority: int  # vLLM's: lower runs first, and may preempt running requests of a higher value


def _common(body: dict) -> _Common:
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    if body.get("stream_options") is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    flags = {}
    for key in ("include_usage", "continuous_usage_stats"):
        flags[key] = options.get(key, False)
        if not isinstance(flags[key], bool):
            raise ApiError(400, f"'stream_options.{key}' must be a boolean", "stream_options")
    prompt_logprobs = _field(body, "prompt_logprobs", int)
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'prompt_logprobs' must be in [0, {MAX_LOGPROBS}], got {prompt_logprobs}", "prompt_logprobs")
    truncate = _field(body, "truncate_prompt_tokens", int)
    if truncate is not None and truncate < 1:
        raise ApiError(400, f"'truncate_prompt_tokens' must be >= 1, got {truncate}", "truncate_prompt_tokens")
    priority = _field(body, "priority", int, 0)
    if not -(2**31) <= priority < 2**31:
        raise ApiError(400, f"'priority' must be a 32-bit integer, got {priority}", "priority")
    return _Common(stream, flags["include_usage"], flags["continuous_usage_stats"], _field(body, "return_token_ids", bool, False), prompt_logprobs,
                   truncate, priority)


def _truncated(prompt: list[int], common: _Common, max_model_len: int) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (vLLM's rule: at most the context length)."""
    if common.truncate is None:
        return prompt
    if common.truncate > max_model_len:
        raise ApiError(400, f"'truncate_prompt_tokens' ({common.truncate}) must be <= the context length {max_model_len}", "truncate_prompt_tokens")
    return prompt[-common.truncate :]


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None, room: int) -> int:
    """The first of `names` present, else `default`, else all the room the context leaves."""
    for name in names:
        value = _field(body, name, int)
        if value is not None:
            if value < 0:
                raise ApiError(400, f"'{name}' must be >= 0, got {value}", name)
            return value
    return default if default is not None else max(room, 1)


def parse_completion(body: dict, tok: Tokenizer, model: str, max_model_len: int) -> Request:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) > MAX_SAMPLES and not all(isinstance(t, int) for t in prompt):
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_SAMPLES} per request", "prompt")
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tok.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays", "prompt")
    if any(not p for p in prompts):
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    common = _common(body)
    prompts = [_truncated(p, common, max_model_len) for p in prompts]
    echo = _field(body, "echo", bool, False)
    logprobs = _field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    room = max_model_len - max(len(p) for p in prompts)
    max_tokens = _max_tokens(body, ("max_tokens",), 16, room)
    drop = max_tokens == 0
    if drop and not echo:
        raise ApiError(400, "'max_tokens' must be >= 1 (0 is allowed only with echo)", "max_tokens")
    guide, guide_param = _guide(body)
    scored = [k for k in (common.prompt_logprobs, logprobs if echo else None) if k is not None]
    params = _sampling(body, max(max_tokens, 1), logprobs, max(scored) if scored else None, guide)
    if len(prompts) * params.n > MAX_SAMPLES:
        raise ApiError(400, f"{len(prompts)} prompts with n={params.n} are {len(prompts) * params.n} samples; at most {MAX_SAMPLES} per request", "n")
    return Request(
        "completion", model, prompts, params, common.stream, common.include_usage, echo, logprobs, drop, guide_param,
        continuous_usage=common.continuous_usage, return_token_ids=common.return_token_ids, prompt_logprobs=common.prompt_logprobs,
        priority=common.priority,
    )


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content parts must be {{'type': 'text', 'text': ...}}", "messages")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM and llama.cpp join text parts
    raise ApiError(400, f"messages[{index}].content must be a string or an array of text parts", "messages")


def _tool_calls(message: dict, index: int) -> list[dict]:
    """An assistant message's earlier tool calls, checked, with their arguments parsed (as HF chat
    templates expect them)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ApiError(400, f"messages[{index}].tool_calls must be an array", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
            raise ApiError(400, f"messages[{index}].tool_calls entries must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", "messages")
        try:
            arguments = parse_json((fn.get("arguments") or "{}").encode(), f"messages[{index}].tool_calls arguments")
        except ApiError as e:
            raise ApiError(400, e.message, "messages") from None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"messages[{index}].tool_calls arguments must be a JSON object, as a string", "messages")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _chat_messages(messages: list, plan: ToolPlan | None, native_tools: bool) -> list[dict]:
    """Messages for the chat template: checked, developer as system, and for a template without tool
    support the tool prompt, calls and results as text."""
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}", "messages")
        text = "" if role == "assistant" and m.get("content") is None else _message_text(m, i)
        message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        calls = _tool_calls(m, i) if role == "assistant" else []
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ApiError(400, f"messages[{i}].tool_call_id must be a string", "messages")
        if native_tools:
            message.update({"tool_calls": calls} if calls else {})
            message.update({"tool_call_id": m["tool_call_id"]} if role == "tool" else {})
        elif role == "tool":
            message = {"role": "user", "content": result_text(text)}
        elif calls:
            message["content"] = "\n".join(([text] if text else []) + [call_text(c) for c in calls])
        rendered.append(message)
    if plan is not None and not native_tools:
        if rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + plan.system_prompt()}
        else:
            rendered.insert(0, {"role": "system", "content": plan.system_prompt()})
    return rendered


def chat_prompt(body: dict, tok: Tokenizer) -> tuple[list[int], ToolPlan | None]:
    """The token ids /v1/chat/completions renders for a body's messages, tools and template fields
    (/tokenize renders with this too), and the tool plan."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    try:
        plan = parse_tools(body)
    except ToolError as e:
        raise ApiError(400, str(e), e.param) from None
    native_tools = "tools" in (tok.chat_template or "")
    rendered = _chat_messages(messages, plan, native_tools)
    extra = {"tools": [template_tool(t) for t in plan.tools]} if plan is not None and native_tools else {}
    kwargs = _field(body, "chat_template_kwargs", dict, {})
    reserved = sorted({"self", "messages", "tools", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token"} & set(kwargs))
    if reserved:
        raise ApiError(400, f"'chat_template_kwargs' must not set {', '.join(reserved)} (send them as request fields)", "chat_template_kwargs")
    add_generation_prompt = _field(body, "add_generation_prompt", bool, True)
    continue_final = _field(body, "continue_final_message", bool, False)
    if continue_final and add_generation_prompt:
        raise ApiError(400, "'continue_final_message' needs 'add_generation_prompt': false", "continue_final_message")
    if continue_final and messages[-1].get("role") != "assistant":
        raise ApiError(400, "'continue_final_message' needs the last message to be the assistant's", "continue_final_message")
    try:
        text = tok.apply_chat_template(rendered, add_generation_prompt, continue_final, **kwargs, **extra)
    except UserError as e:
        raise ApiError(400, f"the chat template rejected the messages: {e}", "messages") from None
    return tok.encode(text, add_special_tokens=False), plan


def parse_chat(body: dict, tok: Tokenizer, model: str, max_model_len: int) -> Request:
    prompt, plan = chat_prompt(body, tok)
    common = _common(body)
    prompt = _truncated(prompt, common, max_model_len)
    logprobs = _field(body, "logprobs", bool, False)
    top = _field(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    if top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None, max_model_len - len(prompt))
    if max_tokens == 0:
        raise ApiError(400, "'max_tokens' must be >= 1", "max_tokens")
    count = (top or 0) if logprobs else None
    guide, guide_param = _guide(body)
    call_guide = plan.guide() if plan is not None else None
    if call_guide is not None:
        if guide is not None:
            raise ApiError(400, f"'tool_choice' {plan.mode!r} constrains the output; it cannot be combined with '{guide_param}'", "tool_choice")
        guide, guide_param = call_guide, "tools"
    params = _sampling(body, max_tokens, count, common.prompt_logprobs, guide)
    final = body["messages"][-1]
    echo = _field(body, "echo", bool, False) and final.get("role") == "assistant"  # vLLM: only a message of the reply's role
    return Request(
        "chat", model, [prompt], params, common.stream, common.include_usage, logprobs=count, guide_param=guide_param, tools=plan,
        continuous_usage=common.continuous_usage, return_token_ids=common.return_token_ids, prompt_logprobs=common.prompt_logprobs,
        echo=echo, echo_text=_message_text(final, len(body["messages"]) - 1) if echo else "", priority=common.priority,
    )
