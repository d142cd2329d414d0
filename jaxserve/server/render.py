"""Engine outputs in, OpenAI response bodies out: one renderer per endpoint.

A renderer keeps one state per choice and is fed every step output of the request in order. Each
`add` returns that output's streamed choice (or None when it adds nothing to say); `response` builds
the whole, non-streamed body from the same states. So echo, the `length` rule for scoring-only
requests, log-probs and tool-call parsing are written once, and a streamed answer always adds up to
the whole one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jaxserve.engine.outputs import StepOutput, TopLogprobs
from jaxserve.server.protocol import ApiError, Request
from jaxserve.server.reasoning import ReasoningParser
from jaxserve.server.tools import ToolCallParser
from jaxserve.tokenizer import Tokenizer


def sse(obj: dict | str) -> str:
    """One server-sent event's data line(s)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object. Completion tokens count the stop token that ended a sample (as vLLM
    does); cached tokens are prompt tokens read from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Choice:
    """What one choice (prompt index * n + sample index) has said so far."""

    started: bool = False
    text: str = ""  # content released, in order
    logprobs: list = field(default_factory=list)  # completions: (token, logprob, top) per token; chat: entries
    held: list = field(default_factory=list)  # log-probs of tokens whose text is not released yet (streamed with it)
    token_ids: list[int] = field(default_factory=list)  # generated, in order
    held_ids: list[int] = field(default_factory=list)  # generated, not streamed yet (held with their text)
    tokens: int = 0  # generated tokens counted in usage
    finish_reason: str | None = None
    tools: ToolCallParser | None = None  # chat with tools
    calls: list[dict] = field(default_factory=list)  # chat: tool calls found at the end
    reasoning: ReasoningParser | None = None  # chat with a reasoning parser (`serve --reasoning-parser`)
    thought: str = ""  # reasoning released, in order (`text` is then the content)


