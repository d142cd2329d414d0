"""The Responses API (`POST /v1/responses`), served through the chat path.

A Responses body becomes a chat body (`chat_body`): `instructions` a system message, `input` the
messages (text, earlier function calls and their outputs), `text.format` a `response_format`, flat
function `tools` the chat's nested ones. Parsing, checks, the engine and the per-choice state are the
chat endpoint's; `ResponsesRenderer` turns that state into a Response object and its typed stream
events. `previous_response_id` continues a stored conversation: `ResponseStore` keeps each stored
response's messages (input and output) per tenant, bounded by count and age; `store: false` keeps nothing.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from jaxserve.engine.outputs import StepOutput
from jaxserve.server.protocol import ApiError, Request
from jaxserve.server.render import ChatRenderer, sse
from jaxserve.tokenizer import Tokenizer


class ResponseStore:
    """Conversations of stored responses by tenant and id: the oldest of a tenant's dropped beyond
    `capacity`, any beyond `max_age` seconds. A tenant neither reads another's nor evicts them."""

    def __init__(self, capacity: int = 1024, max_age: float = 3600.0) -> None:
        self.capacity, self.max_age = capacity, max_age
        self._items: dict[str, OrderedDict[str, tuple[float, list[dict]]]] = {}
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        for tenant, items in list(self._items.items()):
            while items and (len(items) > self.capacity or now - next(iter(items.values()))[0] > self.max_age):
                items.popitem(last=False)
            if not items:
                del self._items[tenant]

    def put(self, tenant: str, response_id: str, messages: list[dict]) -> None:
        with self._lock:
            now = time.monotonic()
            self._items.setdefault(tenant, OrderedDict())[response_id] = (now, messages)
            self._expire(now)

    def get(self, tenant: str, response_id: str) -> list[dict]:
        """The tenant's stored conversation; a 404 for an id unknown to it or expired (as OpenAI answers)."""
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.get(tenant, {}).get(response_id)
        if item is None:
            raise ApiError(404, f"no stored response '{response_id}' (unknown, expired, or created with store: false)", "previous_response_id", "not_found_error", "response_not_found")
        return item[1]


@dataclass(frozen=True)
class ResponsesRequest:
    """What a Responses request adds to its chat request: echoed fields and where to store the result."""

    id: str
    body: dict  # the fields a Response object echoes back
    messages: list[dict]  # the conversation so far (previous turns, then this input), for the store
    store: ResponseStore | None  # None: `store: false`
    tenant: str  # whose store entry it is
    tools: list[dict] = field(default_factory=list)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of input_text parts", "input")


def _input_messages(value: Any) -> list[dict]:
    """`input` as chat messages: text, messages, earlier function calls and their outputs."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a string or a non-empty array of items", "input")
    out: list[dict] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            out.append({"role": item["role"], "content": _text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call" and isinstance(item.get("name"), str) and isinstance(item.get("arguments"), str):
            call = {"id": item.get("call_id") or item.get("id"), "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise ApiError(400, f"input[{i}] must be a message ({{'role', 'content'}}), a function_call or a function_call_output", "input")
    return out


def _tools(body: dict) -> tuple[list[dict], Any]:
    """Flat Responses function tools and tool_choice in the chat's nested shapes."""
    tools = body.get("tools")
    if tools is None:
        return [], body.get("tool_choice")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise ApiError(400, "'tools' must be an array of {'type': 'function', 'name', 'parameters'} (function tools are supported)", "tools")
    nested = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}} for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return nested, choice


def chat_body(body: dict, store: ResponseStore, tenant: str) -> tuple[dict, ResponsesRequest]:
    """The chat body that computes a Responses request of `tenant`, and what the response adds to it."""
    if "input" not in body:
        raise ApiError(400, "'input' is required", "input")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise ApiError(400, "'previous_response_id' must be a string", "previous_response_id")
    history = list(store.get(tenant, previous)) if previous else []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", "instructions")
    keep = body.get("store", True)
    if not isinstance(keep, bool):
        raise ApiError(400, "'store' must be a boolean", "store")
    messages = history + _input_messages(body["input"])
    tools, tool_choice = _tools(body)
    chat: dict[str, Any] = {
        k: body[k] for k in ("model", "temperature", "top_p", "stream", "parallel_tool_calls", "seed", "user") if k in body
    }
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) + messages  # instructions are not carried over
    if "max_output_tokens" in body:
        chat["max_tokens"] = body["max_output_tokens"]
    if tools:
        chat["tools"] = tools
    if tool_choice is not None:
        chat["tool_choice"] = tool_choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") in ("json_object", "text"):
        chat["response_format"] = {"type": fmt["type"]}
    elif fmt is not None:
        raise ApiError(400, "'text.format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "text")
    echoed = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "previous_response_id": previous,
        "store": keep,
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "metadata": body.get("metadata") or {},
    }
    return chat, ResponsesRequest(f"resp_{uuid.uuid4().hex}", echoed, messages, store if keep else None, tenant, body.get("tools") or [])


