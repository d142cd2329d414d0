"""Constrained decoding in the engine, on tiny models: grammar masks, their cache, their vocabulary
mapping, and batch invariance with constrained neighbours; and the tool-call parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from jaxserve.checkpoint.gguf_reader import read_gguf
from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.errors import UserError
from jaxserve.ops.sampling import bitmask_words
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.tools import ToolCallParser, ToolPlan
from jaxserve.structured.guide import Guide
from jaxserve.structured.matchers import GrammarCompiler
from jaxserve.tokenizer import Tokenizer
from tests.tiny_models import tiny_config, tiny_params, write_gguf

PHONE = r"[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model with a byte-level BPE vocabulary (every byte is a token)."""
    cfg = tiny_config("llama", max_position_embeddings=512)
    return read_gguf(write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", cfg, tiny_params(cfg)))


def test_constrained_rows_match_and_leave_their_neighbours_unchanged(tiny) -> None:
    cfg, params, tok = tiny
    limits = EngineConfig(num_pages=64, max_num_seqs=8, max_num_batched_tokens=128, prefill_row_len=32, max_model_len=256)
    engine = LLMEngine(cfg, params, limits, tok)
    prompt = tok.encode("the number is ")
    free = {f"free-{i}": (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i in range(3)}
    alone = engine.run(free)
    guided = {
        **{f"phone-{i}": (prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=10 + i, guide=Guide("regex", PHONE))) for i in range(3)},
        "pick": (prompt, SamplingParams(max_tokens=20, temperature=0.0, guide=Guide.choice(["alpha", "beta", "gamma"]))),
        "json": (prompt, SamplingParams(max_tokens=60, temperature=0.7, seed=5, guide=Guide.json_schema({"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"], "additionalProperties": False}))),
    }
    mixed = engine.run({**free, **guided})
    for rid in free:  # a seeded request samples the same tokens whatever else is in the batch
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    for i in range(3):
        out = mixed[f"phone-{i}"].outputs[0]
        assert re.fullmatch(PHONE, out.text) and out.finish_reason == "stop", out
    assert mixed["pick"].outputs[0].text in {"alpha", "beta", "gamma"}
    assert json.loads(mixed["json"].outputs[0].text)["n"] in (1, 2, 3)
    assert engine.grammars.num_compiles == 3  # one compile per distinct guide; the three phone requests share one
    assert engine.last_step.mask_seconds is None  # the last step had no constrained rows left


def test_bad_guides_are_user_errors_naming_the_problem(tiny) -> None:
    _, _, tok = tiny
    grammars = GrammarCompiler(tok, len(tok.backend.tk.get_vocab()))
    cases = [
        (Guide.json_schema({"type": "integr"}), "Invalid type"),
        (Guide.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (Guide("regex", "[a-"), "unclosed character class"),
        (Guide("grammar", "start: foo"), "unknown name"),
    ]
    for guide, words in cases:
        with pytest.raises(UserError, match=words):
            grammars.compile(guide)
    with pytest.raises(UserError, match="not valid JSON"):
        Guide.json_schema("{not json")
    with pytest.raises(UserError, match="non-empty array"):
        Guide.choice([])


def test_sentencepiece_vocabulary_maps_pieces_and_bytes(tmp_path: Path) -> None:
    """The mask for [0-9]+ allows exactly the tokens whose bytes are all digits: byte-fallback pieces
    (<0x31>) and merged pieces alike; control pieces and pieces with a leading '\u2581' never."""
    corpus = [f"order {n} ships {n * 7} boxes on day {n % 31}" for n in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
    )
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = Tokenizer.from_hf(folder)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = sp.get_piece_size()
    grammars = GrammarCompiler(tok, vocab)
    mask = np.zeros((1, bitmask_words(vocab)), np.int32)
    grammars.fill([(grammars.matcher(Guide("regex", "[0-9]+")), 0)], mask)
    allowed = set(np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab]).tolist())

    def digits(i: int) -> bool:
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return 0x30 <= int(piece[3:5], 16) <= 0x39
        return not (sp.is_control(i) or sp.is_unknown(i)) and piece.isascii() and piece.isdigit()

    expected = {i for i in range(vocab) if digits(i)}
    assert len(expected) > 10 and allowed == expected


def test_tool_call_parser_streams_content_and_holds_back_calls() -> None:
    tools = ({"name": "get_weather", "description": "", "parameters": {"type": "object"}},)
    auto = ToolCallParser(ToolPlan(tools, "auto"))
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    released = "".join(auto.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    assert released == "Let me check. "  # nothing of the tag or the call leaks as content
    rest, calls = auto.finish("stop")
    assert rest == "" and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and calls[0]["id"].startswith("call_")

    plain = ToolCallParser(ToolPlan(tools, "auto"))
    assert plain.feed("a < b, and <tool") == "a < b, and "  # a possible tag start waits
    assert plain.finish("stop") == ("<tool", [])  # ... and is content when no call follows

    named = ToolCallParser(ToolPlan(tools, "named", "get_weather"))
    assert named.feed('{"city": "Oslo"}') == ""
    assert named.finish("stop")[1][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    required = ToolCallParser(ToolPlan(tools, "required"))
    required.feed('[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_weather", "arguments": {}}]')
    assert [json.loads(c["function"]["arguments"]) for c in required.finish("stop")[1]] == [{"city": "Rome"}, {}]
    cut = ToolCallParser(ToolPlan(tools, "required"))
    cut.feed('[{"name": "get_wea')  # cut off by max_tokens before a name: no calls, the text stays content
    assert cut.finish("length") == ('[{"name": "get_wea', [])
    for mode, text in (("required", '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_weather", "arguments": {"city": "Ro'),
                       ("auto", 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro')):
        cut = ToolCallParser(ToolPlan(tools, mode))
        cut.feed(text)  # cut off mid-call: the calls, the last one's arguments as far as they got
        rest, calls = cut.finish("length")
        assert [c["function"] for c in calls][-1] == {"name": "get_weather", "arguments": '{"city": "Ro'} and rest == ""
    whole = ToolCallParser(ToolPlan(tools, "required"))
    whole.feed('[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_weather", "arguments": {"city": "Ro')
    assert [c["function"]["arguments"] for c in whole.finish("length")[1]] == ['{"city": "Rome"}', '{"city": "Ro']
    stopped = ToolCallParser(ToolPlan(tools, "named", "get_weather"))
    stopped.feed('{"city": "Ro')  # not cut by max_tokens (a stop string, say): content, as before
    assert stopped.finish("stop") == ('{"city": "Ro', [])

    # OpenAI's finish reasons: a chosen call, a forced named call, an output cut off.
    calls = required.finish("stop")[1] or [{}]
    assert required.finish_reason("stop", calls) == "tool_calls" and named.finish_reason("stop", calls) == "stop"
    assert required.finish_reason("length", calls) == "length" and required.finish_reason("stop", []) == "stop"
    after = ToolCallParser(ToolPlan(tools, "auto"))
    after.feed('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> Done.')
    assert after.finish("stop")[0] == "Done."  # text outside the call blocks stays content
