"""The jit boundary: a model step and a sampler over fixed-shape, bucketed inputs.

Everything that varies per request arrives as arrays; shapes come from `StepShapes`, a small set fixed
by the engine config, so a warmed-up runner never recompiles. The model step forwards the batch and
returns each row's next-token logits (kept on the device); the sampler turns them into tokens. The
cache is donated and returned updated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxserve.cache.kv_cache import KVCache
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.models.llama import ForwardBatch, Params, compute_logits, forward
from jaxserve.models.lora import LoraAdapter, Tables, empty_tables, slot_values, write_slot
from jaxserve.ops.attention import table_width
from jaxserve.ops.sampling import LogitAdjust, SamplingArrays, sample
from jaxserve.parallel.distributed import StepChannel
from jaxserve.parallel.mesh import make_mesh
from jaxserve.parallel.sharding import CACHE_SPEC, lora_shardings, param_shardings
from jaxserve.sampling_params import MAX_BEAMS, MAX_LOGPROBS


SWAP_CHUNK = 16  # pages per host copy: one compiled program each way


def enable_compilation_cache(folder: Path) -> None:
    """JAX's persistent compilation cache: a restarted process loads its step executables from disk."""
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def decode_group(rows: Sequence[tuple[Sequence[int], int, int, int]], bucket: int, width: int) -> ForwardBatch:
    """One-token rows [bucket, 1], each from (pages, token, position, LoRA slot): the token's K/V goes
    to its position and it attends to position + 1 keys. Padding rows have length 0, write only to the
    null page and take no adapter."""
    tokens, positions = np.zeros((bucket, 1), np.int32), np.zeros((bucket, 1), np.int32)
    tables, kv_lens, adapter = np.zeros((bucket, width), np.int32), np.zeros(bucket, np.int32), np.full(bucket, -1, np.int32)
    for r, (pages, token, position, slot) in enumerate(rows):
        tokens[r, 0], positions[r, 0], kv_lens[r], adapter[r] = token, position, position + 1, slot
        tables[r, : len(pages)] = pages
    return ForwardBatch(tokens, positions, tables, kv_lens, adapter)


def _sizes(limit: int) -> tuple[int, ...]:
    """Powers of two below `limit`, then `limit` itself."""
    return tuple(sorted({1 << i for i in range(limit.bit_length()) if 1 << i < limit} | {limit}))


@dataclass(frozen=True)
class StepShapes:
    """Every batch shape a step can take: decode rows [Bd, 1] and prefill rows [Bp, row_len], over
    page tables of one width. A step has decode rows, prefill rows or both; 0 means absent."""

    decode_rows: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    row_len: int
    table_width: int

    @classmethod
    def from_config(cls, engine: EngineConfig, max_model_len: int) -> StepShapes:
        spec = engine.speculative
        return cls(
            decode_rows=_sizes(max(engine.max_num_seqs, 1 + spec.num_speculative_tokens if spec else 1)),  # room for one drafting sequence
            prefill_rows=_sizes(engine.max_prefill_rows),
            row_len=engine.prefill_row_len,
            table_width=table_width(max_model_len, engine.page_size),
        )

    @staticmethod
    def fit(n: int, sizes: tuple[int, ...]) -> int:
        """The smallest size that holds n rows (0 for none)."""
        return next(s for s in (0, *sizes) if s >= n)

    @staticmethod
    def sampled_rows(rows: int) -> int:
        """The sampler's row count for a step of `rows` rows: the next power of two. A step's logits
        [Bd + Bp, V] are padded to it, so mixed steps share the sampler programs of decode-only ones,
        and engines of any limits share them all (one set per vocabulary)."""
        return 1 << (rows - 1).bit_length()

    @property
    def max_sampled_rows(self) -> int:
        """The sampler's row count for the largest step."""
        return self.sampled_rows(self.decode_rows[-1] + self.prefill_rows[-1])

    def combos(self) -> list[tuple[int, int]]:
        """(decode rows, prefill rows) of every step program."""
        return [c for c in itertools.product((0, *self.decode_rows), (0, *self.prefill_rows)) if any(c)]


