"""What the engine's one interface hands to its callers (servers, the CLI, routers): read-only
snapshots and records, so no caller needs to reach into a scheduler, runner or block manager.

The verbs live on `AsyncEngine`: `check` (every check of a request, once), `generate` (submit a
checked request and stream its outputs), `abort`, `stats`, plus `info`, `limits`, `warmup`,
`subscribe`, `start` and `shutdown`; for LoRA, `read_adapter`, `load_adapter`, `unload_adapter` and
`adapters`. Several models, versions or replicas are several engines behind a router that uses only
these.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.engine.speculation import SpecCounters
from jaxserve.engine.prefix_tier import PrefixTierCounters
from jaxserve.engine.swapper import SwapCounters
from jaxserve.models.lora import LoraAdapter
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """The model an engine serves."""

    name: str
    vocab_size: int
    max_model_len: int  # prompt + output tokens one sequence may hold
    tokenizer: Tokenizer | None
    weights: str = "float32"  # how the dense layers are stored: a float dtype's name, "int8" (W8A8) or "int4" (weight-only)


@dataclass(frozen=True)
class EngineLimits:
    """What one engine can hold at once."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int  # tokens the KV cache holds over all sequences
    page_size: int
    kv_cache_dtype: str  # what the KV cache stores: a float dtype's name, "int8" or "fp8_e4m3"
    enable_prefix_caching: bool
    kv_cache_scales: str | None = None  # what one 8-bit scale covers ("token_head"); None for float caches


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's state and counters since start."""

    running: int  # sequences in the running batch
    waiting: int  # sequences waiting to be scheduled
    kv_cache_usage: float  # fraction of KV-cache pages in use (0-1)
    prefix_cache_queries: int  # full blocks looked up in the prefix cache
    prefix_cache_hits: int
    preemptions: int  # sequences preempted (recomputed or swapped out)
    compiles: int  # programs compiled (flat after warm-up)
    spec: SpecCounters | None = None  # speculative decoding's totals (None: speculation off)
    swap: SwapCounters | None = None  # swaps to and from host memory (None: no swap space)
    host_kv_cache_usage: float = 0.0  # fraction of the host swap pool's pages in use (0-1)
    prefix_tier: PrefixTierCounters | None = None  # the host prefix tier's totals (None: no host prefix cache)


@dataclass(frozen=True)
class StepReport:
    """What one engine step did, for the observers of `AsyncEngine.subscribe`."""

    batch_size: int  # sequences in the step
    num_tokens: int  # tokens computed in the step (prefill chunks and decodes)
    mask_seconds: float | None  # computing the step's grammar masks (None: no constrained rows)


@dataclass(frozen=True)
class Admission:
    """What admission decided about a request, travelling with it to the scheduler's policy."""

    priority: int = 0  # lower runs first (vLLM's field), already capped by the tenant's class
    tenant: str = ""  # whose request it is, for fair share ("": the one anonymous tenant)
    weight: float = 1.0  # the tenant's fair-share weight (> 0)
    timeline: bool = False  # record when its phases ran, for its trace (`jaxserve.engine.timeline`)
    adapter: str | None = None  # the LoRA adapter it runs with, by its loaded name (None: the base model)


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose every check passed (`AsyncEngine.check`): the only thing `generate` takes."""

    prompts: tuple[tuple[int, ...], ...]  # token ids of each prompt; each is one engine request
    params: SamplingParams
    grammar_seconds: float | None  # compiling its grammar now (None: no grammar, or already compiled)
    adapter: LoraAdapter | None = None  # the LoRA adapter it runs with, resolved once: unloading it later does not touch this request
