"""Reasoning output (`serve --reasoning-parser`): the qwen3 and deepseek_r1 parsers, whole and fed in
pieces split at every point; the chat renderer's streamed deltas against its whole reply (tool calls
parsed from the content after `</think>`); and a real server through the `openai` client, with
SmolLM2's output forced into `<think>...</think>...` by a guided regex, and `chat_template_kwargs`
reaching a model's chat template."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from jaxserve.engine.outputs import StepOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.protocol import Request
from jaxserve.server.reasoning import END_THINK, PARSERS, REASONING_PARSERS, THINK, DeepSeekR1ReasoningParser, Qwen3ReasoningParser
from jaxserve.server.render import renderer
from jaxserve.server.tools import parse_tools
from jaxserve.structured.guide import Guide
from tests.server_process import SERVER_ENGINE, ServerProcess, engine_flags

MODEL = "smollm2-135m-instruct"

# ---- the parsers --------------------------------------------------------------------------------------------

# output -> (reasoning, content) of each parser, unconstrained; reasoning None: the output has none.
WHOLE = {
    "<think>abc</think>xyz": {"deepseek_r1": ("abc", "xyz"), "qwen3": ("abc", "xyz")},
    "abc</think>xyz": {"deepseek_r1": ("abc", "xyz"), "qwen3": (None, "abc</think>xyz")},  # R1: the template opened it
    "plain answer": {"deepseek_r1": ("plain answer", ""), "qwen3": (None, "plain answer")},  # R1: cut off while thinking
    "pre<think>abc</think>xyz": {"deepseek_r1": ("preabc", "xyz"), "qwen3": ("abc", "prexyz")},
    "<think>\nstep 1 < step 2\n</think>\n\nThe answer.": {"deepseek_r1": ("\nstep 1 < step 2\n", "\n\nThe answer."),
                                                           "qwen3": ("\nstep 1 < step 2\n", "\n\nThe answer.")},
    "<think>cut off": {"deepseek_r1": ("cut off", ""), "qwen3": ("cut off", "")},
    "<think></think>": {"deepseek_r1": ("", ""), "qwen3": ("", "")},
    "a</think>b</think>c<think>d": {"deepseek_r1": ("a", "b</think>c<think>d"), "qwen3": ("d", "a</think>b</think>c")},
    "<think>a<think>b</think>c</think>": {"deepseek_r1": ("a<think>b", "c</think>"), "qwen3": ("a<think>b", "c</think>")},
    "x<thin": {"deepseek_r1": ("x<thin", ""), "qwen3": (None, "x<thin")},  # a partial tag at the end is text
    "<<think>>a</think</think>": {"deepseek_r1": ("<>a</think", ""), "qwen3": (">a</think", "<")},
    "": {"deepseek_r1": ("", ""), "qwen3": (None, "")},
}


@pytest.mark.parametrize("name", REASONING_PARSERS)
def test_parsers_split_whole_outputs_as_vllms(name) -> None:
    parser = PARSERS[name]
    for text, expected in WHOLE.items():
        assert parser.split(text) == expected[name], (name, text)
    # A constrained output (under a grammar from its first token) starts as content for both.
    assert DeepSeekR1ReasoningParser.split("abc</think>xyz", constrained=True) == (None, "abc</think>xyz")
    assert DeepSeekR1ReasoningParser.split('{"a": 1}', constrained=True) == (None, '{"a": 1}')
    assert DeepSeekR1ReasoningParser.split("<think>abc</think>xyz", constrained=True) == ("abc", "xyz")


def _fed(parser_class, pieces: list[str], constrained: bool = False) -> tuple[str | None, str, list[tuple[str, str]]]:
    """(reasoning, content) from feeding `pieces` one by one, and what each feed released."""
    parser = parser_class(constrained)
    released = []
    for piece in pieces:
        released.append(parser.feed(piece))
        held = parser.pending
        assert len(held) < len(END_THINK) and any(tag.startswith(held) for tag in (THINK, END_THINK)), (pieces, held)
    released.append(parser.finish())
    reasoning = "".join(r for r, _ in released)
    return (reasoning if parser.reasoned else None), "".join(c for _, c in released), released


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("name", REASONING_PARSERS)
def test_incremental_parsing_matches_whole_at_every_split_point(name, constrained) -> None:
    """Every way of cutting an output in two or three pieces, and one character at a time, releases
    exactly the whole output's reasoning and content: a tag split anywhere is still found, and a
    piece that may start a tag is held back only until it cannot."""
    parser = PARSERS[name]
    for text in WHOLE:
        whole = parser.split(text, constrained)
        assert _fed(parser, list(text), constrained)[:2] == whole, (text, "by character")
        for i in range(len(text) + 1):
            assert _fed(parser, [text[:i], text[i:]], constrained)[:2] == whole, (text, i)
            for j in range(i, min(len(text), i + 12) + 1):
                assert _fed(parser, [text[:i], text[i:j], text[j:]], constrained)[:2] == whole, (text, i, j)
    # Nothing is held back that cannot start a tag: text without '<' comes out at once.
    assert _fed(DeepSeekR1ReasoningParser, ["thinking ", "hard"])[2][:2] == [("thinking ", ""), ("hard", "")]
    assert _fed(Qwen3ReasoningParser, ["<think>a", "b</th", "ink>c"])[2][:3] == [("a", ""), ("b", ""), ("", "c")]


# ---- the chat renderer ---------------------------------------------------------------------------------------


class _Tokens:
    """The renderer decodes single tokens only for log-probs; any text does."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"<{i}>" for i in ids)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"], "additionalProperties": False}}}


