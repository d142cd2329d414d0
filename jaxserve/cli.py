"""`jaxserve` command line: generate, chat, serve, convert, train-draft."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from typing import Sequence

from jaxserve.bench.cli import add_commands as add_bench_commands
from jaxserve.checkpoint.registry import DEFAULT_MODEL, cache_dir
from jaxserve.config import INT4_GROUP, KV_CACHE_DTYPES, PREEMPTION_MODES, QUANTIZATIONS, SCHEDULING_POLICIES, FinetuneConfig, TrainDraftConfig, load_yaml
from jaxserve.errors import UserError
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.reasoning import REASONING_PARSERS, reasoning_parser


QUANTIZATION_HELP = (
    "int8: dense layers as int8 weights times int8 activations, SmoothQuant-calibrated; int4: dense weights as 4-bit codes with "
    "a scale and offset per group of input rows (--quantization-group-size), AWQ-calibrated, or a GGUF's Q4_0/Q4_1/Q4_K blocks "
    "kept as stored. The LM head stays float; outputs differ slightly from float"
)
GROUP_SIZES = (32, 64, 128)
GROUP_SIZE_HELP = f"int4: input rows per scale and offset (default {INT4_GROUP}, GGUF's 4-bit block)"


class _ModelsAction(argparse.Action):
    """`serve --model`, repeatable: the first on the command line replaces a default (YAML, environment),
    later ones add models."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*current, values] if isinstance(current, list) and current is not self.default else [values])


def _add_model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--config", default=None, help="YAML file of option defaults (command-line flags take precedence)")
    if several:
        p.add_argument("--model", action=_ModelsAction, default=None,
                       help=f"registry name, GGUF file, HF folder or jaxserve checkpoint (default: {DEFAULT_MODEL}); repeatable as NAME=SOURCE "
                       "to serve several models, each routed by the request's `model` (or a YAML `models:` list in --config)")
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, GGUF file, HF folder or jaxserve checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help=QUANTIZATION_HELP + " (a checkpoint converted with --quantization is served as it is, without this flag)",
    )
    p.add_argument("--quantization-group-size", type=int, default=None, choices=GROUP_SIZES, help=GROUP_SIZE_HELP)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices each model replica is split over (must divide the heads)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="a mixture of experts' devices each hold whole experts (their count must divide the experts) instead of a slice of every one")
    p.add_argument(
        "--unroll-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one buffer per layer, unrolled (default on one device: decode ~1.45x faster on CPU, 1.4-1.65x on an H200) or stacked under scan "
        "(--no-unroll-layers: each step shape compiles ~9x faster, for short-lived processes)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length to allocate the KV cache for (default: the model's)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV cache size: bytes, or a fraction (<= 1) of free accelerator memory (default: room for the context)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="KV-cache storage: auto (the model's dtype), bfloat16 (half the memory of float32), or int8 / fp8_e4m3 "
        "(fp8 for short): 8-bit values with a scale per token and KV head, about half the memory of bfloat16; outputs differ slightly",
    )
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=False, help="compile every step shape before the first request")
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding, as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4} '
        'a draft model with the same tokenizer, {"model": NAME_OR_PATH, "num_speculative_tokens": 4}, or draft heads from `jaxserve train-draft`, '
        '{"method": "medusa", "model": HEADS_DIR, "num_speculative_tokens": 4} (outputs are unchanged, greedy or seeded)',
    )


def _speculative(args: argparse.Namespace):
    from jaxserve.config import SpeculativeConfig

    return SpeculativeConfig.from_json(args.speculative_config) if args.speculative_config else None


SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop")


