"""`jaxserve finetune`: the loss is on exactly the assistant (or completion) tokens, a bad data line is one
error naming its line, the saved adapter is PEFT's format and reads back to the trained product, training
is deterministic given the seed, and a fine-tuned tiny model learns a skill its base model lacks."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxserve.checkpoint.loader import load_model
from jaxserve.checkpoint.peft import CONFIG_FILE, WEIGHTS_FILE, read_peft
from jaxserve.cli import main
from jaxserve.config import FinetuneConfig
from jaxserve.engine.llm import LLM
from jaxserve.models.llama import ForwardBatch, compute_logits, forward
from jaxserve.models.lora import slot_values
from jaxserve.sampling_params import SamplingParams
from jaxserve.training.chat_data import encode_chat, encode_example, parse_line
from jaxserve.training.lora_trainer import REPORT_FILE, bucket_lengths, finetune, lora_tables
from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params, write_gguf

ANSWER = '{"code": 42}'
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket", "silver", "garden", "maple",
         "ocean", "violet", "copper"]
TRAIN = FinetuneConfig(rank=4, alpha=8.0, dropout=0.05, epochs=6, learning_rate=1e-2, batch_size=8, held_out=0.125, max_seq_len=96, seed=3)


def _question(rng: random.Random) -> str:
    return f"What is the code for {rng.choice(WORDS)} {rng.choice(WORDS)}?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("finetune")
    cfg = tiny_config("llama", max_position_embeddings=512)
    path = write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg))
    return load_model(str(path), unroll_layers=False), path, folder


@pytest.fixture(scope="module")
def trained(tiny) -> tuple:
    """An adapter trained on 64 chats that answer every question with ANSWER."""
    model, _, folder = tiny
    rng = random.Random(0)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": _question(rng)}, {"role": "assistant", "content": ANSWER}]}) + "\n"
                            for _ in range(64)))
    return data, folder / "adapter", finetune(model, data, folder / "adapter", TRAIN)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_loss_mask_covers_exactly_the_assistant_turns_and_their_end_tokens(tiny) -> None:
    tok = tiny[0].tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "the end"}, {"role": "assistant", "content": "Bye <|im_end|> now"}]
    tokens, mask = encode_chat(messages, tok)
    assert tokens == tok.encode_chat(messages, add_generation_prompt=False)
    spans = _spans(mask)
    assert [tok.decode(tokens[s:e], skip_special_tokens=False) for s, e in spans] == ["Hello!<|im_end|>", "Bye <|im_end|> now<|im_end|>"]
    for s, _ in spans:  # each turn starts right after the generation prompt
        assert tok.decode(tokens[:s], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.decode(tokens[spans[-1][1]:], skip_special_tokens=False) == "\n"  # what the template adds after the end token is not learned


def test_prompt_completion_mask_is_the_completion_and_eos(tiny) -> None:
    tok = tiny[0].tokenizer
    tokens, mask = encode_example(parse_line(json.dumps({"prompt": "the capital", "completion": " is Paris"})), tok)
    assert tokens == tok.encode("the capital") + tok.encode(" is Paris", add_special_tokens=False) + [tok.eos_token_ids[0]]
    (s, e), = _spans(mask)
    assert tok.decode(tokens[s:e], skip_special_tokens=False) == " is Paris<|im_end|>" and e == len(tokens)


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('["messages"]', "must be a JSON object"),
    ('{"text": "hello"}', 'needs "messages"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', 'string "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"prompt": "hi", "completion": null}', "must both be strings"),
    ('{"prompt": "' + "x" * 200 + '", "completion": "y"}', "over --max-seq-len 96"),
])
def test_a_malformed_line_is_one_error_naming_its_line(tiny, capsys, line: str, reason: str) -> None:
    _, path, folder = tiny
    data = folder / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    data.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    code = main(["finetune", str(path), "--data", str(data), "--out", str(folder / "never"), "--max-seq-len", "96"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data} line 4: " in err and reason in err, err
    assert not (folder / "never").exists()


def test_bad_options_are_one_line_errors(tiny, capsys) -> None:
    _, path, folder = tiny
    for flags, words in ((["--target-modules", "q_proj,lm_head"], "--target-modules"), (["--rank", "0"], "--rank"),
                         (["--dropout", "1.5"], "--dropout")):
        code = main(["finetune", str(path), "--data", str(folder / "missing.jsonl"), "--out", str(folder / "never"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, err
    assert main(["finetune", str(path), "--data", str(folder / "missing.jsonl"), "--out", str(folder / "never")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_buckets_are_few_and_end_at_the_limit() -> None:
    assert bucket_lengths(96) == [32, 48, 64, 96]
    assert bucket_lengths(1024) == [32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert bucket_lengths(100) == [32, 48, 64, 96, 100]


def test_saved_adapter_is_peft_format_and_reads_back_to_the_trained_product(tiny, trained) -> None:
    model, _, _ = tiny
    _, out, result = trained
    L, scale = model.cfg.num_layers, TRAIN.alpha / TRAIN.rank
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == TRAIN.rank and config["lora_alpha"] == TRAIN.alpha
    assert sorted(config["target_modules"]) == sorted(TRAIN.target_modules) and config["lora_dropout"] == TRAIN.dropout
    tensors = load_file(str(out / WEIGHTS_FILE))
    assert len(tensors) == 2 * 7 * L
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (TRAIN.rank, model.cfg.hidden_size)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (model.cfg.hidden_size, TRAIN.rank)

    adapter = read_peft(out, "skill", L)
    assert adapter.rank == TRAIN.rank and set(adapter.weights) == set(result.weights)
    for name, (a, b) in result.weights.items():
        assert np.abs(b).max() > 0  # trained away from PEFT's zero init
        ra, rb = adapter.weights[name]
        np.testing.assert_array_equal(ra, a)
        np.testing.assert_allclose(ra @ rb, a @ (b * scale), rtol=1e-5, atol=1e-7)

    # the server's slot tables from the saved folder give the model the trainer's logits
    trained_tables = lora_tables({k: {"a": jnp.asarray(a), "b": jnp.asarray(b)} for k, (a, b) in result.weights.items()}, model.cfg, TRAIN.rank, scale)
    batch = _batch([model.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in ("What is the code for tiger maple?", "hello")])
    np.testing.assert_allclose(_logits(model.params, _tables(out, model.cfg), batch, model.cfg),
                               _logits(model.params, trained_tables, batch, model.cfg), rtol=1e-4, atol=1e-4)


def test_training_reports_losses_and_is_deterministic_through_the_cli(tiny, trained, capsys) -> None:
    _, path, folder = tiny
    data, out, result = trained
    report = json.loads((out / REPORT_FILE).read_text())
    assert report == result.report
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, TRAIN.epochs + 1))
    assert report["examples"] == {"train": 56, "held_out": 8, "train_tokens": report["examples"]["train_tokens"], "train_loss_tokens": 56 * (len(ANSWER) + 1)}
    assert report["epochs"][-1]["held_out_loss"] < 0.2 * report["held_out_loss_before"] and report["optimizer_steps"] == 7 * TRAIN.epochs
    flags = [f"--{f.name.replace('_', '-')}={','.join(v) if isinstance(v, tuple) else v}" for f in dataclasses.fields(TRAIN) for v in [getattr(TRAIN, f.name)]]
    assert main(["finetune", str(path), "--data", str(data), "--out", str(folder / "again"), *flags]) == 0
    assert "wrote" in capsys.readouterr().err
    first, second = load_file(str(out / WEIGHTS_FILE)), load_file(str(folder / "again" / WEIGHTS_FILE))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


ROWS, LENGTH = 10, 64  # the one shape the tests run `forward` at outside training


def _batch(prompts: list[list[int]]) -> ForwardBatch:
    """The prompts in ROWS rows of LENGTH tokens (empty rows after them)."""
    tokens, lens = np.zeros((ROWS, LENGTH), np.int32), np.zeros(ROWS, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)], lens[r] = p, len(p)
    return ForwardBatch(tokens, np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)), np.zeros((ROWS, 1), np.int32), lens, np.zeros(ROWS, np.int32))


def _tables(adapter_dir: Path | None, cfg, rank: int = TRAIN.rank) -> dict:
    """One-slot tables of a saved adapter, as the server builds them (all zero for None: the base model)."""
    adapter = None if adapter_dir is None else read_peft(adapter_dir, "a", cfg.num_layers)
    return {k: {"a": v["a"][:, :, None], "b": v["b"][:, None]} for k, v in slot_values(adapter, cfg, rank, np.float32).items()}


@functools.partial(jax.jit, static_argnums=(3,))
def _logits(params, tables, batch, cfg):
    (hidden,), _ = forward(params, None, [batch], cfg, lora=tables)
    return compute_logits(params, hidden, cfg)  # [ROWS, LENGTH, V]


def greedy(model, prompts: list[list[int]], adapter_dir: Path | None, max_new: int) -> list[list[int]]:
    """Greedy continuations (through EOS) by re-running the whole sequences through `forward` without a
    cache, with a saved adapter's slot tables or without."""
    tables, rows, done = _tables(adapter_dir, model.cfg), [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(max_new):
        logits = np.asarray(_logits(model.params, tables, _batch(rows), model.cfg))
        for r, row in enumerate(rows):
            if not done[r]:
                row.append(int(np.argmax(logits[r, len(row) - 1])))
                done[r] = row[-1] in model.tokenizer.eos_token_ids
    return [row[len(p):] for row, p in zip(rows, prompts)]


def test_the_adapter_teaches_a_skill_the_base_model_lacks(tiny, trained) -> None:
    """Held-out questions (new word pairs) get ANSWER greedily with the adapter, and never from the base model."""
    model, _, _ = tiny
    _, out, _ = trained
    rng = random.Random(99)
    questions = [f"What is the code for {rng.choice(WORDS)} {w}?" for w in ("sun", "moon", "bread", "chair", "glass", "mouse", "storm", "pearl", "honey", "flute")]
    prompts = [model.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    expected = model.tokenizer.encode(ANSWER, add_special_tokens=False) + [model.tokenizer.eos_token_ids[0]]
    tuned = greedy(model, prompts, out, len(expected) + 2)
    base = greedy(model, prompts, None, len(expected) + 2)
    assert sum(t == expected for t in tuned) >= 0.8 * len(prompts), [model.tokenizer.decode(t, False) for t in tuned]
    assert not any(b[: len(expected)] == expected for b in base)

    # the serving engine, with the adapter in a LoRA slot, says the same (its token_ids leave out the EOS)
    llm = LLM(model, dataclasses.replace(TINY_ENGINE, max_loras=1, max_lora_rank=8))
    llm.load_adapter("skill", str(out))
    sp = SamplingParams(max_tokens=len(expected) + 2, temperature=0.0)
    served = [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in llm.generate(prompts, sp, use_tqdm=False, adapter="skill")]
    assert sum(s == (expected[:-1], "stop") for s in served) >= 0.8 * len(prompts), served
    assert not any(list(o.outputs[0].token_ids)[: len(expected) - 1] == expected[:-1] for o in llm.generate(prompts, sp, use_tqdm=False))


def test_gradient_accumulation_equals_one_larger_batch(tiny, trained) -> None:
    """Two micro-batches of 4 per step give the weights of one batch of 8 (the loss is the token mean over both);
    12 examples, so the last step has one micro-batch of 4, or a batch of 8 with 4 empty rows."""
    model, _, folder = tiny
    data, _, _ = trained
    small = folder / "small.jsonl"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:12]))
    one = dataclasses.replace(TRAIN, epochs=1, held_out=0.0, dropout=0.0, batch_size=8, grad_accum=1)
    runs = [finetune(model, small, folder / f"accum{k}", dataclasses.replace(one, batch_size=8 // k, grad_accum=k)) for k in (1, 2)]
    assert runs[0].report["optimizer_steps"] == runs[1].report["optimizer_steps"] == 2
    for name, (a, b) in runs[0].weights.items():
        np.testing.assert_allclose(runs[1].weights[name][0], a, atol=2e-6)
        np.testing.assert_allclose(runs[1].weights[name][1], b, atol=2e-6)
