"""`jaxserve bench serve | generate | throughput`: the load test against two real servers (a tiny random
model, two engine sizes) with its JSON, table and PNG plots; Poisson rates, chat, datasets and model
mixes; prompt sources and length distributions; one clear error for bad flags and for URLs that are
not OpenAI-compatible servers; the offline benchmarks on the tiny model."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jaxserve.bench.datasets import Lengths, build_requests, parse_lengths, read_dataset
from jaxserve.cli import _parse, main
from jaxserve.errors import UserError
from tests.cli_run import run_cli as _run
from tests.server_process import ServerProcess, free_port, get
from tests.tiny_models import tiny_config, tiny_params, write_gguf

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random model with room for the generate benchmark's ~260-byte prompt."""
    cfg = tiny_config(max_position_embeddings=1024)
    return write_gguf(tmp_path_factory.mktemp("bench") / "tiny.gguf", cfg, tiny_params(cfg, seed=5))


@pytest.fixture(scope="module")
def servers(tiny_gguf: Path, tmp_path_factory):
    """Two servers of the tiny model that differ in one flag (4 or 2 running sequences), started
    together; no warm-up (the benchmark's own warm-up requests compile what they use)."""
    folder = tmp_path_factory.mktemp("servers")
    with contextlib.ExitStack() as stack:
        procs = [ServerProcess(["--model", str(tiny_gguf), "--max-num-seqs", str(n), "--num-pages", "64", "--no-warmup"], folder / f"log{n}.txt")
                 for n in (4, 2)]
        for proc in procs:
            stack.enter_context(proc)
        yield procs


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def _assert_sane(level: dict, requests: int, output_tokens: int) -> None:
    """Every request completed with the tokens asked for, and the figures agree with each other."""
    assert (level["requests"], level["completed"], level["failed"], level["errors"]) == (requests, requests, 0, [])
    assert level["output_tokens"] == output_tokens and level["prompt_tokens"] > 0
    assert level["output_throughput"] > 0 and level["total_token_throughput"] > level["output_throughput"]
    assert level["request_throughput"] == pytest.approx(requests / level["duration_s"], rel=0.05)
    for p in ("mean", "p50", "p90", "p99"):
        assert 0 < level["ttft_ms"][p] <= level["e2e_ms"][p]
    assert level["ttft_ms"]["p50"] <= level["ttft_ms"]["p90"] <= level["ttft_ms"]["p99"]


def test_serve_against_two_servers_writes_json_table_and_plots(servers, tmp_path: Path) -> None:
    a, b = servers
    out = tmp_path / "serve"
    cmd = [sys.executable, "-m", "jaxserve", "bench", "serve", "--base-url", a.url, b.url + "/v1/", "--concurrency", "1", "3",
           "--num-requests", "4", "--prompt-tokens", "uniform:4:8", "--output-tokens", "6", "--goodput", "ttft:600000", "e2el:600000",
           "--warmup-requests", "2", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "serve.json").read_text())
    model = json.loads(get(a.url + "/v1/models")[1])["data"][0]["id"]
    assert report["mode"] == "concurrency" and report["endpoint"] == "completions" and report["slo_ms"] == {"ttft": 600000, "e2e": 600000}
    assert report["args"]["base_url"] == [a.url, b.url + "/v1/"] and report["args"]["prompt_tokens"] == "uniform:4:8"
    assert [(t["base_url"], t["model"]) for t in report["targets"]] == [(a.url + "/v1", model), (b.url + "/v1", model)]
    for target in report["targets"]:
        assert [level["concurrency"] for level in target["levels"]] == [1, 3]
        for level in target["levels"]:
            _assert_sane(level, 4, 4 * 6)
            assert level["goodput"]["requests"] == 4 and level["goodput"]["fraction"] == 1.0  # a ten-minute SLO
            assert ("vs_first" in level) == (target is not report["targets"][0])
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["target", "concurrency", "ok/sent"] and "TTFT p50" in lines[0]
    rows = [line.split() for line in lines[1:5]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(u + "/v1", c, "4/4") for u in (a.url, b.url) for c in ("1", "3")]
    for name in ("throughput.png", "latency.png"):
        _assert_png(out / name)


