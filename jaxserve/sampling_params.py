"""Per-request sampling parameters (host side), validated before a request reaches the device."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

from jaxserve.errors import UserError
from jaxserve.structured.guide import Guide

MAX_LOGPROBS = 20  # most top log-probs a request may ask for (OpenAI's limit for top_logprobs)
MAX_BEAMS = MAX_LOGPROBS // 2  # each beam's candidates are its 2 * width likeliest tokens, from the sampler's top ones
MAX_N = 128  # most samples one request may ask for (OpenAI's limit): each is a sequence the engine holds
INT32_MAX = (1 << 31) - 1  # what the device's int32 sampling arrays hold
_GOLDEN = 0x9E3779B9  # spreads the seeds of a request's n samples


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    """A finite number (JSON's Infinity and NaN are not)."""
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1  # samples of one prompt; they share its KV pages
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # top log-probs per output token (0: only the sampled token's)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    min_tokens: int = 0  # stop tokens and stop strings are ignored before this many tokens
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized output and cut from it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    guide: Guide | None = None  # what the output must match (constrained decoding)
    cache_salt: str | None = None  # mixed into the prefix-cache hashes: only requests with the same salt share pages
    use_beam_search: bool = False  # n beams (`jaxserve.engine.beam`); deterministic, so no sampling fields
    length_penalty: float = 1.0  # beam score = cumulative log-prob / generated tokens ** length_penalty
    # Filled in when `seed` is None so that every draw of an unseeded request is still reproducible
    # from its logged seed.
    effective_seed: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise UserError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and (self.top_k == -1 or 1 <= self.top_k <= INT32_MAX), "top_k", f"must be -1 (off) or an integer in [1, {INT32_MAX}]")
        check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and -(1 << 63) <= self.seed < 1 << 63), "seed", "must be a signed 64-bit integer")
        check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        for name in ("presence_penalty", "frequency_penalty"):
            check(_is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "must be in [-2, 2]")
        check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty", "must be in (0, 10]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be an integer in [0, max_tokens]")
        check(isinstance(self.logit_bias, Mapping), "logit_bias", "must map token ids to numbers")
        bias = {}
        for key, value in self.logit_bias.items():
            token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
            check(_is_int(token) and token >= 0 and _is_num(value) and -100 <= value <= 100, "logit_bias", "must map token ids to numbers in [-100, 100]")
            bias[token] = float(value)
        object.__setattr__(self, "logit_bias", bias)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        check(isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop), "stop", "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", tuple(stop))
        check(
            isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be a list of token ids",
        )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.use_beam_search:
            check(1 <= self.n <= MAX_BEAMS, "n", f"must be in [1, {MAX_BEAMS}] with beam search (the beam width)")
            check(_is_num(self.length_penalty), "length_penalty", "must be a number")
            for name, off in (("temperature", 0), ("top_p", 1), ("top_k", -1), ("min_p", 0), ("presence_penalty", 0), ("frequency_penalty", 0),
                              ("repetition_penalty", 1), ("logit_bias", {}), ("stop", ()), ("guide", None)):
                check(getattr(self, name) == off, name, f"contradicts beam search, which takes the most likely beams (leave it {off!r})")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""), "cache_salt", "must be a non-empty string")
        if self.effective_seed < 0:
            seed = self.seed if self.seed is not None else random.getrandbits(32)
            object.__setattr__(self, "effective_seed", seed % (1 << 32))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling needs this request's per-token logit adjustments (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias or self.min_tokens
        )

    def sample_seed(self, index: int) -> int:
        """Seed of the index-th of the n samples (the first uses the request's own seed)."""
        return (self.effective_seed + index * _GOLDEN) % (1 << 32)
