"""Beam search's choices, on the host: which beams live on after each step.

Every live beam of a request is decoded in the same step; the sampler's top log-probabilities of
each row (the unmodified model distribution) are the candidates. Of all candidates, ordered by
cumulative log-probability (ties: the earlier beam, then the likelier token), the best `width` are
taken in order: one that ends the beam (EOS or a stop token, once `min_tokens` are out) becomes a
finished hypothesis, the others the next live beams; further candidates fill the live beams up to
`width`. At `max_tokens` the live beams finish as "length". The answer is the `width` best finished
hypotheses by score = cumulative log-prob / generated tokens ** length_penalty (the stop token
counts, as in usage). Everything is a deterministic function of the model's log-probs: one beam is
greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam."""

    token_ids: tuple[int, ...]  # generated, without the stop token
    logprobs: tuple[float, ...]  # of each token in token_ids
    cumulative: float  # summed log-probs, the stop token's included
    finish_reason: str  # "stop" or "length"
    stop_token_id: int | None
    score: float


@dataclass
class BeamSearch:
    """One request's beam search state: the rules above, and the finished hypotheses so far."""

    width: int
    length_penalty: float
    max_tokens: int
    min_tokens: int
    stop_ids: frozenset[int]  # tokens that end a beam (EOS unless ignored, and stop_token_ids)
    finished: list[Hypothesis] = field(default_factory=list)

    def score(self, cumulative: float, length: int) -> float:
        return cumulative / max(length, 1) ** self.length_penalty

    def advance(self, beams: Sequence[tuple[list[int], list[float], float, Sequence[tuple[int, float]]]]) -> list[tuple[int, int, float]]:
        """The next live beams as (parent index, token, its log-prob), best first, from each live
        beam's (tokens, log-probs, cumulative log-prob, candidates as (token, log-prob) best first)."""
        ranked = sorted(
            ((cum + lp, b, k, t, lp) for b, (_, _, cum, cands) in enumerate(beams) for k, (t, lp) in enumerate(cands)),
            key=lambda c: (-c[0], c[1], c[2]),
        )
        live: list[tuple[int, int, float]] = []
        for rank, (cum, b, _, token, lp) in enumerate(ranked):
            tokens, logprobs = beams[b][0], beams[b][1]
            if token in self.stop_ids and len(tokens) + 1 > self.min_tokens:
                if rank < self.width:
                    n = len(tokens) + 1
                    self.finished.append(Hypothesis(tuple(tokens), tuple(logprobs), cum, "stop", token, self.score(cum, n)))
                continue
            if len(tokens) + 1 == self.max_tokens:  # the last token: the beam is done
                if rank < self.width:
                    self.finished.append(Hypothesis((*tokens, token), (*logprobs, lp), cum, "length", None, self.score(cum, self.max_tokens)))
                continue
            live.append((b, token, lp))
            if len(live) == self.width:
                break
        return live

    def best(self) -> list[Hypothesis]:
        """The `width` best finished hypotheses, best first (ties: the earlier finished)."""
        order = sorted(range(len(self.finished)), key=lambda i: (-self.finished[i].score, i))
        return [self.finished[i] for i in order[: self.width]]
