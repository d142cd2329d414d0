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

Drafts come from prompt lookup (`ngram_draft`, on the host), from a draft model (`DraftModel`): a
smaller model with the same vocabulary that decodes k tokens ahead, sampling each as the target
would at that position (same seed and filters), so a target that is its own draft has every draft
accepted; or from draft heads trained on the model (`HeadsDraft`, `jaxserve.models.draft_heads`),
which read the hidden state behind the sequence's last token and sample the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import SpeculativeConfig
from jaxserve.engine.runner import ModelRunner, StepShapes, decode_group
from jaxserve.models.draft_heads import DraftHeads, HeadParams, advance, draft_logits, draft_table
from jaxserve.ops.quant import Int8Weight, quantize
from jaxserve.ops.sampling import SamplingArrays, filtered_logits, gumbel_noise

if TYPE_CHECKING:
    from jaxserve.engine.sequence import Sequence  # which imports this module


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
    hidden_step: int = -1  # the engine step that sampled the sequence's last token ...
    hidden_row: int = 0  # ... and its row there (where draft heads find the hidden state behind it)


@dataclass
class SpecCounters:
    """Totals since start, as vLLM's spec-decode metrics count them."""

    num_drafts: int = 0  # verify passes (sequences x steps that carried drafts)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at each offset
    acceptance_lengths: list[int] = field(default_factory=list)  # [k + 1]: passes that accepted 0..k drafts
    drafted_per_position: list[int] = field(default_factory=list)  # [k]: passes that drafted a token at each offset


