"""The engine loop: admit requests, schedule a step, run it on the device, turn tokens into outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.cache.block_manager import BlockManager
from jaxserve.cache.host_pool import HostPool, check_host_memory, host_pages
from jaxserve.cache.host_prefix import HostPrefixCache
from jaxserve.cache.kv_cache import check_kv_dtype, is_quantized, kv_dtype_name, page_bytes, pages_for_memory, storage_dtype
from jaxserve.engine.beam import BeamSearch, Hypothesis
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.interface import Admission, EngineLimits, EngineStats, ModelInfo, StepReport
from jaxserve.engine.outputs import FAILED, RequestOutput, StepOutput, TopLogprobs
from jaxserve.engine.page_copier import PageCopier
from jaxserve.engine.prefix_tier import PrefixTier
from jaxserve.engine.runner import ModelRunner, StepShapes, decode_group
from jaxserve.engine.scheduler import Chunk, Scheduler
from jaxserve.engine.sequence import Sequence, Status
from jaxserve.engine.speculation import DraftModel, HeadsDraft, Speculator
from jaxserve.engine.timeline import Timeline
from jaxserve.engine.swapper import Swapper, swap_min_tokens
from jaxserve.errors import UserError
from jaxserve.models.draft_heads import DraftHeads
from jaxserve.models.llama import ForwardBatch, Params
from jaxserve.checkpoint.peft import read_peft
from jaxserve.models.lora import LoraAdapter, check_adapter
from jaxserve.ops.quant import weight_format
from jaxserve.ops.sampling import LogitAdjust, SamplingArrays
from jaxserve.parallel.channel import Link
from jaxserve.parallel.mesh import MODEL
from jaxserve.parallel.distributed import StepChannel, follow
from jaxserve.sampling_params import MAX_BEAMS, SamplingParams
from jaxserve.structured.matchers import GrammarCompiler
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        params: Params,
        engine_config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
        mesh: Mesh | None = None,
        grammars: GrammarCompiler | None = None,
        model_name: str = "model",
        channel: StepChannel | None = None,
        draft: tuple[ModelConfig, Params] | DraftHeads | None = None,
    ) -> None:
        """`grammars`: a grammar cache to share (data-parallel replicas compile a schema once); by
        default the engine makes its own when it has a tokenizer. `channel`: on process 0 of a
        multi-host group, where every program call is sent for the others to replay. `draft`: the
        draft model or heads a `speculative` config names (`checkpoint.loader.load_draft`)."""
        self.model_config = model_config
        self.engine_config = engine_config
        self.model_name = model_name
        self.tokenizer = tokenizer
        eos = eos_token_ids if eos_token_ids is not None else (tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = min(engine_config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        spec = engine_config.speculative
        if spec is not None and spec.model is not None:
            if channel is not None or (mesh is not None and mesh.size > 1):
                raise UserError(f"speculative_config.model: {spec.method} drafts run on one device in one process; this build has "
                                "none with tensor parallelism or a multi-process group (use method 'ngram')")
            if not isinstance(draft, DraftHeads if spec.method == "medusa" else tuple):
                raise ValueError(f"engine_config.speculative names {spec.method} drafts: pass them as `draft` (checkpoint.loader.load_draft)")
            if isinstance(draft, DraftHeads) and spec.num_speculative_tokens > draft.config.num_heads:
                raise UserError(f"speculative_config.num_speculative_tokens: {spec.num_speculative_tokens} exceeds the "
                                f"{draft.config.num_heads} draft heads in {spec.model}")
        heads, draft = (draft, None) if isinstance(draft, DraftHeads) else (None, draft)
        page_size = engine_config.page_size
        check_kv_dtype(engine_config.kv_cache_dtype)
        dtype = storage_dtype(engine_config.kv_cache_dtype, params["embed"].dtype)
        draft_dtype = storage_dtype(engine_config.kv_cache_dtype, draft[1]["embed"].dtype) if draft is not None else None
        bytes_per_page = page_bytes(model_config, page_size, dtype) + (page_bytes(draft[0], page_size, draft_dtype) if draft is not None else 0)
        self.weights = weight_format(params)
        self.kv_cache_dtype = kv_dtype_name(engine_config.kv_cache_dtype, params["embed"].dtype)
        self.num_pages = engine_config.num_pages if engine_config.kv_cache_memory is None else pages_for_memory(bytes_per_page, engine_config.kv_cache_memory)
        self.shapes = StepShapes.from_config(engine_config, self.max_model_len)
        if engine_config.max_loras and channel is not None:
            raise UserError("LoRA adapters need a single-process engine; multi-host groups have none")
        # As served at this context length: LongRoPE's factor list, and no window that cannot bite.
        served = [c.for_context(self.max_model_len) for c in (model_config, *([draft[0]] if draft is not None else []))]
        self.runner = ModelRunner(served[0], params, self.num_pages, page_size, self.shapes, mesh, dtype, engine_config.max_loras,
                                  engine_config.max_lora_rank)
        self.runner.channel = channel
        self.adapters: dict[str, LoraAdapter] = {}  # loaded LoRA adapters by name (requests name them)
        self.slots: list[LoraAdapter | None] = [None] * engine_config.max_loras  # what each device slot holds
        self._slot_used = [0] * engine_config.max_loras  # the step each slot last ran in (least recently used goes first)
        self.blocks = BlockManager(self.num_pages, engine_config.enable_prefix_caching, record_evictions=engine_config.host_prefix_cache > 0)
        # Pages wholly before a sequence's window are given up (`Scheduler`) when every layer slides,
        # a draft model's included (its pages are the same).
        windows = [c.kv_window for c in served]
        window = None if None in windows else max(windows)
        log.info(
            "KV cache: %d pages of %d tokens = %d tokens (%s, %.1f MiB%s)%s; %d step shapes",
            self.num_pages - 1,
            page_size,
            (self.num_pages - 1) * page_size,
            self.kv_cache_dtype + (" with a scale per token and KV head" if is_quantized(dtype) else ""),
            self.num_pages * bytes_per_page / 2**20,
            ", the draft model's cache included" if draft is not None else "",
            f"; sliding window of {window} tokens: pages that fall out of it are freed" if window is not None else "",
            len(self.shapes.combos()),
        )
        drafter = DraftModel(ModelRunner(served[1], draft[1], self.num_pages, page_size, self.shapes, mesh, draft_dtype)) if draft is not None else None
        if heads is not None:
            drafter = HeadsDraft(heads, self.runner, spec.num_speculative_tokens)
        self.speculator = Speculator(spec, drafter) if spec else None
        self.copier, self.swapper, self.prefix_tier = self._host_tiers(bytes_per_page, params)
        threshold = None
        if self.swapper is not None:
            threshold = 1 if engine_config.preemption_mode == "swap" else swap_min_tokens(self.runner, page_size)
        self.scheduler = Scheduler(engine_config, self.blocks, self.swapper.pool if self.swapper else None, threshold,
                                   self.prefix_tier.cache if self.prefix_tier else None, window)
        self.grammars = grammars or (GrammarCompiler(tokenizer, model_config.vocab_size) if tokenizer else None)
        self.seqs: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples
        self._arrivals = itertools.count()
        self.num_computed_tokens = 0  # tokens whose K/V the device computed (prefix hits excluded)
        self.num_steps = 0  # model steps run for requests
        self.last_step = StepReport(0, 0, None)

    # ---- requests ------------------------------------------------------------------------

    def adapter(self, name: str | None) -> LoraAdapter | None:
        """The loaded adapter a request names (None for none); UserError for one not loaded."""
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UserError(f"no LoRA adapter '{name}' is loaded", param="model", code="model_not_found")
        return adapter

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise UserError naming what is wrong with a request (its `param`: the field at fault);
        touches no state. A new grammar is compiled (and cached) here."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise UserError("the prompt is empty", param="prompt")
        for name, ids in (("prompt", prompt_ids), ("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise UserError(f"{name}: token id {bad!r} is out of range: token ids must be integers in [0, {vocab}) (the vocabulary size is {vocab})", param=name)
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this engine has none", param="stop")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise UserError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}",
                param="prompt",
                code="context_length_exceeded",
            )
        need = self.scheduler.pages_needed(total)  # with a sliding window, less than the whole context
        if need > self.num_pages - 1:
            raise UserError(f"the request needs {min(total, need * self.engine_config.page_size)} tokens of KV cache; the cache holds "
                            f"{self.limits.kv_cache_tokens}", param="prompt")

    def compile_guide(self, params: SamplingParams) -> float | None:
        """Compile the request's grammar if it is new (UserError if it is bad, or if this engine has no
        tokenizer to constrain); the seconds a fresh compile took, None when there was nothing to do."""
        if params.guide is None:
            return None
        if self.grammars is None:
            raise UserError("constrained decoding needs a tokenizer; this engine has none", param="guide")
        try:
            return self.grammars.prepare(params.guide)
        except UserError as e:
            raise UserError(str(e), param="guide") from None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, admission: Admission = Admission()) -> None:
        """Check a request, then queue it (its n samples): nothing bad can touch a batch."""
        adapter = self.adapter(admission.adapter)
        self.compile_guide(params)
        self.check_request(prompt_ids, params)
        self.enqueue(request_id, prompt_ids, params, admission, adapter)

    def enqueue(self, request_id: str, prompt_ids: list[int], params: SamplingParams, admission: Admission = Admission(),
                adapter: LoraAdapter | None = None) -> None:
        """Queue a request that passed `check_request` (and `compile_guide`), with the adapter its
        admission named (`adapter`)."""
        if request_id in self.seqs:
            raise UserError(f"request id {request_id!r} is already in use")
        arrival = next(self._arrivals)
        samples: list[Sequence] = []
        for index in range(1 if params.use_beam_search else params.n):  # beams fork from one sequence
            sp = params if index == 0 else dataclasses.replace(params, prompt_logprobs=None)
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer else None
            leader = samples[0] if samples else None
            seq = Sequence(request_id, list(prompt_ids), sp, arrival, admission.priority, admission.tenant, admission.weight, index, leader, detok,
                           timeline=Timeline() if admission.timeline else None, adapter=adapter)
            if params.guide is not None:
                seq.matcher = self.grammars.matcher(params.guide)
            if params.use_beam_search:
                stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
                seq.beam, seq.detokenizer = BeamSearch(params.n, params.length_penalty, params.max_tokens, params.min_tokens, frozenset(stops)), None
            samples.append(seq)
        self.seqs[request_id] = samples
        for seq in samples:
            self.scheduler.add(seq)

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Make an adapter available to requests by its name (UserError if it does not fit this model,
        LoRA is off, or the name is taken). Its values reach a device slot when a step first needs them."""
        c = self.engine_config
        if not c.max_loras:
            raise UserError("LoRA is off for this engine (max_loras is 0)")
        if adapter.name in self.adapters:
            raise UserError(f"a LoRA adapter named '{adapter.name}' is already loaded; unload it first", param="lora_name")
        tp = self.runner.mesh.shape[MODEL]
        try:
            check_adapter(adapter, self.model_config, c.max_lora_rank, kv_copied=tp > 1 and self.model_config.num_kv_heads == tp)
        except ValueError as e:
            raise UserError(str(e), param="lora_path") from None
        self.adapters[adapter.name] = adapter

    def read_adapter(self, name: str, path: str) -> LoraAdapter:
        """A PEFT adapter folder read for this model (UserError naming what is wrong with it)."""
        return read_peft(path, name, self.model_config.num_layers)

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for an adapter; requests already queued or running finish with it."""
        if self.adapters.pop(name, None) is None:
            raise UserError(f"no LoRA adapter '{name}' is loaded", param="lora_name", code="model_not_found")

    def run(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
        """Every request (id -> prompt ids, params) to completion, batched as the limits allow."""
        results = {rid: RequestOutput.empty(rid, ids, sp.n) for rid, (ids, sp) in requests.items()}
        for rid, (ids, sp) in requests.items():
            self.add_request(rid, ids, sp)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].add(out)
        return results

    def abort(self, request_id: str, reason: str = "abort", message: str = "") -> list[StepOutput]:
        """Stop a request's unfinished samples and free their pages; returns their final outputs (with
        `message` as text when the reason is "error", or "rejected": the request's own input cannot go on)."""
        outputs = []
        for seq in self.seqs.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, reason)
                text = message if reason in FAILED else seq.text[seq.sent :]
                outputs.append(StepOutput(request_id, seq.index, None, 0.0, reason, text))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def warmup(self, progress: bool = True) -> None:
        """Compile every step shape now (the draft model's too), so that serving never waits on the compiler."""
        self.runner.warmup(progress)
        if self.slots:
            self.slots[0] = None  # warm-up emptied it
        if self._drafter is not None:
            self._drafter.warmup(progress)

    def _host_tiers(self, bytes_per_page: int, params: Params) -> tuple[PageCopier | None, Swapper | None, PrefixTier | None]:
        """The host pools and their copies, when `swap_space` (and a preemption mode that may swap) or
        `host_prefix_cache` ask for them."""
        c = self.engine_config
        wants = {"swap_space": c.swap_space if c.preemption_mode != "recompute" else 0.0, "host_prefix_cache": c.host_prefix_cache}
        if not any(wants.values()):
            return None, None, None
        if self.runner.channel is not None:
            names = ", ".join(name for name, gib in wants.items() if gib)
            raise UserError(f"{names}: host-memory KV tiers need a single-process engine; multi-host groups have none")
        check_host_memory(wants)
        copier = PageCopier(self._runners())
        caches = [r.cache for r in self._runners()]
        swapper = tier = None
        for name, gib in wants.items():
            if not gib:
                continue
            pages = host_pages(gib, bytes_per_page, name)
            log.info("%s: %d host pages of %d tokens = %d tokens (%.2f GiB)", name, pages, c.page_size, pages * c.page_size, pages * bytes_per_page / 2**30)
            pool = HostPool(caches, pages)
            if name == "swap_space":
                swapper = Swapper(copier, pool)
            else:
                folder = Path(c.prefix_cache_dir) if c.prefix_cache_dir else None
                tier = PrefixTier(copier, HostPrefixCache(pool), folder, self._fingerprint(params) if folder else "")
        return copier, swapper, tier

    def _fingerprint(self, params: Params) -> str:
        """What a saved host prefix tier must have been computed by: this model (name, config, weight
        format and a sample of its embedding) and this cache layout."""
        sample = [np.asarray(leaf[:2]).tobytes() for leaf in jax.tree_util.tree_leaves(params["embed"])]
        parts = [self.model_name, repr(self.runner.cfg), self.weights, self.kv_cache_dtype, str(self.engine_config.page_size), *sample]
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def _host_copies(self, chunks: list[Chunk]) -> list[Chunk]:
        """Run the schedule's host copies, every read before any write (a page given up in this
        schedule may be refilled in this step); a sequence whose copy failed recomputes, and its chunk waits."""
        copies, failed = self.scheduler.take_copies(), []
        if self.prefix_tier is not None:
            self.prefix_tier.store(self.blocks.take_evicted())
        if self.swapper is not None:
            failed += self.swapper.run(copies.swap_outs, copies.swap_ins)
        if self.prefix_tier is not None:
            failed += self.prefix_tier.fetch(copies.prefix_ins)
        for seq in failed:
            self.scheduler.recompute(seq)
        return [c for c in chunks if c.seq not in failed]

    def _settle_copies(self) -> None:
        """Wait for this step's copies to host memory (dispatched before the step, they ran beside it);
        a sequence whose swap-out failed in flight recomputes."""
        if self.copier is None:
            return
        self.copier.settle()
        for seq in self.swapper.take_failed() if self.swapper is not None else ():
            if seq.status is not Status.FINISHED:
                self.scheduler.recompute(seq)

    def close(self) -> None:
        """Save what outlives the process: with `prefix_cache_dir`, the host prefix tier, the blocks the
        device still caches copied into it first (the hottest prefixes are those nobody evicted)."""
        if self.prefix_tier is not None and self.prefix_tier.folder is not None:
            self.prefix_tier.store(self.blocks.cached_blocks())
            self.prefix_tier.close()

    @property
    def _drafter(self) -> DraftModel | HeadsDraft | None:
        return self.speculator.draft if self.speculator else None

    def _runners(self) -> list[ModelRunner]:
        """The runners whose caches hold the sequences' pages: the target's, then a draft model's."""
        return [self.runner] + (self._drafter.caches if self._drafter is not None else [])

    def follow(self, link: Link) -> None:
        """On a follower process of a multi-host group: replay process 0's program calls until it
        says stop (`jaxserve.parallel.distributed.follow`)."""
        follow(self.runner, link)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.model_config.vocab_size, self.max_model_len, self.tokenizer, self.weights)

    @property
    def limits(self) -> EngineLimits:
        kv_tokens = (self.num_pages - 1) * self.engine_config.page_size  # page 0 is the null page
        c = self.engine_config
        return EngineLimits(c.max_num_seqs, c.max_num_batched_tokens, kv_tokens, c.page_size, self.kv_cache_dtype, c.enable_prefix_caching,
                            "token_head" if is_quantized(self.runner.cache.k.dtype) else None)

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        spec = self.speculator.snapshot() if self.speculator else None
        swap = dataclasses.replace(self.swapper.counters) if self.swapper else None
        host_usage = self.swapper.pool.usage if self.swapper else 0.0
        tier = self.prefix_tier.counters if self.prefix_tier else None
        return EngineStats(len(s.running), len(s.waiting), b.usage, b.prefix_queries, b.prefix_hits, s.num_preemptions, self._num_compiles(), spec,
                           swap, host_usage, tier)

    def _num_compiles(self) -> int:
        """Programs compiled: the model's and the drafter's."""
        return self.runner.num_compiles + (self._drafter.num_compiles if self._drafter is not None else 0)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        tuned = self.speculator is not None and self.speculator.cfg.tune_k
        started, compiles = time.perf_counter(), self._num_compiles() if tuned else 0  # drafting included
        chunks = self.scheduler.schedule()
        if self.copier is not None:
            chunks = self._host_copies(chunks)  # before drafting: a draft model writes into freshly reserved pages
        if self.speculator is not None:
            chunks = self._speculate(chunks)
        self.last_step = StepReport(len(chunks), sum(c.length for c in chunks), None)
        if not chunks:
            self._settle_copies()
            return []
        groups, last_row, prompt_slots = self._batch(chunks, self._place_adapters(chunks))
        self.runner.forward(groups)
        self.num_steps += 1
        if self._drafter is not None:
            self._drafter.mirror(groups)
        sampled = [c for c in chunks if c.completes]
        rows = self.shapes.sampled_rows(sum(g.tokens.shape[0] for g in groups))
        sampling, positions = self._sampling(sampled, last_row, rows)
        self._fill_masks(sampled, last_row, sampling.allowed)  # on the host while the device runs the step
        adjust = self._adjust(sampled, last_row, rows) if any(c.seq.params.adjusts_logits for c in sampled) else None
        want_top = any(c.seq.params.logprobs is not None or c.seq.beam is not None for c in sampled)
        tokens, logprobs, *top = self.runner.sample(sampling, positions, adjust, want_top)
        ended = time.perf_counter()
        self._settle_copies()
        if tuned and groups[-1].tokens.shape[1] == 1 and self._num_compiles() == compiles:  # decode rows only, nothing compiled
            self.speculator.observe(groups[0].tokens.shape[0], time.perf_counter() - started)
        if prompt_slots:
            self._collect_prompt_logprobs(groups[-1].tokens.size, prompt_slots)
        outputs, beams = [], set()
        for chunk in chunks:
            seq, row = chunk.seq, last_row[id(chunk)]
            if seq.status is Status.FINISHED:
                continue  # its request failed earlier in this loop
            if seq.timeline is not None:
                seq.timeline.step(started, ended, max(0, min(chunk.start + chunk.length, len(seq.prompt_ids)) - chunk.start))
            if chunk.draft:
                outputs += self._guarded(seq, lambda: self._verify(chunk, row, tokens, logprobs, top))
                continue
            seq.num_computed += chunk.length
            self.num_computed_tokens += chunk.length
            self.scheduler.register_computed(seq)
            if chunk.completes and seq.beam is not None:
                width = 2 * seq.beam.width
                seq.candidates = list(zip(top[0][row, :width].tolist(), top[1][row, :width].tolist()))
                beams.add(seq.request_id)
            elif chunk.completes:
                seq.spec.hidden_step, seq.spec.hidden_row = self.num_steps, row
                outputs += self._guarded(seq, lambda: [self._append(seq, int(tokens[row]), float(logprobs[row]), _alternatives(seq, top, row))])
        for request_id in sorted(beams):
            outputs += self._advance_beams(request_id)
        return outputs

    def _guarded(self, seq: Sequence, emit) -> list[StepOutput]:
        """`emit()`'s outputs; a host-side failure (say, detokenizing) fails only its own request."""
        try:
            return emit()
        except UserError as e:  # what the request asked for cannot go on (its grammar outgrew the matcher's limits)
            log.warning("request %s rejected: %s", seq.request_id, e)
            return self.abort(seq.request_id, "rejected", str(e))
        except Exception as e:
            log.exception("request %s failed", seq.request_id)
            return self.abort(seq.request_id, "error", f"{type(e).__name__}: {e}")

    # ---- speculative decoding ------------------------------------------------------------

    def _speculate(self, chunks: list[Chunk]) -> list[Chunk]:
        """Give decode chunks drafts (`jaxserve.engine.speculation`) within the spare rows of the
        largest decode bucket and the step's token budget, shared evenly (a sequence's first drafts
        are its likeliest to be accepted), then cut from the drafts' ends down to a bucket the rows
        fill exactly (5 rows run as 8: a padded bucket costs more than its drafts save). A request
        with a grammar or beams decodes without: its next token's mask or candidates need the one
        before. A step with more decoding sequences than `disable_by_batch_size` drafts nothing;
        with `tune_k`, each sequence drafts at most `Speculator.plan`'s k. A
        draft model's tokens get their pages before it runs: it writes their K/V. Draft heads draft
        for the sequences the latest step sampled (the hidden states they read are that step's)."""
        spec = self.speculator
        base = sum(c.length for c in chunks if not c.rows)  # decode rows, one per sequence before drafts
        if base > (spec.cfg.disable_by_batch_size or max(1, self.engine_config.max_num_seqs // 2)):
            return chunks
        spare = min(self.shapes.decode_rows[-1] - base, self.engine_config.max_num_batched_tokens - sum(c.length for c in chunks))
        eligible = [i for i, c in enumerate(chunks) if not c.rows and c.completes and c.seq.matcher is None and c.seq.beam is None]
        most = spec.plan(base, len(eligible), self.shapes.decode_rows) if spec.cfg.tune_k else spec.cfg.num_speculative_tokens
        drafts: dict[int, list[int]] = {}
        wanted: list[tuple[int, int]] = []  # (chunk, tokens) the draft model is to propose
        for n, i in enumerate(eligible):
            c = chunks[i]
            share = -(-spare // (len(eligible) - n))  # what is left, split over the sequences still to come
            k = spec.budget(c.seq.spec, min(share, most, c.seq.params.max_tokens - len(c.seq.output_ids) - 1, self.max_model_len - c.seq.num_tokens))
            if k < 1 or (spec.draft is not None and spec.draft.needs_latest_step and c.seq.spec.hidden_step != self.num_steps):
                continue
            if spec.draft is None:
                draft = spec.lookup(c.seq.tokens, k)
                if draft and self.scheduler.reserve(c.seq, c.start + 1 + len(draft)):
                    drafts[i] = draft
                    spare -= len(draft)
            elif self.scheduler.reserve(c.seq, c.start + 1 + k):
                wanted.append((i, k))
                spare -= k
        if wanted:
            drafts.update(zip((i for i, _ in wanted), spec.draft.propose([(chunks[i].seq, k) for i, k in wanted])))
        rows = base + sum(map(len, drafts.values()))
        excess = rows - max([b for b in self.shapes.decode_rows if base <= b <= rows], default=rows)
        for i in reversed(drafts):  # the last sequences' draft ends go first
            cut = min(excess, len(drafts[i]))
            drafts[i], excess = drafts[i][: len(drafts[i]) - cut], excess - cut
        planned = list(chunks)
        for i, draft in drafts.items():
            if draft:
                c = chunks[i]
                planned[i] = Chunk(c.seq, c.start, 1 + len(draft), 0, tuple(draft))
        return planned

    def _verify(self, chunk: Chunk, row: int, tokens: np.ndarray, logprobs: np.ndarray, top: list) -> list[StepOutput]:
        """The tokens a drafting sequence sampled at its rows: each draft that equals the model's own
        token is kept, then the model's token at the first mismatch (or after the last draft). Their
        K/V stay in the cache; the rest is overwritten as the sequence grows."""
        seq, draft = chunk.seq, chunk.draft
        sampled = tokens[row : row + len(draft) + 1].tolist()
        accepted = next((j for j, d in enumerate(draft) if sampled[j] != d), len(draft))
        self.speculator.record(seq.spec, len(draft), accepted)
        seq.spec.hidden_step, seq.spec.hidden_row = self.num_steps, row + accepted  # behind the last token kept
        outputs = []
        for j in range(accepted + 1):
            outputs.append(self._append(seq, sampled[j], float(logprobs[row + j]), _alternatives(seq, top, row + j)))
            if seq.status is Status.FINISHED:
                return outputs
        seq.num_computed += 1 + accepted
        self.num_computed_tokens += 1 + accepted
        self.scheduler.register_computed(seq)
        return outputs

    # ---- beam search ---------------------------------------------------------------------

    def _advance_beams(self, request_id: str) -> list[StepOutput]:
        """Once every live beam of a request has its candidates: fork the next beams (sharing full
        pages, copying a partial last page on the device), or finish the request with its best ones."""
        live = self.seqs.get(request_id, [])
        if not live or any(s.candidates is None for s in live):
            return []  # a beam was preempted: it catches up first
        search: BeamSearch = live[0].beam
        chosen = search.advance([(s.output_ids, s.beam_logprobs, s.beam_cumulative, s.candidates) for s in live])
        taken: set[int] = set()
        copies: list[tuple[int, int]] = []  # (source page, new page) of forked partial pages
        children = []
        for parent, token, logprob in chosen:  # a parent's first child is the parent itself; others fork it
            seq = live[parent]
            children.append((seq if parent not in taken else self._fork(seq, copies), token, logprob))
            taken.add(parent)
        for child, token, logprob in children:  # after every fork, so forks start from their parent's tokens
            child.output_ids.append(token)
            child.beam_logprobs.append(logprob)
            child.beam_cumulative += logprob
        for b, seq in enumerate(live):
            seq.candidates = None
            if b not in taken:
                self.scheduler.finish(seq, "beam")  # no candidate of it is among the best
        if copies:
            src, dst = np.zeros(MAX_BEAMS, np.int32), np.zeros(MAX_BEAMS, np.int32)  # a step forks fewer than MAX_BEAMS per request
            src[: len(copies)], dst[: len(copies)] = zip(*copies)
            for runner in self._runners():
                runner.copy_pages(src, dst)
        self.seqs[request_id] = [child for child, _, _ in children]
        for index, child in enumerate(self.seqs[request_id]):
            child.index = index
        if children:
            return []
        self.seqs.pop(request_id)
        return [out for index, hyp in enumerate(search.best()) for out in self._beam_outputs(live[0], index, hyp)]

    def _fork(self, seq: Sequence, copies: list[tuple[int, int]]) -> Sequence:
        """A running copy of a beam: its full pages shared, its partial last page copied (recorded in
        `copies` for the device). Without a free page or a free running slot it waits instead, and
        recomputes what the prefix cache does not hold."""
        clone = dataclasses.replace(seq, output_ids=list(seq.output_ids), beam_logprobs=list(seq.beam_logprobs), hashes=list(seq.hashes), pages=[], candidates=None)
        page_size = self.engine_config.page_size
        full, partial = divmod(seq.num_computed, page_size)
        room = len(self.scheduler.running) < self.engine_config.max_num_seqs
        fresh = self.blocks.allocate(1) if partial and room else [] if room else None
        if fresh is None:
            clone.num_computed = 0
            self.scheduler.add(clone)
            return clone
        self.blocks.acquire(seq.pages[:full])
        clone.pages = seq.pages[:full] + fresh
        if partial:
            copies.append((seq.pages[full], fresh[0]))
        self.scheduler.running.append(clone)
        return clone

    def _beam_outputs(self, seq: Sequence, index: int, hyp: Hypothesis) -> list[StepOutput]:
        """A finished beam as the step outputs a sampled sequence would have given, token by token."""
        detok = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens) if self.tokenizer else None
        outs, last = [], len(hyp.token_ids) - 1
        for i, (token, logprob) in enumerate(zip(hyp.token_ids, hyp.logprobs)):
            text = (detok.push(token) + (detok.flush() if i == last else "")) if detok else ""
            done = i == last
            outs.append(StepOutput(seq.request_id, index, token, logprob, hyp.finish_reason if done else None, text,
                                   stop_token_id=hyp.stop_token_id if done else None,
                                   num_cached_tokens=seq.num_cached_tokens if i == 0 else None, queue_seconds=seq.queue_seconds if i == 0 else None))
        if not outs:  # the prompt's likeliest next token ends it
            outs.append(StepOutput(seq.request_id, index, None, 0.0, hyp.finish_reason, "", stop_token_id=hyp.stop_token_id,
                                   num_cached_tokens=seq.num_cached_tokens, queue_seconds=seq.queue_seconds))
        return outs

    def _append(self, seq: Sequence, token: int, logprob: float, top: TopLogprobs) -> StepOutput:
        p = seq.params
        first = not seq.output_ids
        reason, token_out, stop_token, stopped_by_string = None, None, None, False
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            why = (seq.matcher.get_error().strip() or "no reason given").splitlines()[0]
            raise UserError(f"the {p.guide.description} could not be followed past {len(seq.output_ids)} output tokens: {why}")
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason, stop_token = "stop", token  # min_tokens banned these until it was reached
        else:
            token_out = token
            seq.output_ids.append(token)
            if seq.detokenizer:
                before = len(seq.text)
                if seq.timeline is None:
                    seq.text += seq.detokenizer.push(token)
                else:
                    began = time.perf_counter()
                    seq.text += seq.detokenizer.push(token)
                    seq.timeline.detokenize_seconds += time.perf_counter() - began
                stopped_by_string = self._match_stop(seq, before)
            if stopped_by_string or (seq.matcher is not None and seq.matcher.is_stopped()):
                reason = "stop"  # a stop string, or a grammar that is complete and admits nothing more
            elif len(seq.output_ids) == p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason and seq.detokenizer and not stopped_by_string:
            seq.text += seq.detokenizer.flush()  # an incomplete character held back at the end
        end = len(seq.text) if reason else len(seq.text) - _held_back(seq.text, p.stop)
        text, seq.sent = seq.text[seq.sent : end], max(seq.sent, end)
        prompt = None
        if first and p.prompt_logprobs is not None:
            k = p.prompt_logprobs
            prompt = tuple((lp, tuple(zip(ids[:k], lps[:k]))) for lp, ids, lps in seq.prompt_logprobs)
        if reason:
            self.scheduler.finish(seq, reason)
            if all(s.status is Status.FINISHED for s in self.seqs.get(seq.request_id, [])):
                self.seqs.pop(seq.request_id, None)
        cached, queued = (seq.num_cached_tokens, seq.queue_seconds) if first else (None, None)
        return StepOutput(seq.request_id, seq.index, token_out, logprob, reason, text, top, prompt, stop_token, cached, queued,
                          seq.timeline if reason else None)

    def _match_stop(self, seq: Sequence, before: int) -> bool:
        """Cut the output text at the first stop string that the last token completed."""
        stops = seq.params.stop
        if not stops or len(seq.output_ids) < seq.params.min_tokens:
            return False
        found = [i for s in stops if (i := seq.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if not found:
            return False
        seq.text = seq.text[: min(found)]
        return True

    # ---- step inputs ---------------------------------------------------------------------

    def _place_adapters(self, chunks: list[Chunk]) -> dict[LoraAdapter, int]:
        """The device slot of every adapter this step's sequences use, writing those not in one into the
        least recently used slots no other of them needs (the scheduler admits at most `max_loras`
        adapters among running sequences, so there is always one)."""
        needed = {c.seq.adapter for c in chunks} - {None}
        if not needed:
            return {}
        placed = {a: i for i, a in enumerate(self.slots) if a in needed}
        for adapter in needed - placed.keys():
            slot = min((i for i, a in enumerate(self.slots) if a not in needed), key=self._slot_used.__getitem__)
            self.runner.write_lora(slot, adapter)
            log.info("LoRA adapter '%s' into slot %d", adapter.name, slot)
            self.slots[slot], placed[adapter] = adapter, slot
        for slot in placed.values():
            self._slot_used[slot] = self.num_steps + 1
        return placed

    def _batch(self, chunks: list[Chunk], slots: dict[LoraAdapter, int]) -> tuple[list[ForwardBatch], dict[int, int], list[tuple[Sequence, int, int]]]:
        """Fixed-shape groups for this step: one-token decode rows [Bd, 1], then prefill rows [Bp, T]
        (a chunk spans one or more rows), all over page tables of one width; each row takes its
        sequence's LoRA slot from `slots` (-1: none). Padding rows have length 0 and write only to
        the null page. Also returns the row of each chunk's last token (by chunk id) and, for prompt
        log-probs, (sequence, prompt position, index into the prefill rows)."""
        s = self.shapes
        decode = [c for c in chunks if not c.rows]
        prefill = [c for c in chunks if c.rows]
        bd = StepShapes.fit(sum(c.length for c in decode), s.decode_rows)
        bp = StepShapes.fit(sum(c.rows for c in prefill), s.prefill_rows)
        groups, last_row, prompt_slots = [], {}, []

        def rows(b: int, t: int) -> tuple[np.ndarray, ...]:
            return (np.zeros((b, t), np.int32), np.zeros((b, t), np.int32), np.zeros((b, s.table_width), np.int32), np.zeros(b, np.int32),
                    np.full(b, -1, np.int32))

        if bd:
            one_token_rows = []
            for c in decode:  # a drafting sequence takes a row per token: its last one, then the drafts
                last = c.seq.prompt_ids[c.start] if c.start < len(c.seq.prompt_ids) else c.seq.output_ids[c.start - len(c.seq.prompt_ids)]
                last_row[id(c)] = len(one_token_rows)
                slot = slots.get(c.seq.adapter, -1)
                one_token_rows += [(c.seq.pages, token, c.start + j, slot) for j, token in enumerate((last, *c.draft))]
            groups.append(decode_group(one_token_rows, bd, s.table_width))
        if bp:
            t = s.row_len
            tokens, positions, tables, kv_lens, adapter = rows(bp, t)
            r = 0
            for c in prefill:
                seq = c.seq
                ids = seq.tokens
                for first in range(c.start, c.start + c.length, t):
                    n = min(t, c.start + c.length - first)
                    tokens[r, :n] = ids[first : first + n]
                    positions[r] = first + np.arange(t)
                    tables[r, : len(seq.pages)] = seq.pages
                    kv_lens[r] = first + n
                    adapter[r] = slots.get(seq.adapter, -1)
                    if seq.wants_prompt_logprobs(first):
                        done = len(seq.prompt_logprobs)  # positions before this are collected
                        prompt_slots += [(seq, q, r * t + q - first) for q in range(max(first, done), min(first + n, len(seq.prompt_ids) - 1))]
                    r += 1
                last_row[id(c)] = bd + r - 1
            groups.append(ForwardBatch(tokens, positions, tables, kv_lens, adapter))
        return groups, last_row, prompt_slots

    def _sampling(self, sampled: list[Chunk], last_row: dict[int, int], rows: int) -> tuple[SamplingArrays, np.ndarray]:
        """Per-row sampling arrays (padding rows greedy) and the position each sampled token takes."""
        s, positions = SamplingArrays.greedy(rows, self.model_config.vocab_size), np.zeros(rows, np.int32)
        for c in sampled:
            p, first = c.seq.params, c.start + c.length - len(c.draft)  # the position of the first sampled token
            for j in range(1 + len(c.draft)):  # a drafting sequence samples at every row: the verify
                r = last_row[id(c)] + j
                s.set_row(r, p, p.sample_seed(c.seq.index))
                positions[r] = first + j
        return s, positions

    def _fill_masks(self, sampled: list[Chunk], last_row: dict[int, int], allowed: np.ndarray) -> None:
        """Each constrained row's allowed tokens into `allowed` [R, words] (other rows stay all ones)."""
        rows = [(c.seq.matcher, last_row[id(c)]) for c in sampled if c.seq.matcher is not None]
        if rows:
            start = time.perf_counter()
            self.grammars.fill(rows, allowed)
            self.last_step = dataclasses.replace(self.last_step, mask_seconds=time.perf_counter() - start)

    def _adjust(self, sampled: list[Chunk], last_row: dict[int, int], rows: int) -> LogitAdjust:
        """Dense per-row penalties and biases (identity for rows that ask for none)."""
        vocab = self.model_config.vocab_size
        repetition, bias = np.ones((rows, vocab), np.float32), np.zeros((rows, vocab), np.float32)
        for c in sampled:
            p, seq = c.seq.params, c.seq
            for j in range(1 + len(c.draft)):  # a verify row sees the drafts before it as output
                r, output = last_row[id(c)] + j, seq.output_ids + list(c.draft[:j])
                if p.repetition_penalty != 1:
                    repetition[r, np.unique(seq.prompt_ids + output)] = p.repetition_penalty
                if (p.presence_penalty or p.frequency_penalty) and output:
                    counts = np.bincount(output, minlength=vocab).astype(np.float32)
                    bias[r] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
                for token, b in p.logit_bias.items():
                    bias[r, token] += b
                if len(output) < p.min_tokens:
                    banned = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_token_ids))
                    bias[r, banned] = -np.inf
        return LogitAdjust(repetition, bias)

    def _collect_prompt_logprobs(self, num_positions: int, slots: list[tuple[Sequence, int, int]]) -> None:
        """Log-probs of the next prompt token at each slot (of the step's `num_positions` prefill
        positions), appended in position order."""
        targets = np.zeros(num_positions, np.int32)
        for seq, pos, i in slots:
            targets[i] = seq.prompt_ids[pos + 1]
        chosen, top_ids, top_lps = self.runner.prompt_logprobs(targets)
        for seq, pos, i in slots:
            if pos == len(seq.prompt_logprobs):
                seq.prompt_logprobs.append((float(chosen[i]), top_ids[i].tolist(), top_lps[i].tolist()))


def _alternatives(seq: Sequence, top: list, row: int) -> TopLogprobs:
    """The top log-probs a sequence asked for, at one row of the step's sampler output."""
    k = seq.params.logprobs or 0
    return tuple(zip(top[0][row, :k].tolist(), top[1][row, :k].tolist())) if k else ()
