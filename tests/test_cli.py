"""The `jaxserve` command line: generation output, conversion, chat, and one clear error line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxserve.cli import main
from tests.cli_run import run_cli as _run
from tests.tiny_models import tiny_config, tiny_params, write_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    cfg = tiny_config("llama", tie_word_embeddings=True)
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", cfg, tiny_params(cfg))


def test_help_lists_every_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "chat", "convert"):
        assert command in proc.stdout


def test_generate_json_through_console_entry(tiny_gguf: Path) -> None:
    cmd = [sys.executable, "-m", "jaxserve", "generate", "--model", str(tiny_gguf), "--prompt", "the theme",
           "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert set(result) == {"text", "token_ids", "prompt_token_ids", "logprobs", "finish_reason"}
    assert result["prompt_token_ids"] == [119, 260, 261, 112, 104]
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"
    assert len(result["logprobs"]) == 6 and all(lp <= 0 for lp in result["logprobs"])


def test_generate_from_prompt_token_ids(capsys, tiny_gguf: Path) -> None:
    """Token ids drive generation as the text they encode does; each generated token's log-prob is the
    model's (greedy: the first is the log-softmax maximum after the prompt)."""
    from tests.tiny_models import prefill_logits

    args = ["--model", str(tiny_gguf), "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--json"]
    code, out, _ = _run(capsys, "generate", "--prompt-token-ids", "119,260,261,112,104", *args)
    by_ids = json.loads(out)
    assert code == 0 and by_ids == json.loads(_run(capsys, "generate", "--prompt", "the theme", *args)[1])
    assert by_ids["prompt_token_ids"] == [119, 260, 261, 112, 104] and len(by_ids["token_ids"]) == 5
    cfg = tiny_config("llama", tie_word_embeddings=True)
    logits = prefill_logits(cfg, tiny_params(cfg), by_ids["prompt_token_ids"])[-1]
    logsoftmax = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert by_ids["token_ids"][0] == int(np.argmax(logits))
    assert abs(by_ids["logprobs"][0] - float(logsoftmax.max())) < 1e-4
    assert isinstance(by_ids["text"], str)  # decodable


@pytest.mark.parametrize(("ids", "expected"), [
    ("1,2,9999", "--prompt-token-ids: token id 9999 is out of the vocabulary: ids must be in [0, 262)"),
    ("1,-3", "--prompt-token-ids: token id -3 is out of the vocabulary"),
    ("1,two,3", "--prompt-token-ids takes comma-separated integer token ids (1,2,3), got '1,two,3'"),
    ("", "--prompt-token-ids takes comma-separated integer token ids"),
])
def test_bad_prompt_token_ids_give_one_clear_line(capsys, tiny_gguf: Path, ids: str, expected: str) -> None:
    code, _, err = _run(capsys, "generate", "--model", str(tiny_gguf), f"--prompt-token-ids={ids}", "--max-tokens", "2")
    lines = [line for line in err.splitlines() if line.strip() and "tensor/s" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jaxserve: error:") and expected in lines[0], err


def test_prompt_token_ids_exclude_the_prompt_and_chat(capsys, tiny_gguf: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_gguf), "--prompt", "hi", "--prompt-token-ids", "1,2"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code, _, err = _run(capsys, "generate", "--model", str(tiny_gguf), "--prompt-token-ids", "1,2", "--chat")
    assert code == 2 and "give --prompt, not --prompt-token-ids" in err


def test_json_text_is_null_when_the_tokenizer_cannot_decode(capsys, tmp_path: Path) -> None:
    """A SentencePiece tokenizer of 300 pieces on a model of 1024 tokens: the first id past its pieces
    fails the request; --json still reports the ids, with no text and the engine's reason."""
    import random

    import sentencepiece as spm

    from tests.tiny_models import write_hf_folder

    cfg = tiny_config("llama", vocab_size=1024)  # untied: random heads, no echo of the prompt
    folder = write_hf_folder(tmp_path / "hf", cfg, tiny_params(cfg))
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    rng, words = random.Random(0), "the quick brown fox jumps over lazy dog".split()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)), model_prefix=str(folder / "tokenizer"),
        vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2,
    )
    code, out, _ = _run(capsys, "generate", "--model", str(folder), "--prompt-token-ids", "1,40,41,42", "--max-tokens", "12",
                        "--temperature", "0", "--ignore-eos", "--json", "--no-unroll-layers", "--max-model-len", "32")
    result = json.loads(out)
    assert code == 1 and result["text"] is None and result["finish_reason"] == "error", result
    assert "out of range" in result["error"] and result["prompt_token_ids"] == [1, 40, 41, 42]
    assert len(result["logprobs"]) == len(result["token_ids"]) and all(t < 300 for t in result["token_ids"])


