"""Engine outputs in, OpenAI response bodies out: one renderer per endpoint.

A renderer keeps one state per choice and is fed every step output of the request in order. Each
`add` returns that output's streamed choice (or None when it adds nothing to say); `response` builds
the whole, non-streamed body from the same states. So echo, the `length` rule for scoring-only
requests, log-probs and tool-call parsing are written once, and a streamed answer always adds up to
the whole one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxserve.engine.outputs import StepOutput, TopLogprobs
from jaxserve.server.protocol import Request
from jaxserve.server.tools import ToolCallParser
from jaxserve.tokenizer import Tokenizer


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Choice:
    """What one choice (prompt index * n + sample index) has said so far."""

    started: bool = False
    text: str = ""  # content released, in order
    logprobs: list = field(default_factory=list)  # completions: (token, logprob, top) per token; chat: entries
    tokens: int = 0  # generated tokens counted in usage
    finish_reason: str | None = None
    tools: ToolCallParser | None = None  # chat with tools
    calls: list[dict] = field(default_factory=list)  # chat: tool calls found at the end


class Renderer:
    """What both endpoints share: ids, heads, usage, and the per-choice states."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, req: Request, tok: Tokenizer) -> None:
        self.req, self.tok = req, tok
        self.id = f"{self.id_prefix}-{req.request_id}"
        self.choices: dict[int, Choice] = {}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.req.created, "model": self.req.model}

    def token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def add(self, prompt_index: int, out: StepOutput) -> dict | None:
        """Fold one output into its choice; the streamed choice it makes (None: nothing to send)."""
        index = prompt_index * self.req.params.n + out.index
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = self._new_choice()
        token = [] if out.token_id is None or self.req.drop_generated else [out.token_id]
        choice.tokens += len(token)
        delta = self._add(choice, prompt_index, index, out, token)
        choice.started = True
        return delta

    def _new_choice(self) -> Choice:
        return Choice()

    def _add(self, choice: Choice, prompt_index: int, index: int, out: StepOutput, token: list[int]) -> dict | None:
        raise NotImplementedError

    def chunk(self, choices: list[dict]) -> dict:
        return {**self._head(self.chunk_object), "choices": choices}

    def usage(self) -> dict:
        return usage(sum(map(len, self.req.prompts)), sum(c.tokens for c in self.choices.values()))

    def usage_chunk(self) -> dict:
        return {**self.chunk([]), "usage": self.usage()}

    def response(self) -> dict:
        """The whole (non-streamed) body from every output added."""
        choices = [self._whole(index, self.choices[index]) for index in sorted(self.choices)]
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    def _whole(self, index: int, choice: Choice) -> dict:
        raise NotImplementedError


class CompletionRenderer(Renderer):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def _add(self, choice: Choice, prompt_index: int, index: int, out: StepOutput, token: list[int]) -> dict | None:
        req = self.req
        text = "" if req.drop_generated else out.text
        scored = list(zip(token, [out.logprob], [out.top_logprobs]))
        if not choice.started and req.echo:
            prompt = req.prompts[prompt_index]
            text = self.tok.decode(prompt, skip_special_tokens=False) + text
            if out.prompt_logprobs is not None:  # the prompt was scored (the first token has none)
                scored = [(prompt[0], None, None), *((t, lp, top) for t, (lp, top) in zip(prompt[1:], out.prompt_logprobs)), *scored]
        finish = "length" if req.drop_generated and out.finish_reason else out.finish_reason
        if not text and not scored and not finish:
            return None
        offset = len(choice.text)
        choice.text += text
        choice.logprobs += scored
        choice.finish_reason = finish
        logprobs = self._logprobs(scored, offset) if req.logprobs is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, scored: list[tuple[int, float | None, TopLogprobs | None]], offset: int) -> dict:
        """Parallel arrays, with each token's character offset into the choice's text."""
        tokens = [self.token(t) for t, _, _ in scored]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in scored],
            "top_logprobs": [None if top is None else {self.token(t): lp for t, lp in top} for _, _, top in scored],
            "text_offset": offsets,
        }

    def _whole(self, index: int, choice: Choice) -> dict:
        logprobs = self._logprobs(choice.logprobs, 0) if self.req.logprobs is not None else None
        return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


class ChatRenderer(Renderer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _new_choice(self) -> Choice:
        return Choice(tools=ToolCallParser(self.req.tools) if self.req.tools is not None else None)

    def _entry(self, token: int, logprob: float) -> dict:
        s = self.token(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    def _add(self, choice: Choice, prompt_index: int, index: int, out: StepOutput, token: list[int]) -> dict | None:
        text, finish, calls = out.text, out.finish_reason, []
        entries = [{**self._entry(t, out.logprob), "top_logprobs": [self._entry(a, b) for a, b in out.top_logprobs]} for t in token]
        choice.logprobs += entries
        if choice.tools is not None:
            text = choice.tools.feed(text)
            if finish:
                rest, calls = choice.tools.finish()
                text += rest
                finish = choice.tools.finish_reason(finish, calls)
            elif not text and choice.started:
                return None  # held back: part of a tool call
        choice.text += text
        choice.calls += calls
        choice.finish_reason = finish
        delta: dict[str, Any] = {"role": "assistant", "content": text} if not choice.started else ({"content": text} if text or token else {})
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        if not delta and not finish:
            return None
        logprobs = {"content": entries} if self.req.logprobs is not None else None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _whole(self, index: int, choice: Choice) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.calls:
            message = {"role": "assistant", "content": choice.text or None, "tool_calls": choice.calls}
        logprobs = {"content": choice.logprobs} if self.req.logprobs is not None else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def renderer(req: Request, tok: Tokenizer) -> Renderer:
    """The renderer of the request's endpoint."""
    return (CompletionRenderer if req.kind == "completion" else ChatRenderer)(req, tok)