class DraftModel:
    """A draft model's runner. Its paged cache has the engine's page count and page size and is
    indexed by the same page tables: the engine runs each step's batch through the draft too
    (`mirror`), so the draft's cache holds the K/V of every token the target computed, on the same
    pages, and page accounting stays the scheduler's alone. Rows it drafts past a sequence's end
    are overwritten as the sequence grows, as rejected verify rows are."""

    needs_latest_step = False  # it drafts for any decoding sequence

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @property
    def caches(self) -> list[ModelRunner]:
        """Runners whose paged caches follow the target's pages (beam search copies pages in them)."""
        return [self.runner]

    @property
    def num_compiles(self) -> int:
        return self.runner.num_compiles

    def warmup(self, progress: bool) -> None:
        self.runner.warmup(progress)

    def mirror(self, groups) -> None:
        """Write the K/V of the target step's rows (`runner.forward`'s groups) into the draft's cache."""
        self.runner.forward(groups)

    def propose(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k tokens for each (sequence, k), by k decode steps of the draft over the sequences
        still drafting: step i feeds the token before (the sequence's last, then the previous draft)
        and samples the next with the request's seed and filters at its position (no penalties)."""
        shapes, vocab = self.runner.shapes, self.runner.cfg.vocab_size
        drafts: list[list[int]] = [[] for _ in wanted]
        for i in range(max((k for _, k in wanted), default=0)):
            live = [n for n, (_, k) in enumerate(wanted) if k > i]
            rows = [(wanted[n][0], drafts[n][-1] if i else wanted[n][0].tokens[-1], wanted[n][0].num_tokens - 1 + i) for n in live]
            bucket = StepShapes.fit(len(rows), shapes.decode_rows)
            self.runner.forward([decode_group([(seq.pages, token, position, -1) for seq, token, position in rows], bucket, shapes.table_width)])
            count = StepShapes.sampled_rows(bucket)
            sampling, positions = SamplingArrays.greedy(count, vocab), np.zeros(count, np.int32)
            for r, (seq, _, position) in enumerate(rows):
                sampling.set_row(r, seq.params, seq.params.sample_seed(seq.index))
                positions[r] = position + 1  # the position of the token sampled
            tokens = self.runner.sample(sampling, positions, None, False)[0]
            for r, n in enumerate(live):
                drafts[n].append(int(tokens[r]))
        return drafts


def heads_propose(
    heads: HeadParams,
    table: Int8Weight,  # [D, N] the LM head's columns of the draft vocabulary
    vocab: jnp.ndarray,  # [N] their token ids
    embed: jnp.ndarray,  # [V, D]
    final_norm: jnp.ndarray,  # [D]
    hidden: jnp.ndarray,  # [H, D] the latest model step's hidden states
    rows: jnp.ndarray,  # [B] the row of each sequence's last token in `hidden`
    tokens: jnp.ndarray,  # [B] that token
    sampling: SamplingArrays,
    positions: jnp.ndarray,  # [B] the position of the first draft
    k: int,
    eps: float,
) -> jnp.ndarray:
    """Drafts [B, k]: head i's guess over the draft vocabulary, by argmax for greedy rows and, for
    sampled rows, with the request's filters and the model's own noise at position + i (gathered at
    the draft vocabulary). Everything runs over the N draft ids, never the whole vocabulary."""
    state, token, drafts = hidden[rows].astype(jnp.float32), tokens, []
    sampled = sampling.temperature > 0  # [B]
    for i in range(k):
        state = advance(heads, i, state, embed[token])
        logits = draft_logits(state, final_norm, table, eps)  # [B, N]
        greedy = jnp.argmax(logits, axis=-1)

        def draw(_: None) -> jnp.ndarray:  # traced by the cond below, in this iteration
            noise = gumbel_noise(sampling.seed, positions + i, embed.shape[0])[:, vocab]  # [B, N]
            return jnp.where(sampled, jnp.argmax(filtered_logits(logits, sampling) + noise, axis=-1), greedy)

        token = vocab[jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, None)]
        drafts.append(token)
    return jnp.stack(drafts, axis=1)


class HeadsDraft:
    """Draft heads on the target's runner: one program per power-of-two count of drafting sequences.
    A sequence drafts only if its last token was sampled in the latest step, whose hidden states the
    runner still holds (`SpecState.hidden_step`)."""

    needs_latest_step = True  # it reads the hidden states the runner kept from the latest step

    def __init__(self, heads: DraftHeads, runner: ModelRunner, k: int) -> None:
        self.runner = runner
        p = runner.params
        vocab = jnp.asarray(heads.vocab)
        dtype = p["embed"].dtype
        table = quantize(draft_table(p, vocab))  # int8: drafts need only the ranking, and it reads a quarter of the bytes
        # each head's weights in their own buffers: a slice of a stacked [K, ...] array is a copy on XLA:CPU
        per_head = {name: tuple(jnp.asarray(w, dtype)) for name, w in heads.params.items()}
        self._weights = (per_head, table, vocab, p["embed"], p["final_norm"])
        self._propose = jax.jit(functools.partial(heads_propose, k=k, eps=heads.config.rms_norm_eps))
        self.sizes = tuple(1 << i for i in range(StepShapes.sampled_rows(runner.shapes.decode_rows[-1]).bit_length()))

    @property
    def caches(self) -> list[ModelRunner]:
        """None: the heads keep no cache of their own."""
        return []

    @property
    def num_compiles(self) -> int:
        return self._propose._cache_size()

    def propose(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k tokens for each (sequence, k)."""
        count = StepShapes.sampled_rows(len(wanted))
        rows, tokens, positions = (np.zeros(count, np.int32) for _ in range(3))
        sampling = SamplingArrays.greedy(count, self.runner.cfg.vocab_size)
        for r, (seq, _) in enumerate(wanted):
            rows[r], tokens[r], positions[r] = seq.spec.hidden_row, seq.tokens[-1], seq.num_tokens
            sampling.set_row(r, seq.params, seq.params.sample_seed(seq.index))
        drafts = self.draft(self.runner.last_hidden, rows, tokens, sampling, positions)
        return [drafts[r, :k].tolist() for r, (_, k) in enumerate(wanted)]

    def draft(self, hidden: jax.Array, rows: np.ndarray, tokens: np.ndarray, sampling: SamplingArrays, positions: np.ndarray) -> np.ndarray:
        """Drafts [B, k] from hidden states [H, D], for each row's hidden-state row, last token and
        first draft position [B] (`heads_propose`)."""
        return np.asarray(self._propose(*self._weights, hidden, rows, tokens, sampling, positions))

    def mirror(self, groups) -> None:
        """Nothing to do: the heads read the target's own hidden states."""

    def warmup(self, progress: bool) -> None:
        """Compile the program for every count of drafting sequences."""
        for count in self.sizes:
            zeros = np.zeros(count, np.int32)
            self.draft(self.runner.last_hidden, zeros, zeros, SamplingArrays.greedy(count, self.runner.cfg.vocab_size), zeros)


class Speculator:
    """Plans and proposes drafts for a step's decode rows and keeps the acceptance counters."""

    PAUSE_BELOW = 0.2  # a sequence whose moving acceptance falls below this pauses ...
    PAUSE_STEPS = 8  # ... for this many steps, then tries again
    RETRY_AFTER = 16  # after this many steps planned without drafts, one with k = 1 (acceptance may have changed)

    def __init__(self, cfg: SpeculativeConfig, draft: DraftModel | HeadsDraft | None = None) -> None:
        self.cfg = cfg
        self.draft = draft
        k = cfg.num_speculative_tokens
        self.counters = SpecCounters(accepted_per_position=[0] * k, acceptance_lengths=[0] * (k + 1), drafted_per_position=[0] * k)
        self.step_seconds: dict[int, float] = {}  # decode rows -> moving average of a decode-only step's time
        self.idle = 0  # consecutive steps planned without drafts

    def observe(self, rows: int, seconds: float) -> None:
        """Time of a decode-only step of `rows` rows, drafting included (steps that compiled are not
        timed), for `plan`. A faster time replaces the estimate at once and a slower one moves it up
        by a twentieth: a step's own cost is what it takes unhindered, and one slow step (another
        process, a page fault) must not keep a bucket that is then rarely chosen looking expensive."""
        old = self.step_seconds.get(rows)
        self.step_seconds[rows] = seconds if old is None else min(seconds, 0.95 * old + 0.05 * seconds)

    def plan(self, base: int, drafting: int, sizes: tuple[int, ...]) -> int:
        """Drafts per sequence for a step of `base` decode rows, `drafting` of which may draft: of the
        k that fill a decode bucket (the engine cuts drafts down to one), the one with the most
        expected tokens per second of step time, from the measured step time of each bucket and the
        share of passes that kept a draft at each position so far (smoothed towards 1/2, 1/4, ... while
        few passes have been seen). A k whose bucket has not been timed yet is tried first (the
        smallest such), so every bucket gets measured."""
        c, most, drafting = self.counters, self.cfg.num_speculative_tokens, max(drafting, 1)
        expected, keep = [0.0], 1.0
        for j in range(most):
            keep = min(keep, (c.accepted_per_position[j] + 2 * 0.5 ** (j + 1)) / (c.drafted_per_position[j] + 2))
            expected.append(expected[-1] + keep)  # drafts a sequence drafting j + 1 expects to keep
        best, best_rate = 0, 0.0
        for k in sorted({0} | {min((rows - base) // drafting, most) for rows in sizes if rows > base}):
            seconds = self.step_seconds.get(StepShapes.fit(base + drafting * k, sizes))
            if seconds is None:
                return k
            rate = (base + drafting * expected[k]) / seconds
            if rate > best_rate:
                best, best_rate = k, rate
        self.idle = self.idle + 1 if best == 0 else 0
        if self.idle > self.RETRY_AFTER:
            self.idle, best = 0, 1
        return best

    def budget(self, state: SpecState, k: int) -> int:
        """Tokens a sequence may draft this step: up to k, none while it pauses."""
        if state.pause:
            state.pause -= 1
            return 0
        return max(0, min(k, self.cfg.num_speculative_tokens))

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Prompt lookup (method "ngram") over a sequence's tokens."""
        return ngram_draft(np.asarray(tokens, np.int64), k, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)

    def snapshot(self) -> SpecCounters:
        """A copy of the counters (safe to read while the engine runs on)."""
        c = self.counters
        return SpecCounters(c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, list(c.accepted_per_position), list(c.acceptance_lengths),
                            list(c.drafted_per_position))

    def record(self, state: SpecState, drafted: int, accepted: int) -> None:
        c = self.counters
        c.num_drafts += 1
        c.num_draft_tokens += drafted
        c.num_accepted_tokens += accepted
        for j in range(accepted):
            c.accepted_per_position[j] += 1
        c.acceptance_lengths[accepted] += 1
        for j in range(drafted):
            c.drafted_per_position[j] += 1
        state.rate = 0.7 * state.rate + 0.3 * accepted / drafted
        if state.rate < self.PAUSE_BELOW:
            state.pause, state.rate = self.PAUSE_STEPS, self.PAUSE_BELOW  # back to the threshold: one good pass resumes