def test_seeded_sampling_is_reproducible_and_seed_dependent(capsys, tiny_gguf: Path) -> None:
    def tokens(seed: int) -> list[int]:
        code, out, _ = _run(capsys, "generate", "--model", str(tiny_gguf), "--prompt", "the", "--max-tokens", "12",
                            "--temperature", "50", "--top-p", "0.95", "--seed", str(seed), "--ignore-eos", "--json")
        assert code == 0
        return json.loads(out)["token_ids"]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_generate_with_speculation_gives_the_same_tokens_and_its_acceptance(capsys, tiny_gguf: Path) -> None:
    args = ["--model", str(tiny_gguf), "--prompt", "the theme the theme the theme", "--max-tokens", "40", "--temperature", "0", "--ignore-eos", "--json"]
    plain = json.loads(_run(capsys, "generate", *args)[1])
    code, out, _ = _run(capsys, "generate", *args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "tune_k": false}')
    drafted = json.loads(out)
    assert code == 0 and drafted["token_ids"] == plain["token_ids"] and "speculative" not in plain
    spec = drafted["speculative"]
    assert spec["drafts"] > 0 and spec["acceptance_rate"] == round(spec["accepted_tokens"] / spec["draft_tokens"], 4)


def test_generate_with_the_model_as_its_own_draft_accepts_every_draft(capsys, tiny_gguf: Path) -> None:
    args = ["--model", str(tiny_gguf), "--prompt", "the theme", "--max-tokens", "24", "--temperature", "0.8", "--seed", "3", "--ignore-eos", "--json"]
    plain = json.loads(_run(capsys, "generate", *args)[1])
    code, out, _ = _run(capsys, "generate", *args, "--speculative-config", json.dumps({"model": str(tiny_gguf), "num_speculative_tokens": 3, "tune_k": False}))  # k fixed: counts asserted
    drafted = json.loads(out)
    assert code == 0 and drafted["token_ids"] == plain["token_ids"]
    assert drafted["speculative"]["draft_tokens"] > 10 and drafted["speculative"]["acceptance_rate"] == 1.0


def _other_vocabulary(tmp: Path) -> Path:
    cfg = tiny_config("llama", vocab_size=600)
    return write_gguf(tmp / "other.gguf", cfg, tiny_params(cfg))


def test_convert_then_generate_from_checkpoint(capsys, tiny_gguf: Path, tmp_path: Path) -> None:
    assert _run(capsys, "convert", str(tiny_gguf), str(tmp_path / "ckpt"))[0] == 0
    args = ["--prompt", "the theme", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json"]
    from_gguf = json.loads(_run(capsys, "generate", "--model", str(tiny_gguf), *args)[1])
    from_ckpt = json.loads(_run(capsys, "generate", "--model", str(tmp_path / "ckpt"), *args)[1])
    assert from_ckpt == from_gguf
    code, _, err = _run(capsys, "convert", str(tiny_gguf), str(tmp_path / "q4"), "--quantization", "int4")
    assert code == 0 and "int4 weights" in err
    assert len(json.loads(_run(capsys, "generate", "--model", str(tmp_path / "q4"), *args)[1])["token_ids"]) == 8
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "q4"), "--quantization", "int8", *args)
    assert code == 2 and "holds int4 weights, which cannot be re-quantized to int8" in err
    code, _, err = _run(capsys, "convert", str(tiny_gguf), str(tmp_path / "f"), "--quantization-group-size", "64")
    assert code == 2 and "--quantization-group-size applies to --quantization int4 only" in err


