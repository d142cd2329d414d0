"""When a traced sequence's phases ran, recorded on the engine thread for its request's trace spans.

Only sequences whose request is traced carry one (`Admission.timeline`), so an untraced request
costs a None check per step. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timeline:
    chunks: list[tuple[float, float, int]] = field(default_factory=list)  # each prompt chunk's step: (start, end, tokens)
    decode_start: float | None = None  # the first step that fed a generated token
    decode_end: float | None = None
    decode_steps: int = 0
    detokenize_seconds: float = 0.0  # summed over its tokens

    def step(self, start: float, end: float, prompt_tokens: int) -> None:
        """A step that computed `prompt_tokens` of its prompt (0: a decode or verify step)."""
        if prompt_tokens:
            self.chunks.append((start, end, prompt_tokens))
            return
        if self.decode_start is None:
            self.decode_start = start
        self.decode_end = end
        self.decode_steps += 1
