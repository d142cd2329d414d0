"""What the engine hands back: per-step outputs, and whole results assembled from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxserve.engine.timeline import Timeline

TopLogprobs = tuple[tuple[int, float], ...]  # (token id, log-prob), most likely first
FAILED = ("error", "rejected")  # finish reasons of a failed sample: the engine's fault, or the request's (a constraint it cannot follow)


@dataclass(frozen=True)
class StepOutput:
    """What one step added to one sample of a request."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None  # None when the step sampled a stop token, which is not part of the output
    logprob: float
    finish_reason: str | None  # None while running; "stop", "length", "abort", or one of FAILED (`text` says why)
    text: str = ""  # newly released text (held back while it may be the start of a stop string)
    top_logprobs: TopLogprobs = ()  # when the request asked for logprobs
    # On a sample's first output when the request asked for prompt_logprobs: for each prompt token
    # after the first, its log-prob and the top alternatives.
    prompt_logprobs: tuple[tuple[float, TopLogprobs], ...] | None = None
    # On a sample's last output when a stop token (EOS or a stop_token_ids entry) ended it: that token,
    # generated but kept out of token_id and the text; usage counts it, as vLLM does.
    stop_token_id: int | None = None
    # On a sample's first output: prompt tokens whose K/V came from the prefix cache, and the seconds
    # it waited before it first ran.
    num_cached_tokens: int | None = None
    queue_seconds: float | None = None
    timeline: Timeline | None = None  # on a traced sample's last output: when its phases ran

    @property
    def num_generated(self) -> int:
        """Tokens this output generated, a stop token included (what usage counts)."""
        return (self.token_id is not None) + (self.stop_token_id is not None)


@dataclass
class CompletionOutput:
    """One finished (or, while collecting, growing) sample."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token in token_ids
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when asked for
    text: str = ""
    finish_reason: str | None = None
    stop_token_id: int | None = None  # the EOS or stop token that ended it (generated, not in token_ids)
    error: str | None = None  # why it failed (finish_reason in FAILED)

    @property
    def num_generated(self) -> int:
        """Tokens generated, the stop token included (what usage counts)."""
        return len(self.token_ids) + (self.stop_token_id is not None)


@dataclass
class RequestOutput:
    """A request's prompt and its n samples, assembled from step outputs with `add`."""

    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: tuple[tuple[float, TopLogprobs], ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache

    @classmethod
    def empty(cls, request_id: str, prompt_ids: list[int], n: int) -> RequestOutput:
        return cls(request_id, prompt_ids, [CompletionOutput(i) for i in range(n)])

    def add(self, out: StepOutput) -> None:
        sample = self.outputs[out.index]
        if out.token_id is not None:
            sample.token_ids.append(out.token_id)
            sample.logprobs.append(out.logprob)
            if out.top_logprobs:
                sample.top_logprobs.append(out.top_logprobs)
        if out.finish_reason in FAILED:
            sample.error = out.text
        else:
            sample.text += out.text
        sample.finish_reason = out.finish_reason
        sample.stop_token_id = out.stop_token_id
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.num_cached_tokens is not None and out.index == 0:
            self.num_cached_tokens = out.num_cached_tokens

    @property
    def finished(self) -> bool:
        return all(o.finish_reason for o in self.outputs)