def test_chat_keeps_history_and_streams(tiny_gguf: Path) -> None:
    cmd = [sys.executable, "-m", "jaxserve", "chat", "--model", str(tiny_gguf), "--max-tokens", "4",
           "--temperature", "0", "--ignore-eos", "--system", "be brief"]
    proc = subprocess.run(cmd, input="hello\nand again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 2  # one reply per turn


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _unsupported_arch(tmp: Path) -> Path:
    cfg = tiny_config("llama")
    return write_gguf(tmp / "gpt2.gguf", cfg, tiny_params(cfg), arch="gpt2")


def _unsupported_quant(tmp: Path) -> Path:
    cfg = tiny_config("llama")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((cfg.hidden_size, cfg.hidden_size // block_elems * block_bytes), np.uint8)
    return write_gguf(tmp / "q81.gguf", cfg, tiny_params(cfg), raw={"blk.0.attn_output.weight": (raw, Q.Q8_1)})


BAD_INPUT = {
    "missing path": (lambda tmp, g: ["--model", str(tmp / "nope.gguf")], "not found"),
    "missing model name": (lambda tmp, g: ["--model", "no-such-model"], "neither a known model name"),
    "corrupt gguf": (lambda tmp, g: ["--model", str((tmp / "bad.gguf").write_text("not a gguf") and tmp / "bad.gguf")], "not a valid GGUF"),
    "truncated gguf": (lambda tmp, g: ["--model", str(_truncated(g, tmp / "cut.gguf"))], "GGUF"),
    "unsupported architecture": (lambda tmp, g: ["--model", str(_unsupported_arch(tmp))], "unsupported architecture 'gpt2'"),
    "unsupported quant type": (lambda tmp, g: ["--model", str(_unsupported_quant(tmp))], "unsupported quantization type Q8_1"),
    "prompt longer than context": (lambda tmp, g: ["--model", str(g), "--prompt", "x" * 200], "context"),
    "prompt + max tokens beyond context": (lambda tmp, g: ["--model", str(g), "--max-tokens", "127"], "exceeds the context"),
    "max tokens zero": (lambda tmp, g: ["--model", str(g), "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    "max tokens negative": (lambda tmp, g: ["--model", str(g), "--max-tokens", "-3"], "max_tokens must be an integer >= 1"),
    "negative temperature": (lambda tmp, g: ["--model", str(g), "--temperature", "-0.5"], "temperature must be a number >= 0"),
    "top p out of range": (lambda tmp, g: ["--model", str(g), "--top-p", "1.5"], "top_p must be in (0, 1]"),
    "repetition penalty zero": (lambda tmp, g: ["--model", str(g), "--repetition-penalty", "0"], "repetition_penalty must be in (0, 10]"),
    "min tokens above max": (lambda tmp, g: ["--model", str(g), "--max-tokens", "2", "--min-tokens", "5"], "min_tokens must be an integer in [0, max_tokens]"),
    "kv cache memory negative": (lambda tmp, g: ["--model", str(g), "--kv-cache-memory", "-1"], "kv_cache_memory must be > 0"),
    "empty prompt": (lambda tmp, g: ["--model", str(g), "--prompt", ""], "prompt is empty"),
    "not a model folder": (lambda tmp, g: ["--model", str(tmp)], "neither a jaxserve checkpoint"),
    "speculative method unknown": (lambda tmp, g: ["--model", str(g), "--speculative-config", '{"method": "eagle3"}'], "speculative_config.method"),
    "speculative config not json": (lambda tmp, g: ["--model", str(g), "--speculative-config", "ngram"], "speculative_config is not valid JSON"),
    "draft model missing": (lambda tmp, g: ["--model", str(g), "--speculative-config", json.dumps({"model": str(tmp / "none.gguf")})],
                            "speculative_config.model: model path not found"),
    "draft of another vocabulary": (lambda tmp, g: ["--model", str(g), "--speculative-config", json.dumps({"model": str(_other_vocabulary(tmp))})],
                                    "speculative_config.model: the draft's vocabulary has 600 tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_clear_line(capsys, tmp_path: Path, tiny_gguf: Path, case: str) -> None:
    make_args, expected = BAD_INPUT[case]
    args = make_args(tmp_path, tiny_gguf)
    argv = ["generate", "--prompt", "hi", *args]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "tensor/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("jaxserve: error:"), err
    assert expected in lines[0]
    assert "Traceback" not in err


def test_offline_with_empty_cache_fails_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "JAXSERVE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    cmd = [sys.executable, "-m", "jaxserve", "generate", "--prompt", "hi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "jaxserve: error: cannot download model 'smollm2-135m-instruct'" in proc.stderr
    assert "Traceback" not in proc.stderr


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(config: Path) -> None:
    from jaxserve.cli import _parse

    args = _parse(["generate", "--config", str(config), "--prompt", "x"])
    assert args.model and args.page_size >= 1 and args.dtype in ("float32", "bfloat16")


def test_config_values_are_defaults_and_flags_win(capsys, tiny_gguf: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_gguf}\nmax_tokens: 3\ntemperature: 0\nignore_eos: true\n")
    code, out, _ = _run(capsys, "generate", "--config", str(cfg), "--prompt", "the", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 3
    code, out, _ = _run(capsys, "generate", "--config", str(cfg), "--prompt", "the", "--json", "--max-tokens", "5")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 5
    cfg.write_text("max_tokens: 3\nbogus_option: 1\n")
    code, _, err = _run(capsys, "generate", "--config", str(cfg), "--prompt", "the")
    assert code == 2 and "unknown options for 'generate': bogus_option" in err