class Renderer:
    """What both endpoints share: ids, heads, usage, and the per-choice states."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, req: Request, tok: Tokenizer) -> None:
        self.req, self.tok = req, tok
        self.id = f"{self.id_prefix}-{req.request_id}"
        count = len(req.prompts) * req.params.n
        self.choices: dict[int, Choice] = {i: self._new_choice() for i in range(count)}
        self.cached: dict[int, int] = {}  # prompt index -> its tokens read from the prefix cache
        self.scored: dict[int, tuple] = {}  # prompt index -> its prompt log-probs (engine output)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.req.created, "model": self.req.model}

    def token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def add(self, prompt_index: int, out: StepOutput) -> dict | None:
        """Fold one output into its choice; the streamed choice it makes (None: nothing to send)."""
        req = self.req
        index = prompt_index * req.params.n + out.index
        choice = self.choices[index]
        token = [] if out.token_id is None or req.drop_generated else [out.token_id]
        choice.tokens += len(token) + (out.stop_token_id is not None and not req.drop_generated)
        choice.token_ids += token
        choice.held_ids += token
        if out.num_cached_tokens is not None and out.index == 0:
            self.cached[prompt_index] = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.scored[prompt_index] = out.prompt_logprobs
        first = not choice.started
        delta = self._add(choice, prompt_index, index, out, token)
        choice.started = True
        if delta is None:
            return None
        if req.return_token_ids:
            delta["token_ids"], choice.held_ids = choice.held_ids, []
            if first and req.kind == "completion":
                delta["prompt_token_ids"] = req.prompts[prompt_index]
        if first and req.prompt_logprobs is not None and req.kind == "completion":
            delta["prompt_logprobs"] = self.prompt_logprobs(prompt_index)
        return delta

    def prompt_logprobs(self, prompt_index: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: None for the first prompt token, then for each later one a map of
        token id to its log-prob, rank (where among the top ones) and text: the token itself, then
        the top `prompt_logprobs` alternatives."""
        prompt, k = self.req.prompts[prompt_index], self.req.prompt_logprobs or 0
        out: list[dict | None] = [None]
        for token, (lp, top) in zip(prompt[1:], self.scored.get(prompt_index, ())):
            ids = [t for t, _ in top]
            entry = {str(token): {"logprob": lp, "rank": ids.index(token) + 1 if token in ids else None, "decoded_token": self.token(token)}}
            for rank, (t, b) in enumerate(top[:k], 1):
                entry.setdefault(str(t), {"logprob": b, "rank": rank, "decoded_token": self.token(t)})
            out.append(entry)
        return out

    def _new_choice(self) -> Choice:
        return Choice()

    def _add(self, choice: Choice, prompt_index: int, index: int, out: StepOutput, token: list[int]) -> dict | None:
        raise NotImplementedError

    # ---- the stream: events (the objects sent), each as one SSE frame or one WebSocket message ----

    def opening(self) -> list[dict]:
        """Events due before any output."""
        return []

    def frames(self, prompt_index: int, out: StepOutput) -> list[dict]:
        choice = self.add(prompt_index, out)
        return [] if choice is None else [self.chunk([choice])]

    def closing(self) -> list[dict]:
        return [self.usage_chunk()] if self.req.include_usage else []

    def failure(self, error: ApiError) -> list[dict]:
        """What a stream sends when its request fails midway (instead of `closing`)."""
        return [error.body()]

    def sse(self, event: dict) -> str:
        """One event as a server-sent event."""
        return sse(event)

    def sse_end(self) -> list[str]:
        """What ends an SSE stream, after the closing or failure events."""
        return [sse("[DONE]")]

    def chunk(self, choices: list[dict]) -> dict:
        """A streamed chunk (with the usage so far, when asked for continuous usage stats)."""
        out = {**self._head(self.chunk_object), "choices": choices}
        if self.req.continuous_usage and choices:
            out["usage"] = self.usage()
        return out

    def usage(self) -> dict:
        return usage(sum(map(len, self.req.prompts)), sum(c.tokens for c in self.choices.values()), sum(self.cached.values()))

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
                k = req.logprobs or 0
                scored = [(prompt[0], None, None), *((t, lp, top[:k]) for t, (lp, top) in zip(prompt[1:], out.prompt_logprobs)), *scored]
        finish = "length" if req.drop_generated and out.finish_reason else out.finish_reason
        choice.logprobs += scored
        if not text and not finish:
            choice.held += scored  # part of a character: sent with the text that completes it
            return None
        scored, choice.held = choice.held + scored, []
        offset = len(choice.text)
        choice.text += text
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
            # The sampled token first, then the alternatives asked for (only it for logprobs 0), as vLLM.
            "top_logprobs": [None if top is None else {self.token(t): lp, **{self.token(a): b for a, b in top}} for t, lp, top in scored],
            "text_offset": offsets,
        }

    def _whole(self, index: int, choice: Choice) -> dict:
        req = self.req
        logprobs = self._logprobs(choice.logprobs, 0) if req.logprobs is not None else None
        out = {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        if req.return_token_ids:
            out.update(prompt_token_ids=req.prompts[index // req.params.n], token_ids=choice.token_ids)
        if req.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs(index // req.params.n)
        return out


class ChatRenderer(Renderer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, req: Request, tok: Tokenizer, reasoning: type[ReasoningParser] | None = None) -> None:
        """`reasoning`: the server's reasoning parser, which splits each choice's output into
        `reasoning_content` and `content` (None: all content)."""
        self.reasoning_parser = reasoning
        super().__init__(req, tok)

    def _new_choice(self) -> Choice:
        parser = self.reasoning_parser(constrained=self.req.params.guide is not None) if self.reasoning_parser is not None else None
        return Choice(text=self.req.echo_text, tools=ToolCallParser(self.req.tools) if self.req.tools is not None else None, reasoning=parser)

    def opening(self) -> list[dict]:
        """A role-only chunk per choice, before any text (what OpenAI's clients expect first), then the
        echoed final message, if any."""
        req, chunks = self.req, []
        for i in self.choices:
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            head = self.chunk([role])
            if req.return_token_ids:
                head["prompt_token_ids"] = req.prompts[0]
            chunks.append(head)
            if req.echo_text:
                chunks.append(self.chunk([{"index": i, "delta": {"content": req.echo_text}, "logprobs": None, "finish_reason": None}]))
        return chunks

    def _entry(self, token: int, logprob: float) -> dict:
        s = self.token(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    def _add(self, choice: Choice, prompt_index: int, index: int, out: StepOutput, token: list[int]) -> dict | None:
        text, finish, calls, thought = out.text, out.finish_reason, [], ""
        entries = [{**self._entry(t, out.logprob), "top_logprobs": [self._entry(a, b) for a, b in out.top_logprobs]} for t in token]
        choice.logprobs += entries
        if choice.reasoning is not None:  # the reasoning first: tool calls are parsed from the content
            thought, text = choice.reasoning.feed(text)
            if finish:
                rest_thought, rest = choice.reasoning.finish()
                thought, text = thought + rest_thought, text + rest
            choice.thought += thought
        if choice.tools is not None:
            text = choice.tools.feed(text)
            if finish:
                rest, calls = choice.tools.finish(finish)
                text += rest
                finish = choice.tools.finish_reason(finish, calls)
        choice.text += text
        choice.calls += calls
        choice.finish_reason = finish
        if not text and not thought and not finish:
            choice.held += entries  # part of a character, a tag or a tool call: sent with the text
            return None
        entries, choice.held = choice.held + entries, []
        delta: dict[str, Any] = {"reasoning_content": thought, "reasoning": thought} if thought else {}
        delta.update({"content": text} if text else {})
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        logprobs = {"content": entries} if self.req.logprobs is not None else None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _whole(self, index: int, choice: Choice) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.reasoning is not None:  # vLLM's field names, the older first (what clients read most)
            thought = choice.thought if choice.reasoning.reasoned else None
            message = {"role": "assistant", "content": choice.text or (None if thought is not None else ""), "reasoning_content": thought, "reasoning": thought}
        if choice.calls:
            message = {**message, "content": choice.text or None, "tool_calls": choice.calls}
        logprobs = {"content": choice.logprobs} if self.req.logprobs is not None else None
        out = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        if self.req.return_token_ids:
            out["token_ids"] = choice.token_ids
        return out

    def response(self) -> dict:
        """vLLM puts a chat's prompt token ids and prompt log-probs beside the choices."""
        out = super().response()
        if self.req.return_token_ids:
            out["prompt_token_ids"] = self.req.prompts[0]
        if self.req.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs(0)
        return out


def renderer(req: Request, tok: Tokenizer, reasoning: type[ReasoningParser] | None = None) -> Renderer:
    """The renderer of the request's endpoint; `reasoning`: the server's reasoning parser (chat only)."""
    return CompletionRenderer(req, tok) if req.kind == "completion" else ChatRenderer(req, tok, reasoning)
