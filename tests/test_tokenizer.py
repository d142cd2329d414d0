"""Tokenizer behaviour: SmolLM2 encodings equal the reference's; streaming detokenization equals full
decode; a Hugging Face folder's rules (tokenizer.json or tokenizer.model, BOS/EOS and add_bos/add_eos
from tokenizer_config.json, every EOS of generation_config.json, the chat template) are honoured."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import processors

from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer, _gguf_byte_level_bpe
from tests.tiny_models import CHAT_TEMPLATE, MERGES, TOKENS


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


# ---- the rules of a Hugging Face folder ---------------------------------------------------------

EXTRA = ["<bos>", "<eos>", "<|eot_id|>"]  # special tokens after the tiny vocabulary: ids 262, 263, 264
BOS, EOS, EOT = (len(TOKENS) + i for i in range(3))
THE_THEME = [119, 260, 261, 112, 104]  # "the theme": t he | Ġthe m e


def _folder(tmp_path: Path, config: dict | None, generation: dict | None = None, bos_post_processor: bool = False) -> Path:
    """A folder with a tiny byte-level BPE tokenizer.json (special tokens TOKENS[:3] + EXTRA), and
    tokenizer_config.json / generation_config.json when given."""
    folder = tmp_path / "tok"
    folder.mkdir()
    tk = _gguf_byte_level_bpe(TOKENS, MERGES, "default")
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in TOKENS[:3] + EXTRA])
    if bos_post_processor:  # as Llama 3's tokenizer.json prepends <|begin_of_text|>
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tk.save(str(folder / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        if content is not None:
            (folder / name).write_text(json.dumps(content))
    return folder


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def test_gemma_style_folder_adds_bos_from_added_token_dicts(tmp_path: Path) -> None:
    tok = Tokenizer.from_hf(_folder(tmp_path, {"bos_token": _added("<bos>"), "eos_token": _added("<eos>"), "add_bos_token": True,
                                               "add_eos_token": False}, {"eos_token_id": EOS}))
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos, tok.add_eos) == (BOS, (EOS,), True, False)
    assert tok.encode("the theme") == [BOS, *THE_THEME]
    assert tok.encode("the theme", add_special_tokens=False) == THE_THEME
    assert (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")


def test_qwen_style_folder_adds_no_bos_and_stops_on_every_eos(tmp_path: Path) -> None:
    """No BOS (`bos_token: null`); generation_config's list adds <|endoftext|> to the tokenizer's
    <|im_end|>, which stays first (what chat templates and fine-tuning append)."""
    conf = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    tok = Tokenizer.from_hf(_folder(tmp_path, conf, {"bos_token_id": 0, "eos_token_id": [0, 2]}))
    assert tok.bos_token_id is None and not tok.add_bos and not tok.add_eos
    assert tok.eos_token_ids == (2, 0) and tok.eos_token == "<|im_end|>"
    assert tok.encode("the theme") == THE_THEME
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_style_folder_takes_bos_from_the_post_processor(tmp_path: Path) -> None:
    """No add_bos_token in the config: tokenizer.json's post-processor says whether BOS comes first."""
    conf = {"bos_token": "<bos>", "eos_token": "<|eot_id|>"}
    tok = Tokenizer.from_hf(_folder(tmp_path, conf, {"eos_token_id": [EOS, EOT]}, bos_post_processor=True))
    assert tok.add_bos and not tok.add_eos and tok.eos_token_ids == (EOT, EOS)
    assert tok.encode("the theme") == [BOS, *THE_THEME]
    (tmp_path / "plain").mkdir()
    plain = Tokenizer.from_hf(_folder(tmp_path / "plain", conf))
    assert not plain.add_bos and plain.encode("the theme") == THE_THEME and plain.eos_token_ids == (EOT,)


