"""Reasoning output (`serve --reasoning-parser`): a chat reply split into `reasoning_content` (the
model's thinking between `<think>` and `</think>`) and `content` (the answer), as vLLM's reasoning
parsers split it.

- `deepseek_r1`: DeepSeek-R1's chat template ends the prompt with `<think>`, so the output starts
  inside the reasoning: everything up to the first `</think>` is reasoning (an opening `<think>`,
  which newer R1 releases write themselves, is dropped), the rest is content. An output that never
  writes `</think>` (cut off by `max_tokens`, say) is all reasoning.
- `qwen3`: Qwen3 writes `<think>` itself (and with `enable_thinking: false` its template puts an empty
  `<think></think>` in the prompt instead), so the output is content until a `<think>`; then
  reasoning until `</think>`; then content again. Text before `<think>` is content, and so is an
  output without tags, a `</think>` before any `<think>` included.

One parser serves a whole (non-streamed) reply and a stream alike: `feed` takes the text as it comes
and returns the reasoning and content it can release, holding back a tail that may be the start of a
tag (`<thi` may become `<think>`); `finish` releases what is held. A tag split over several tokens or
chunks is found all the same, so the streamed pieces add up to exactly the whole reply's fields.

A request constrained by a grammar (structured output, or a forced tool call) is constrained from its
first token: jaxserve does not let the model think first and apply the grammar after `</think>`, as
vLLM does. So a constrained reply starts as content under either parser, and holds reasoning only
where the grammar itself writes `<think>`...`</think>`; JSON and forced tool calls stay content.
"""

from __future__ import annotations

from jaxserve.errors import UserError

THINK, END_THINK = "<think>", "</think>"

# States: the channel their text goes to and the tags they watch for (tag -> the state it leads to).
_BEFORE, _OPENING, _THINKING, _AFTER = "before", "opening", "thinking", "after"
_CHANNEL = {_BEFORE: "content", _OPENING: "reasoning", _THINKING: "reasoning", _AFTER: "content"}
_WATCH = {
    _BEFORE: {THINK: _THINKING},  # content until a <think>
    _OPENING: {THINK: _THINKING, END_THINK: _AFTER},  # reasoning already; an opening <think> is dropped
    _THINKING: {END_THINK: _AFTER},
    _AFTER: {},  # content to the end: later tags are text
}


class ReasoningParser:
    """One choice's output split into reasoning and content, fed as it streams."""

    name: str = ""
    starts_in_reasoning: bool = False  # whether an unconstrained output begins inside the reasoning

    def __init__(self, constrained: bool = False) -> None:
        """`constrained`: the request's output is under a grammar from its first token (see the module
        docstring), so it starts as content."""
        self.state = _OPENING if self.starts_in_reasoning and not constrained else _BEFORE
        self.pending = ""  # text fed and not released yet: a possible start of a tag
        self.reasoned = _CHANNEL[self.state] == "reasoning"  # whether the output has had any reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) releasable once `text` is added to the output so far."""
        self.pending += text
        out = {"reasoning": "", "content": ""}
        while True:
            watch = _WATCH[self.state]
            found = [(i, tag) for tag in watch if (i := self.pending.find(tag)) >= 0]
            if not found:
                keep = max((k for tag in watch for k in range(1, len(tag)) if self.pending.endswith(tag[:k])), default=0)
                out[_CHANNEL[self.state]] += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return out["reasoning"], out["content"]
            i, tag = min(found)
            out[_CHANNEL[self.state]] += self.pending[:i]
            self.pending = self.pending[i + len(tag) :]
            self.state = watch[tag]
            self.reasoned = self.reasoned or _CHANNEL[self.state] == "reasoning"

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held, at the end of the output: a partial tag is just text."""
        held, self.pending = self.pending, ""
        return (held, "") if _CHANNEL[self.state] == "reasoning" else ("", held)

    @classmethod
    def split(cls, text: str, constrained: bool = False) -> tuple[str | None, str]:
        """A whole output's (reasoning, content); reasoning is None when the output has none."""
        parser = cls(constrained)
        reasoning, content = parser.feed(text)
        rest_reasoning, rest_content = parser.finish()
        return (reasoning + rest_reasoning if parser.reasoned else None), content + rest_content


class DeepSeekR1ReasoningParser(ReasoningParser):
    """Reasoning up to the first `</think>`, whether or not the output opens with `<think>`."""

    name = "deepseek_r1"
    starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Reasoning only between `<think>` and `</think>`; everything else is content."""

    name = "qwen3"
    starts_in_reasoning = False


PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}
REASONING_PARSERS = tuple(PARSERS)  # the names `serve --reasoning-parser` takes


def reasoning_parser(name: str | None) -> type[ReasoningParser] | None:
    """The parser class of a `--reasoning-parser` name (None: no reasoning parsing); UserError naming
    the choices for an unknown name."""
    if name is None:
        return None
    if name not in PARSERS:
        raise UserError(f"unknown reasoning parser {name!r}: choose from {', '.join(REASONING_PARSERS)}")
    return PARSERS[name]
