"""Prompts that `jaxserve train-draft` has the model answer, to learn from its answers.

Built in: every task below about every topic (12 x 24 = 288 user messages), a spread of chat
requests (explaining, listing, story and poem writing, advice, code) that avoids the benchmark's chat
prompts. A user's own file is JSON Lines: `{"prompt": "raw text"}` or `{"messages": [...]}` (rendered
with the model's chat template) per line.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxserve.errors import UserError
from jaxserve.tokenizer import Tokenizer

TASKS = (
    "Explain {} in simple terms.",
    "Write a short story about {}.",
    "What are the pros and cons of {}?",
    "Give me five interesting facts about {}.",
    "Write a haiku about {}.",
    "How would I get started with {}?",
    "Summarize the history of {} in a paragraph.",
    "What are common misconceptions about {}?",
    "Write a friendly email inviting a colleague to a talk about {}.",
    "Describe {} to someone who has never heard of it.",
    "Write a Python function related to {}, with a docstring.",
    "List the steps to explain {} in a classroom lesson.",
)
TOPICS = (
    "the moon", "coffee", "photosynthesis", "bicycles", "the Roman Empire", "machine learning", "gardening", "volcanoes",
    "chess", "recycling", "the human heart", "electric cars", "bread baking", "the internet", "honey bees", "jazz music",
    "rainbows", "public libraries", "the stock market", "sleep", "mountains", "solar panels", "dinosaurs", "friendship",
)


def builtin_prompts() -> list[list[dict[str, str]]]:
    """Each built-in prompt as a one-message chat."""
    return [[{"role": "user", "content": task.format(topic)}] for task in TASKS for topic in TOPICS]


def read_prompts(path: Path, flag: str = "--prompts") -> list[str | list[dict[str, str]]]:
    """A JSONL file's prompts: raw text or chats. A bad line is a UserError naming it (and the `flag` that gave the file)."""
    items: list[str | list[dict[str, str]]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag}: {path} line {number} is not JSON: {e}") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            items.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list) and all(isinstance(m, dict) for m in item["messages"]):
            items.append(item["messages"])
        else:
            raise UserError(f'{flag}: {path} line {number} needs {{"prompt": "..."}} or {{"messages": [...]}}')
    if not items:
        raise UserError(f"{flag}: {path} holds no prompts")
    return items


def encode_prompts(items: list[str | list[dict[str, str]]], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids: raw text as is, chats through the chat template ready for the assistant's turn."""
    return [tokenizer.encode(item) if isinstance(item, str) else tokenizer.encode_chat(item, add_generation_prompt=True) for item in items]