def model_step(
    params: Params, cache: KVCache, groups: Sequence[ForwardBatch], lora: Tables | None, cfg: ModelConfig, hidden_rows: int
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None, KVCache]:
    """Forward the groups (each row through its LoRA slot, when `lora` holds slot tables); return the logits [R, V] at each row's last valid token (rows in group
    order, then zero rows up to `StepShapes.sampled_rows`), the hidden states [hidden_rows, D] those
    logits came from (rows as the logits', zero-padded to one shape for every step: draft heads read
    them), the hidden states [Bp * T, D] of the prefill group (for prompt log-probs; None without
    one) and the updated cache."""
    hidden, cache = forward(params, cache, groups, cfg, lora=lora)
    last_rows = []
    for g, h in zip(groups, hidden):  # h: [B, T, D]
        last = jnp.clip(g.kv_lens - 1 - g.positions[:, 0], 0, g.tokens.shape[1] - 1)  # [B]
        last_rows.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])  # [B, D]
    last = jnp.concatenate(last_rows)  # [Bd + Bp, D]
    logits = compute_logits(params, last, cfg)  # [Bd + Bp, V]
    logits = jnp.pad(logits, ((0, StepShapes.sampled_rows(logits.shape[0]) - logits.shape[0]), (0, 0)))  # [R, V]
    prefill = hidden[-1].reshape(-1, hidden[-1].shape[-1]) if groups[-1].tokens.shape[1] > 1 else None
    return logits, jnp.pad(last, ((0, hidden_rows - last.shape[0]), (0, 0))), prefill, cache


def prompt_logprobs(params: Params, hidden: jnp.ndarray, targets: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, ...]:
    """Log-probs [N] of each next prompt token `targets` [N] after hidden states [N, D], and the top
    MAX_LOGPROBS ids and log-probs [N, K]."""
    logprobs = jax.nn.log_softmax(compute_logits(params, hidden, cfg), axis=-1)  # [N, V]
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp


