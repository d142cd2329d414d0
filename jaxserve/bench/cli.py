"""The `jaxserve bench serve | generate | throughput` sub-commands: their flags, and each run from flags
to report (JSON and PNGs in --out-dir, a table on stdout, progress on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable

from jaxserve.bench import plots
from jaxserve.bench.datasets import LENGTHS_HELP, parse_lengths
from jaxserve.bench.report import generate_table, save_report, serve_table, throughput_table
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.errors import UserError

QUANTIZATIONS = ("int8", "int4")


def _positive(kind: type, zero: bool = False):
    """An argparse type: a finite number of `kind` above 0 (or at least 0, with `zero`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value >= 0 if zero else value > 0) or math.isinf(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number {'of 0 or more' if zero else 'above 0'}")
        return value

    return parse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add serve, generate and throughput to `jaxserve bench`'s sub-commands."""
    from jaxserve.bench.stats import SLO_METRICS, parse_slo

    s = _command(sub, serve, "serve.json, throughput.png and latency.png", "load-test an OpenAI-compatible server: TTFT, ITL, E2E, tok/s, goodput",
                 "Streams requests to an OpenAI-compatible server (ours, vLLM, llama-server...) at each concurrency (closed loop) or "
                 "Poisson rate, and reports throughput, latency percentiles and goodput as JSON, a table and PNG plots.")
    s.add_argument("--base-url", nargs="+", default=["http://127.0.0.1:8000"], metavar="URL",
                   help="server(s), with or without /v1 (default: http://127.0.0.1:8000); with several, each level runs against each "
                   "in turn and the report gives the others' figures against the first's")
    s.add_argument("--model", default=None, help="model id to request (default: the first each server lists at GET /v1/models)")
    s.add_argument("--mix", action="append", default=[], metavar="IDS",
                   help="comma-separated model ids (LoRA adapters, say) that requests cycle through, on the first server; "
                   "repeat to compare mixes against the first")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: env OPENAI_API_KEY)")
    s.add_argument("--endpoint", default="completions", choices=("completions", "chat"),
                   help="/v1/completions (default) or /v1/chat/completions (the prompt as one user message)")
    load = s.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive(int), nargs="+", default=None, metavar="N",
                      help="closed-loop clients per level, each sending its next request when its last ends (default: 1 4 16)")
    load.add_argument("--rate", type=_positive(float), nargs="+", default=None, metavar="R",
                      help="instead: requests per second per level, Poisson arrivals")
    s.add_argument("--num-requests", type=_positive(int), default=None,
                   help="requests per level (default: max(8, 3 x concurrency), or 64 per rate)")
    source = s.add_mutually_exclusive_group()
    source.add_argument("--prompt-tokens", type=parse_lengths, default=None, metavar="DIST",
                        help=f"random prompts of about this many tokens (one common word each): {LENGTHS_HELP} (default: 100)")
    source.add_argument("--dataset", type=Path, default=None, metavar="FILE",
                        help='prompts from a file: JSONL of {"prompt": TEXT} or {"messages": [...]} (chats: --endpoint chat), as '
                        'train-draft --prompts reads, or a JSON list of ShareGPT chats ({"conversations": [{"from": "human", '
                        "\"value\": ...}, {\"from\": \"gpt\", ...}]}: the first human turn, and the reply's length at 4 characters a token)")
    s.add_argument("--output-tokens", type=parse_lengths, default=None, metavar="DIST",
                   help=f"tokens to generate per request: {LENGTHS_HELP} (default: the dataset's lengths, else 64)")
    s.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for every output token even past an end of sequence (vLLM's and llama-server's extension; default: on)")
    s.add_argument("--goodput", type=parse_slo, nargs="+", default=[], metavar="METRIC:MS",
                   help=f"SLO for goodput, as vLLM's --goodput: requests/s that completed with every METRIC ({', '.join(SLO_METRICS)}) "
                   "within MS milliseconds, e.g. ttft:500 e2e:5000")
    s.add_argument("--rounds", type=_positive(int), default=1, help="turns per target and level, the order alternating (default: 1)")
    s.add_argument("--warmup-requests", type=_positive(int, zero=True), default=4, help="untimed requests per target before measuring (default: 4)")
    s.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals (default: 0)")
    s.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds one request may take (default: 600)")

    g = _command(sub, generate, "generate.json and generate.png", "single-stream decode in this process: set-up, load, compile, prefill and decode tok/s",
                 "One request alone from a cold start: download and conversion into an empty folder, load, compile, prefill and decode "
                 "tokens/s, with float weights and each --quantizations, and other engines on the same GGUF.")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or .gguf file (default: {DEFAULT_MODEL})")
    g.add_argument("--decode-tokens", type=_positive(int), default=128, help="tokens to generate, at least 2 (default: 128)")
    g.add_argument("--quantizations", nargs="*", default=list(QUANTIZATIONS), choices=QUANTIZATIONS,
                   help="also decode with these weight formats in the same run (default: int8 int4; none: skip)")
    g.add_argument("--reference-python", default=None,
                   help="a Python with torch and transformers, for transformers' float32 decode (default: this one, if it has them)")
    g.add_argument("--llama-cpp-python", default=None, help="a Python with llama-cpp-python, for llama.cpp's decode of the GGUF in F32")

    t = _command(sub, throughput, "throughput.json and throughput.png", "offline batched throughput against one at a time; chunked prefill's stall",
                 "Requests through the offline engine batched, against one at a time; and the worst inter-token gap of decoding streams "
                 "while a long prompt prefills, with and without chunked prefill.")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, GGUF file, HF folder or jaxserve checkpoint (default: {DEFAULT_MODEL})")
    t.add_argument("--requests", type=_positive(int), default=64, help="requests batched (default: 64)")
    t.add_argument("--sequential-sample", type=_positive(int), default=8, help="of them, how many run one at a time (default: 8)")
    t.add_argument("--prompt-tokens", type=_positive(int), default=128, help="tokens per prompt (default: 128)")
    t.add_argument("--output-tokens", type=_positive(int), default=128, help="tokens generated per request (default: 128)")
    t.add_argument("--streams", type=_positive(int), default=16, help="streams decoding when the long prompt arrives (default: 16)")
    t.add_argument("--long-prompt-tokens", type=_positive(int), default=1000, help="the long prompt's tokens (default: 1000)")
    t.add_argument("--prefill-chunk", type=_positive(int), default=256, help="tokens per step with chunked prefill (default: 256)")


