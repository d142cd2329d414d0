"""Decides each step's work: which sequences advance and by how many tokens (plain Python).

Every sequence is fed uniformly: tokens [num_computed, num_tokens) still need their K/V; a step gives
a sequence a chunk of them, and when the chunk reaches the end, the token sampled from its last
position is the sequence's next token. A decode is a chunk of one; a long prompt is prefilled in
chunks beside running decodes (chunked prefill) within the per-step token budget.

Waiting and running sequences are served in the order of the scheduling policy
(`EngineConfig.scheduling_policy`, keys from `jaxserve.engine.fair_share.policy_key`):
- fcfs: arrival order; a request's priority is ignored and nothing is preempted to admit one.
- priority: lower `priority` first, then arrival. A waiting request that outranks running ones
  preempts them at the start of a step when it would not fit otherwise, so it starts in that step.
- fair: priority class first, then the tenant's normalized usage (tokens computed / weight; a
  tenant that becomes active starts level with the least-served one), then arrival; the orders are
  re-sorted every step as usage grows. Across classes a waiting request preempts as under priority.
  Within its class it preempts the latest-arrived sequence of the running tenant most over its
  share, when that tenant's usage exceeds its own by more than the tokens it holds after its first
  chunk (in its tenant's units; at most one step's budget for a sequence computed from scratch).
  That margin is WFQ's finish-time rule (the chunk would have been served before the victim
  tenant's latest tokens) and a hysteresis: admitting lifts the waiting tenant by at most that, so
  the victim's tenant stays ahead and cannot preempt back at once, and a swapped-out sequence counts
  the context it copies back, so swaps do not trade slots every few steps. Only a decoding victim
  is taken (it produced a token since its admission): every admission makes progress, so every
  accepted request finishes.
Each step's chunks are charged to their tenants (decodes as one token; speculative drafts are not).
With LoRA, the running sequences use at most `max_loras` distinct adapters (the device's slots): a
waiting request whose adapter would need another waits until a slot's last user finishes, and nothing
after it in the policy order is admitted meanwhile, so the slots drain for it rather than starve it.

When pages run out mid-step, the running sequence at the back of the policy order is preempted: its
pages are released and it is recomputed later from its tokens, so its output is the same as if it
had never stopped (bit for bit where prefill and decode rows share one attention implementation: on
CPU and TPU; on GPU, decode rows use the Pallas kernel, whose rounding can differ from the
recompute's). With a host pool (`--swap-space`) a preempted sequence's computed pages are swapped
out to host memory instead and copied back when it resumes, when its context is long enough that
copying beats recomputing (`swap_min_tokens`, measured by the engine). With a host prefix tier
(`--host-prefix-cache`), a prompt whose cached prefix the device lost finds the rest of it there and
copies it back.

Prefill chunks run as rows of `prefill_row_len` tokens: a chunk that does not finish its prompt fills
whole rows, and a step holds at most `max_prefill_rows` of them. The n samples of one request share
its prompt's pages: later samples wait until the first has computed the prompt, then find its pages
in the prefix cache.

With a sliding window on every layer (`window`: a query at position p sees keys p - window + 1..p),
a sequence gives up each page once every query it has still to run starts its window after that
page's last token: before a step, pages wholly below num_computed - window + 1 (num_computed is the
first query of its next chunk, prefill or decode; speculative drafts and their verify rows come after
it and it never moves back) are released through the block manager, so a full block stays in the
prefix cache as an evictable cached block, and the page table holds the null page 0 in their place
(the attention masks it). A sequence then holds at most about window / page_size + 2 pages plus its
chunk's, and admission, growth and swap-in count only the pages a chunk needs: a swapped-out sequence
carries only its in-window pages to host memory and back, and a prefix hit needs only the cached
blocks its first chunk's window reaches (earlier blocks of the prefix may have been evicted).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from jaxserve.cache.block_manager import BlockManager
from jaxserve.cache.host_pool import HostPool
from jaxserve.cache.host_prefix import HostPrefixCache
from jaxserve.config import EngineConfig
from jaxserve.engine.fair_share import FairShare, policy_key
from jaxserve.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # first token fed
    length: int  # tokens fed
    rows: int  # prefill rows it takes; 0 = decode rows, one per token fed
    draft: tuple[int, ...] = ()  # speculative tokens fed after the sequence's last one (decode rows only)

    @property
    def completes(self) -> bool:
        """Whether the token sampled after this chunk's last real token is the sequence's next token."""
        return self.start + self.length - len(self.draft) == self.seq.num_tokens


@dataclass(frozen=True)
class HostCopy:
    """Pages of one sequence to copy between device and host memory before the step runs."""

    seq: Sequence
    device_pages: list[int]
    host_pages: list[int]


@dataclass
class HostCopies:
    """One step's copies between device and host memory, dispatched before the step in this order:
    reads first (a page given up in this schedule may be refilled in the same step), then writes.
    Reads land in host memory beside the step (`jaxserve.engine.page_copier`)."""

    swap_outs: list[HostCopy]
    swap_ins: list[HostCopy]
    prefix_ins: list[HostCopy]  # host prefix hits copied into their sequences' fresh pages


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, host: HostPool | None = None, swap_min_tokens: int | None = None,
                 host_prefix: HostPrefixCache | None = None, window: int | None = None) -> None:
        """`host`: where preempted sequences with at least `swap_min_tokens` computed tokens are swapped
        (None: no swapping); `host_prefix`: the host prefix tier, looked up after the device cache;
        `window`: the attention window of every layer (every model's whose cache the pages index),
        None when some layer sees the whole context (no page is given up)."""
        self.cfg = cfg
        self.blocks = blocks
        self.host = host
        self.swap_min_tokens = swap_min_tokens
        self.host_prefix = host_prefix
        self.window = window
        self.policy = cfg.scheduling_policy
        self.share = FairShare()  # tokens computed per tenant (every policy); normalized usage (fair)
        self.key = policy_key(self.policy, self.share)
        self.waiting: list[Sequence] = []  # sorted by `key` (under fair, as of the latest `schedule`)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._copies = HostCopies([], [], [])  # this step's, handed over by `take_copies`

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self.key)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence (finished or aborted) and release its pages."""
        self._drop(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def recompute(self, seq: Sequence) -> None:
        """Drop whatever a sequence holds (device and host pages) so that it recomputes from its tokens:
        the fallback when a host copy fails."""
        self._drop(seq)
        seq.num_computed = 0
        self.add(seq)

    def _drop(self, seq: Sequence) -> None:
        """Take a sequence off its queue and give back its device and host pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.pages)
        if seq.host_pages:
            self.host.release(seq.host_pages)
        seq.pages, seq.host_pages = [], []

    def take_copies(self) -> HostCopies:
        """The host copies the latest `schedule` decided, handed over once: the engine runs them before the step."""
        out, self._copies = self._copies, HostCopies([], [], [])
        return out

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.page_size)

    def _gone(self, first_query: int) -> int:
        """Leading pages that no query at `first_query` or later reads: their last token is before its window."""
        return 0 if self.window is None else max(0, (first_query - self.window + 1) // self.cfg.page_size)

    def pages_needed(self, num_tokens: int) -> int:
        """The most pages a sequence of `num_tokens` holds at once: one per page of tokens, or with a
        window, those of the window and of one step's chunk, at whatever offset in its pages they fall."""
        full = self._pages_for(num_tokens)
        if self.window is None:
            return full
        return min(full, self._pages_for(self.window + min(num_tokens, self.cfg.max_num_batched_tokens) + self.cfg.page_size - 2))

    def _slide(self, seq: Sequence) -> None:
        """Give up the pages of `seq` that fell out of its window (null page 0 in their place)."""
        end = self._gone(seq.num_computed)
        start = end
        while start and seq.pages[start - 1]:  # pages before the latest one given up are given up too
            start -= 1
        if start < end:
            self.blocks.release(seq.pages[start:end])
            seq.pages[start:end] = [0] * (end - start)

    def _preempt(self, seq: Sequence) -> None:
        """Stop a running sequence: swap its computed pages out when it qualifies and the pool has
        room, else drop them (it recomputes)."""
        self._slide(seq)
        self.running.remove(seq)
        computed = seq.pages[self._gone(seq.num_computed) : self._pages_for(seq.num_computed)]
        swap = self.host is not None and self.swap_min_tokens is not None and seq.num_computed >= self.swap_min_tokens
        host = self.host.allocate(len(computed)) if swap and computed else None
        if host is not None:
            self._copies.swap_outs.append(HostCopy(seq, computed, host))
            seq.host_pages = host
        else:
            seq.num_computed = 0
        self.blocks.release(seq.pages)
        seq.pages = []
        self.num_preemptions += 1
        self.add(seq)

    def _make_room_for(self, seq: Sequence) -> None:
        """Preempt running sequences that `seq` (waiting) outranks, back of the policy order first,
        until its first chunk would find a running slot and pages."""
        held = min(seq.num_tokens, seq.num_computed + self.cfg.max_num_batched_tokens)  # its tokens after that chunk
        need = self._pages_for(held) - self._gone(seq.num_computed)
        while self.running and (len(self.running) >= self.cfg.max_num_seqs or self.blocks.num_free < need):
            victim = max((s for s in self.running if self._outranks(seq, s, held)), key=self.key, default=None)
            if victim is None:
                return
            self._preempt(victim)

    def _outranks(self, seq: Sequence, victim: Sequence, held: int) -> bool:
        """Whether waiting `seq`, holding `held` tokens once admitted, may preempt running `victim`:
        never under fcfs; from a lower priority class under priority and fair; under fair, within its
        class, when the victim's tenant is ahead of `seq`'s by more than those tokens (in `seq`'s
        tenant's units) and the victim is decoding (it produced a token since its admission)."""
        if self.policy == "fcfs":
            return False
        if self.policy == "priority" or victim.priority != seq.priority:
            return victim.priority > seq.priority
        decoding = victim.num_tokens - victim.num_computed == 1
        return decoding and self.share.normalized(seq.tenant) + held / seq.weight < self.share.normalized(victim.tenant)

    def _chunk(self, seq: Sequence, start: int, budget: int, rows_left: int) -> Chunk | None:
        """The largest chunk of `seq` from `start` that fits the token budget and free prefill rows."""
        pending, row = seq.num_tokens - start, self.cfg.prefill_row_len
        if pending == 1 and not seq.wants_prompt_logprobs(start):
            return Chunk(seq, start, 1, 0)
        n = min(pending, budget, rows_left * row)
        if row < n < pending:
            n -= n % row  # a chunk that leaves more to compute fills whole rows
        return Chunk(seq, start, n, -(-n // row)) if n else None

    def schedule(self) -> list[Chunk]:
        """This step's chunks: running sequences first (in policy order), then newly admitted ones;
        each charged to its tenant."""
        budget, rows_left, prefills = self.cfg.max_num_batched_tokens, self.cfg.max_prefill_rows, 0
        chunks: list[Chunk] = []
        if self.policy == "fair":  # usage moved since the latest step: so do the orders
            self.share.sync({s.tenant for s in self.waiting} | {s.tenant for s in self.running})
            self.waiting.sort(key=self.key)
        if self.window is not None:
            for seq in self.running:
                self._slide(seq)
        head = self.waiting[0] if self.waiting else None
        if head is not None and not head.waits_for_leader() and not self._needs_slot(head, self._adapters()):
            self._make_room_for(head)  # preempting frees no adapter slot: a request that needs one waits for it
        self.running.sort(key=self.key)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or out of budget
            if seq.num_tokens - seq.num_computed > 1 and prefills == self.cfg.max_prefill_seqs:
                continue
            chunk = self._chunk(seq, seq.num_computed, budget, rows_left)
            if chunk is None or not self._grow(seq, chunk.start + chunk.length, scheduled=chunks):
                continue  # no rows left, or preempted itself
            chunks.append(chunk)
            prefills += chunk.rows > 0
            rows_left -= chunk.rows
            budget -= chunk.length
        adapters = self._adapters()
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) == self.cfg.max_num_seqs or prefills == self.cfg.max_prefill_seqs:
                break
            if self._needs_slot(seq, adapters):
                break  # nothing after it starts, so the slots' users drain and it gets one (no starvation)
            if seq.waits_for_leader():
                continue
            if seq.host_pages:  # swapped out: its pages come back from host memory
                chunk = self._chunk(seq, seq.num_computed, budget, rows_left)
                gone = self._gone(seq.num_computed)  # the pages it gave up before it was swapped out
                fresh = self.blocks.allocate(self._pages_for(chunk.start + chunk.length) - gone) if chunk else None
                if fresh is None:
                    break
                self._copies.swap_ins.append(HostCopy(seq, fresh[: len(seq.host_pages)], seq.host_pages))
                hit, seq.host_pages = [0] * gone, []
            else:
                # Prompt log-probs need every prompt position computed, so such a request skips the cache;
                # the last token is always computed: its logits give the next token.
                hashes = [] if seq.wants_prompt_logprobs(0) else seq.full_block_hashes(self.cfg.page_size, seq.num_tokens - 1)
                hit = self.blocks.match_prefix(hashes, None if self.window is None else lambda k: self._gone(k * self.cfg.page_size))
                from_host = self.host_prefix.match(hashes[len(hit) :]) if self.host_prefix is not None else []
                chunk = self._chunk(seq, (len(hit) + len(from_host)) * self.cfg.page_size, budget, rows_left)
                fresh = None
                if chunk is not None and self.window is not None:  # what the chunk's window leaves behind is not needed
                    gone = self._gone(chunk.start)
                    unneeded = max(0, gone - len(hit))  # host hits
                    if unneeded:
                        self.host_prefix.unpin(from_host[:unneeded])
                    hit, from_host = [0] * min(gone, len(hit)) + hit[gone:] + [0] * unneeded, from_host[unneeded:]
                if chunk is not None:
                    self.blocks.acquire(hit)
                    fresh = self.blocks.allocate(self._pages_for(chunk.start + chunk.length) - len(hit))
                    if fresh is None:
                        self.blocks.release(hit)
                if fresh is None:
                    if from_host:
                        self.host_prefix.unpin(from_host)
                    break
                if from_host:
                    self._copies.prefix_ins.append(HostCopy(seq, fresh[: len(from_host)], from_host))
            self.waiting.remove(seq)
            seq.pages, seq.num_computed, seq.status = hit + fresh, chunk.start, Status.RUNNING
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens, seq.queue_seconds = chunk.start, time.perf_counter() - seq.arrival_time
            self.running.append(seq)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            chunks.append(chunk)
            prefills += chunk.rows > 0
            rows_left -= chunk.rows
            budget -= chunk.length
        for chunk in chunks:
            self.share.charge(chunk.seq, chunk.length)
        return chunks

    def _adapters(self) -> set:
        """The LoRA adapters of the running sequences: each holds a device slot."""
        return {s.adapter for s in self.running} - {None}

    def _needs_slot(self, seq: Sequence, adapters: set) -> bool:
        """Whether `seq`'s adapter would need a slot while `adapters` hold them all."""
        return seq.adapter is not None and seq.adapter not in adapters and len(adapters) >= self.cfg.max_loras

    def _grow(self, seq: Sequence, num_tokens: int, scheduled: list[Chunk]) -> bool:
        """Give `seq` pages for `num_tokens`, preempting from the back of the running (policy) order if
        needed. False when `seq` itself had to be preempted."""
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

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` from free pages only (speculation never preempts)."""
        need = self._pages_for(num_tokens) - len(seq.pages)
        fresh = self.blocks.allocate(need) if need > 0 else []
        if fresh is None:
            return False
        seq.pages += fresh
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's fully computed pages into the prefix cache."""
        for page, h in zip(seq.pages, seq.full_block_hashes(self.cfg.page_size, seq.num_computed)):
            self.blocks.register(page, h)