def test_rate_chat_dataset_and_model_mixes(servers, capsys, tmp_path: Path) -> None:
    """Poisson arrivals to the chat endpoint, texts and chats from a JSONL file, and two model mixes on
    one server compared."""
    server = servers[0]
    model = json.loads(get(server.url + "/v1/models")[1])["data"][0]["id"]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "the theme"}\n{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}\n')
    code, out, err = _run(capsys, "bench", "serve", "--base-url", server.url, "--rate", "50", "--num-requests", "4", "--endpoint", "chat",
                          "--dataset", str(dataset), "--output-tokens", "3", "--mix", model, "--mix", f"{model},{model}",
                          "--warmup-requests", "1", "--out-dir", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert report["mode"] == "rate" and report["endpoint"] == "chat" and report["slo_ms"] is None
    assert [t["model"] for t in report["targets"]] == [model, f"{model},{model}"]
    for target in report["targets"]:
        (level,) = target["levels"]
        assert level["rate"] == 50 and level["goodput"] is None
        _assert_sane(level, 4, 4 * 3)
    assert "rate" in out.splitlines()[0] and f"[{model},{model}]" in out


def test_datasets_jsonl_and_sharegpt(capsys, tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert read_dataset(jsonl) == [("a", None), ([{"role": "user", "content": "b"}], None)]
    code, _, err = _run(capsys, "bench", "serve", "--base-url", "http://127.0.0.1:1", "--dataset", str(jsonl))
    assert code == 2 and "holds chats" in err and "--endpoint chat" in err  # before any request
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "first question"}, {"from": "gpt", "value": "x" * 41}, {"from": "human", "value": "more"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn: skipped"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "unanswered"}]},
    ]))
    entries = read_dataset(sharegpt)
    assert entries == [("first question", 10), ("unanswered", None)]  # 41 characters at 4 a token
    rng = random.Random(0)
    # Cycled through in a shuffled order; the dataset's lengths, else the default; --output-tokens overrides.
    specs = build_requests(5, rng, None, None, entries)
    assert sorted({s.prompt for s in specs}) == ["first question", "unanswered"] and len(specs) == 5
    assert {(s.prompt, s.output_tokens) for s in specs} == {("first question", 10), ("unanswered", 64)}
    assert {s.output_tokens for s in build_requests(5, rng, Lengths("fixed", 3), None, entries)} == {3}
    random_specs = build_requests(50, rng, parse_lengths("uniform:2:4"), parse_lengths("normal:5:2"), None)
    assert {s.output_tokens for s in random_specs} == {2, 3, 4} and len({s.prompt for s in random_specs}) == 50
    for bad, message in (('{"text": "a"}\n', "--dataset: .* line 1 needs"), ("not json\n", "line 1 is not JSON"), ("", "holds no prompts"),
                         ('[{"x": 1}]', '"conversations"'), ('[{"conversations": [{"from": "gpt", "value": "a"}]}]', "no chat with a human turn")):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(UserError, match=message):
            read_dataset(tmp_path / "bad")


def test_length_distributions_parse_and_print_back() -> None:
    assert str(parse_lengths("128")) == "128" and str(parse_lengths("uniform:64:256")) == "uniform:64:256"
    assert str(parse_lengths("normal:100:20")) == "normal:100:20"
    rng = random.Random(1)
    assert all(parse_lengths("normal:2:50").sample(rng) >= 1 for _ in range(100))


@pytest.mark.parametrize("argv, flag", [
    (["--prompt-tokens", "uniform:9:2"], "--prompt-tokens"),
    (["--prompt-tokens", "0"], "--prompt-tokens"),
    (["--output-tokens", "normal:x:1"], "--output-tokens"),
    (["--output-tokens", "poisson:3"], "--output-tokens"),
    (["--rate", "0"], "--rate"),
    (["--rate", "-2"], "--rate"),
    (["--rate", "fast"], "--rate"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "1", "--rate", "2"], "--rate"),
    (["--num-requests", "-1"], "--num-requests"),
    (["--goodput", "ttft:abc"], "--goodput"),
    (["--goodput", "latency:5"], "--goodput"),
    (["--dataset", "x.jsonl", "--prompt-tokens", "5"], "--prompt-tokens"),
])
def test_bad_flags_are_an_argparse_error_naming_the_flag(capsys, argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}" in err.splitlines()[-1]


