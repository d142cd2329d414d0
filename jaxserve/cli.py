"""`jaxserve` command line: generate, chat, convert."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Sequence

from jaxserve.checkpoint.registry import DEFAULT_MODEL, cache_dir
from jaxserve.config import load_yaml
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file of option defaults (command-line flags take precedence)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, GGUF file, HF folder or jaxserve checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length to allocate the KV cache for (default: the model's)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV cache size: bytes, or a fraction (<= 1) of free accelerator memory (default: room for the context)",
    )
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=False, help="compile every step shape before the first request")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the output")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its sub-command parsers by name."""
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference engine on JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (streams tokens, keeps history)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=_cmd_chat)

    conv = sub.add_parser("convert", help="convert a GGUF file or HF folder to a jaxserve checkpoint")
    conv.add_argument("src", help="GGUF file, HF folder (config.json + safetensors) or jaxserve checkpoint")
    conv.add_argument("dst", help="output folder")
    conv.set_defaults(func=_cmd_convert)
    return parser, {"generate": gen, "chat": chat, "convert": conv}


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        min_tokens=args.min_tokens,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
    )


def _single_stream(args: argparse.Namespace):
    """The model and an engine sized for one sequence of the full context (what generate and chat run)."""
    from jaxserve.checkpoint.loader import load_model
    from jaxserve.config import EngineConfig
    from jaxserve.engine.llm import LLM

    if args.page_size < 1:
        raise UserError(f"--page-size must be >= 1, got {args.page_size}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    model = load_model(args.model, args.dtype)
    max_len = min(args.max_model_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    engine = EngineConfig(
        max_num_seqs=1,
        max_num_batched_tokens=2048,
        page_size=args.page_size,
        num_pages=-(-max_len // args.page_size) + 1,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=max_len,
    )
    llm = LLM(model, engine)
    if args.warmup:
        llm.engine.warmup()
    return model, llm


def _cmd_generate(args: argparse.Namespace) -> int:
    sp = _sampling(args)
    model, llm = _single_stream(args)
    tok = model.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = tok.encode_chat(messages)
    else:
        prompt_ids = tok.encode(args.prompt)
    token_ids: list[int] = []
    text, finish = "", None
    for out in llm.stream(prompt_ids, sp):
        finish = out.finish_reason
        token_ids += [out.token_id] if out.token_id is not None else []
        text += out.text
        if not args.json:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "prompt_token_ids": prompt_ids, "finish_reason": finish}))
    else:
        print()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    sp = _sampling(args)
    model, llm = _single_stream(args)
    tok = model.tokenizer
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print("chatting with", model.name, "- empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt_ids = tok.encode_chat(history)
        try:
            outputs = llm.stream(prompt_ids, sp, request_id=f"turn-{len(history)}")
            first = next(outputs)  # the request is checked when it is added, before any output
        except UserError as e:
            print(f"jaxserve: error: {e}; start a new chat", file=sys.stderr)
            return 2
        reply = ""
        for out in itertools.chain([first], outputs):
            reply += out.text
            sys.stdout.write(out.text)
            sys.stdout.flush()
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxserve.checkpoint.loader import convert

    cfg = convert(Path(args.src), Path(args.dst))
    print(f"wrote {args.dst} ({cfg.architecture}, {cfg.num_layers} layers, vocab {cfg.vocab_size})", file=sys.stderr)
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags; with --config, YAML values become the defaults and flags still win."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        known = set(vars(args)) - {"command", "func", "config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config file {args.config} has unknown options for '{args.command}': {', '.join(unknown)}")
        commands[args.command].set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
        from jaxserve.engine.runner import enable_compilation_cache

        enable_compilation_cache(cache_dir() / "jax_cache")
        return args.func(args)
    except UserError as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
