"""Streaming requests to an OpenAI-compatible server (ours, vLLM, llama-server...), timed chunk by chunk.

Each request streams with `stream_options.include_usage`, so token counts are the server's own; a
server that sends no usage is counted one token per text chunk. A chunk may carry several tokens
(speculative decoding, detokenization holding back partial characters): the inter-token latencies
are the gaps between chunks, as vLLM's benchmark measures them."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from jaxserve.bench.datasets import RequestSpec
from jaxserve.errors import UserError

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
PROBE_TIMEOUT = 60.0  # seconds GET /models may take: a URL that never answers fails before the load, not after --timeout


def api_root(url: str) -> str:
    """The API's root, ending in /v1, from a server URL given with or without it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Outcome:
    """One request, timed from sending it (seconds)."""

    ok: bool = False
    ttft: float | None = None  # to the first chunk with text
    itls: list[float] = field(default_factory=list)  # between chunks with text
    e2e: float | None = None  # to the end of the stream
    prompt_tokens: int | None = None  # the server's usage (None: it sent none)
    output_tokens: int = 0
    error: str | None = None


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


class Client:
    """Requests to any number of servers over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, ignore_eos: bool) -> None:
        self.session, self.path, self.ignore_eos, self.chat = session, ENDPOINTS[endpoint], ignore_eos, endpoint == "chat"

    async def models(self, root: str) -> list[str]:
        """GET /models: the ids the server lists. Checks that `root` is an OpenAI-compatible API, so a
        wrong URL is one clear error before any load is sent."""
        url = root + "/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as r:
                body = (await r.read()).decode("utf-8", errors="replace")
                # What came back, in a few words: a JSON body as it is (it says why), else only its type (a page of HTML says little).
                shown = _one_line(body, 120) if r.content_type == "application/json" else f"{r.content_type}, {len(body)} characters"
                if r.status == 401:
                    raise UserError(f"GET {url} answered HTTP 401 ({shown}): give the server's key with --api-key (or OPENAI_API_KEY)")
                if r.status != 200:
                    raise UserError(f"GET {url} answered HTTP {r.status} ({shown}): is it an OpenAI-compatible server?")
                try:
                    return [m["id"] for m in json.loads(body)["data"]]
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"GET {url} answered something other than an OpenAI model list ({shown}): "
                                    "is it an OpenAI-compatible server?") from None
        except aiohttp.ClientError as e:
            raise UserError(f"cannot reach {url}: {_one_line(str(e)) or type(e).__name__}") from None
        except asyncio.TimeoutError:
            raise UserError(f"cannot reach {url}: no answer within {PROBE_TIMEOUT:g} s") from None

    def body(self, model: str, spec: RequestSpec) -> dict:
        """A streaming, greedy request for spec.output_tokens tokens (all of them, with ignore_eos); text
        goes to chat as one user message."""
        body = {"model": model, "max_tokens": spec.output_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            return {**body, "messages": spec.prompt if isinstance(spec.prompt, list) else [{"role": "user", "content": spec.prompt}]}
        return {**body, "prompt": spec.prompt}

    async def send(self, root: str, model: str, spec: RequestSpec) -> Outcome:
        """One streamed request; failures are recorded in the outcome, never raised."""
        outcome, start, last = Outcome(), time.perf_counter(), None
        try:
            async with self.session.post(root + self.path, json=self.body(model, spec)) as r:
                if r.status != 200:
                    outcome.error = f"HTTP {r.status}: {_one_line(await r.text())}"
                    return outcome
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if not isinstance(chunk, dict):
                        outcome.error = f"a stream event that is not a JSON object: {_one_line(line.decode(errors='replace'))}"
                        return outcome
                    if "error" in chunk:
                        outcome.error = f"error in stream: {_one_line(json.dumps(chunk['error']))}"
                        return outcome
                    if chunk.get("usage"):
                        outcome.prompt_tokens = chunk["usage"].get("prompt_tokens")
                        outcome.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    if chunk.get("choices") and self._text(chunk["choices"][0]):
                        now = time.perf_counter()
                        if last is None:
                            outcome.ttft = now - start
                        else:
                            outcome.itls.append(now - last)
                        last = now
            outcome.e2e = time.perf_counter() - start
            outcome.ok = outcome.ttft is not None
            if not outcome.ok:
                outcome.error = "the stream ended without text"
            elif not outcome.output_tokens:  # no usage: one token per text chunk
                outcome.output_tokens = len(outcome.itls) + 1
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # a malformed chunk too
            outcome.error = f"{type(e).__name__}: {_one_line(str(e))}"
        return outcome

    def _text(self, choice: dict) -> str:
        """The text a choice chunk carries (a chat delta's content or reasoning)."""
        if not self.chat:
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
