"""Tool calling on /v1/chat/completions: tool definitions into the prompt, tool calls out of the text.

- `tool_choice` "required" or a named function: the output is constrained (a JSON schema) to a valid
  call, so it parses whatever the model would have written; "required" takes a JSON array of
  `{"name", "arguments"}` objects, a named function its arguments object.
- "auto": calls are parsed from the model's text in the Hermes/Qwen format, `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, the format the tool prompt asks for.
- "none" (or no tools): plain chat; the tools are not shown to the model.

A chat template that knows tools (its source reads `tools`) gets them as `tools=`, as HF's
`apply_chat_template` passes them, and the history's assistant `tool_calls` and `tool` messages as
they are. Other templates get the Hermes tool prompt in the system message and the calls and results
as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jaxserve.structured.guide import Guide

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|$)", re.S)

_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class ToolError(ValueError):
    """A malformed `tools` or `tool_choice` (the message says what is wrong; `param` names the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[dict, ...]  # {"name", "description", "parameters"} of each function
    mode: str  # "auto" | "required" | "named"
    name: str | None = None  # the named function
    parallel: bool = True  # "required" may return several calls

    def guide(self) -> Guide | None:
        """The constraint that makes the output a valid call (None for "auto")."""
        if self.mode == "named":
            return Guide.json_schema(next(t for t in self.tools if t["name"] == self.name)["parameters"])
        if self.mode == "auto":
            return None
        defs: dict[str, Any] = {}
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": _hoist(t["parameters"], f"tool{i}", defs)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, t in enumerate(self.tools)
        ]
        schema = {"type": "array", "items": {"anyOf": call}, "minItems": 1, **({} if self.parallel else {"maxItems": 1}), "$defs": defs}
        return Guide.json_schema(schema)

    def system_prompt(self) -> str:
        return _PROMPT.format(tools="\n".join(json.dumps(template_tool(t)) for t in self.tools))


def _hoist(schema: dict, prefix: str, defs: dict[str, Any]) -> dict:
    """A reference to `schema` for use below another root: the schema and its `$defs`/`definitions`
    move into `defs` under names starting with `prefix`, and its local `$ref`s are rewritten to match
    (a pointer such as `#/$defs/Address` would otherwise resolve against the new root)."""

    def moved(ref: str) -> str:
        for kind in ("#/$defs/", "#/definitions/"):
            if ref.startswith(kind):
                return f"#/$defs/{prefix}.{ref[len(kind):]}"
        return f"#/$defs/{prefix}{ref[1:]}"  # "#" or "#/properties/...": into the moved root

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items()}
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            out["$ref"] = moved(node["$ref"])
        return out

    for kind in ("definitions", "$defs"):
        for name, sub in (schema.get(kind) or {}).items():
            defs[f"{prefix}.{name}"] = rewrite(sub)
    defs[prefix] = rewrite({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
    return {"$ref": f"#/$defs/{prefix}"}


def template_tool(tool: dict) -> dict:
    """A function in the OpenAI / HF chat-template shape."""
    return {"type": "function", "function": tool}


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's tools and tool_choice (None when no call can happen); ToolError when malformed."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty array", "tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}", "tools")
        if any(f["name"] == name for f in functions):
            raise ToolError(f"tools[{i}].function.name {name!r} is used twice", "tools")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        for kind in ("$defs", "definitions"):
            if not isinstance(parameters.get(kind, {}), dict):
                raise ToolError(f"tools[{i}].function.parameters.{kind} must be an object of named schemas", "tools")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description must be a string", "tools")
        functions.append({"name": name, "description": description, "parameters": parameters})
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None or choice == "auto":
        return ToolPlan(tuple(functions), "auto", parallel=parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan(tuple(functions), "required", parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if not any(f["name"] == fn["name"] for f in functions):
        raise ToolError(f"'tool_choice' names the function {fn['name']!r}, which is not among the tools", "tool_choice")
    return ToolPlan(tuple(functions), "named", fn["name"], parallel)


def call_text(call: dict) -> str:
    """An assistant's earlier tool call as the Hermes text a template without tools shows."""
    fn = call["function"]
    return f"{_OPEN}\n{json.dumps({'name': fn['name'], 'arguments': fn['arguments']})}\n{_CLOSE}"


def result_text(content: str) -> str:
    """A tool's result as the Hermes text a template without tools shows (in a user turn)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def _call(name: str, arguments: Any) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }


class ToolCallParser:
    """One choice's output split into content and tool calls, fed text as it streams."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""  # all output so far
        self.sent = 0  # characters released as content

    def feed(self, text: str) -> str:
        """Content to release now. Constrained output is all call; "auto" output is content up to a
        `<tool_call>` tag (a possible start of the tag is held back)."""
        self.text += text
        if self.plan.mode != "auto":
            return ""
        tag = self.text.find(_OPEN)
        end = tag if tag >= 0 else len(self.text) - max((k for k in range(1, len(_OPEN)) if self.text.endswith(_OPEN[:k])), default=0)
        out, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return out

    def finish(self, reason: str | None) -> tuple[str, list[dict]]:
        """(content not yet released, tool calls). Output that does not parse as calls is content;
        so is "auto" text outside the call blocks. A call cut off by max_tokens (`reason` "length")
        is still a call, its `arguments` the JSON text as far as it got: the "length" finish reason
        tells the client it is incomplete."""
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        cut = reason == "length"
        if self.plan.mode == "auto":
            blocks = _CALL.findall(rest)
            calls = [c for c in map(_hermes_call, blocks) if c is not None]
            if cut and len(calls) == len(blocks) - 1:
                calls += _cut_calls(blocks[-1])
            if not blocks or len(calls) < len(blocks):
                return rest, []
            return _CALL.sub("", rest).strip(), calls
        try:
            value = json.loads(rest)
        except json.JSONDecodeError:
            if not cut:
                return rest, []
            calls = [_call(self.plan.name, rest)] if self.plan.mode == "named" else _cut_calls(rest)
            return ("", calls) if calls else (rest, [])  # cut before a call's name: the text stays content
        if self.plan.mode == "named":
            return "", [_call(self.plan.name, value)]
        return "", [_call(item["name"], item["arguments"]) for item in value]

    def finish_reason(self, reason: str | None, calls: list[dict]) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call, "stop" for a forced named function; an
        output cut off by max_tokens stays "length"."""
        if not calls or reason != "stop":
            return reason
        return "stop" if self.plan.mode == "named" else "tool_calls"


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _cut_calls(text: str) -> list[dict]:
    """The calls in `{"name": ..., "arguments": ...}` objects of output cut off mid-call: each with
    its arguments' text, the last one incomplete."""
    heads = list(_CALL_HEAD.finditer(text))
    calls = []
    for k, head in enumerate(heads):
        last = k + 1 == len(heads)
        arguments = text[head.end() : len(text) if last else heads[k + 1].start()].rstrip()
        if not last:  # `{...}}, `: the arguments, then the brace that closes the call object
            arguments = arguments.rstrip(",").rstrip().removesuffix("}")
        calls.append(_call(json.loads(f'"{head.group(1)}"'), arguments))
    return calls


def _hermes_call(block: str) -> dict | None:
    try:
        item = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    return _call(item["name"], item.get("arguments", item.get("parameters", {})))