def _chat(pieces: list[str], parser: str | None, tool_choice=None, guide: Guide | None = None, finish: str = "stop") -> tuple[dict, list[dict]]:
    """The whole message and the streamed deltas of one chat choice whose tokens' texts are `pieces`."""
    plan = parse_tools({"tools": [WEATHER], "tool_choice": tool_choice}) if tool_choice else None
    req = Request("chat", "m", [[1, 2, 3]], SamplingParams(max_tokens=64, guide=guide), stream=True, include_usage=False, tools=plan)
    reasoning = PARSERS[parser] if parser else None
    whole, streamed = renderer(req, _Tokens(), reasoning), renderer(req, _Tokens(), reasoning)
    deltas = []
    for k, piece in enumerate(pieces):
        out = StepOutput(req.request_id, 0, 100 + k, -0.5, finish if k == len(pieces) - 1 else None, piece)
        whole.add(0, out)
        choice = streamed.add(0, out)
        if choice is not None:
            deltas.append(choice["delta"])
    return whole.response()["choices"][0], deltas


def _joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key) or "" for d in deltas)


def test_streamed_deltas_add_up_to_the_whole_reply_and_tool_calls_come_from_the_content() -> None:
    think = ["<", "th", "ink", ">\n", "Let", " me", " think", ".\n", "</", "think", ">", "\n\n", "It", " is", " 4", "."]
    for parser in REASONING_PARSERS:
        choice, deltas = _chat(think, parser)
        message = choice["message"]
        assert (message["reasoning_content"], message["content"]) == ("\nLet me think.\n", "\n\nIt is 4.")
        assert message["reasoning"] == message["reasoning_content"]  # newer vLLM's name for it
        assert _joined(deltas, "reasoning_content") == message["reasoning_content"] == _joined(deltas, "reasoning")
        assert _joined(deltas, "content") == message["content"]
        assert all("<" not in d.get("content", "") and "<" not in d.get("reasoning_content", "") for d in deltas)

    # DeepSeek-R1: no opening tag, and no closing one either (cut off): all reasoning, no content.
    choice, deltas = _chat(["Hmm", ",", " let", " me", " see"], "deepseek_r1", finish="length")
    assert (choice["message"]["reasoning_content"], choice["message"]["content"], choice["finish_reason"]) == ("Hmm, let me see", None, "length")
    assert _joined(deltas, "reasoning_content") == "Hmm, let me see" and _joined(deltas, "content") == ""
    # Qwen3: no tags, all content; reasoning null.
    choice, deltas = _chat(["Hello", " there", " <", "b>"], "qwen3")
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (None, "Hello there <b>")
    assert _joined(deltas, "content") == "Hello there <b>" and not _joined(deltas, "reasoning_content")

    # Without a parser nothing changes: the tags are content, and there is no reasoning field.
    choice, deltas = _chat(think, None)
    assert choice["message"] == {"role": "assistant", "content": "".join(think)}
    assert all(set(d) <= {"content"} for d in deltas) and _joined(deltas, "content") == "".join(think)

    # "auto" tool calls are parsed from the content after </think>, never from the reasoning.
    call = ["<think>", "I should call", " <tool_call> here", "</think>", "<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "</tool_call>"]
    for parser in REASONING_PARSERS:
        choice, deltas = _chat(call, parser, tool_choice="auto")
        message = choice["message"]
        assert message["reasoning_content"] == "I should call <tool_call> here" == _joined(deltas, "reasoning_content")
        assert message["content"] is None and choice["finish_reason"] == "tool_calls"
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [("get_weather", {"city": "Paris"})]
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["get_weather"]

    # A forced call is constrained from its first token: its JSON is content (the call), not R1 reasoning.
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice, deltas = _chat(['{"city": ', '"Oslo"}'], "deepseek_r1", tool_choice=named, guide=Guide.json_schema(WEATHER["function"]["parameters"]))
    assert choice["message"]["reasoning_content"] is None and choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert not _joined(deltas, "reasoning_content")


# ---- the command line -------------------------------------------------------------------------------------------


def test_unknown_reasoning_parser_is_a_usage_error_naming_the_choices(capsys, tmp_path) -> None:
    from jaxserve.cli import _parse

    with pytest.raises(SystemExit) as exit_:
        _parse(["serve", "--reasoning-parser", "deepseek"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--reasoning-parser: invalid choice: 'deepseek'" in err and "qwen3" in err and "deepseek_r1" in err
    # From a --config file (which argparse does not check) too, before any model loads.
    (tmp_path / "serve.yaml").write_text("reasoning_parser: r1\n")
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--config", str(tmp_path / "serve.yaml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "jaxserve: error: unknown reasoning parser 'r1': choose from qwen3, deepseek_r1"


# ---- a real server -----------------------------------------------------------------------------------------------

# A Qwen3-style template: `enable_thinking: false` renders an empty think block after the generation prompt.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
FORCED = r"<think>[a-z ]{3,30}</think>[a-z ]{3,30}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SmolLM2 with --reasoning-parser deepseek_r1, and a tiny random model `tiny` whose chat template
    reads `enable_thinking`."""
    from tests.tiny_models import tiny_config, tiny_params, write_hf_folder

    folder = tmp_path_factory.mktemp("reasoning")
    cfg = tiny_config()
    write_hf_folder(folder / "tiny", cfg, tiny_params(cfg, seed=5))
    conf = json.loads((folder / "tiny" / "tokenizer_config.json").read_text())
    (folder / "tiny" / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": THINKING_TEMPLATE}))
    (folder / "serve.yaml").write_text(yaml.safe_dump({"models": [{"name": "tiny", "model": str(folder / "tiny"), "max_num_seqs": 8, "num_pages": 64}]}))
    args = [*engine_flags(SERVER_ENGINE), "--model", MODEL, "--config", str(folder / "serve.yaml"), "--no-warmup", "--reasoning-parser", "deepseek_r1"]
    with ServerProcess(args, folder / "log.txt") as proc:
        yield proc


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _stream(client: openai.OpenAI, **kw) -> tuple[str, str, list]:
    """(reasoning, content, chunks) of a streamed chat."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return "".join(getattr(d, "reasoning_content", None) or "" for d in deltas), "".join(d.content or "" for d in deltas), chunks


def test_forced_think_output_is_split_alike_whole_and_streamed(server) -> None:
    client = _client(server)
    assert any(r["msg"] == "listening" and r["reasoning_parser"] == "deepseek_r1" for r in server.log_records())
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Think, then name a colour."}], max_tokens=80, temperature=0,
              extra_body={"guided_regex": FORCED})
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert re.fullmatch(FORCED, f"<think>{message.reasoning_content}</think>{message.content}"), message
    assert re.fullmatch("[a-z ]{3,30}", message.reasoning_content) and message.reasoning == message.reasoning_content
    assert whole.choices[0].finish_reason == "stop"
    reasoning, content, chunks = _stream(client, **kw)
    assert (reasoning, content) == (message.reasoning_content, message.content)
    assert "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices) == reasoning
    assert sum(bool(getattr(c.choices[0].delta, "reasoning_content", None)) for c in chunks if c.choices) >= 2  # streamed as it came

    # Several samples, sampled: each choice split on its own, the stream adding up to the whole.
    kw.update(n=3, temperature=1.0, seed=11)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for choice in whole.choices:
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == choice.message.reasoning_content
        assert "".join(d.content or "" for d in deltas) == (choice.message.content or "")
        assert re.fullmatch(FORCED, f"<think>{choice.message.reasoning_content}</think>{choice.message.content or ''}")


def test_unconstrained_r1_reply_without_end_tag_is_all_reasoning(server) -> None:
    client = _client(server)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert message.reasoning_content and message.content is None and whole.choices[0].finish_reason == "length"
    reasoning, content, _ = _stream(client, **kw)
    assert (reasoning, content) == (message.reasoning_content, "")


def test_forced_tool_call_and_json_stay_content_under_the_reasoning_parser(server) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0, tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = named.choices[0].message
    assert message.reasoning_content is None and message.tool_calls[0].function.name == "get_weather"
    assert isinstance(json.loads(message.tool_calls[0].function.arguments)["city"], str)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    shaped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert shaped.choices[0].message.reasoning_content is None and isinstance(json.loads(shaped.choices[0].message.content)["ok"], bool)


def test_chat_template_kwargs_reach_the_chat_template(server) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    off = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    on = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    # The tiny tokenizer spells the empty think block one byte a token.
    assert off.usage.prompt_tokens == plain.usage.prompt_tokens + len("<think>\n\n</think>\n\n") and on.usage.prompt_tokens == plain.usage.prompt_tokens
    for bad in ("enable_thinking", ["enable_thinking"], 1):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={"chat_template_kwargs": bad})
        assert error.value.status_code == 400 and error.value.body["param"] == "chat_template_kwargs"
        assert error.value.body["message"] == "'chat_template_kwargs' must be an object"