def _add_sampling_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    """Sampling flags. For `serve` they are defaults for requests that leave a field out, and only
    those given (by flag, environment or YAML) apply."""

    def add(flag: str, default, **kw) -> None:
        p.add_argument(flag, default=argparse.SUPPRESS if server else default, **kw)

    add("--max-tokens", 128, type=int)
    add("--temperature", 1.0, type=float, help="0 = greedy")
    add("--top-p", 1.0, type=float)
    add("--top-k", -1, type=int)
    add("--min-p", 0.0, type=float)
    add("--seed", None, type=int)
    add("--ignore-eos", False, action="store_true")
    add("--min-tokens", 0, type=int)
    add("--repetition-penalty", 1.0, type=float)
    add("--presence-penalty", 0.0, type=float)
    add("--frequency-penalty", 0.0, type=float)
    add("--stop", [], action="append", help="stop string (repeatable); cut from the output")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its sub-command parsers by name."""
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference engine on JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(gen)
    _add_sampling_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-token-ids", default=None, metavar="IDS",
                        help="the prompt as comma-separated token ids (1,2,3) instead of text: for checkpoints without a usable tokenizer")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object instead of streaming text: prompt_token_ids, token_ids, text (null when it cannot be "
                     "decoded), logprobs (of each generated token) and finish_reason")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (streams tokens, keeps history)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=_cmd_chat)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(srv, several=True)
    _add_sampling_args(srv, server=True)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", action="append", default=[], help="accepted bearer key (repeatable; env JAXSERVE_API_KEY, comma-separated)")
    srv.add_argument("--api-keys-file", default=None,
                     help="YAML mapping each key (or sha256:<hex> of it) to a tenant with limits, priority, fair-share weight and "
                     "models; reloaded on SIGHUP")
    srv.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    srv.add_argument("--data-parallel-size", type=int, default=1, help="independent engine replicas, each on its own tensor-parallel devices")
    srv.add_argument("--coordinator-address", default=None, help="host:port of process 0, for a multi-process group (jax.distributed)")
    srv.add_argument("--num-processes", type=int, default=1, help="processes in the group; process 0 serves HTTP, the others follow")
    srv.add_argument("--process-id", type=int, default=0, help="this process's rank in the group")
    srv.add_argument("--distributed-timeout", type=float, default=300.0, help="seconds to wait for every process to join")
    srv.add_argument(
        "--cluster-secret-file",
        default=None,
        help="file holding the secret every process of the group shares (or the secret itself in env JAXSERVE_CLUSTER_SECRET)",
    )
    srv.add_argument("--max-num-seqs", type=int, default=16, help="running sequences per step")
    srv.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens computed per step (default: 256 on CPU, where smaller steps keep first-token latency low; 2048 on GPU/TPU)",
    )
    srv.add_argument("--num-pages", type=int, default=1024, help="KV-cache pages (when --kv-cache-memory is not given)")
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    srv.add_argument("--swap-space", type=float, default=0.0,
                     help="GiB of host memory for the KV cache of preempted requests, copied back when they resume (default 0: they recompute)")
    srv.add_argument("--preemption-mode", default="auto", choices=PREEMPTION_MODES,
                     help="with --swap-space: auto swaps contexts longer than a threshold measured at start (logged) and recomputes "
                     "shorter ones; swap always swaps while the pool has room; recompute never swaps")
    srv.add_argument("--host-prefix-cache", type=float, default=0.0,
                     help="GiB of host memory for prefix-cache blocks evicted from the device, copied back on a later hit instead of "
                     "recomputed (default 0: evicted blocks are forgotten)")
    srv.add_argument("--prefix-cache-dir", default=None,
                     help="with --host-prefix-cache: a folder the host prefix tier is loaded from at start and saved to at shutdown, "
                     "so a restarted server keeps long system prompts warm (a corrupt or mismatched one is ignored with a warning)")
    srv.add_argument("--scheduling-policy", default="priority", choices=SCHEDULING_POLICIES,
                     help="fcfs: arrival order; priority: request priority, then arrival; fair: priority, then weighted fair share "
                     "of computed tokens across tenants, preempting the tenant most over its share")
    srv.add_argument("--otlp-traces-endpoint", default=None,
                     help="URL OpenTelemetry spans are posted to (e.g. http://collector:4318/v1/traces; default: tracing off)")
    srv.add_argument("--cost-per-hour", type=float, default=None,
                     help="what the machine costs in USD per hour: gives cost per million tokens and each tenant's share on /metrics")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 429")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20)
    srv.add_argument("--cors-origin", action="append", default=[], help="allowed CORS origin (repeatable, '*' for any; default: CORS off)")
    srv.add_argument("--root-path", default="",
                     help="path prefix of a reverse proxy (e.g. /llm): every route also answers under it, and the playground works there")
    srv.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True, help="the web playground at / (--no-ui: none)")
    srv.add_argument("--max-loaded-models", type=int, default=None,
                     help="model versions holding engines at once: a lazy one loading beyond it evicts the least recently used idle lazy one")
    srv.add_argument("--admin-api-key", default=None,
                     help="key of the admin API (/admin/...: load versions, traffic splits, promote, roll back, unload; default: no admin API)")
    srv.add_argument("--lora-modules", action="extend", nargs="+", default=[], metavar="NAME=PATH",
                     help="LoRA adapters (PEFT folders) served as models of their own, on the default model: NAME=PATH, or vLLM's JSON "
                     '{"name": ..., "path": ..., "base_model_name": ...}; naming any turns LoRA on')
    srv.add_argument("--enable-lora", action="store_true",
                     help="give the engines LoRA adapter slots, for adapters loaded at runtime (POST /v1/load_lora_adapter, with the admin key)")
    srv.add_argument("--max-loras", type=int, default=None,
                     help="adapters one step can mix (device slots; default 4 with LoRA on); more may be loaded, and take turns")
    srv.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank the slots hold (default 16)")
    srv.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                     help="split chat replies into reasoning_content (<think>...</think>) and content, as vLLM's parser of that name (default: off)")
    srv.set_defaults(func=_cmd_serve, warmup=True, models=None)  # models: the YAML `models:` list (jaxserve.server.model_spec)

    ro = sub.add_parser("rollout", help="move a model's traffic to a new version in stages through a server's admin API, rolling back on regressions")
    ro.add_argument("name", help="the model's name on the server")
    ro.add_argument("--to", required=True, help="the version to roll out (loaded already: POST /admin/models/NAME/versions)")
    ro.add_argument("--stages", default="10,50,100", help="the new version's percent of traffic at each stage (default: 10,50,100)")
    ro.add_argument("--interval", type=float, default=300.0, help="seconds per stage before it is judged (default: 300)")
    ro.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    ro.add_argument("--admin-key", default=os.environ.get("JAXSERVE_ADMIN_API_KEY"),
                    help="the server's admin key (default: env JAXSERVE_ADMIN_API_KEY)")
    ro.add_argument("--max-error-rate-increase", type=float, default=0.01,
                    help="error rate above production's that stops it (absolute; default 0.01)")
    ro.add_argument("--max-p99-ratio", type=float, default=1.5, help="p99 latency over production's that stops it (default 1.5x)")
    ro.add_argument("--latency", default="e2e", choices=("e2e", "ttft"), help="which p99 latency is compared (default: e2e)")
    ro.add_argument("--min-requests", type=int, default=20, help="new-version requests a stage needs for its error rate and latency to be judged (default 20); an unhealthy canary, "
                    "or one that got no requests while production got many, rolls back whatever the count")
    ro.set_defaults(func=_cmd_rollout)

    conv = sub.add_parser("convert", help="convert a GGUF file or HF folder to a jaxserve checkpoint (a folder, or a version in the model store)")
    conv.add_argument("src", help="GGUF file, HF folder (config.json + safetensors), jaxserve checkpoint, or model name (NAME[@VERSION])")
    conv.add_argument("dst", nargs="?", default=None, help="output folder (or --name)")
    conv.add_argument("--name", default=None, help="keep it in the model store as NAME (under $JAXSERVE_CACHE/models/NAME/VERSION) instead of DST")
    conv.add_argument("--version", default=None, help="with --name: the version (default: the next integer)")
    conv.add_argument("--force", action="store_true", help="with --name: replace an existing NAME@VERSION")
    conv.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                      help=QUANTIZATION_HELP + "; calibrated once, here, and stored packed (embedding and LM head as 8-bit blocks)")
    conv.add_argument("--quantization-group-size", type=int, default=None, choices=GROUP_SIZES, help=GROUP_SIZE_HELP)
    conv.set_defaults(func=_cmd_convert)

    models = sub.add_parser("models", help="list and manage the versioned model store")
    models_sub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    models_sub.add_parser("list", help="stored names: versions, current version, architecture, quantization, size, created").set_defaults(func=_cmd_models_list)
    for action, target, func, text in (("show", "NAME[@VERSION]", _cmd_models_show, "a version's metadata as JSON (default: the current version)"),
                                       ("rm", "NAME@VERSION", _cmd_models_rm, "remove a version (the current one only when it is the last)"),
                                       ("current", "NAME@VERSION", _cmd_models_current, "make a version the one NAME resolves to")):
        act = models_sub.add_parser(action, help=text)
        act.add_argument("model", metavar=target)
        act.set_defaults(func=func)

    bench = sub.add_parser("bench", help="benchmarks: a server under load, single-stream decode, offline throughput, a stored version")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_bench_commands(bench_sub)  # serve, generate, throughput: jaxserve/bench/cli.py
    stored = bench_sub.add_parser("model", help="short offline benchmark; figures recorded in a stored version's metadata "
                                  "(`jaxserve bench [NAME]` for short)")
    stored.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"NAME[@VERSION] or any model path (default: {DEFAULT_MODEL})")
    stored.add_argument("--num-prompts", type=int, default=8, help="prompts decoded together (default: 8)")
    stored.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default: 32)")
    stored.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU/TPU)")
    stored.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="layer layout, as for serving (default: unrolled on one device; --no-unroll-layers compiles ~9x faster)")
    stored.set_defaults(func=_cmd_bench)

    td = sub.add_parser("train-draft", help='train draft heads for a model from its own answers (serve them with {"method": "medusa", "model": OUT})')
    td.add_argument("model", help="registry name, GGUF file, HF folder or jaxserve checkpoint")
    td.add_argument("--out", required=True, help="folder to save the heads in")
    td.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU/TPU)")
    td.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} or {"messages": [...]} per line (default: 288 built-in chat prompts)')
    defaults = TrainDraftConfig()
    for f in dataclasses.fields(TrainDraftConfig):
        if f.name != "prompts":
            kind = int if f.name == "num_prompts" else type(getattr(defaults, f.name))
            td.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name), help=f"(default: {getattr(defaults, f.name)})")
    td.set_defaults(func=_cmd_train_draft)

    ft = sub.add_parser("finetune", help="train a LoRA adapter on chats or prompt/completion pairs (PEFT format; serve with --lora-modules NAME=OUT)")
    ft.add_argument("model", help="registry name, GGUF file, HF folder or jaxserve checkpoint")
    ft.add_argument("--data", required=True, help='JSONL: {"messages": [...]} (loss on assistant turns) or {"prompt": ..., "completion": ...} per line')
    ft.add_argument("--out", required=True, help="folder to save the adapter in")
    ft.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU/TPU)")
    ft.add_argument("--base-model-name", default=None, help="base_model_name_or_path in adapter_config.json (default: MODEL)")
    ft.add_argument("--config", default=None, help="YAML file of option defaults, e.g. rank: 16 (command-line flags take precedence)")
    ft_defaults = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        default = getattr(ft_defaults, f.name)
        kind = (lambda v: tuple(m.strip() for m in v.split(",") if m.strip())) if f.name == "target_modules" else type(default)
        shown = ",".join(default) if f.name == "target_modules" else default
        ft.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, help=f"(default: {shown})")
    ft.set_defaults(func=_cmd_finetune)
    return parser, {"generate": gen, "chat": chat, "serve": srv, "rollout": ro, "convert": conv, "train-draft": td, "finetune": ft, "models": models, "bench": bench}


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
    from jaxserve.config import EngineConfig, ParallelConfig
    from jaxserve.engine.llm import LLM
    from jaxserve.parallel.mesh import make_mesh

    if args.page_size < 1:
        raise UserError(f"--page-size must be >= 1, got {args.page_size}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    speculative = _speculative(args)  # before loading: a bad config fails at once
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=args.tensor_parallel_size))
    model = load_model(args.model, args.dtype, args.unroll_layers, args.quantization, args.tensor_parallel_size, args.quantization_group_size,
                       args.enable_expert_parallel)
    max_len = min(args.max_model_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    engine = EngineConfig(
        max_num_seqs=1,
        max_num_batched_tokens=2048,
        page_size=args.page_size,
        num_pages=-(-max_len // args.page_size) + 1,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=max_len,
        speculative=speculative,
    )
    llm = LLM(model, engine, mesh=mesh)
    if args.warmup:
        llm.warmup()
    return model, llm


def _token_ids(value: str) -> list[int]:
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise UserError(f"--prompt-token-ids takes comma-separated integer token ids (1,2,3), got {value!r}") from None
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxserve.engine.outputs import FAILED

    ids = None if args.prompt_token_ids is None else _token_ids(args.prompt_token_ids)
    if ids is not None and args.chat:
        raise UserError("--chat renders --prompt through the chat template; give --prompt, not --prompt-token-ids")
    sp = _sampling(args)
    if args.json:
        sp = dataclasses.replace(sp, logprobs=0)  # each generated token's own log-prob
    model, llm = _single_stream(args)
    tok = model.tokenizer
    if ids is not None:
        vocab = model.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"--prompt-token-ids: token id {bad} is out of the vocabulary: ids must be in [0, {vocab})")
        prompt_ids = ids
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = tok.encode_chat(messages)
    else:
        prompt_ids = tok.encode(args.prompt)
    token_ids: list[int] = []
    logprobs: list[float] = []
    text, finish, error = "", None, None
    for out in llm.stream(prompt_ids, sp):
        finish = out.finish_reason
        if out.token_id is not None:
            token_ids.append(out.token_id)
            logprobs.append(out.logprob)
        if finish in FAILED:  # the engine failed the request (say, a token the tokenizer cannot decode): out.text says why
            text, error = None, out.text
            break
        text += out.text
        if not args.json:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    result = {"text": text, "token_ids": token_ids, "prompt_token_ids": prompt_ids, "logprobs": logprobs, "finish_reason": finish}
    if error is not None:
        if not args.json:
            raise UserError(f"generation failed: {error}")
        result["error"] = error
    if llm.engine.speculator is not None:
        c = llm.engine.speculator.snapshot()
        result["speculative"] = {"drafts": c.num_drafts, "draft_tokens": c.num_draft_tokens, "accepted_tokens": c.num_accepted_tokens,
                                 "acceptance_rate": round(c.num_accepted_tokens / max(c.num_draft_tokens, 1), 4)}
        if not args.json:
            print(f"\nspeculative decoding: accepted {c.num_accepted_tokens} of {c.num_draft_tokens} drafted tokens "
                  f"({result['speculative']['acceptance_rate']:.0%}) over {c.num_drafts} drafts", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print()
    return 0 if error is None else 1


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


RESTART = "a group cannot go on without any of its processes; restart all of them"


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from jaxserve.checkpoint.loader import load_model
    from jaxserve.config import DistributedConfig, EngineConfig, ParallelConfig, ServerConfig
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.logs import setup_json_logging
    from jaxserve.parallel.distributed import PeerLostError, StepChannel, StepChannelError, check_mesh, connect, initialize, read_secret
    from jaxserve.parallel.mesh import make_mesh, replica_meshes
    from jaxserve.engine.async_engine import engine_replicas
    from jaxserve.server.app import Server, serve

    setup_json_logging()
    specs = _model_specs(args)  # before anything loads: a bad spec fails at once
    reasoning_parser(args.reasoning_parser)  # a bad name from --config or the environment too
    from jaxserve.server.adapters import LoraModule

    lora_modules = [LoraModule.from_flag(v) for v in args.lora_modules]
    lora = bool(lora_modules) or args.enable_lora or args.max_loras is not None
    if args.num_processes > 1 and (len(specs) > 1 or specs[0].lazy):
        raise UserError("a multi-process group serves one model: give one --model (several models need one process, or a group each)")
    secret = read_secret(args.cluster_secret_file, args.process_id) if args.num_processes > 1 else None
    dist = DistributedConfig(args.coordinator_address, args.num_processes, args.process_id, args.distributed_timeout, secret=secret)
    if dist.num_processes > 1 and args.data_parallel_size > 1:
        raise UserError("data parallelism across processes is not supported: run one process group per replica behind a load balancer")
    channel = peer = None  # the step channel, opened first: a process that never comes is a clear error here
    if dist.num_processes > 1:
        channel, peer = (StepChannel(dist), None) if dist.process_id == 0 else (None, connect(dist))
    initialize(dist)  # before anything touches a device
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        api_keys_file=args.api_keys_file,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        cost_per_hour=args.cost_per_hour,
        served_model_name=args.served_model_name,
        max_waiting=args.max_waiting,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
        max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin),
        warmup=args.warmup,
        default_sampling=tuple((k, getattr(args, k)) for k in SAMPLING_OPTIONS if hasattr(args, k)),
        admin_api_key=args.admin_api_key,
        enable_lora=lora,
        root_path=args.root_path.rstrip("/"),
        ui=args.ui,
    )
    if server_config.api_keys_file:  # a bad keys file or a missing tracing SDK fails before the model loads
        from jaxserve.server.tenants import load_keys

        load_keys(server_config.api_keys_file)
    if server_config.otlp_traces_endpoint:
        from jaxserve.server.tracing import span_exporter

        span_exporter()
    import jax

    budget = args.max_num_batched_tokens or (256 if jax.default_backend() == "cpu" else 2048)
    engine_config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=budget,
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        speculative=_speculative(args),
        swap_space=args.swap_space,
        preemption_mode=args.preemption_mode,
        host_prefix_cache=args.host_prefix_cache,
        prefix_cache_dir=args.prefix_cache_dir,
        scheduling_policy=args.scheduling_policy,
        max_loras=(4 if args.max_loras is None else args.max_loras) if lora else 0,
        max_lora_rank=args.max_lora_rank,
    )
    if lora and not engine_config.max_loras:
        raise UserError("--max-loras must be >= 1 with LoRA on")
    if dist.num_processes == 1:
        return _serve_models(args, specs, engine_config, server_config, lora_modules)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size))
    check_mesh(mesh, dist)
    model = load_model(specs[0].source, args.dtype, args.unroll_layers, args.quantization, args.tensor_parallel_size, args.quantization_group_size,
                       args.enable_expert_parallel)
    if dist.process_id > 0:  # a follower: the same runner as process 0's, driven by its calls
        try:
            LLMEngine(model.cfg, model.params, engine_config, model.tokenizer, mesh=mesh).follow(peer)
        except (PeerLostError, StepChannelError) as e:
            raise UserError(f"process {dist.process_id}: {e}; exiting: {RESTART}") from None
        return 0
    server = Server(engine_replicas(model, engine_config, replica_meshes(mesh), channel=channel), server_config, args.reasoning_parser)
    status = 1
    try:
        status = asyncio.run(serve(server))
    finally:
        if channel is not None:  # followers stop cleanly only after a clean stop
            channel.close(stop_followers=status == 0)
    if status and channel is not None and server.engine_error is not None:
        raise UserError(f"process 0: the group stopped after an error ({str(server.engine_error).splitlines()[0]}); exiting: {RESTART}")
    return status


def _model_specs(args: argparse.Namespace) -> list:
    """The models `serve` serves: each --model (NAME=SOURCE, or one plain SOURCE named after its model),
    then the YAML `models:` list; the default model when neither gives one."""
    from jaxserve.server.model_spec import ModelSpec

    flags = args.model if isinstance(args.model, list) else [args.model] if args.model else []
    entries = args.models or []
    if not isinstance(entries, list):
        raise UserError(f"config file {args.config}: 'models' must be a list of models, each a mapping with 'name' and 'model'")
    specs = [ModelSpec.from_flag(v) for v in flags]
    specs += [ModelSpec.from_mapping(e, f"config file {args.config}, models[{i}]") for i, e in enumerate(entries)]
    if sum(not s.name for s in specs) > 1:
        raise UserError("name every model but one: --model NAME=SOURCE")
    return specs or [ModelSpec("", DEFAULT_MODEL)]


def _serve_models(args: argparse.Namespace, specs: list, engine_config, server_config, lora_modules: list) -> int:
    """Serve every model in one process: those not lazy load now (a bad one fails before the server
    listens, as does a bad LoRA adapter), lazy ones on their first request."""
    import asyncio

    from jaxserve.server.app import Server, serve
    from jaxserve.server.engine_factory import EngineFactory
    from jaxserve.server.router import ModelRouter

    eager = [s for s in specs if not s.lazy]
    if args.max_loaded_models is not None and (args.max_loaded_models < 1 or len(eager) > args.max_loaded_models):
        raise UserError(f"--max-loaded-models {args.max_loaded_models} is fewer than the {len(eager)} models that are not lazy (or < 1)")
    factory = EngineFactory(engine_config, args.dtype, args.quantization, args.quantization_group_size, args.unroll_layers,
                            args.tensor_parallel_size, args.data_parallel_size, args.enable_expert_parallel)
    router = ModelRouter(factory.build, args.max_loaded_models, server_config.warmup)
    for spec in specs:
        engines = [] if spec.lazy else factory.build(spec)
        if not spec.name:
            spec = dataclasses.replace(spec, name=server_config.served_model_name or engines[0].info.name)
        router.add(spec, engines)
    server = Server(router, server_config, args.reasoning_parser)
    for module in lora_modules:
        server.adapters.add(module, server.adapters.read(module))
    return asyncio.run(serve(server))


def _cmd_rollout(args: argparse.Namespace) -> int:
    from jaxserve.rollout import AdminClient, RolloutPlan, run_rollout

    if not args.admin_key:
        raise UserError("give the server's admin key: --admin-key or env JAXSERVE_ADMIN_API_KEY")
    try:
        stages = tuple(float(s) for s in args.stages.split(","))
    except ValueError:
        raise UserError(f"--stages must be comma-separated percents, got {args.stages!r}") from None
    plan = RolloutPlan(args.name, args.to, stages, args.interval, args.max_error_rate_increase, args.max_p99_ratio, args.min_requests, args.latency)
    report = run_rollout(plan, AdminClient(args.url, args.admin_key), say=lambda event: print(json.dumps(event), file=sys.stderr, flush=True))
    print(json.dumps(report))
    return 0 if report["outcome"] == "promoted" else 1


def _env_defaults(parser: argparse.ArgumentParser) -> dict:
    """Option values from JAXSERVE_<OPTION> environment variables (lists comma-separated)."""
    values = {}
    for action in parser._actions:
        raw = os.environ.get(f"JAXSERVE_{action.dest.upper()}")
        if raw is None or action.dest in ("help", "func"):
            continue
        if isinstance(action, argparse._AppendAction):
            values[action.dest] = [v for v in raw.split(",") if v]
        elif isinstance(action, argparse.BooleanOptionalAction):
            values[action.dest] = raw.lower() in ("1", "true", "yes", "on")
        else:
            try:
                values[action.dest] = action.type(raw) if action.type else raw
            except ValueError:
                raise UserError(f"environment variable JAXSERVE_{action.dest.upper()}={raw!r} is not a valid {action.dest}") from None
    return values


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxserve.checkpoint import store
    from jaxserve.checkpoint.loader import convert
    from jaxserve.checkpoint.native import MARKER, folder_bytes

    if (args.dst is None) == (args.name is None):
        raise UserError("give an output folder DST or --name NAME (a version in the model store), exactly one of them")
    if args.name is None and (args.version is not None or args.force):
        raise UserError("--version and --force apply to --name")
    if args.name is not None:
        ref = store.convert(args.src, args.name, args.version, args.force, args.quantization, args.quantization_group_size)
        meta = store.read_metadata(ref)
        print(f"stored {ref.spec} at {ref.path} ({meta.architecture}, {meta.quantization or meta.dtype} weights, "
              f"{meta.size_bytes / 2**20:.1f} MiB; current: {store.current_version(ref.name)})", file=sys.stderr)
        return 0
    cfg = convert(args.src, Path(args.dst), args.quantization, args.quantization_group_size)
    size = folder_bytes(Path(args.dst))
    weights = json.loads((Path(args.dst) / MARKER).read_text())["weights"]
    print(f"wrote {args.dst} ({cfg.architecture}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, {weights} weights, {size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from jaxserve.checkpoint import store

    rows = [("NAME", "VERSIONS", "CURRENT", "ARCHITECTURE", "QUANTIZATION", "SIZE", "CREATED")]
    for s in store.summaries():
        m = s.metadata
        rows.append((s.name, ",".join(s.versions), s.current or "-", m.architecture if m else "?",
                     (m.quantization or "-") if m else "?", f"{m.size_bytes / 2**20:.1f} MiB" if m else "?", m.created_at if m else "?"))
    if len(rows) == 1:
        print(f"no models stored in {store.models_dir()}", file=sys.stderr)
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_models_show(args: argparse.Namespace) -> int:
    from jaxserve.checkpoint import store

    ref = store.get(args.model)
    meta = store.read_raw_metadata(ref)
    print(json.dumps({**meta, "path": str(ref.path), "current": store.current_version(ref.name) == ref.version}, indent=1))
    return 0


def _exact_version(spec: str) -> tuple[str, str]:
    from jaxserve.checkpoint import store

    parsed = store.parse_spec(spec)
    if parsed is None or parsed[1] is None:
        raise UserError(f"give the version as NAME@VERSION, got {spec!r}")
    return parsed[0], parsed[1]


def _cmd_models_rm(args: argparse.Namespace) -> int:
    from jaxserve.checkpoint import store

    name, version = _exact_version(args.model)
    store.remove(name, version)
    left = store.versions(name)
    print(f"removed {name}@{version}" + (f"; versions left: {', '.join(left)}" if left else f"; {name} has no versions left"), file=sys.stderr)
    return 0


def _cmd_models_current(args: argparse.Namespace) -> int:
    from jaxserve.checkpoint import store

    name, version = _exact_version(args.model)
    store.set_current(name, version)
    print(f"{name} now resolves to {name}@{version}", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from jaxserve.checkpoint import store
    from jaxserve.checkpoint.loader import load_model, locate
    from jaxserve.engine.bench import bench, report

    _, stored = locate(args.model)
    model = load_model(stored.spec if stored else args.model, args.dtype, args.unroll_layers)
    result = report(bench(model, args.num_prompts, args.max_tokens))
    if stored is not None:
        store.record_bench(stored, result)
    print(json.dumps({"model": stored.spec if stored else args.model, **result}, indent=1))
    return 0


def _cmd_train_draft(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxserve.checkpoint.loader import load_model
    from jaxserve.training.draft_trainer import train_draft

    names = {f.name for f in dataclasses.fields(TrainDraftConfig)}
    cfg = TrainDraftConfig(**{k: (Path(v) if k == "prompts" and v else v) for k, v in vars(args).items() if k in names})
    model = load_model(args.model, args.dtype, unroll_layers=False)  # stacked: the generation pass's step shapes compile ~9x faster
    report = train_draft(model, Path(args.out), cfg)
    held = report["held_out"]
    print(f"wrote {args.out}: {cfg.num_heads} heads in {report['seconds']['total']:.0f} s; final loss {report['final_loss']}; held-out "
          f"mean accepted length {held['mean_accepted_length']} of {cfg.num_heads} (head top-1 {held['head_top1']}, chance {held['chance_top1']})",
          file=sys.stderr)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxserve.checkpoint.loader import load_model
    from jaxserve.training.lora_trainer import finetune

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if isinstance(values["target_modules"], (str, list)):  # from a --config YAML: "q_proj,v_proj" or a list
        modules = values["target_modules"].split(",") if isinstance(values["target_modules"], str) else values["target_modules"]
        values["target_modules"] = tuple(str(m).strip() for m in modules if str(m).strip())
    cfg = FinetuneConfig(**values)
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file")
    model = load_model(args.model, args.dtype, unroll_layers=False)  # stacked layers under scan: the step compiles fast
    report = finetune(model, Path(args.data), Path(args.out), cfg, args.base_model_name).report
    held = "" if report["held_out_loss"] is None else f", held-out loss {report['held_out_loss_before']} -> {report['held_out_loss']}"
    print(f"wrote {args.out}: rank-{cfg.rank} LoRA adapter ({report['trainable_params']:,} parameters), {report['optimizer_steps']} steps in "
          f"{report['seconds']['total']:.0f} s; train loss {report['final_train_loss']}{held}", file=sys.stderr)
    return 0


BENCHMARKS = ("serve", "generate", "throughput", "model", "-h", "--help")


def _bench_shorthand(argv: list[str]) -> list[str]:
    """`jaxserve bench [NAME] [flags]`, as before `bench` had sub-commands, is `jaxserve bench model ...`."""
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in BENCHMARKS):
        return ["bench", "model", *argv[1:]]
    return argv


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags. Precedence, highest first: flags, JAXSERVE_* environment variables (for `serve`),
    the --config YAML file, built-in defaults."""
    parser, commands = build_parser()
    argv = _bench_shorthand(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    command = commands[args.command]
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        known = set(vars(args)) - {"command", "func", "config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config file {args.config} has unknown options for '{args.command}': {', '.join(unknown)}")
        command.set_defaults(**values)
    if args.command == "serve":
        command.set_defaults(**_env_defaults(command))
    return parser.parse_args(argv)


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
