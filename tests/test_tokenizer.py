"""Tokenizer behaviour: SmolLM2 encodings equal the reference's; streaming detokenization equals full decode."""

from __future__ import annotations

import random

from jaxserve.tokenizer import IncrementalDetokenizer


def _stream(tok, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_encodings_match_reference(smollm2, golden) -> None:
    cases = golden["tokenizer"]
    assert len(cases) >= 200
    mismatches = [c["text"] for c in cases if smollm2.tokenizer.encode(c["text"]) != c["ids"]]
    assert not mismatches, f"{len(mismatches)} strings encode differently, e.g. {mismatches[:5]!r}"


def test_special_tokens_and_bos(smollm2) -> None:
    tok = smollm2.tokenizer
    assert tok.encode("<|im_start|>user") [:1] == [1]
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1 and not tok.add_bos
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert tok.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"


def test_streaming_detokenization_equals_full_decode(smollm2, golden) -> None:
    tok = smollm2.tokenizer
    for case in golden["tokenizer"]:
        pieces = _stream(tok, case["ids"])
        assert "".join(pieces) == tok.decode(case["ids"])
        # No piece ends inside a multi-byte character (U+FFFD would show a half character).
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_streaming_never_splits_utf8_in_random_token_soup(smollm2) -> None:
    """Byte tokens of multi-byte characters arrive one by one: nothing is emitted until complete."""
    tok = smollm2.tokenizer
    rng = random.Random(0)
    text = "".join(rng.choice("日本語🦙😀éüß a") for _ in range(300))
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_conventions(smollm2) -> None:
    tok = smollm2.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