def _error_line(capsys, url: str, tmp_path: Path) -> str:
    code, out, err = _run(capsys, "bench", "serve", "--base-url", url, "--concurrency", "1", "--out-dir", str(tmp_path))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "serve.json").exists()
    return err


class _WebSite(http.server.SimpleHTTPRequestHandler):
    """Files of a folder, HTML 404 pages for anything else, and no log lines on stderr."""

    def log_message(self, *args) -> None:
        pass


def test_unreachable_and_non_openai_urls_are_one_error_line(capsys, tmp_path: Path) -> None:
    assert _error_line(capsys, f"http://127.0.0.1:{free_port()}", tmp_path).startswith("jaxserve: error: cannot reach http://127.0.0.1:")
    (tmp_path / "index.html").write_text("<html>a web page</html>")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_WebSite, directory=str(tmp_path))) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        try:
            err = _error_line(capsys, f"http://127.0.0.1:{site.server_address[1]}", tmp_path)
        finally:
            site.shutdown()
    assert "answered HTTP 404 (text/html" in err and "is it an OpenAI-compatible server?" in err


def test_without_matplotlib_the_error_says_how_to_install_it(capsys, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    code, _, err = _run(capsys, "bench", "serve", "--base-url", "http://127.0.0.1:1")
    assert code == 2 and "pip install 'jaxserve[bench]'" in err


def test_bench_with_a_model_name_is_the_stored_version_benchmark() -> None:
    """`jaxserve bench NAME`, from before `bench` had sub-commands, still names the store benchmark."""
    for argv in (["bench", "tiny@2", "--num-prompts", "3"], ["bench", "model", "tiny@2", "--num-prompts", "3"]):
        args = _parse(argv)
        assert (args.benchmark, args.model, args.num_prompts) == ("model", "tiny@2", 3)
    assert _parse(["bench"]).benchmark == "model" and _parse(["bench", "serve"]).benchmark == "serve"


def test_generate_on_a_tiny_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    """A process of its own: it turns JAX's persistent compilation cache off to measure compiles."""
    cmd = [sys.executable, "-m", "jaxserve", "bench", "generate", "--model", str(tiny_gguf), "--decode-tokens", "6",
           "--quantizations", "int8", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "generate.json").read_text())
    assert report["model"] == str(tiny_gguf) and report["download_s"] is None and report["backend"] == "cpu"
    assert report["args"]["decode_tokens"] == 6 and report["prompt_tokens"] > 200 and report["prefill_tokens_per_s"] > 0
    assert list(report["configurations"]) == ["float", "int8"]
    for c in report["configurations"].values():
        assert len(c["step_ms"]) == 5 and all(s > 0 for s in c["step_ms"]) and c["decode_tokens_per_s"] > 0
    assert report["configurations"]["int8"]["dense_weight_bytes"] < report["configurations"]["float"]["dense_weight_bytes"]
    assert report["decode_tokens_per_s"] == report["configurations"]["float"]["decode_tokens_per_s"]
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["configuration", "float", "int8"]
    _assert_png(tmp_path / "generate.png")


def test_throughput_on_a_tiny_gguf(tiny_gguf: Path, capsys, tmp_path: Path) -> None:
    code, out, err = _run(capsys, "bench", "throughput", "--model", str(tiny_gguf), "--requests", "2", "--sequential-sample", "1",
                          "--prompt-tokens", "16", "--output-tokens", "8", "--streams", "1", "--long-prompt-tokens", "96",
                          "--prefill-chunk", "32", "--out-dir", str(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert [(r["requests"], r["output_tokens_per_s"] > 0) for r in report["runs"].values()] == [(2, True), (1, True)]
    assert report["speedup"] > 0 and report["compiles_while_measuring"] == 0  # warm-up compiled every step shape
    assert list(report["worst_inter_token_gap_s"]) == ["chunked_prefill_32", "whole_prompt_in_one_step"]
    assert all(gap > 0 for gap in report["worst_inter_token_gap_s"].values())
    assert "batched" in out and "one_at_a_time" in out and "speedup" in out
    _assert_png(tmp_path / "throughput.png")
