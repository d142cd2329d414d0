"""LoRA fine-tuning benchmark: `jaxserve finetune` teaches SmolLM2 a skill it lacks, on this machine's CPU.

The skill: read one sentence about a person and answer with exactly {"name": ..., "city": ..., "age": ...}
(that key order, JSON's ", " / ": " separators, nothing else). The script

1. writes seeded synthetic data: training chats from 12 sentence templates over one pool of first
   names, surnames and cities; held-out sentences about people from pools never trained on (new
   first names, surnames and cities), a third of them in 3 templates never trained on;
2. runs `jaxserve finetune` on the training chats (a subprocess: load, train, save; its wall time
   is the figure that must stay under 10 minutes);
3. serves the base model and the adapter from one `jaxserve serve --lora-modules skill=ADAPTER` on
   127.0.0.1, has the `openai` client ask every held-out sentence greedily of each (`model` = the
   base model's id, then "skill"), and scores exact answers (the string is the expected JSON) and
   parsed answers (the first {...} in the text parses to the expected object, whatever the formatting);
4. prints and saves the figures as JSON.

    python scripts/bench_finetune.py                      # SmolLM2, defaults tuned for a 2-core CPU
    python scripts/bench_finetune.py --train-examples 480 --epochs 1 --out bench_results/finetune.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jaxserve.bench.report import save_report  # noqa: E402

import openai  # noqa: E402

from jaxserve.checkpoint.registry import DEFAULT_MODEL, cache_dir  # noqa: E402
from jaxserve.engine.runner import enable_compilation_cache  # noqa: E402

SYSTEM = "Extract the person's name, city and age as JSON."
FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Karen", "Leo", "Maria", "Nils", "Olga",
         "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Walter", "Yara", "Zoe", "Aaron", "Bianca", "Carlos", "Dana", "Emil"]
LAST = ["Smith", "Garcia", "Muller", "Rossi", "Novak", "Silva", "Kim", "Berg", "Lopez", "Fischer", "Costa", "Brown", "Wagner", "Moreau",
        "Jensen", "Kowalski", "Tanaka", "Hughes", "Schmidt", "Ward"]
CITIES = ["Paris", "Lisbon", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Dublin", "Athens", "Warsaw", "Zurich", "Boston",
          "Denver", "Toronto", "Chicago", "Seattle", "Austin", "Sydney", "Osaka"]
HELD_FIRST = ["Mateo", "Sofia", "Ivan", "Leila", "Oscar", "Nadia", "Victor", "Helga", "Tomas", "Alma"]
HELD_LAST = ["Petrov", "Okafor", "Lindqvist", "Haddad", "Moreno", "Dubois", "Nakamura", "Keller"]
HELD_CITIES = ["Lyon", "Porto", "Munich", "Seville", "Milan", "Krakow", "Bergen", "Geneva", "Hamburg", "Montreal", "Melbourne", "Kyoto"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "In {city}, {name} just turned {age}.",
    "{name}, age {age}, works in {city}.",
    "Our new neighbor {name} is {age} and comes from {city}.",
    "{city} resident {name} celebrated turning {age} today.",
    "At {age}, {name} opened a bakery in {city}.",
    "{name} from {city} is {age}.",
    "The {age}-year-old {name} was seen in {city}.",
    "Say hello to {name}: {age} years old, living in {city}.",
    "{name} has lived in {city} since birth and is now {age}.",
]
HELD_TEMPLATES = [
    "Last week {name}, {age}, flew home to {city}.",
    "Visitor from {city}: {name}, {age} years of age.",
    "{name} teaches music in {city}; she or he is {age}.",
]


def person(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> dict[str, Any]:
    return {"name": f"{rng.choice(first)} {rng.choice(last)}", "city": rng.choice(cities), "age": rng.randint(18, 89)}


def chat(sentence: str, answer: dict[str, Any] | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence}]
    return messages + ([{"role": "assistant", "content": json.dumps(answer)}] if answer is not None else [])


def make_data(train_examples: int, held_examples: int, seed: int) -> tuple[list[list[dict[str, str]]], list[tuple[str, dict[str, Any]]]]:
    """(training chats, held-out (sentence, expected object)): held-out people come from pools never
    trained on, and a third of their sentences from templates never trained on."""
    rng = random.Random(seed)
    train = []
    for _ in range(train_examples):
        p = person(rng, FIRST, LAST, CITIES)
        train.append(chat(rng.choice(TEMPLATES).format(**p), p))
    held = []
    for i in range(held_examples):
        p = person(rng, HELD_FIRST, HELD_LAST, HELD_CITIES)
        template = HELD_TEMPLATES[i % len(HELD_TEMPLATES)] if i % 3 == 0 else rng.choice(TEMPLATES)
        held.append((template.format(**p), p))
    return train, held


def parsed(text: str) -> Any:
    """The first {...} of a text as JSON (None when there is none or it does not parse)."""
    m = re.search(r"\{.*?\}", text, re.S)
    try:
        return json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        return None


def score(outputs: list[str], held: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    exact = [o.strip() == json.dumps(p) for o, (_, p) in zip(outputs, held)]
    loose = [parsed(o) == p for o, (_, p) in zip(outputs, held)]
    unseen = [i for i in range(len(held)) if i % 3 == 0]
    return {"exact": round(sum(exact) / len(held), 4), "parsed": round(sum(loose) / len(held), 4),
            "exact_unseen_templates": round(sum(exact[i] for i in unseen) / max(len(unseen), 1), 4),
            "samples": [{"sentence": s, "output": o} for o, (s, _) in list(zip(outputs, held))[:3]],
            "misses": [{"sentence": s, "output": o} for o, (s, _), ok in zip(outputs, held, exact) if not ok][:5]}


MAX_TOKENS = 40


async def served_answers(model: str, adapter: Path, rank: int, held: list[tuple[str, dict[str, Any]]], log: Path) -> tuple[list[str], list[str]]:
    """Greedy answers to the held-out sentences from a real server: the base model's, then the adapter's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "jaxserve", "serve", "--model", model, "--port", str(port), "--lora-modules", f"skill={adapter}",
               "--max-lora-rank", str(rank), "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--num-pages", "256",
               "--max-model-len", "160", "--no-unroll-layers", "--no-warmup"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        deadline = time.monotonic() + 600
        while True:
            try:
                base = (await client.models.list()).data[0].id
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}") from None
                await asyncio.sleep(0.5)

        async def ask(name: str, sentence: str) -> str:
            r = await client.chat.completions.create(model=name, messages=chat(sentence, None), max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content

        return tuple([await asyncio.gather(*(ask(name, s) for s, _ in held)) for name in (base, "skill")])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--train-examples", type=int, default=320)
    parser.add_argument("--held-examples", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=76)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the data and adapter go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/finetune.json"))
    args = parser.parse_args()
    enable_compilation_cache(cache_dir() / "jax_cache")
    started = time.perf_counter()
    load_before = os.getloadavg()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    train, held = make_data(args.train_examples, args.held_examples, args.seed)
    data, adapter = work / "train.jsonl", work / "adapter"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in train))

    command = [sys.executable, "-m", "jaxserve", "finetune", args.model, "--data", str(data), "--out", str(adapter), "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate), "--batch-size",
               str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--held-out", "0.05", "--seed", str(args.seed)]
    print("$", " ".join(command[1:]), file=sys.stderr)
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True)
    finetune_seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    finetune_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    training = json.loads((adapter / "training_report.json").read_text())

    t0 = time.perf_counter()
    base_out, tuned_out = asyncio.run(served_answers(args.model, adapter, args.rank, held, work / "server.log"))
    eval_seconds = time.perf_counter() - t0

    base, tuned = score(base_out, held), score(tuned_out, held)
    report = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "skill": "one sentence about a person -> exactly {\"name\", \"city\", \"age\"} as JSON",
        "command": "jaxserve " + " ".join(command[3:]),
        "train_examples": len(train), "held_out_examples": len(held),
        "finetune_seconds": round(finetune_seconds, 1), "under_10_minutes": finetune_seconds < 600,
        "finetune_cpu_seconds": round(finetune_cpu, 1),  # user + system over all its threads: what the work costs whatever else runs
        "training": {k: training[k] for k in ("optimizer_steps", "trainable_params", "held_out_loss_before", "epochs", "final_train_loss", "seconds", "examples")},
        "evaluation": {"with": "jaxserve serve --lora-modules skill=ADAPTER and the openai client's chat completions", "seconds": round(eval_seconds, 1),
                       "max_tokens": MAX_TOKENS},
        "held_out_accuracy": {"base": {k: base[k] for k in ("exact", "parsed", "exact_unseen_templates")},
                              "adapter": {k: tuned[k] for k in ("exact", "parsed", "exact_unseen_templates")}},
        "samples": {"base": base["samples"], "adapter": tuned["samples"]},
        "adapter_misses": tuned["misses"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_report(report, args.out)


if __name__ == "__main__":
    main()
