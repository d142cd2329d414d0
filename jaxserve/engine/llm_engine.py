"""The engine loop: admit requests, schedule a step, run it on the device, turn tokens into outputs."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cache.block_manager import BlockManager
from jaxserve.cache.kv_cache import page_bytes, pages_for_memory
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.runner import ModelRunner, bucket
from jaxserve.engine.scheduler import Chunk, Scheduler
from jaxserve.engine.sequence import Sequence, Status
from jaxserve.errors import UserError
from jaxserve.models.llama import ForwardBatch, Params
from jaxserve.ops.sampling import SamplingArrays
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one step added to one request."""

    request_id: str
    token_id: int | None  # None when the step sampled a stop token, which is not part of the output
    logprob: float
    finish_reason: str | None  # None while running; "stop", "length" or "abort"


class LLMEngine:
    def __init__(self, cfg: ModelConfig, params: Params, eos_token_ids: tuple[int, ...], engine: EngineConfig) -> None:
        self.model_cfg = cfg
        self.cfg = engine
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(engine.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        dtype = jax.tree.leaves(params)[0].dtype
        self.num_pages = (
            engine.num_pages
            if engine.kv_cache_memory is None
            else pages_for_memory(cfg, engine.page_size, dtype, engine.kv_cache_memory)
        )
        self.runner = ModelRunner(cfg, params, self.num_pages, engine.page_size)
        self.blocks = BlockManager(self.num_pages, engine.enable_prefix_caching)
        log.info(
            "KV cache: %d pages of %d tokens = %d tokens (%.1f MiB)",
            self.num_pages - 1,
            engine.page_size,
            (self.num_pages - 1) * engine.page_size,
            self.num_pages * page_bytes(cfg, engine.page_size, dtype) / 2**20,
        )
        self.scheduler = Scheduler(engine, self.blocks)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_computed_tokens = 0  # tokens whose K/V the device computed (prefix hits excluded)

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """Queue a request; every check happens here, before it can touch a batch."""
        if request_id in self.seqs:
            raise UserError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if any(not 0 <= t < self.model_cfg.vocab_size for t in prompt_ids):
            raise UserError(f"prompt token ids must be in [0, {self.model_cfg.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise UserError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}"
            )
        if -(-total // self.cfg.page_size) > self.num_pages - 1:
            raise UserError(f"the request needs {total} tokens of KV cache; the cache holds {(self.num_pages - 1) * self.cfg.page_size}")
        seq = Sequence(request_id, list(prompt_ids), params, arrival=next(self._arrivals), priority=priority)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        groups, sampling, rows = self._inputs(chunks)
        tokens, logprobs = self.runner.run(groups, sampling)
        outputs = []
        for chunk, row in zip(chunks, rows):
            seq, token, logprob = chunk.seq, tokens[row], logprobs[row]
            seq.num_computed += chunk.length
            self.num_computed_tokens += chunk.length
            self.scheduler.register_computed(seq)
            if chunk.completes:
                outputs.append(self._append(seq, int(token), float(logprob)))
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float) -> StepOutput:
        p = seq.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        else:
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            if len(seq.output_ids) == p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.request_id]
        return StepOutput(seq.request_id, None if reason == "stop" else token, logprob, reason)

    def _inputs(self, chunks: list[Chunk]) -> tuple[list[ForwardBatch], SamplingArrays, list[int]]:
        """Fixed-shape groups for this step: decodes [Bd, 1], then prefill chunks [Bp, Tp]; one page-table
        width P for both. Padding rows have length 0 and write only to the null page. Also returns each
        chunk's row in the step's output."""
        width = bucket(max(len(c.seq.pages) for c in chunks), 1)
        decode = [c for c in chunks if c.length == 1]
        prefill = [c for c in chunks if c.length > 1]
        groups, padded, row_of = [], [], {}
        for part, t in ((decode, 1), (prefill, bucket(max((c.length for c in prefill), default=1)))):
            if not part:
                continue
            b = bucket(len(part), 1)
            tokens = np.zeros((b, t), np.int32)
            positions = np.zeros((b, t), np.int32)
            tables = np.zeros((b, width), np.int32)
            kv_lens = np.zeros(b, np.int32)
            for r, c in enumerate(part):
                row_of[id(c)] = len(padded) + r
                tokens[r, : c.length] = c.seq.tokens[c.start : c.start + c.length]
                positions[r] = c.start + np.arange(t)
                tables[r, : len(c.seq.pages)] = c.seq.pages
                kv_lens[r] = c.start + c.length
            groups.append(ForwardBatch(tokens, positions, tables, kv_lens))
            padded += [c.seq.params for c in part] + [None] * (b - len(part))
        sampling = SamplingArrays(
            temperature=jnp.asarray([p.temperature if p else 0.0 for p in padded], jnp.float32),
            top_k=jnp.asarray([p.top_k if p else -1 for p in padded], jnp.int32),
            top_p=jnp.asarray([p.top_p if p else 1.0 for p in padded], jnp.float32),
            min_p=jnp.asarray([p.min_p if p else 0.0 for p in padded], jnp.float32),
            seed=jnp.asarray([p.effective_seed if p else 0 for p in padded], jnp.uint32),
        )
        return groups, sampling, [row_of[id(c)] for c in chunks]
