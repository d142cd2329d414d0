"""Speculative decoding: draft tokens proposed on the host, verified by the model in the same step.

A sequence with k drafted tokens d1..dk runs as k + 1 ordinary decode rows: its last token at
position p and the drafts at p+1..p+k, each row over the sequence's own page table with the KV
length of its position. Every layer writes the K/V of all rows before any row attends, so row j sees
the drafts before it exactly as a plain decode at position p+j would see tokens it had accepted:
the same program, the same row numerics, the same sampler noise (seed, position). Draft j is
accepted when it equals the token sampled at row j-1; the first mismatch takes the model's own
token instead, and when all match the last row gives one more. The output is therefore the output
without speculation, token for token, greedy or seeded, whatever else shares the batch.

Verify rows use spare decode rows of the warmed-up shapes (no new programs): a step speculates only
while its decode rows stay within the largest decode bucket, so k shrinks as the batch grows and
a full batch decodes as before. A sequence whose recent drafts were mostly rejected pauses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxserve.config import SpeculativeConfig


def ngram_draft(tokens: np.ndarray, k: int, lo: int, hi: int) -> list[int]:
    """Prompt lookup: the up to `k` tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (the longest n in [lo, hi] that occurs), or none."""
    length = len(tokens)
    for n in range(min(hi, length - 1), lo - 1, -1):
        tail = tokens[length - n :]
        starts = np.flatnonzero(tokens[: length - n] == tail[0])  # candidate starts, each followed by >= 1 token
        for i in range(1, n):
            starts = starts[tokens[starts + i] == tail[i]]
        if len(starts):
            at = int(starts[-1]) + n
            return tokens[at : at + k].tolist()
    return []


@dataclass
class SpecState:
    """A sequence's recent acceptance, to stop drafting for it while drafts keep failing."""

    rate: float = 1.0  # moving average of accepted / drafted
    pause: int = 0  # steps to skip before drafting again


@dataclass
class SpecCounters:
    """Totals since start, as vLLM's spec-decode metrics count them."""

    num_drafts: int = 0  # verify passes (sequences x steps that carried drafts)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at each offset
    acceptance_lengths: list[int] = field(default_factory=list)  # [k + 1]: passes that accepted 0..k drafts


class Speculator:
    """Proposes drafts for a step's decode rows and keeps the acceptance counters."""

    PAUSE_BELOW = 0.2  # a sequence whose moving acceptance falls below this pauses ...
    PAUSE_STEPS = 8  # ... for this many steps, then tries again

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.counters = SpecCounters(
            accepted_per_position=[0] * cfg.num_speculative_tokens, acceptance_lengths=[0] * (cfg.num_speculative_tokens + 1)
        )

    def propose(self, tokens: list[int], state: SpecState, k: int) -> list[int]:
        """Up to k drafts for a sequence with these tokens (none while it pauses)."""
        if state.pause:
            state.pause -= 1
            return []
        k = min(k, self.cfg.num_speculative_tokens)
        return ngram_draft(np.asarray(tokens, np.int64), k, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max) if k > 0 else []

    def snapshot(self) -> SpecCounters:
        """A copy of the counters (safe to read while the engine runs on)."""
        c = self.counters
        return SpecCounters(c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, list(c.accepted_per_position), list(c.acceptance_lengths))

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        c = self.counters
        c.num_drafts += 1
        c.num_draft_tokens += drafted
        c.num_accepted_tokens += accepted
        for j in range(accepted):
            c.accepted_per_position[j] += 1
        c.acceptance_lengths[accepted] += 1
        state.rate = 0.7 * state.rate + 0.3 * accepted / drafted
        if state.rate < self.PAUSE_BELOW:
            state.pause, state.rate = self.PAUSE_STEPS, self.PAUSE_BELOW  # back to the threshold: one good pass resumes
