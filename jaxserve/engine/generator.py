"""Single-sequence generation over the paged cache: what `jaxserve generate` and `chat` run.

It drives the same `ModelRunner` step the batched engine uses, with a batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from jaxserve.cache.block_manager import BlockManager
from jaxserve.config import ModelConfig
from jaxserve.engine.runner import ModelRunner, bucket
from jaxserve.errors import UserError
from jaxserve.models.llama import ForwardBatch, Params
from jaxserve.ops.sampling import SamplingArrays
from jaxserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenOut:
    token_id: int
    logprob: float
    finish_reason: str | None  # None while generating, then "stop" or "length"


class Generator:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        eos_token_ids: tuple[int, ...],
        max_model_len: int | None = None,
        page_size: int = 16,
    ) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_pages = -(-self.max_model_len // page_size)
        self.runner = ModelRunner(cfg, params, num_pages=self.max_pages + 1, page_size=page_size)
        self.blocks = BlockManager(self.max_pages + 1, enable_prefix_caching=False)

    def check_lengths(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise UserError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise UserError(
                f"the prompt has {num_prompt_tokens} tokens; the context holds {self.max_model_len}"
            )
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise UserError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"length {self.max_model_len}"
            )

    def generate(self, prompt_ids: list[int], sp: SamplingParams) -> Iterator[TokenOut]:
        """Yield generated tokens one by one; the last carries the finish reason."""
        self.check_lengths(len(prompt_ids), sp.max_tokens)
        total = len(prompt_ids) + sp.max_tokens
        pages = self.blocks.allocate(-(-total // self.runner.page_size))
        assert pages is not None  # one sequence at a time in a cache sized for the context
        try:
            page_row = np.zeros((1, bucket(len(pages), 1)), np.int32)
            page_row[0, : len(pages)] = pages
            sampling = SamplingArrays(
                temperature=jnp.asarray([sp.temperature], jnp.float32),
                top_k=jnp.asarray([sp.top_k], jnp.int32),
                top_p=jnp.asarray([sp.top_p], jnp.float32),
                min_p=jnp.asarray([sp.min_p], jnp.float32),
                seed=jnp.asarray([sp.effective_seed], jnp.uint32),
            )
            stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids))
            n_prompt = len(prompt_ids)
            t = bucket(n_prompt)
            tokens = np.zeros((1, t), np.int32)
            tokens[0, :n_prompt] = prompt_ids
            batch = ForwardBatch(
                tokens=tokens,
                positions=np.arange(t, dtype=np.int32)[None],
                page_table=page_row,
                kv_lens=np.asarray([n_prompt], np.int32),
            )
            for i in range(sp.max_tokens):
                next_ids, logprobs = self.runner.run((batch,), sampling)
                token = int(next_ids[0])
                finish = "stop" if token in stop_ids else ("length" if i + 1 == sp.max_tokens else None)
                yield TokenOut(token, float(logprobs[0]), finish)
                if finish:
                    return
                pos = n_prompt + i
                batch = ForwardBatch(
                    tokens=np.asarray([[token]], np.int32),
                    positions=np.asarray([[pos]], np.int32),
                    page_table=page_row,
                    kv_lens=np.asarray([pos + 1], np.int32),
                )
        finally:
            self.blocks.release(pages)
