"""One request's state on the host: its tokens, its pages and how much of it the cache holds."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from jaxserve.cache.block_manager import BlockHash, block_hashes, salt_hash
from jaxserve.engine.speculation import SpecState
from jaxserve.engine.timeline import Timeline
from jaxserve.models.lora import LoraAdapter
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One of a request's n samples."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; a preempted sequence keeps its place
    priority: int = 0  # lower runs first
    tenant: str = ""  # whose request it is (fair share)
    weight: float = 1.0  # its tenant's fair-share weight
    index: int = 0  # which of the request's n samples
    leader: Sequence | None = None  # sample 0 of the request, whose prompt pages the others share
    detokenizer: IncrementalDetokenizer | None = None
    matcher: Any = None  # llguidance.LLMatcher of a constrained sample, advanced by each output token
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenized output so far
    sent: int = 0  # characters of `text` already released to the caller
    prompt_logprobs: list = field(default_factory=list)  # per prompt position after the first, once computed
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache (or, while swapped out, in host_pages)
    host_pages: list[int] = field(default_factory=list)  # host-memory pages holding its K/V while swapped out
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
    arrival_time: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None  # arrival to first admission into the running batch
    beam: Any = None  # the request's `jaxserve.engine.beam.BeamSearch` when this is one of its beams
    beam_logprobs: list[float] = field(default_factory=list)  # a beam's log-prob of each output token
    beam_cumulative: float = 0.0
    candidates: list[tuple[int, float]] | None = None  # a beam's next tokens, computed and not yet chosen from
    hashes: list[BlockHash] = field(default_factory=list)  # of this sequence's full blocks, as far as computed
    spec: SpecState = field(default_factory=SpecState)  # its speculative drafts' recent acceptance
    timeline: Timeline | None = None  # when its phases ran, if its request is traced
    adapter: LoraAdapter | None = None  # the LoRA adapter it runs with (None: the base model)
    status: Status = Status.WAITING
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def wants_prompt_logprobs(self, start: int) -> bool:
        """Whether a chunk from `start` computes prompt log-probs not collected yet."""
        return self.params.prompt_logprobs is not None and start < len(self.prompt_ids) - 1 and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def waits_for_leader(self) -> bool:
        """Later samples start once the first has computed the shared prompt (so they hit its pages)."""
        lead = self.leader
        return lead is not None and lead.status is not Status.FINISHED and lead.num_computed < len(lead.prompt_ids)

    @property
    def order(self) -> tuple[int, int]:
        """Scheduling order: priority, then arrival."""
        return self.priority, self.arrival

    def full_block_hashes(self, page_size: int, upto: int) -> list[BlockHash]:
        """Hashes of the full blocks among the first `upto` tokens (extends the cached list)."""
        have = len(self.hashes) * page_size
        if upto - have >= page_size:
            parent = self.hashes[-1] if self.hashes else salt_hash(self.params.cache_salt, self.adapter.digest if self.adapter else None)
            self.hashes += block_hashes(self.tokens[have:upto], page_size, parent)
        return self.hashes[: upto // page_size]
