"""Decides each step's work: which sequences advance and by how many tokens (plain Python).

Every sequence is fed uniformly: tokens [num_computed, num_tokens) still need their K/V; a step gives
a sequence a chunk of them, and when the chunk reaches the end, the token sampled from its last
position is the sequence's next token. A decode is a chunk of one; a long prompt is prefilled in
chunks beside running decodes (chunked prefill) within the per-step token budget. When pages run
out, the lowest-priority, latest-arrived running sequence is preempted: its pages are released and
it is recomputed later from its tokens, so its output is the same as if it had never stopped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from jaxserve.cache.block_manager import BlockManager
from jaxserve.config import EngineConfig
from jaxserve.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # first token fed
    length: int  # tokens fed

    @property
    def completes(self) -> bool:
        """Whether the token sampled after this chunk is the sequence's next token."""
        return self.start + self.length == self.seq.num_tokens


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # sorted by Sequence.order
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        keys = [s.order for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.order), seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence (finished or aborted) and release its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.pages)
        seq.pages = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.page_size)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.pages)
        seq.pages, seq.num_computed = [], 0
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> list[Chunk]:
        """This step's chunks: running sequences first (in order), then newly admitted ones."""
        budget = self.cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        prefills = 0
        self.running.sort(key=lambda s: s.order)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or out of budget
            pending = seq.num_tokens - seq.num_computed
            if pending > 1 and prefills == self.cfg.max_prefill_seqs:
                continue
            n = min(pending, budget)
            if not self._grow(seq, seq.num_computed + n, scheduled=chunks):
                continue  # preempted itself
            chunks.append(Chunk(seq, seq.num_computed, n))
            prefills += n > 1
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            if prefills == self.cfg.max_prefill_seqs:
                break
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq.full_block_hashes(self.cfg.page_size, seq.num_tokens))
            if len(hit) * self.cfg.page_size >= seq.num_tokens:
                hit = hit[:-1]  # always compute at least one token: its logits give the next token
            cached = len(hit) * self.cfg.page_size
            n = min(seq.num_tokens - cached, budget)
            self.blocks.acquire(hit)
            fresh = self.blocks.allocate(self._pages_for(cached + n) - len(hit))
            if fresh is None:
                self.blocks.release(hit)
                break
            self.waiting.pop(0)
            seq.pages, seq.num_computed, seq.status = hit + fresh, cached, Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, cached, n))
            prefills += n > 1
            budget -= n
        return chunks

    def _grow(self, seq: Sequence, num_tokens: int, scheduled: list[Chunk]) -> bool:
        """Give `seq` pages for `num_tokens`, preempting from the back of the running order if needed.
        False when `seq` itself had to be preempted."""
        need = self._pages_for(num_tokens) - len(seq.pages)
        while need > 0:
            fresh = self.blocks.allocate(need)
            if fresh is not None:
                seq.pages += fresh
                return True
            planned = {c.seq for c in scheduled}
            victim = next(s for s in reversed(self.running) if s not in planned)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's fully computed pages into the prefix cache."""
        for page, h in zip(seq.pages, seq.full_block_hashes(self.cfg.page_size, seq.num_computed)):
            self.blocks.register(page, h)