def _command(sub: argparse._SubParsersAction, run: Callable[[argparse.Namespace], int], files: str, summary: str,
             description: str) -> argparse.ArgumentParser:
    """`jaxserve bench NAME`, which runs `run` (named NAME) and writes `files` to --out-dir (default bench_results/NAME)."""
    p = sub.add_parser(run.__name__, help=summary, description=description)
    folder = f"bench_results/{run.__name__}"
    p.add_argument("--out-dir", type=Path, default=Path(folder), help=f"where {files} go (default: {folder})")
    p.set_defaults(func=run)
    return p


def _header(args: argparse.Namespace) -> dict:
    """What every report starts with: the command, the date (UTC) and the command line's values (the API key left out)."""
    from jaxserve.checkpoint.store import utc_now

    return {"command": f"jaxserve bench {args.benchmark}", "date": utc_now(),
            "args": {k: v for k, v in vars(args).items() if k not in ("command", "benchmark", "func", "api_key")}}


def _finish(report: dict, args: argparse.Namespace, table: str, drawn: list[Path]) -> None:
    """Save the JSON beside the plots, print the table, and say where the files went."""
    out = args.out_dir / f"{args.benchmark}.json"
    save_report(report, out, echo=False)
    print(table)
    print("wrote " + ", ".join(str(p) for p in [out, *drawn]), file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    plots.require_matplotlib()
    report = asyncio.run(_serve(args))
    drawn = [plots.serve_throughput(report, args.out_dir / "throughput.png"), plots.serve_latency(report, args.out_dir / "latency.png")]
    _finish(report, args, serve_table(report), drawn)
    return 0 if any(level["completed"] for t in report["targets"] for level in t["levels"]) else 1


async def _serve(args: argparse.Namespace) -> dict:
    from jaxserve.bench.client import Client, api_root
    from jaxserve.bench.datasets import build_requests, read_dataset
    from jaxserve.bench.load import resolve_targets, run_levels, session
    from jaxserve.bench.stats import against, summarise

    mode, levels = ("rate", args.rate) if args.rate else ("concurrency", args.concurrency or [1, 4, 16])
    dataset = read_dataset(args.dataset) if args.dataset else None
    if args.endpoint == "completions" and any(isinstance(prompt, list) for prompt, _ in dataset or []):
        raise UserError(f'--dataset {args.dataset} holds chats ({{"messages": [...]}}): send them with --endpoint chat')
    rng = random.Random(args.seed)
    requests = [build_requests(args.num_requests or (64 if mode == "rate" else max(8, 3 * level)), rng, args.output_tokens, args.prompt_tokens, dataset)
                for level in levels]
    warmup = build_requests(args.warmup_requests, random.Random(f"{args.seed}-warmup"), args.output_tokens, args.prompt_tokens, dataset)
    async with session(args.api_key, args.timeout) as http:
        client = Client(http, args.endpoint, args.ignore_eos)
        targets = await resolve_targets(client, [api_root(u) for u in args.base_url], args.model, args.mix)
        measured = await run_levels(client, targets, mode, levels, requests, args.rounds, warmup, args.seed)
    slo = dict(args.goodput)
    report = {**_header(args), "mode": mode, "endpoint": args.endpoint, "slo_ms": slo or None, "targets": []}
    for target, per_level in zip(targets, measured):
        figures = [{mode: level, **summarise(m.outcomes, m.duration, slo)} for level, m in zip(levels, per_level)]
        report["targets"].append({"label": target.label, "base_url": target.root, "model": ",".join(target.models), "levels": figures})
    for target in report["targets"][1:]:
        for level, first in zip(target["levels"], report["targets"][0]["levels"]):
            level["vs_first"] = against(level, first)
    return report


def generate(args: argparse.Namespace) -> int:
    from jaxserve.bench import offline

    plots.require_matplotlib()
    if args.decode_tokens < 2:
        raise UserError("--decode-tokens must be at least 2: the first token comes from the prefill, decode steps after it")
    report = {**_header(args),
              **offline.generate(args.model, args.decode_tokens, args.quantizations, args.reference_python, args.llama_cpp_python)}
    _finish(report, args, generate_table(report), [plots.generate(report, args.out_dir / "generate.png")])
    return 0


def throughput(args: argparse.Namespace) -> int:
    from jaxserve.bench import offline

    plots.require_matplotlib()
    if args.sequential_sample > args.requests:
        raise UserError(f"--sequential-sample {args.sequential_sample} is more than --requests {args.requests}")
    report = {**_header(args),
              **offline.throughput(args.model, args.requests, args.sequential_sample, args.prompt_tokens, args.output_tokens,
                                   args.streams, args.long_prompt_tokens, args.prefill_chunk)}
    _finish(report, args, throughput_table(report), [plots.throughput(report, args.out_dir / "throughput.png")])
    return 0