@pytest.mark.parametrize("eos", [EOS, [EOS], None])
def test_generation_config_eos_int_list_or_null(tmp_path: Path, eos) -> None:
    tok = Tokenizer.from_hf(_folder(tmp_path, {"eos_token": "<eos>"}, {"eos_token_id": eos}))
    assert tok.eos_token_ids == (EOS,)
    (tmp_path / "gen-only").mkdir()
    only = Tokenizer.from_hf(_folder(tmp_path / "gen-only", {}, {"eos_token_id": eos}))
    assert only.eos_token_ids == ((EOS,) if eos is not None else ())


def test_add_eos_token_appends_eos_and_survives_a_save(tmp_path: Path) -> None:
    conf = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "add_bos_token": True, "add_eos_token": True}
    tok = Tokenizer.from_hf(_folder(tmp_path, conf, {"eos_token_id": [EOT, EOS]}))
    assert tok.encode("the theme") == [BOS, *THE_THEME, EOS]
    assert tok.encode("the theme", add_special_tokens=False) == THE_THEME
    (tmp_path / "saved").mkdir()
    tok.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert (again.eos_token_ids, again.add_bos, again.add_eos) == ((EOS, EOT), True, True)
    assert again.encode("the theme") == [BOS, *THE_THEME, EOS]


def test_chat_template_file_takes_priority_over_the_config(tmp_path: Path) -> None:
    conf = {"eos_token": "<eos>", "chat_template": "config: {{ messages[0]['content'] }}"}
    folder = _folder(tmp_path, conf)
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_hf(folder).apply_chat_template(messages) == "config: hi"
    (folder / "chat_template.jinja").write_text("{{ bos_token }}file: {{ messages[0]['content'] }}{{ eos_token }}")
    assert Tokenizer.from_hf(folder).apply_chat_template(messages) == "file: hi<eos>"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "named: {{ messages[0]['content'] }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    (folder / "chat_template.jinja").unlink()
    assert Tokenizer.from_hf(folder).apply_chat_template(messages) == "named: hi"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog".split()
    folder = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)), model_prefix=str(folder / "tokenizer"),
        vocab_size=300, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_sentencepiece_model_when_there_is_no_tokenizer_json(tmp_path: Path, sp_model: Path) -> None:
    """tokenizer.model alone: LlamaTokenizer's defaults (its <s> and </s>, BOS added); the config
    overrides them; a tokenizer.json beside it wins."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tok = Tokenizer.from_hf(folder)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos, tok.add_eos) == (1, (2,), True, False)
    assert tok.encode("the lazy fox") == [1, *sp.encode("the lazy fox")]
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True, "eos_token": _added("</s>")}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf(folder)
    assert tok.encode("the lazy fox") == [*sp.encode("the lazy fox"), 2] and tok.eos_token_ids == (2, 0)
    _folder(tmp_path / "sp", None)  # writes folder/tok/tokenizer.json: move it beside the .model
    (folder / "tok" / "tokenizer.json").rename(folder / "tokenizer.json")
    assert Tokenizer.from_hf(folder).encode("the theme", add_special_tokens=False) == THE_THEME


def test_engine_stops_on_any_eos_the_tokenizer_names(tmp_path: Path) -> None:
    """generation_config.json's second EOS id ends generation as the first does."""
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params, write_hf_folder

    cfg = tiny_config("llama", tie_word_embeddings=True)
    params = tiny_params(cfg)
    folder = write_hf_folder(tmp_path / "hf", cfg, params)
    prompt = THE_THEME

    def generate(ignore_eos: bool):
        engine = LLMEngine(cfg, params, TINY_ENGINE, tokenizer=Tokenizer.from_hf(folder))
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=ignore_eos)
        return engine.run({"r": (prompt, sp)})["r"].outputs[0]

    free = generate(ignore_eos=True).token_ids
    stop = next(t for t in free[2:] if t != 2)  # <|im_end|> (2) is the tokenizer's own EOS
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    assert Tokenizer.from_hf(folder).eos_token_ids == (2, stop)
    out = generate(ignore_eos=False)
    first = next(i for i, t in enumerate(free) if t in (2, stop))
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == (free[:first], "stop", free[first])