class ResponsesRenderer(ChatRenderer):
    """The chat state as a Response object, and as Responses stream events."""

    def __init__(self, req: Request, tok: Tokenizer) -> None:
        super().__init__(req, tok)
        self.resp: ResponsesRequest = req.responses
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0  # of the next stream event
        self._text_open = False  # the message item and its text part have been announced

    def _event(self, kind: str, **fields: Any) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def sse(self, event: dict) -> str:
        """Responses events are named, and their stream has no [DONE]."""
        return f"event: {event['type']}\n" + sse(event)

    def sse_end(self) -> list[str]:
        return []

    def _message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text else []}

    def _object(self, status: str, output: list[dict]) -> dict:
        choice = self.choices[0]
        usage = self.usage()
        incomplete = status == "incomplete"
        return {
            "id": self.resp.id, "object": "response", "created_at": self.req.created, "status": status, "model": self.req.model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "tools": self.resp.tools, **self.resp.body,
            "usage": None if status == "in_progress" else {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"], "total_tokens": usage["total_tokens"],
                "input_tokens_details": usage["prompt_tokens_details"], "output_tokens_details": {"reasoning_tokens": 0},
            },
            **({"output_text": choice.text} if status != "in_progress" else {}),
        }

    def _output(self) -> list[dict]:
        choice = self.choices[0]
        items = [self._message(choice.text, "completed")] if choice.text or not choice.calls else []
        return items + [
            {"type": "function_call", "id": f"fc_{c['id']}", "call_id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"}
            for c in choice.calls
        ]

    def _status(self) -> str:
        return "incomplete" if self.choices[0].finish_reason == "length" else "completed"

    def response(self) -> dict:
        out = self._object(self._status(), self._output())
        self._store()
        return out

    def _store(self) -> None:
        if self.resp.store is None:
            return
        choice = self.choices[0]
        reply: dict[str, Any] = {"role": "assistant", "content": choice.text or None}
        if choice.calls:
            reply["tool_calls"] = [{"id": c["id"], "type": "function", "function": c["function"]} for c in choice.calls]
        self.resp.store.put(self.resp.tenant, self.resp.id, [*self.resp.messages, reply])

    def opening(self) -> list[dict]:
        shell = self._object("in_progress", [])
        return [
            self._event("response.created", response=shell),
            self._event("response.in_progress", response=shell),
        ]

    def frames(self, prompt_index: int, out: StepOutput) -> list[dict]:
        choice = self.add(prompt_index, out)
        text = choice["delta"].get("content") if choice else None
        if not text:
            return []
        opening = [] if self._text_open else self._open_text()
        return [*opening, self._event("response.output_text.delta", item_id=self.message_id, output_index=0, content_index=0, delta=text)]

    def _open_text(self) -> list[dict]:
        self._text_open = True
        return [
            self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress")),
            self._event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}),
        ]

    def closing(self) -> list[dict]:
        choice, events = self.choices[0], []
        output = self._output()
        if output and output[0]["type"] == "message":
            if not self._text_open:
                events += self._open_text()
            part = {"type": "output_text", "text": choice.text, "annotations": []}
            events += [
                self._event("response.output_text.done", item_id=self.message_id, output_index=0, content_index=0, text=choice.text),
                self._event("response.content_part.done", item_id=self.message_id, output_index=0, content_index=0, part=part),
                self._event("response.output_item.done", output_index=0, item=output[0]),
            ]
        for index, item in enumerate(output):
            if item["type"] == "function_call":
                events += [
                    self._event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
                    self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item),
                ]
        status = self._status()
        events.append(self._event(f"response.{status}", response=self._object(status, output)))
        self._store()
        return events

    def failure(self, error: ApiError) -> list[dict]:
        return [self._event("error", code=error.code or ("server_error" if error.status >= 500 else "invalid_request"), message=error.message,
                            param=error.param)]
