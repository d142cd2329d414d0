"""Offline batched generation: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence as Seq

from tqdm import tqdm

from jaxserve.checkpoint.loader import LoadedModel, load_model
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine, StepOutput
from jaxserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


class LLM:
    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, engine: EngineConfig = EngineConfig(), dtype: str | None = None) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        tok = self.model.tokenizer
        self.engine = LLMEngine(self.model.cfg, self.model.params, tok.eos_token_ids, engine)

    def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "stream") -> Iterator[StepOutput]:
        """One request's tokens as they come; the last output carries the finish reason."""
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
    ) -> list[Completion]:
        """Run every prompt to completion, batched; results in prompt order."""
        tok = self.model.tokenizer
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        ids = [p if isinstance(p, list) else tok.encode(p) for p in prompts]
        outputs: dict[str, list] = {f"offline-{i}": [] for i in range(len(ids))}
        finish: dict[str, str] = {}
        try:
            for request_id, prompt_ids, sp in zip(outputs, ids, per_prompt):
                self.engine.add_request(request_id, prompt_ids, sp)
        except ValueError:
            for request_id in outputs:  # a bad prompt leaves nothing of this call queued
                self.engine.abort(request_id)
            raise
        with tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(finish) < len(prompts):
                for out in self.engine.step():
                    if out.token_id is not None:
                        outputs[out.request_id].append((out.token_id, out.logprob))
                    if out.finish_reason:
                        finish[out.request_id] = out.finish_reason
                        bar.update()
        results = []
        for i, prompt_ids in enumerate(ids):
            pairs = outputs[f"offline-{i}"]
            token_ids = [t for t, _ in pairs]
            results.append(Completion(prompt_ids, token_ids, [lp for _, lp in pairs], tok.decode(token_ids), finish[f"offline-{i}"]))
        return results