def _pinned_host(sharding: NamedSharding) -> NamedSharding:
    """`sharding` in page-locked host memory where the devices have it (GPU, TPU, and XLA:CPU, where
    it is the same RAM): page copies then move by DMA between device and host buffers, with no
    staging copy through pageable memory."""
    kinds = {m.kind for m in sharding.mesh.devices.flat[0].addressable_memories()}
    return sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else sharding


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Host or single-device data as a global array. Across processes every process passes the same
    value and keeps its own shards."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index]))


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result on the host (this process's copy; whole on every process)."""
    return np.asarray(x.addressable_data(0))


class ModelRunner:
    """Owns the params, the KV cache and the jitted programs on one replica's mesh; counts compilations.

    Every program declares its shardings: params and cache split per `jaxserve.parallel.sharding`,
    step inputs and outputs replicated. A single device is the 1 x 1 mesh, on the same path. The
    latest step's logits and hidden states stay on the device for `sample` and `prompt_logprobs`, so
    every call takes host data only; with a `channel` (multi-host process 0) each call is sent to
    the other processes before it runs, and they replay it (`jaxserve.parallel.distributed`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        num_pages: int,
        page_size: int,
        shapes: StepShapes,
        mesh: Mesh | None = None,
        cache_dtype: jnp.dtype | None = None,
        lora_slots: int = 0,
        lora_rank: int = 16,
    ) -> None:
        """`cache_dtype`: what the KV cache stores (`kv_cache.storage_dtype`; default the params' dtype).
        `lora_slots`: LoRA adapter slots of rank up to `lora_rank` (0: none)."""
        self.cfg = cfg
        self.shapes = shapes
        self.mesh = mesh if mesh is not None else make_mesh()
        self.channel: StepChannel | None = None
        self.host_copies = False  # whether pages are copied to and from host memory (warm-up compiles the copies)
        param_sh = param_shardings(params, self.mesh, cfg)
        cache_sh = NamedSharding(self.mesh, CACHE_SPEC)
        self._replicated = replicated = NamedSharding(self.mesh, P())
        self._local = self._replicated.is_fully_addressable
        self.params = jax.tree.map(_place, params, param_sh)
        dtype = cache_dtype or params["embed"].dtype
        self.cache = jax.jit(lambda: KVCache.create(cfg, num_pages, page_size, dtype), out_shardings=cache_sh)()
        self.lora_rank = lora_rank
        self.lora: Tables | None = None  # the adapter slot tables (None: LoRA off)
        lora_sh = replicated
        if lora_slots:
            tables = functools.partial(empty_tables, cfg, lora_slots, lora_rank, params["embed"].dtype, isinstance(params["layers"], dict))
            lora_sh = lora_shardings(jax.eval_shape(tables), self.mesh, table=True)
            self.lora = jax.jit(tables, out_shardings=lora_sh)()
            values_sh = lora_shardings(slot_values(None, cfg, lora_rank, np.float32), self.mesh, table=False)
            self._write_lora = jax.jit(write_slot, in_shardings=(lora_sh, replicated, values_sh), out_shardings=lora_sh, donate_argnums=(0,))
        self._step = jax.jit(
            functools.partial(model_step, cfg=cfg, hidden_rows=shapes.max_sampled_rows),
            in_shardings=(param_sh, cache_sh, replicated, lora_sh),
            out_shardings=(replicated, replicated, replicated, cache_sh),
            donate_argnums=(1,),
        )
        self._sample = jax.jit(sample, static_argnums=4, in_shardings=replicated, out_shardings=replicated)  # 4: num_top
        self._copy = jax.jit(KVCache.copy_pages, in_shardings=(cache_sh, replicated, replicated), out_shardings=cache_sh, donate_argnums=(0,))
        self._host_sh = host_sh = _pinned_host(cache_sh)  # page copies to and from host memory
        self._read = jax.jit(KVCache.take, in_shardings=(cache_sh, replicated), out_shardings=cache_sh)
        self._write = jax.jit(  # copies the pages to the device first: no compute runs in host memory
            lambda cache, pages, data: KVCache.put(cache, pages, jax.device_put(data, cache_sh)),
            in_shardings=(cache_sh, replicated, host_sh), out_shardings=cache_sh, donate_argnums=(0,),
        )
        self._prompt_logprobs = jax.jit(
            functools.partial(prompt_logprobs, cfg=cfg), in_shardings=(param_sh, replicated, replicated), out_shardings=replicated
        )
        self._logits: jax.Array | None = None  # [R, V] of the latest step
        # [max_sampled_rows, D] of the latest step, its logits' rows (zeros before the first)
        self._hidden = _place(jnp.zeros((shapes.max_sampled_rows, cfg.hidden_size), params["embed"].dtype), replicated)
        self._prefill: jax.Array | None = None  # [Bp * T, D] of the latest step (None without prefill rows)

    @property
    def num_compiles(self) -> int:
        """Distinct input shapes the jitted programs have been traced for."""
        lora = (self._write_lora,) if self.lora is not None else ()
        return sum(f._cache_size() for f in (self._step, self._sample, self._prompt_logprobs, self._copy, self._read, self._write, *lora))

    def _call(self, name: str, *args: Any) -> None:
        """Send the call to the other processes of a multi-host group before making it."""
        if self.channel is not None:
            self.channel.send(name, args)

    def _global(self, tree: Any) -> Any:
        """Host inputs as replicated arrays: needed when the mesh spans processes."""
        return tree if self._local else jax.tree.map(lambda x: _place(x, self._replicated), tree)

    @property
    def logits(self) -> jax.Array | None:
        """The latest step's logits [R, V], on the device."""
        return self._logits

    @property
    def last_hidden(self) -> jax.Array:
        """The hidden states [max_sampled_rows, D] behind the latest step's logits, on the device."""
        return self._hidden

    def step_hlo(self, groups: Sequence[ForwardBatch]) -> str:
        """The compiled step program for these groups' shapes, as HLO text (to inspect collectives)."""
        return self._step.lower(self.params, self.cache, self._rows(groups), self.lora).compile().as_text()

    def _rows(self, groups: Sequence[ForwardBatch]) -> tuple[ForwardBatch, ...]:
        """The groups with LoRA slots exactly when this runner has slot tables (rows without any take
        none), so every caller's groups meet the one compiled program of their shape."""
        if self.lora is None:
            return tuple(dataclasses.replace(g, adapter=None) for g in groups)
        return tuple(g if g.adapter is not None else dataclasses.replace(g, adapter=np.full(g.tokens.shape[0], -1, np.int32)) for g in groups)

    def forward(self, groups: Sequence[ForwardBatch]) -> None:
        """Dispatch one model step over the row groups; its outputs stay on the device."""
        groups = self._rows(groups)
        self._call("forward", groups)
        self._logits, self._hidden, self._prefill, self.cache = self._step(self.params, self.cache, self._global(groups), self.lora)

    def write_lora(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Put an adapter's values into a LoRA slot (None: empty it): one compiled program for every
        slot and adapter, so loading one never recompiles a step."""
        values = slot_values(adapter, self.cfg, self.lora_rank, self.params["embed"].dtype)
        self.lora = self._write_lora(self.lora, np.int32(slot), values)

    def sample(self, sampling: SamplingArrays, positions: np.ndarray, adjust: LogitAdjust | None, top: bool) -> tuple[np.ndarray, ...]:
        """The latest step's tokens [R] and log-probs [R] on the host; with `top`, also top ids and
        log-probs [R, MAX_LOGPROBS]."""
        self._call("sample", sampling, positions, adjust, top)
        sampling, positions, adjust = self._global((sampling, positions, adjust))
        return tuple(_host(x) for x in self._sample(self._logits, sampling, positions, adjust, MAX_LOGPROBS if top else 0))

    def prompt_logprobs(self, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """Log-prob of `targets` [Bp * T] after each prefill position of the latest step, and the top ones."""
        self._call("prompt_logprobs", targets)
        return tuple(_host(x) for x in self._prompt_logprobs(self.params, self._prefill, self._global(targets)))

    def copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy pages src [MAX_BEAMS] to dst [MAX_BEAMS] (pad with 0 -> 0)."""
        self._call("copy_pages", src, dst)
        self.cache = self._copy(self.cache, *self._global((src, dst)))

    def read_pages(self, pages: np.ndarray) -> dict[str, jax.Array]:
        """Device pages [SWAP_CHUNK] (padding: 0) of every cache array, `[Hkv, L, SWAP_CHUNK, ...]`, on their
        way to pinned host memory: gathered by a program, then moved by a transfer that is only started
        here, so the device's copy engine runs it beside the programs dispatched next (np.asarray waits)."""
        if self.channel is not None:
            raise RuntimeError("host copies of the KV cache need a single-process engine")
        return jax.device_put(self._read(self.cache, pages), self._host_sh)

    def write_pages(self, pages: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Write `data` (as `read_pages` returns it) into device pages [SWAP_CHUNK] (padding: 0, the null page)."""
        if self.channel is not None:
            raise RuntimeError("host copies of the KV cache need a single-process engine")
        self.cache = self._write(self.cache, pages, data)

    def warmup(self, progress: bool = True) -> None:
        """Compile every program the engine can call (step shapes x sampler variants, the page copy, the
        host copies when used), on padding rows that write only to the null page."""
        vocab, s = self.cfg.vocab_size, self.shapes

        def rows(b: int, t: int) -> ForwardBatch:
            zeros = np.zeros((b, t), np.int32)
            return ForwardBatch(zeros, zeros, np.zeros((b, s.table_width), np.int32), np.zeros(b, np.int32))

        combos = s.combos()
        with tqdm(total=len(combos), desc="warming up", unit="shape", disable=not progress) as bar:
            for bd, bp in combos:
                groups = [g for g in (bd and rows(bd, 1), bp and rows(bp, s.row_len)) if g]
                self.forward(groups)
                r = s.sampled_rows(bd + bp)
                sampling, positions = SamplingArrays.greedy(r, vocab), np.zeros(r, np.int32)
                adjust = LogitAdjust(np.ones((r, vocab), np.float32), np.zeros((r, vocab), np.float32))
                for variant, top in itertools.product((None, adjust), (False, True)):
                    self.sample(sampling, positions, variant, top)
                if bp:
                    self.prompt_logprobs(np.zeros(bp * s.row_len, np.int32))
                bar.update()
        no_copy = np.zeros(MAX_BEAMS, np.int32)
        self.copy_pages(no_copy, no_copy)
        if self.lora is not None:
            self.write_lora(0, None)  # the engine forgets what slot 0 held
        if self.host_copies:
            self.round_trip_null_pages()

    def round_trip_null_pages(self) -> None:
        """Copy a chunk of null pages to host memory and back, as swapping does (warm-up compiles it,
        `swap_min_tokens` times it)."""
        null = np.zeros(SWAP_CHUNK, np.int32)
        self.write_pages(null, {name: np.asarray(x) for name, x in self.read_pages(null).items()})
