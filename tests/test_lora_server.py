"""LoRA adapters through a real `jaxserve serve` on a tiny model: served as models of their own beside
the base, mixed in shared steps, loaded and unloaded at runtime through vLLM's routes, with no compile."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import aiohttp
import openai
import pytest

from tests.server_process import DEADLINE, ServerProcess, get, post
from tests.test_lora import random_adapter
from tests.tiny_models import tiny_config, tiny_params, write_gguf

ADMIN = "sk-lora-admin"
FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--num-pages", "64", "--max-model-len", "256"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_server")
    cfg = tiny_config()
    model = write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg, seed=3))
    adapters = [random_adapter(folder / f"a{i}", cfg, seed=i) for i in range(5)]
    return folder, model, adapters


@pytest.fixture(scope="module")
def server(files):
    folder, model, adapters = files
    modules = [f"a{i}={adapters[i]}" for i in range(4)]
    args = ["--model", f"base={model}", *FLAGS, "--lora-modules", *modules, "--max-loras", "4", "--max-lora-rank", "8", "--admin-api-key", ADMIN]
    with ServerProcess(args, folder / "log.txt") as proc:
        yield proc


def _compiles(url: str) -> float:
    status, text = get(url + "/metrics")
    assert status == 200
    return sum(float(m.group(1)) for m in re.finditer(r'^jaxserve:num_compiles\{[^}]*\} (\S+)$', text, re.M))


def test_adapters_are_listed_with_their_base_model(server, files) -> None:
    _, _, adapters = files
    cards = {c["id"]: c for c in json.loads(get(server.url + "/v1/models")[1])["data"]}
    assert cards["base"]["parent"] is None
    for i in range(4):
        assert cards[f"a{i}"]["parent"] == "base" and cards[f"a{i}"]["root"] == str(adapters[i])


def test_mixed_requests_equal_each_alone_and_a_fifth_adapter_loads_without_a_compile(server, files) -> None:
    """16 requests over 4 adapters and the base model at once: each gets the tokens it gets alone. A
    fifth adapter loaded while requests run compiles nothing (the compile metric), and serves."""
    _, _, adapters = files
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=DEADLINE * 5)
    names = ["base", "a0", "a1", "a2", "a3"] * 4
    prompts = [f"request {i}: {'abc' * (i % 5 + 1)}" for i in range(16)]

    async def one(prompt: str, model: str, max_tokens: int = 8) -> list[str]:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].logprobs.tokens

    async def run() -> None:
        alone = [await one(p, m) for p, m in zip(prompts, names)]
        together = await asyncio.gather(*(one(p, m) for p, m in zip(prompts, names)))
        assert together == alone
        assert len({tuple(t) for t in alone[:5]}) == 5  # the base model and four adapters differ
        before = _compiles(server.url)
        running = [asyncio.create_task(one(p, m, 48)) for p, m in zip(prompts[:8], names[1:9])]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            async with http.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": str(adapters[4])}) as r:
                assert r.status == 200, await r.text()
                assert "a4" in await r.text()
        assert all(len(t) == 48 for t in await asyncio.gather(*running))
        assert len(await one("fresh adapter", "a4")) == 8
        assert _compiles(server.url) == before > 0

    asyncio.run(run())


def test_bad_adapters_get_a_clear_error_and_serving_goes_on(server, files, tmp_path) -> None:
    _, _, adapters = files
    cfg = tiny_config()
    other = random_adapter(tmp_path / "other", tiny_config(hidden_size=32, num_heads=2, num_kv_heads=1), seed=1, rank=2)
    big = random_adapter(tmp_path / "big", cfg, seed=2, rank=16)
    corrupt = random_adapter(tmp_path / "corrupt", cfg, seed=3, rank=2)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    load = server.url + "/v1/load_lora_adapter"
    for path, reason in ((other, "another base model"), (big, "over --max-lora-rank 8"), (tmp_path / "nowhere", "not found"),
                         (corrupt, "not a readable safetensors file"), (adapters[0], "already been loaded")):
        status, text = post(load, {"lora_name": "a0" if path == adapters[0] else "bad", "lora_path": str(path)}, ADMIN)
        assert status == 400 and reason in json.loads(text)["error"]["message"], text
    assert post(load, {"lora_name": "x", "lora_path": str(adapters[1])})[0] == 401  # no admin key
    assert post(load, {"lora_name": "x", "lora_path": str(adapters[1])}, "sk-wrong")[0] == 401
    assert post(load, {"lora_name": "x"}, ADMIN)[0] == 400
    assert post(server.url + "/v1/unload_lora_adapter", {"lora_name": "nope"}, ADMIN)[0] == 404
    assert post(server.url + "/v1/unload_lora_adapter", {"lora_name": "a3"}, ADMIN)[0] == 200
    status, text = post(server.url + "/v1/completions", {"model": "a3", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    status, text = post(server.url + "/v1/completions", {"model": "a2", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and json.loads(text)["model"] == "a2"


def test_without_an_admin_key_the_routes_do_not_exist_and_a_bad_module_stops_the_start(files) -> None:
    folder, model, adapters = files
    with ServerProcess(["--model", str(model), *FLAGS, "--enable-lora", "--no-warmup"], folder / "plain.txt") as proc:
        assert post(proc.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapters[0])})[0] == 404
    bad = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--model", str(model), *FLAGS, "--no-warmup",
                          "--lora-modules", f"a={folder / 'missing'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "LoRA adapter 'a'" in bad.stderr and "not found" in bad.stderr
