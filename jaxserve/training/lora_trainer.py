"""`jaxserve finetune`: LoRA adapters for a model, trained with optax on chats or prompt/completion pairs.

The base weights stay frozen; for every target matrix W [in, out] of every layer, A [L, in, r] and
B [L, r, out] train, and the model computes x @ W + (alpha / r) * x @ A @ B (PEFT's LoRA: A starts
kaiming-uniform as torch's Linear does, B at zero, so training starts from the base model). The
forward pass is the serving model's (`llama.forward` without a cache: dense causal attention in
each row, adapters added through the same slot tables the server uses, one slot here), so what
trains is exactly what serves.

Batches are `batch_size` rows padded to one of a few lengths (`BUCKETS`, up to max_seq_len), so the
jitted step compiles once per length used. The loss is the mean cross-entropy over the masked
tokens of all the micro-batches of an optimizer step (token-weighted, so accumulation equals one
big batch). optax AdamW with linear warm-up, then cosine decay to zero; gradient-norm clipping. Each
epoch ends with the held-out loss. The adapter is saved in PEFT's format (`checkpoint.peft`), with
`training_report.json` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxserve.checkpoint.loader import LoadedModel
from jaxserve.checkpoint.peft import save_peft
from jaxserve.config import FinetuneConfig, ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import ForwardBatch, Params, compute_logits, forward
from jaxserve.models.lora import PEFT_NAMES, TARGETS, target_dims
from jaxserve.training.chat_data import Example, read_examples

REPORT_FILE = "training_report.json"
Trainable = dict[str, dict[str, jnp.ndarray]]  # target (our name) -> {"a": [L, in, r], "b": [L, r, out]}, float32, B unscaled


def bucket_lengths(max_seq_len: int) -> list[int]:
    """Row lengths batches are padded to: 32, 48, 64, 96, 128, 192, ... (powers of two and 1.5x
    them, so padding wastes at most a third), capped by and ending at max_seq_len."""
    out, n = [], 32
    while n < max_seq_len:
        out += [n] + ([n * 3 // 2] if n * 3 // 2 < max_seq_len else [])
        n *= 2
    return out + [max_seq_len]


def init_lora(cfg: ModelConfig, targets: list[str], rank: int, key: jax.Array) -> Trainable:
    """PEFT's initialization: A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch Linear's kaiming-uniform with
    a = sqrt(5)), B = 0."""
    dims, out = target_dims(cfg), {}
    for name, k in zip(targets, jax.random.split(key, len(targets))):
        n_in, n_out = dims[name]
        bound = 1 / math.sqrt(n_in)
        out[name] = {"a": jax.random.uniform(k, (cfg.num_layers, n_in, rank), jnp.float32, -bound, bound),
                     "b": jnp.zeros((cfg.num_layers, rank, n_out), jnp.float32)}
    return out


def lora_tables(trainable: Trainable, cfg: ModelConfig, rank: int, scale: float) -> dict[str, dict[str, jnp.ndarray]]:
    """The forward's one-slot stacked tables {target: {"a": [L, in, 1, r], "b": [L, 1, r, out]}}, B
    scaled by alpha / r; zeros for targets that do not train."""
    tables = {}
    for name, (n_in, n_out) in target_dims(cfg).items():
        if name in trainable:
            tables[name] = {"a": trainable[name]["a"][:, :, None, :], "b": (trainable[name]["b"] * scale)[:, None]}
        else:
            tables[name] = {"a": jnp.zeros((cfg.num_layers, n_in, 1, rank), jnp.float32), "b": jnp.zeros((cfg.num_layers, 1, rank, n_out), jnp.float32)}
    return tables


def loss_sums(trainable: Trainable, params: Params, batch: dict[str, jnp.ndarray], key: jax.Array | None, cfg: ModelConfig,
              rank: int, scale: float, dropout: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed cross-entropy over the masked tokens of batch {tokens [B, T], mask [B, T], lens [B]}, and how many there are."""
    tokens, mask, lens = batch["tokens"], batch["mask"], batch["lens"]
    rows, length = tokens.shape
    fb = ForwardBatch(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
                      page_table=jnp.zeros((rows, 1), jnp.int32), kv_lens=lens, adapter=jnp.zeros((rows,), jnp.int32))
    drop = (key, dropout) if key is not None and dropout > 0 else None
    (hidden,), _ = forward(params, None, [fb], cfg, lora=lora_tables(trainable, cfg, rank, scale), lora_dropout=drop)  # [B, T, D]
    logits = compute_logits(params, hidden[:, :-1], cfg)  # [B, T-1, V] float32: position t predicts token t + 1
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # [B, T-1]
    weight = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


