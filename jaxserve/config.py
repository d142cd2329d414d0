"""Frozen configuration dataclasses, built from a GGUF header, an HF config.json or YAML.

Configs are hashable so they can be static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from jaxserve.errors import UserError

# Every architecture `jaxserve.models.architectures` reads (HF model_type names; GGUF names map onto them).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmoe", "gemma2", "gemma3_text", "phi3")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_tanh")
QUANTIZATIONS = ("int8", "int4")  # weight formats `load_model` can convert dense layers to
INT4_GROUP = 32  # default input rows per int4 scale and offset: GGUF's 4-bit block
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8", "fp8", "fp8_e4m3")  # KV-cache storage (EngineConfig.kv_cache_dtype; fp8 = fp8_e4m3)
PREEMPTION_MODES = ("auto", "swap", "recompute")  # EngineConfig.preemption_mode
SCHEDULING_POLICIES = ("fcfs", "priority", "fair")  # EngineConfig.scheduling_policy
MIN_SECRET_BYTES = 16  # a shorter cluster secret could be guessed from a recorded handshake


ROPE_SCALINGS = ("linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear`, `llama3`, `longrope` (Phi-3: per-frequency `factors`, the short
    or the long list, and an `attention_factor` on cos and sin), or explicit per-frequency `factors`
    (GGUF rope_freqs)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    factors: tuple[float, ...] = ()
    long_factors: tuple[float, ...] = ()  # longrope: the factors for contexts past the original length
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in (*ROPE_SCALINGS, "factors"):
            raise UserError(f"unsupported rope scaling type {self.kind!r} (supported: {', '.join(ROPE_SCALINGS)})")
        if self.kind in ("factors", "longrope") and not self.factors:
            raise UserError(f"{self.kind} rope scaling needs its per-frequency factors (short_factor)")

    def for_context(self, max_len: int) -> RopeScaling:
        """LongRoPE's factors for a served context of max_len tokens: the long list past the original
        length, for every position (one choice per model, so cached keys never mix two rotations)."""
        if self.kind != "longrope" or max_len <= self.original_max_position_embeddings or not self.long_factors:
            return self
        return dataclasses.replace(self, factors=self.long_factors, long_factors=())


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder: the Llama family and the named variations of the others
    (`jaxserve.models.architectures` reads each one's config)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    # Attention windows: each layer is "full_attention" or "sliding_attention" (() = all full); a
    # sliding layer's query sees itself and the previous sliding_window - 1 tokens.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE base, unscaled (Gemma 3); None: as full layers
    partial_rotary_factor: float = 1.0  # the leading fraction of each head's dims that RoPE rotates (Phi-4-mini)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: per "head" (Qwen3, Gemma 3) or over the "full" projection (OLMoE)
    sandwich_norm: bool = False  # a norm on the attention and MLP outputs too (Gemma 2/3: post_attn_norm, post_mlp_norm)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (None: head_dim's)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits likewise
    num_experts: int = 0  # mixture of experts (0: a dense MLP): experts per layer,
    num_experts_per_tok: int = 0  # experts each token runs (top-k of the router's softmax),
    moe_intermediate_size: int = 0  # each expert's FFN width,
    norm_topk_prob: bool = True  # and whether the top-k probabilities are renormalised to sum to 1
    expert_parallel_size: int = 1  # devices the experts are split over, whole (set by load_model's expert_parallel; 1: none)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"unsupported architecture {self.architecture!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise UserError(f"layer_types names {len(self.layer_types)} layers; the model has {self.num_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise UserError(f"unsupported layer type {bad[0]!r} (supported: {', '.join(LAYER_TYPES)})")
        if "sliding_attention" in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window >= 1):
            raise UserError(f"sliding layers need a sliding_window >= 1, got {self.sliding_window!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"unsupported activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        if self.qk_norm not in (None, "head", "full"):
            raise UserError(f"unsupported q/k norm {self.qk_norm!r} (supported: head, full)")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UserError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rotary != int(rotary) or int(rotary) % 2:
            raise UserError(f"partial_rotary_factor {self.partial_rotary_factor} must rotate an even number of the {self.head_dim} head dims")
        rs = self.rope_scaling
        for name in ("factors", "long_factors"):
            factors = getattr(rs, name, ())
            if factors and len(factors) != int(rotary) // 2:
                raise UserError(f"rope scaling has {len(factors)} {name.replace('_', ' ')}; the {int(rotary)} rotated head dims need {int(rotary) // 2}")

    def for_context(self, max_len: int) -> ModelConfig:
        """This config as served with contexts of up to max_len tokens: LongRoPE picks its factors, and
        a window no shorter than the context is no window (Phi-4-mini's 262144 over its 131072; the
        same math, and the GPU's decode kernel stays usable)."""
        cfg = self
        if cfg.rope_scaling is not None:
            cfg = dataclasses.replace(cfg, rope_scaling=cfg.rope_scaling.for_context(max_len))
        if cfg.sliding_window is not None and cfg.sliding_window >= max_len:
            cfg = dataclasses.replace(cfg, layer_types=(), sliding_window=None)
        return cfg

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its attention is windowed."""
        return tuple(t == "sliding_attention" for t in self.layer_types) or (False,) * self.num_layers

    @property
    def kv_window(self) -> int | None:
        """The window when every layer slides (then a page wholly before a sequence's last window
        tokens is never read again); None when some layer attends to the whole context."""
        return self.sliding_window if self.layer_types and all(self.sliding_layers) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        rs = d.pop("rope_scaling", None)
        if rs is not None:
            rs = RopeScaling(**{**rs, **{k: tuple(rs.get(k, ())) for k in ("factors", "long_factors")}})
        return cls(**{**d, "layer_types": tuple(d.get("layer_types", ()))}, rope_scaling=rs)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` dict (hub keys or transformers 5's `rope_parameters`)."""
        from jaxserve.models.architectures import read_hf_config

        return read_hf_config(hf)

    @classmethod
    def from_gguf(
        cls, meta: Mapping[str, Any], tensor_names: set[str], rope_factors: Mapping[str, tuple[float, ...]] | None = None
    ) -> ModelConfig:
        """From GGUF metadata (llama.cpp's architecture names and `{arch}.*` keys), the tensor names
        present in the file and its RoPE factor tensors by name (rope_freqs, rope_factors_long/short),
        read as llama.cpp reads each architecture (`jaxserve.checkpoint.gguf_reader`)."""
        from jaxserve.checkpoint.gguf_reader import gguf_config

        return gguf_config(meta, tensor_names, rope_factors)


def shortest_float(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; recover the value that was written."""
    return float(str(np.float32(value)))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a plain dict (keys are CLI option names with underscores)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


MAX_SPECULATIVE_TOKENS = 16
SPECULATIVE_METHODS = ("ngram", "draft_model", "medusa")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with the keys of vLLM's `--speculative-config` JSON. A drafted token is
    accepted exactly when it is the token the model samples at its position (with that position's
    noise), so the output is the same as without speculation, greedy or seeded."""

    # "ngram": prompt lookup on the host; "draft_model": a smaller model (`model`); "medusa": draft
    # heads trained for the model by `jaxserve train-draft` (`model`: their folder)
    method: str = "ngram"
    num_speculative_tokens: int = 4  # most tokens drafted per sequence and step
    prompt_lookup_min: int = 1  # shortest tail n-gram looked up
    prompt_lookup_max: int = 4  # longest tail n-gram looked up (tried first)
    model: str | None = None  # the draft model (name or path) or the heads' folder
    # No drafts in a step with more decoding sequences than this (None: half of max_num_seqs): under
    # load the verify rows cost more than they save (measured at 16 concurrent streams on a 2-core CPU).
    disable_by_batch_size: int | None = None
    # Choose each step's k (up to num_speculative_tokens) for the most expected tokens per second,
    # from this machine's measured step times and the acceptance so far (a jaxserve key): verify rows
    # are nearly free on a GPU, and each beyond the second costs a 2-core CPU ~0.3x a step.
    tune_k: bool = True

    def __post_init__(self) -> None:
        field = "speculative_config"
        if self.method in ("eagle", "eagle3", "mlp_speculator", "deepseek_mtp"):
            raise UserError(f"{field}.method: {self.method!r} is not in this build (use 'ngram', a draft 'model', or 'medusa' "
                            "with heads from `jaxserve train-draft`)")
        if self.method not in SPECULATIVE_METHODS:
            raise UserError(f"{field}.method: unknown method {self.method!r} (this build has {', '.join(map(repr, SPECULATIVE_METHODS))})")
        if (self.method == "ngram") == (self.model is not None):
            raise UserError(f"{field}.model: method {self.method!r} " + ("takes no model" if self.method == "ngram" else "needs a model"))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise UserError(f"{field}.model must be a model name or path, got {self.model!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise UserError(f"{field}.num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.disable_by_batch_size is not None and (not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1):
            raise UserError(f"{field}.disable_by_batch_size must be an integer >= 1, got {self.disable_by_batch_size!r}")
        if not isinstance(self.tune_k, bool):
            raise UserError(f"{field}.tune_k must be true or false, got {self.tune_k!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{field}.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise UserError(f"{field}.prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """Parse `--speculative-config`; a UserError names the field at fault. As in vLLM, a `model`
        without a `method` means a draft model."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"speculative_config.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        if "model" in data and "method" not in data:
            data["method"] = "draft_model"
        return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    """Batching and KV-cache limits of the engine (names follow vLLM's flags)."""

    max_num_seqs: int = 16  # running sequences per step
    max_num_batched_tokens: int = 512  # tokens computed per step (decodes + prefill chunks)
    max_prefill_seqs: int = 4  # prompts chunk-prefilled side by side in one step
    prefill_row_len: int = 64  # prefill chunks run as rows of this many tokens (one compiled width)
    page_size: int = 16
    num_pages: int = 1024  # including the null page; ignored when kv_cache_memory is set
    kv_cache_memory: float | None = None  # bytes (> 1), or a fraction (<= 1) of free accelerator memory
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "bfloat16", or 8-bit "int8" / "fp8_e4m3" with per-token scales
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    swap_space: float = 0.0  # GiB of host memory for the KV cache of preempted sequences (0: none; they recompute)
    preemption_mode: str = "auto"  # "auto" (swap long contexts, recompute short ones, by measured cost), "swap", "recompute"
    host_prefix_cache: float = 0.0  # GiB of host memory for prefix-cache blocks the device evicts (0: they are forgotten)
    prefix_cache_dir: str | None = None  # folder the host prefix tier is loaded from at start and saved to at shutdown
    # "fcfs" (arrival order), "priority" (request priority, then arrival; a waiting request preempts
    # lower ones), "fair" (priority, then weighted fair share of computed tokens across tenants)
    scheduling_policy: str = "priority"
    max_loras: int = 0  # LoRA adapter slots on the device: adapters one step can mix (0: LoRA off)
    max_lora_rank: int = 16  # the largest adapter rank the slots hold

    def __post_init__(self) -> None:
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise UserError(f"max_loras must be >= 0 and max_lora_rank >= 1, got {self.max_loras} and {self.max_lora_rank}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "prefill_row_len", "page_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_row_len < 2:
            raise UserError(f"prefill_row_len must be >= 2 (one-token rows are decode rows), got {self.prefill_row_len}")
        if self.num_pages < 2:
            raise UserError(f"num_pages must be >= 2, got {self.num_pages}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise UserError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        if self.swap_space < 0:
            raise UserError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.host_prefix_cache < 0:
            raise UserError(f"host_prefix_cache must be >= 0 GiB, got {self.host_prefix_cache}")
        if self.host_prefix_cache and not self.enable_prefix_caching:
            raise UserError("host_prefix_cache needs prefix caching: it holds the blocks the device prefix cache evicts")
        if self.prefix_cache_dir and not self.host_prefix_cache:
            raise UserError("prefix_cache_dir persists the host prefix tier: set host_prefix_cache (GiB) too")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise UserError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}; got {self.preemption_mode!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise UserError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.scheduling_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")

    @property
    def max_prefill_rows(self) -> int:
        """Prefill rows one step can hold within the token budget."""
        return max(1, self.max_num_batched_tokens // self.prefill_row_len)


@dataclass(frozen=True)
class ParallelConfig:
    """How devices are split: `data_parallel_size` independent engine replicas, each running the
    model tensor-parallel over `tensor_parallel_size` devices."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host membership (`jax.distributed`): process 0 serves, the others follow its steps."""

    coordinator_address: str | None = None  # host:port of process 0's coordinator
    num_processes: int = 1
    process_id: int = 0
    timeout: float = 300.0  # seconds to wait for every process to join
    heartbeat_timeout: float = 10.0  # seconds of silence after which a process counts as dead
    secret: bytes | None = dataclasses.field(default=None, repr=False)  # shared by the group; admits a process to the step channel

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise UserError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise UserError(f"process_id {self.process_id} is out of range for {self.num_processes} processes (0..{self.num_processes - 1})")
        if self.num_processes > 1 and not self.coordinator_address:
            raise UserError(f"{self.num_processes} processes need a coordinator address (host:port of process 0)")
        if self.coordinator_address and not self.coordinator_address.rpartition(":")[2].isdigit():
            raise UserError(f"coordinator address {self.coordinator_address!r} is not host:port")
        if self.num_processes > 1 and len(self.secret or b"") < MIN_SECRET_BYTES:
            problem = f"a cluster secret of {len(self.secret)} bytes is too short" if self.secret else "a multi-process group needs a cluster secret"
            raise UserError(
                f"process {self.process_id}: {problem}: put at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`) in a file "
                "given to every process as --cluster-secret-file, or in JAXSERVE_CLUSTER_SECRET"
            )


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front end: address, access control and request limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # each one unlimited tenant's key (with no api_keys_file); empty with no file: no authentication
    api_keys_file: str | None = None  # YAML of keys, tenants and their limits (`jaxserve.server.tenants`), reloaded on SIGHUP
    otlp_traces_endpoint: str | None = None  # where OpenTelemetry spans go (None: tracing off)
    cost_per_hour: float | None = None  # USD the machine costs per hour (None: no cost figures)
    served_model_name: str | None = None  # None: the model's own name
    max_waiting: int = 256  # queued requests beyond which new ones get 429
    request_timeout: float | None = 600.0  # seconds per request; None: no limit
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    max_body_bytes: int = 4 * 2**20
    cors_origins: tuple[str, ...] = ()  # empty: CORS off
    warmup: bool = True  # compile every step shape before /ready says yes
    default_sampling: tuple[tuple[str, Any], ...] = ()  # (field, value) used when a request leaves the field out
    admin_api_key: str | None = dataclasses.field(default=None, repr=False)  # the admin API's own key (None: no admin routes)
    enable_lora: bool = False  # whether the engines have LoRA adapter slots (adapters may be loaded)
    root_path: str = ""  # a reverse proxy's path prefix ("/llm"): every route also answers under it
    ui: bool = True  # the web playground at / (and under the root path)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/") or any(c in self.root_path for c in "?#{} ")):
            raise UserError(f"--root-path must be a path like /llm (a leading slash, no trailing one), got {self.root_path!r}")
        for name in ("max_waiting", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout", "drain_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be > 0, got {value}")
        if any(not k for k in self.api_keys):
            raise UserError("API keys must not be empty")
        if self.api_keys and self.api_keys_file:
            raise UserError("give --api-key or --api-keys-file, not both: a keys file names every key with its tenant")
        if self.cost_per_hour is not None and self.cost_per_hour <= 0:
            raise UserError(f"cost_per_hour must be > 0 USD, got {self.cost_per_hour}")
        if self.admin_api_key is not None and (not self.admin_api_key or self.admin_api_key in self.api_keys):
            raise UserError("the admin API key must be non-empty and differ from every API key")


@dataclass(frozen=True)
class TrainDraftConfig:
    """`jaxserve train-draft`'s settings (`jaxserve.training.draft_trainer`); each is a flag of that name."""

    num_heads: int = 4
    prompts: Path | None = None  # JSONL of prompts or chats (default: the built-in set)
    num_prompts: int | None = None  # use the first this many prompts (default: all)
    samples_per_prompt: int = 1  # answers per prompt: one greedy, the rest sampled
    max_tokens: int = 128  # per answer
    draft_vocab_size: int = 8192  # the most frequent answer tokens the heads can propose
    steps: int = 1200
    batch_size: int = 128  # positions per step
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    held_out: float = 0.08  # fraction of prompts kept for the acceptance check
    eval_every: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_heads", "samples_per_prompt", "max_tokens", "draft_vocab_size", "steps", "batch_size", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 < self.held_out < 1:
            raise UserError(f"--held-out must be in (0, 1), got {self.held_out}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be > 0, got {self.learning_rate}")


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT's names


@dataclass(frozen=True)
class FinetuneConfig:
    """`jaxserve finetune`'s settings (`jaxserve.training.lora_trainer`); each is a flag of that name."""

    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha: the update is (alpha / r) * B @ A
    dropout: float = 0.05  # on each adapter's input, in training
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES  # PEFT module names (flag: comma-separated)
    epochs: int = 3
    learning_rate: float = 2e-4
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.03  # fraction of the optimizer steps spent warming up linearly
    warmup_steps: int = 0  # when > 0, the warm-up in steps (instead of warmup_ratio)
    weight_decay: float = 0.0  # AdamW's, on A and B
    max_grad_norm: float = 1.0  # global gradient-norm clip (0: none)
    max_seq_len: int = 1024  # a longer example is an error naming its line (not truncated)
    held_out: float = 0.1  # fraction of examples kept for the held-out loss (0: none)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_seq_len < 2:
            raise UserError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        unknown = [m for m in self.target_modules if m not in LORA_TARGET_MODULES]
        if unknown or not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise UserError(f"--target-modules must be distinct names among {','.join(LORA_TARGET_MODULES)}, got {','.join(self.target_modules)!r}")
        if self.alpha <= 0 or self.learning_rate <= 0:
            raise UserError(f"--alpha and --learning-rate must be > 0, got {self.alpha} and {self.learning_rate}")
        if not 0 <= self.dropout < 1 or not 0 <= self.held_out < 1 or not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--dropout, --held-out and --warmup-ratio must be in [0, 1), got {self.dropout}, {self.held_out}, {self.warmup_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("--warmup-steps, --weight-decay and --max-grad-norm must be >= 0")
