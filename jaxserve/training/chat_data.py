"""Fine-tuning data: JSON Lines of chats or prompt/completion pairs, as token ids with a loss mask.

Each line is one example:

    {"messages": [{"role": "system" | "user" | "assistant" | ..., "content": "..."}, ...]}
        rendered with the model's chat template; the loss is on each assistant turn's tokens,
        including the token that ends the turn (the template's end-of-turn / EOS token), and on
        nothing else (system, user and template tokens are context);
    {"prompt": "...", "completion": "..."}
        raw text, no template: the prompt (with BOS where the model adds one), then the completion
        and EOS, which the loss is on.

Assistant tokens are found by rendering, before each assistant turn, the conversation so far with
the generation prompt: its tokens must be a prefix of the whole conversation's, and the turn is the
tokens that follow, up to and including the last end token the turn renders with. A template that
renders a turn differently inside the conversation than at its end is an error, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.errors import UserError
from jaxserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # [T] int32
    mask: np.ndarray  # [T] bool: the tokens the loss is on (each predicted from the ones before it)
    line: int  # of the data file, from 1


def read_examples(path: str | Path, tokenizer: Tokenizer, max_seq_len: int) -> list[Example]:
    """Every example of a JSONL file; UserError naming the file and line of the first bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tokens, mask = encode_example(parse_line(line), tokenizer)
        except ValueError as e:  # UserError included (a template that fails on this chat)
            raise UserError(f"{path} line {number}: {e}") from None
        if len(tokens) > max_seq_len:
            raise UserError(f"{path} line {number}: {len(tokens)} tokens, over --max-seq-len {max_seq_len} (shorten it or raise the limit)")
        examples.append(Example(np.asarray(tokens, np.int32), mask, number))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def parse_line(line: str) -> dict[str, Any]:
    """One line's checked object: {"messages": [...]} or {"prompt", "completion"}; ValueError saying what is wrong."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(item, dict):
        raise ValueError('each line must be a JSON object: {"messages": [...]} or {"prompt": ..., "completion": ...}')
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f'message {i} must be an object with a string "role" and a string "content"')
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant turn to learn from")
        return {"messages": messages}
    if "prompt" in item or "completion" in item:
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("completion"), str):
            raise ValueError('"prompt" and "completion" must both be strings')
        if not item["completion"]:
            raise ValueError('"completion" is empty')
        return {"prompt": item["prompt"], "completion": item["completion"]}
    raise ValueError('needs "messages" (a chat) or "prompt" and "completion"')


def encode_example(item: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], np.ndarray]:
    """Token ids and loss mask [T] of a parsed line."""
    if "messages" in item:
        return encode_chat(item["messages"], tokenizer)
    if not tokenizer.eos_token_ids:
        raise ValueError("the model has no EOS token to end a completion with")
    prompt = tokenizer.encode(item["prompt"])
    completion = tokenizer.encode(item["completion"], add_special_tokens=False) + [tokenizer.eos_token_ids[0]]
    tokens = prompt + completion
    mask = np.zeros(len(tokens), bool)
    mask[len(prompt) :] = True
    if len(prompt) == 0:  # the first token has nothing before it to be predicted from
        mask[0] = False
    return tokens, mask


def encode_chat(messages: list[dict[str, Any]], tokenizer: Tokenizer) -> tuple[list[int], np.ndarray]:
    """The rendered conversation's token ids and a mask over its assistant turns (see the module doc)."""
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = np.zeros(len(full), bool)
    ends = set(tokenizer.eos_token_ids)
    turn = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn += 1
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        upto = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        start = len(before)
        if upto[:start] != before or full[:start] != before:
            raise ValueError(f"the chat template's generation prompt is not how it renders assistant turn {turn}; cannot find that turn's tokens")
        closing = [j for j in range(start, len(upto)) if upto[j] in ends]
        end = closing[-1] + 1 if closing else len(upto)  # through the turn's end token; what the template adds after it is context
        if end <= start or full[start:end] != upto[start:end]:
            raise ValueError(f"the chat template renders assistant turn {turn} differently inside the conversation; cannot find its tokens")
        mask[start:end] = True
    return full, mask