def make_batch(examples: list[Example], rows: int, buckets: list[int]) -> dict[str, np.ndarray]:
    """`examples` in `rows` rows (empty rows after them) padded to the first bucket that fits the longest."""
    length = next(b for b in buckets if b >= max(len(e.tokens) for e in examples))
    tokens, mask, lens = np.zeros((rows, length), np.int32), np.zeros((rows, length), bool), np.zeros(rows, np.int32)
    for r, e in enumerate(examples):
        tokens[r, : len(e.tokens)], mask[r, : len(e.tokens)], lens[r] = e.tokens, e.mask, len(e.tokens)
    return {"tokens": tokens, "mask": mask, "lens": lens}


def split_examples(examples: list[Example], held_out: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random `held_out` fraction (at least one example when above 0) held out."""
    if held_out == 0:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    count = max(1, round(held_out * len(examples)))
    if count >= len(examples):
        raise UserError(f"--held-out {held_out} of {len(examples)} examples leaves none to train on")
    held = set(order[:count].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


@dataclass(frozen=True)
class Finetuned:
    report: dict[str, Any]  # as saved in REPORT_FILE
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # per target (our names): A [L, in, r], B [L, r, out], unscaled, as saved


def finetune(model: LoadedModel, data: Path, out: Path, cfg: FinetuneConfig, base_model: str | None = None) -> Finetuned:
    """Train an adapter on `data` (`chat_data`) and save it to `out` in PEFT's format with its report.
    `base_model`: what the adapter config names as its base (default: the model's name)."""
    started = time.perf_counter()
    if not isinstance(model.params["layers"], dict):
        raise UserError("fine-tuning needs the model's layers stacked (load_model(..., unroll_layers=False))")
    examples = read_examples(data, model.tokenizer, cfg.max_seq_len)
    train, held = split_examples(examples, cfg.held_out, cfg.seed)
    mcfg, buckets = model.cfg, bucket_lengths(cfg.max_seq_len)
    targets = [PEFT_NAMES[m] for m in cfg.target_modules]
    targets = [t for t in TARGETS if t in targets]
    unreachable = [m for m in cfg.target_modules if PEFT_NAMES[m] not in target_dims(mcfg)]
    if unreachable:
        raise UserError(f"--target-modules {','.join(unreachable)}: a mixture of experts' MLP is its experts, which adapters "
                        "here do not reach; use q_proj,k_proj,v_proj,o_proj")
    rank, scale, rows = cfg.rank, cfg.alpha / cfg.rank, cfg.batch_size

    micro_per_epoch = -(-len(train) // rows)
    steps_per_epoch = -(-micro_per_epoch // cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps or int(cfg.warmup_ratio * total), total)  # more warm-up than steps: warm-up only
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total + 1, end_value=0.0)
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    # lr(n + 1): the first update already moves (warm-up from lr / (warmup + 1)), the last does not stop at 0
    optimizer = optax.chain(*clip, optax.adamw(lambda n: schedule(n + 1), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay))

    key = jax.random.PRNGKey(cfg.seed)
    trainable = init_lora(mcfg, targets, rank, jax.random.fold_in(key, 0))
    opt_state = optimizer.init(trainable)
    dropout_key = jax.random.fold_in(key, 1)
    params = model.params

    def sums(trainable, params, batch, key):
        return loss_sums(trainable, params, batch, key, mcfg, rank, scale, cfg.dropout)

    @jax.jit
    def accumulate(trainable, params, batch, key, acc):
        """acc + (loss sum, token count, gradient of the loss sum) of one micro-batch."""
        (loss, count), grads = jax.value_and_grad(sums, has_aux=True)(trainable, params, batch, key)
        return jax.tree.map(jnp.add, acc, (loss, count, grads))

    @jax.jit
    def update(trainable, opt_state, acc):
        """One optimizer step on the token-mean gradient; the step's mean loss."""
        loss, count, grads = acc
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss / jnp.maximum(count, 1.0)

    evaluate = jax.jit(lambda trainable, params, batch: sums(trainable, params, batch, None))
    zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, trainable))

    ordered = sorted(held, key=lambda e: len(e.tokens))  # similar lengths together: less padding
    held_batches = [make_batch(ordered[start : start + rows], rows, buckets) for start in range(0, len(ordered), rows)]  # built once

    def held_out_loss(trainable) -> float | None:
        if not held_batches:
            return None
        loss = count = 0.0
        for batch in held_batches:
            s, c = evaluate(trainable, params, batch)
            loss, count = loss + float(s), count + float(c)
        return loss / max(count, 1.0)

    rng = np.random.default_rng(cfg.seed)
    history, step, losses, micro = [], 0, [], 0
    initial_held_out = held_out_loss(trainable)
    if initial_held_out is not None:
        tqdm.write(f"held-out loss before training: {initial_held_out:.4f}")
    prepared = time.perf_counter()
    with tqdm(total=total, desc="fine-tuning", unit="step") as bar:
        for epoch in range(1, cfg.epochs + 1):
            order = rng.permutation(len(train))
            batches = [[train[i] for i in order[s : s + rows]] for s in range(0, len(order), rows)]
            epoch_loss = epoch_count = 0.0
            for first in range(0, len(batches), cfg.grad_accum):
                acc = zero
                for group in batches[first : first + cfg.grad_accum]:
                    acc = accumulate(trainable, params, make_batch(group, rows, buckets), jax.random.fold_in(dropout_key, micro), acc)
                    micro += 1
                epoch_loss, epoch_count = epoch_loss + float(acc[0]), epoch_count + float(acc[1])
                trainable, opt_state, loss = update(trainable, opt_state, acc)
                step += 1
                losses.append(float(loss))
                bar.update()
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{float(schedule(step)):.2e}")
            record = {"epoch": epoch, "step": step, "train_loss": round(epoch_loss / max(epoch_count, 1.0), 4),
                      "held_out_loss": None if not held else round(held_out_loss(trainable), 4)}
            history.append(record)
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}"
                       + ("" if record["held_out_loss"] is None else f", held-out loss {record['held_out_loss']:.4f}"))
    trained = time.perf_counter()

    weights = {name: (np.asarray(t["a"]), np.asarray(t["b"])) for name, t in trainable.items()}
    save_peft(out, weights, rank, cfg.alpha, cfg.dropout, base_model or model.name)
    report = {
        "model": model.name,
        "data": str(data),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "examples": {"train": len(train), "held_out": len(held), "train_tokens": int(sum(len(e.tokens) for e in train)),
                     "train_loss_tokens": int(sum(e.mask[1:].sum() for e in train))},
        "optimizer_steps": step, "warmup_steps": warmup, "trainable_params": int(sum(a.size + b.size for a, b in weights.values())),
        "held_out_loss_before": None if initial_held_out is None else round(initial_held_out, 4),
        "epochs": history,
        "final_train_loss": round(float(np.mean(losses[-max(1, steps_per_epoch // 4):])), 4),
        "held_out_loss": history[-1]["held_out_loss"],
        "step_losses": [round(x, 4) for x in losses],
        "seconds": {"prepare": round(prepared - started, 1), "train": round(trained - prepared, 1), "total": round(time.perf_counter() - started, 1)},
    }
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return Finetuned(report, weights)

