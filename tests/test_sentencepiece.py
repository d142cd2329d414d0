"""SentencePiece vocabularies: a `.model` file (HF folder) and a GGUF `llama` vocabulary both encode and
decode exactly like the sentencepiece library. The model is trained here, in the test."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

WORDS = "the quick brown fox jumps over lazy dog model token cache page batch server stream jax".split()
TEXTS = [
    "the quick brown fox", "  leading spaces", "trailing  ", "numbers 12345 and 3.14", "ünïcödé wörds",
    "emoji 🦙 here", "new\nline", "tab\tstop", "jaxserve streams tokens",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    folder = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's tokenizer
    )
    return folder / "tokenizer.model"


def _gguf_meta(sp: spm.SentencePieceProcessor) -> dict:
    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        return 6 if sp.is_byte(i) else 1

    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }


def _tokenizers(sp_model: Path, tmp_path: Path) -> dict[str, Tokenizer]:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return {"model-file": Tokenizer.from_hf(folder), "gguf-llama": Tokenizer.from_gguf(_gguf_meta(sp))}


@pytest.mark.parametrize("source", ["model-file", "gguf-llama"])
def test_matches_sentencepiece(sp_model: Path, tmp_path: Path, source: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = _tokenizers(sp_model, tmp_path)[source]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and tok.add_bos
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [1, *expected]
        assert tok.decode(expected) == sp.decode(expected)
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.push(i) for i in expected) + detok.flush() == sp.decode(expected)


def test_special_token_text_is_split_out(sp_model: Path, tmp_path: Path) -> None:
    tok = _tokenizers(sp_model, tmp_path)["model-file"]
    ids = tok.encode("</s>the fox", add_special_tokens=False)
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=False).startswith("</s>")
