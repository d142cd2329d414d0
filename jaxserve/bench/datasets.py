"""What `bench serve` sends: random prompts of a length distribution, or prompts from a file (the JSONL
of prompts and chats `jaxserve train-draft --prompts` reads, or the ShareGPT-style chats vLLM's
benchmark reads), each with the output length to ask for.

Lengths are counted client-side without the server's tokenizer, so they are approximate: a random
prompt has one common English word per token asked for (about one token each in BPE vocabularies),
and a ShareGPT reply's length in tokens is its characters / 4 (OpenAI's rule of thumb). The report
gives the prompt and output tokens the server counted (`usage`)."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from jaxserve.errors import UserError

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point government "
         "company number group problem fact").split()
CHARS_PER_TOKEN = 4
DEFAULT_OUTPUT_TOKENS = 64
HUMAN, ASSISTANT = ("human", "user"), ("gpt", "assistant")
LENGTHS_HELP = "a fixed N, uniform:LO:HI (integers, both included) or normal:MEAN:STD (rounded, at least 1)"


@dataclass(frozen=True)
class Lengths:
    """A distribution of token counts, written as on the command line (`str` gives it back)."""

    kind: str  # "fixed" | "uniform" | "normal"
    a: float  # N, LO or MEAN
    b: float = 0.0  # HI or STD

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return int(self.a)

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


DEFAULT_PROMPT_TOKENS = Lengths("fixed", 100)


def parse_lengths(text: str) -> Lengths:
    """An argparse type: `N`, `uniform:LO:HI` or `normal:MEAN:STD`, with every count at least 1."""
    kind, *params = text.split(":")
    try:
        if not params:
            lengths = Lengths("fixed", int(kind))
            ok = lengths.a >= 1
        elif kind == "uniform" and len(params) == 2:
            lengths = Lengths(kind, int(params[0]), int(params[1]))
            ok = 1 <= lengths.a <= lengths.b
        elif kind == "normal" and len(params) == 2:
            lengths = Lengths(kind, float(params[0]), float(params[1]))
            ok = lengths.a >= 1 and lengths.b >= 0
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length distribution: give {LENGTHS_HELP}")
    return lengths


Prompt = str | list[dict[str, str]]  # raw text, or a chat's messages


@dataclass(frozen=True)
class RequestSpec:
    prompt: Prompt
    output_tokens: int  # max_tokens asked for (with ignore_eos, what is generated)

    def tagged(self, tag: str) -> RequestSpec:
        """The request with `tag` opening its prompt (its first message's, for a chat), so a server's
        prefix cache cannot carry it over from another turn that sent the same prompts."""
        if isinstance(self.prompt, str):
            return RequestSpec(f"{tag} {self.prompt}", self.output_tokens)
        first, *rest = self.prompt
        return RequestSpec([{**first, "content": f"{tag} {first['content']}"}, *rest], self.output_tokens)


Entry = tuple[Prompt, int | None]  # a prompt and the output length its source gives (None: none)


def read_dataset(path: Path) -> list[Entry]:
    """The prompts of a file: a JSON list of ShareGPT-style chats (`{"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", ...}, ...]}`: the first human turn is the prompt, the reply after it
    gives the output length), or JSONL of `{"prompt": TEXT}` or `{"messages": [...]}` per line."""
    from jaxserve.training.prompts import read_prompts

    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--dataset: cannot read {path}: {e.strerror}") from None
    if not text.lstrip().startswith("["):
        return [(prompt, None) for prompt in read_prompts(path, "--dataset")]
    entries = _sharegpt(text, path)
    if not entries:
        raise UserError(f"--dataset: {path} holds no chat with a human turn")
    return entries


def _sharegpt(text: str, path: Path) -> list[Entry]:
    try:
        chats = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--dataset: {path} is not JSON ({e.msg} at line {e.lineno})") from None
    entries = []
    for chat in chats:
        turns = chat.get("conversations") if isinstance(chat, dict) else None
        if not isinstance(turns, list):
            raise UserError(f'--dataset: {path}: each item of a JSON list must hold "conversations": [{{"from": ..., "value": ...}}, ...]')
        first = next((i for i, t in enumerate(turns) if _turn(t, HUMAN)), None)
        if first is None:
            continue  # a chat without a human turn has no prompt
        reply = turns[first + 1] if first + 1 < len(turns) else None
        output = max(1, round(len(reply["value"]) / CHARS_PER_TOKEN)) if _turn(reply, ASSISTANT) else None
        entries.append((turns[first]["value"], output))
    return entries


def _turn(turn: object, speakers: tuple[str, ...]) -> bool:
    """Whether a ShareGPT turn is text from one of `speakers`."""
    return isinstance(turn, dict) and turn.get("from") in speakers and isinstance(turn.get("value"), str)


def random_prompt(index: int, words: int, rng: random.Random) -> str:
    return f"Request {index}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def build_requests(count: int, rng: random.Random, output: Lengths | None, prompt_tokens: Lengths | None,
                   dataset: list[Entry] | None) -> list[RequestSpec]:
    """`count` requests: dataset prompts in a shuffled order (cycled when it has fewer), else random
    prompts of `prompt_tokens` words (default DEFAULT_PROMPT_TOKENS). The output length is drawn from
    `output` when given, else the dataset's for that prompt, else DEFAULT_OUTPUT_TOKENS."""
    if dataset is not None:
        order = rng.sample(range(len(dataset)), len(dataset))
        entries = [dataset[order[i % len(dataset)]] for i in range(count)]
    else:
        entries = [(random_prompt(i, (prompt_tokens or DEFAULT_PROMPT_TOKENS).sample(rng), rng), None) for i in range(count)]
    return [RequestSpec(prompt, output.sample(rng) if output else own or DEFAULT_OUTPUT_TOKENS) for prompt, own in entries]
