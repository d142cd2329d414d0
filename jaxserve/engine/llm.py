"""Offline batched generation: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from typing import Iterator, Sequence as Seq

from jax.sharding import Mesh
from tqdm import tqdm

from jaxserve.checkpoint.loader import LoadedModel, load_draft, load_model
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.config import EngineConfig
from jaxserve.engine.interface import Admission
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.outputs import RequestOutput, StepOutput
from jaxserve.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        engine_config: EngineConfig = EngineConfig(),
        dtype: str | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        """`mesh`: the devices of one replica (`jaxserve.parallel.mesh`); default one device."""
        self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        draft = load_draft(self.model, engine_config.speculative)
        self.engine = LLMEngine(self.model.cfg, self.model.params, engine_config, self.model.tokenizer, mesh=mesh, model_name=self.model.name, draft=draft)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder under `name`, for `generate(..., adapter=name)` (the engine
        config needs `max_loras` >= 1)."""
        self.engine.load_adapter(self.engine.read_adapter(name, path))

    def warmup(self, progress: bool = True) -> None:
        """Compile every step shape now (`LLMEngine.warmup`)."""
        self.engine.warmup(progress)

    def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "stream") -> Iterator[StepOutput]:
        """One single-sample request's outputs as they come; the last carries the finish reason."""
        self.engine.add_request(request_id, prompt_ids, params)
        while True:
            for out in self.engine.step():
                if out.request_id == request_id:
                    yield out
                    if out.finish_reason:
                        return

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
        use_tqdm: bool = True,
        adapter: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; results in prompt order. `adapter`: the loaded LoRA
        adapter every prompt runs with, or one per prompt (None: the base model)."""
        tok = self.model.tokenizer
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        adapters = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        ids = [p if isinstance(p, list) else tok.encode(p) for p in prompts]
        results = {f"offline-{i}": RequestOutput.empty(f"offline-{i}", p, sp.n) for i, (p, sp) in enumerate(zip(ids, per_prompt))}
        try:
            for (request_id, result), sp, name in zip(results.items(), per_prompt, adapters):
                self.engine.add_request(request_id, result.prompt_ids, sp, Admission(adapter=name))
        except ValueError:
            for request_id in results:  # a bad prompt leaves nothing of this call queued
                self.engine.abort(request_id)
            raise
        done = 0
        with tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while done < len(prompts):
                for out in self.engine.step():
                    result = results[out.request_id]
                    result.add(out)
                    if out.finish_reason and result.finished:
                        done += 1
                        bar.update()
        return list(results.values())
