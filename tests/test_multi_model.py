"""Several models and versions behind one endpoint, through real `jaxserve serve` processes: SmolLM2
beside a tiny random model, each answering exactly as offline; lazy models loaded on first use and
evicted; a canary rolled out, promoted, rolled back and unloaded under its own streams, through the
admin API and `jaxserve rollout`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
import yaml

from jaxserve.checkpoint.loader import load_model
from jaxserve.engine.llm import LLM
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.traffic import TrafficSplit
from tests.server_process import DEADLINE, SERVER_ENGINE, ServerProcess, engine_flags, get, wait_for
from tests.tiny_models import tiny_config, tiny_params, write_hf_folder

MODEL = "smollm2-135m-instruct"
ADMIN = "sk-admin-of-the-test"
TINY_SETTINGS = {"max_num_seqs": 8, "num_pages": 64}  # the tiny model's own engine settings (YAML)


def _call(url: str, method: str = "GET", body: object = None, key: str | None = ADMIN, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ---- two models in one process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """SmolLM2 (a plain --model, the shared test servers' engine flags) and a tiny random model named
    `tiny` with its own engine settings, from the config file's `models:` list; no admin key."""
    folder = tmp_path_factory.mktemp("two_models")
    cfg = tiny_config()
    write_hf_folder(folder / "tiny", cfg, tiny_params(cfg, seed=3))
    (folder / "serve.yaml").write_text(yaml.safe_dump({"models": [{"name": "tiny", "model": str(folder / "tiny"), **TINY_SETTINGS}]}))
    args = [*engine_flags(SERVER_ENGINE), "--model", MODEL, "--config", str(folder / "serve.yaml"), "--no-warmup"]
    with ServerProcess(args, folder / "log.txt") as proc:
        proc.tiny = folder / "tiny"
        yield proc


def test_two_models_answer_as_offline_and_a_concurrent_mix_of_32_loses_nothing(two_models, smollm2) -> None:
    prompts = [f"Item {i}: the {w} of the" for i, w in enumerate("river stone light window garden letter music winter".split())]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    smol = [o.outputs[0] for o in LLM(smollm2, SERVER_ENGINE).generate(prompts, greedy, use_tqdm=False)]
    tiny_model = load_model(str(two_models.tiny), unroll_layers=False)
    tiny = [o.outputs[0] for o in LLM(tiny_model, dataclasses.replace(SERVER_ENGINE, **TINY_SETTINGS)).generate(prompts, greedy, use_tqdm=False)]

    client = openai.OpenAI(base_url=two_models.url + "/v1", api_key="none", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [MODEL, "tiny"]
    assert (cards["tiny"].root, cards["tiny"].parent, cards[MODEL].parent) == (str(two_models.tiny), None, None)
    assert client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0).choices[0].text == smol[0].text
    assert client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=0).choices[0].text == tiny[0].text

    async def mix() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=two_models.url + "/v1", api_key="none", max_retries=0) as aclient:
            async def one(model: str, prompt: str, stream: bool) -> tuple[str, str]:
                if not stream:
                    choice = (await aclient.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)).choices[0]
                    return choice.text, choice.finish_reason
                text, finish = "", None
                async for chunk in await aclient.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True):
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                return text, finish

            calls = [one(model, p, stream) for p in prompts for model in (MODEL, "tiny") for stream in (False, True)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(mix())
    expected = [(e.text, e.finish_reason) for s, t in zip(smol, tiny) for e in (s, s, t, t)]
    assert len(answers) == 32 and answers == expected
    metrics = get(two_models.url + "/metrics")[1]
    for name in (MODEL, "tiny"):
        assert f'jaxserve:routed_requests_total{{model_name="{name}",version="default"}} 17.0' in metrics
        assert f'jaxserve:num_requests_running{{engine="0",model_name="{name}",version="default"}} 0.0' in metrics
    missing = _call(two_models.url + "/v1/completions", "POST", {"model": "gpt-5", "prompt": "hi"}, key=None)
    assert missing[0] == 404 and f"'{MODEL}', 'tiny'" in missing[2]["error"]["message"]
    assert _call(two_models.url + "/admin/models", key=ADMIN)[0] == 404  # no admin key configured: no admin routes


# ---- versions, lazy models, a canary -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Tiny random models with a 1024-token context: `chat` version v1 (seed 0), and lazy `lazy-a` and
    `lazy-b`; at most two versions loaded at once; an admin key. Version v2 (seed 1) is loaded by the
    tests through the admin API."""
    folder = tmp_path_factory.mktemp("versions")
    cfg = tiny_config(max_position_embeddings=1024)
    for seed in (0, 1):
        write_hf_folder(folder / f"seed{seed}", cfg, tiny_params(cfg, seed=seed))
    models = [{"name": "chat", "model": str(folder / "seed0"), "version": "v1"},
              {"name": "lazy-a", "model": str(folder / "seed1"), "lazy": True},
              {"name": "lazy-b", "model": str(folder / "seed0"), "lazy": True}]
    (folder / "serve.yaml").write_text(yaml.safe_dump({"models": models}))
    args = ["--config", str(folder / "serve.yaml"), "--max-num-seqs", "16", "--max-num-batched-tokens", "128", "--num-pages", "640",
            "--max-model-len", "1024", "--max-loaded-models", "2", "--admin-api-key", ADMIN, "--no-warmup"]
    with ServerProcess(args, folder / "log.txt") as proc:
        proc.v2 = folder / "seed1"
        yield proc


def _states(ready: dict) -> dict[str, dict[str, str]]:
    """Each model's versions' states, from a /ready body."""
    return {name: {v: x["state"] for v, x in m["versions"].items()} for name, m in ready["models"].items()}


def _complete(server, model: str, **extra) -> tuple[int, dict, dict]:
    return _call(server.url + "/v1/completions", "POST", {"model": model, "prompt": "Hello there", "max_tokens": 2, **extra}, key=None)


def test_lazy_models_load_on_first_request_and_the_least_recently_used_idle_one_makes_room(versions) -> None:
    status, _, ready = _call(versions.url + "/ready", key=None)
    assert status == 200 and _states(ready) == {"chat": {"v1": "ready"}, "lazy-a": {"default": "unloaded"}, "lazy-b": {"default": "unloaded"}}
    assert all(m["ready"] and m["healthy"] for m in ready["models"].values())  # a lazy model loads on demand
    status, headers, body = _complete(versions, "lazy-a")
    assert status == 503 and headers["Retry-After"] == "5" and "loading" in body["error"]["message"]
    assert _call(versions.url + "/ready", key=None)[0] == 200  # a lazy model does not make the server unready
    wait_for(lambda: _complete(versions, "lazy-a")[0] == 200, "lazy-a loaded")
    assert _complete(versions, "lazy-b")[0] == 503  # two loaded already (chat v1, lazy-a): lazy-a, idle, makes room
    wait_for(lambda: _complete(versions, "lazy-b")[0] == 200, "lazy-b loaded")
    assert _states(_call(versions.url + "/ready", key=None)[2]) == {"chat": {"v1": "ready"}, "lazy-a": {"default": "unloaded"},
                                                                  "lazy-b": {"default": "ready"}}
    assert _complete(versions, "chat")[0] == 200  # chat is not lazy: never evicted


def test_canary_split_rollout_promote_rollback_and_unload_under_its_own_streams(versions) -> None:
    admin = versions.url + "/admin/models"
    assert _call(admin, key=None)[0] == 401 and _call(admin, key="sk-wrong")[0] == 401
    assert _call(f"{admin}/chat/versions", "POST", {"version": "v2", "model": str(versions.v2), "lazzy": 1})[0] == 400
    # A version that cannot load fails alone; it takes no traffic and goes when asked.
    assert _call(f"{admin}/chat/versions", "POST", {"version": "broken", "model": "/no/such/model"})[0] == 202
    broken = lambda: next(v for v in _call(f"{admin}/chat")[2]["versions"] if v["version"] == "broken")  # noqa: E731
    wait_for(lambda: broken()["state"] == "failed", "the broken version's load failed")
    assert "not found" in broken()["error"] and _complete(versions, "chat")[0] == 200
    assert _call(f"{admin}/chat/traffic", "PUT", {"v1": 0.5, "broken": 0.5})[0] == 409
    assert _call(f"{admin}/chat/versions/broken", "DELETE")[0] == 202 and _call(f"{admin}/chat/versions/nope", "DELETE")[0] == 404
    wait_for(lambda: [v["version"] for v in _call(f"{admin}/chat")[2]["versions"]] == ["v1"], "the broken version removed")
    status, _, state = _call(f"{admin}/chat/versions", "POST", {"version": "v2", "model": str(versions.v2), "max_num_seqs": 8})
    assert status == 202 and [v["version"] for v in state["versions"]] == ["v1", "v2"] and state["traffic"] == {"v1": 1.0}
    assert _call(f"{admin}/chat/versions", "POST", {"version": "v2", "model": str(versions.v2)})[0] == 409
    wait_for(lambda: _call(f"{admin}/chat")[2]["versions"][1]["state"] == "ready", "v2 loaded (lazy-b, idle, evicted)")
    assert _call(f"{admin}/chat/traffic", "PUT", {"v1": 0.8, "v2": 0.1})[0] == 400
    assert _call(f"{admin}/chat/traffic", "PUT", {"v1": 0.9, "v3": 0.1})[0] == 400
    assert _call(f"{admin}/nope/traffic", "PUT", {"v1": 1.0})[0] == 404
    assert _call(f"{admin}/chat/traffic", "PUT", {"v1": 0.9, "v2": 0.1})[0] == 200

    # Sticky: each user's version is the split's for its hash, every time; a session header goes first.
    split = TrafficSplit.parse({"v1": 0.9, "v2": 0.1}, ["v1", "v2"])
    for i in range(24):
        user = f"user-{i}"
        for _ in range(2):
            status, headers, _ = _complete(versions, "chat", user=user, max_tokens=1)
            assert status == 200 and headers["X-Model-Version"] == split.pick("chat", user, random.Random())
        session = f"session-{i}"
        headers = _call(versions.url + "/v1/completions", "POST", {"model": "chat", "prompt": "Hi", "max_tokens": 1, "user": user}, key=None,
                        headers={"X-Session-Id": session})[1]
        assert headers["X-Model-Version"] == split.pick("chat", session, random.Random())
    cards = {m["id"]: m for m in json.loads(get(versions.url + "/v1/models")[1])["data"]}
    assert {"chat", "chat@v1", "chat@v2"} <= set(cards) and cards["chat@v2"]["root"] == str(versions.v2)

    # `jaxserve rollout` through 50% to 100% (no traffic to judge), then promote.
    from jaxserve.cli import main

    assert main(["rollout", "chat", "--to", "v2", "--stages", "50,100", "--interval", "0.2", "--url", versions.url, "--admin-key", ADMIN]) == 0
    state = _call(f"{admin}/chat")[2]
    assert (state["production"], state["previous"], state["traffic"]) == ("v2", "v1", {"v2": 1.0})
    assert _call(f"{admin}/chat/versions/v2", "DELETE")[2]["error"]["code"] == "only_version_with_traffic"

    # 8 long streams on v2; roll back to v1 and unload v2 while they run: all finish, nothing sees a 5xx.
    async def run() -> tuple[list, list[int], dict]:
        async with aiohttp.ClientSession() as s:
            streaming: set[int] = set()  # streams that have had their first chunk
            started = asyncio.Event()

            async def stream(i: int) -> tuple[str, str | None, int]:
                body = {"model": "chat", "prompt": f"Story {i}:", "max_tokens": 600, "ignore_eos": True, "stream": True, "user": f"streamer-{i}",
                        "stream_options": {"include_usage": True}}
                finish, tokens = None, 0
                async with s.post(versions.url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    async for line in r.content:
                        if not line.startswith(b"data: {"):
                            continue
                        streaming.add(i)
                        if len(streaming) == 8:
                            started.set()
                        chunk = json.loads(line[6:])
                        if chunk["choices"]:
                            finish = chunk["choices"][0]["finish_reason"] or finish
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                    return r.headers["X-Model-Version"], finish, tokens

            streams = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.wait_for(started.wait(), DEADLINE)
            rollback = await asyncio.to_thread(_call, f"{admin}/chat/rollback", "POST")
            unload = await asyncio.to_thread(_call, f"{admin}/chat/versions/v2", "DELETE")
            others = [(await asyncio.to_thread(_complete, versions, "chat", user=f"late-{i}"))[0] for i in range(8)]
            results = await asyncio.gather(*streams)
            return results, [rollback[0], unload[0], *others], unload[2]

    results, statuses, unloading = asyncio.run(run())
    assert results == [("v2", "length", 600)] * 8
    assert statuses == [200, 202] + [200] * 8
    v2 = next(v for v in unloading["versions"] if v["version"] == "v2")
    assert v2["state"] == "draining" and v2["in_flight"] > 0 and unloading["traffic"] == {"v1": 1.0}
    wait_for(lambda: [v["version"] for v in _call(f"{admin}/chat")[2]["versions"]] == ["v1"], "v2 unloaded once its streams ended")
    assert "chat@v2" not in [m["id"] for m in json.loads(get(versions.url + "/v1/models")[1])["data"]]

    # Figures per version, for comparing a canary with production.
    stats = _call(f"{admin}/chat/stats?window=600")[2]["versions"]
    assert stats["v1"]["requests"] > 0 and stats["v1"]["errors"] == 0 and stats["v1"]["e2e_p99"] > 0
    metrics = get(versions.url + "/metrics")[1]
    assert 'jaxserve:routed_requests_total{model_name="chat",version="v2"}' in metrics
    assert 'jaxserve:e2e_request_latency_seconds_count{model_name="chat",version="v1"}' in metrics
