"""Tenants: keys with identities and limits (`--api-keys-file`), token-bucket quotas with OpenAI's
`x-ratelimit-*` headers, model access, priority caps, usage and cost, SIGHUP reload. The server is a
real `jaxserve serve` of SmolLM2 driven by aiohttp and the `openai` client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import time

import aiohttp
import openai
import pytest

from jaxserve.errors import UserError
from jaxserve.server.quota import TokenBucket, duration
from jaxserve.server.responses import ResponseStore
from jaxserve.server.tenants import load_keys
from tests.server_process import DEADLINE, SERVER_ARGS, ServerProcess, get, until, wait_for

MODEL = "smollm2-135m-instruct"
HASHED_KEY = "sk-hashed-key-of-team-h"
KEYS = f"""
keys:
  "sk-limited":
    tenant: limited
    requests_per_minute: 60
    burst: 5
    prompt_tokens_per_minute: 2000
  "sk-free":
    tenant: free
  "sk-admin":
    tenant: ops
    admin: true
  "sk-elsewhere":
    tenant: elsewhere
    models: [some-other-model]
  "sk-thrifty":
    tenant: thrifty
    generated_tokens_per_minute: 12
  "sk-counted":
    tenant: counted
  "sk-flood":
    tenant: flood
  "sk-capped":
    tenant: capped
    priority: 2
  "sk-small":
    tenant: small
  "sha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}":
    tenant: hashed
    max_concurrent: 1
"""
# The keys file reloaded by SIGHUP: `counted` gets a limit, `free` is gone, `newcomer` arrives.
RELOADED = KEYS.replace('"sk-free":\n    tenant: free\n', '"sk-newcomer":\n    tenant: newcomer\n').replace(
    '"sk-counted":\n    tenant: counted\n', '"sk-counted":\n    tenant: counted\n    requests_per_minute: 1000\n')


def _server_args(keys_file) -> list[str]:
    args = [a for a in SERVER_ARGS]
    i = args.index("--api-key")
    del args[i : i + 2]
    # no warm-up: the shapes these tests use compile on first use (a cold run would compile all of them twice, here and in the shared server)
    return [*args, "--api-keys-file", str(keys_file), "--cost-per-hour", "3.6", "--scheduling-policy", "fair", "--no-warmup"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "keys.yaml").write_text(KEYS)
    with ServerProcess(_server_args(folder / "keys.yaml"), folder / "log.txt") as proc:
        proc.keys_file = folder / "keys.yaml"
        yield proc


# ---- units: buckets, durations, keys files ----------------------------------------------------------


def test_bucket_grants_at_most_capacity_plus_the_rate() -> None:
    bucket = TokenBucket(per_minute=60, capacity=5, now=0.0)
    granted = 0
    for step in range(1000):  # 100 s, asking every 0.1 s
        now = step * 0.1
        if bucket.available(now) >= 1:
            bucket.take(1, now)
            granted += 1
        assert granted <= 5 + 60 * now / 60 + 1e-9
    assert granted == 5 + 99  # capacity at start, then one a second
    empty = TokenBucket(per_minute=60, capacity=5, now=0.0)
    empty.take(5, 0.0)
    assert empty.seconds_until(1, 0.0) == pytest.approx(1.0) and empty.seconds_until(1, 0.25) == pytest.approx(0.75)
    assert empty.seconds_until(5, 0.0) == pytest.approx(5.0)


@pytest.mark.parametrize("seconds,text", [(0.25, "250ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (61, "1m1s")])
def test_reset_durations_use_openais_format(seconds, text) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize("body,where", [
    ("keys:\n  k1:\n    tenant: a\n    requests_per_minute: -3\n", "line 4, field 'requests_per_minute': must be an integer > 0"),
    ("keys:\n  k1:\n    tenant: a\n    wieght: 2\n", "line 4, field 'wieght': unknown field"),
    ("keys:\n  k1:\n    requests_per_minute: 3\n", "line 2: each key needs"),
    ("keys:\n  k1:\n    tenant: a\n  k1:\n    tenant: b\n", "line 4: the same key as on line 2"),
    ("keys:\n  k1:\n    tenant: a\n  k2:\n    tenant: a\n    weight: 2\n", "line 4: tenant 'a' has other settings on line 2"),
    ("keys:\n  'sha256:abc':\n    tenant: a\n", "line 2: a hashed key must be"),
    ("keys: [1, 2\n", "not valid YAML"),
    ("tenants: {}\n", "expected a mapping with a non-empty 'keys'"),
])
def test_a_malformed_keys_file_names_the_line_and_field(tmp_path, body, where) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=re.escape(where)):
        load_keys(path)


def test_a_bad_keys_file_stops_the_cli_with_its_line(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  k1:\n    tenant: a\n    max_concurrent: many\n")
    run = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--api-keys-file", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "line 4, field 'max_concurrent': must be an integer > 0" in run.stderr and "Traceback" not in run.stderr


def test_keys_are_kept_only_as_digests(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    table = load_keys(path)
    assert table.find("sk-limited")[1].name == "limited"
    assert table.find(HASHED_KEY)[1].name == "hashed"
    assert table.find("sk-limite") is None and table.find("") is None
    assert all(isinstance(d, bytes) and len(d) == 32 for d, _ in table.entries)
    assert "sk-limited" not in repr(table.entries)


# ---- the server ------------------------------------------------------------------------------------


async def _complete(session: aiohttp.ClientSession, url: str, key: str, **body) -> tuple[int, dict, dict]:
    async with session.post(url + "/v1/completions", json={"model": MODEL, "max_tokens": 4, "temperature": 0, **body},
                            headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, dict(r.headers), await r.json()


def _seconds(reset: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(\d+)s|(\d+)ms", reset)
    assert m, reset
    return int(m.group(3)) / 1000 if m.group(3) else int(m.group(1) or 0) * 60 + int(m.group(2))


def test_a_limited_tenant_gets_429s_within_its_limits_and_another_tenant_none(server, smollm2) -> None:
    """200 requests as fast as possible from a tenant allowed 60 requests and 2,000 prompt tokens a
    minute (burst 5), beside a steady unlimited tenant. Whatever the machine's speed, the limited
    tenant is granted at most what its buckets allow over the time the run took."""
    prompt = "Write a short story about a lighthouse keeper and the sea. " * 5
    prompt_tokens = len(smollm2.tokenizer.encode(prompt))

    async def run():
        async with aiohttp.ClientSession() as session:
            limiter = asyncio.Semaphore(16)

            async def limited():
                async with limiter:
                    return await _complete(session, server.url, "sk-limited", prompt=prompt, max_tokens=2)

            async def free():
                return [await _complete(session, server.url, "sk-free", prompt="Hello", max_tokens=2) for _ in range(10)]

            start = time.monotonic()
            results, others = await asyncio.gather(asyncio.gather(*(limited() for _ in range(200))), free())
            return results, others, time.monotonic() - start

    results, others, elapsed = asyncio.run(run())
    granted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(granted) + len(refused) == 200 and refused
    assert len(granted) <= 5 + 60 * elapsed / 60  # the burst, then one a second
    assert len(granted) * prompt_tokens <= 2000 + 2000 * elapsed / 60
    for status, headers, body in results:
        assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-limit-tokens"] == "2000"
        assert 0 <= int(headers["x-ratelimit-remaining-requests"]) <= 5
        assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) <= 2000
        assert _seconds(headers["x-ratelimit-reset-requests"]) <= 5 * 60 / 60 + 1
        assert _seconds(headers["x-ratelimit-reset-tokens"]) <= 61
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
            assert 1 <= int(headers["Retry-After"]) <= 60
    assert [s for s, _, _ in others] == [200] * 10
    assert all("x-ratelimit-limit-requests" not in h for _, h, _ in others)  # an unlimited tenant has no limits to report


def test_generated_tokens_run_dry_and_the_stream_ends_with_length(server) -> None:
    """A tenant allowed 12 generated tokens a minute (one more every 5 s) asks for 40 in a stream: it
    gets what its bucket gives, whole tokens, then finish_reason "length"; its next request is refused
    until the bucket refills."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-thrifty", max_retries=0)
    start = time.monotonic()
    chunks = list(client.completions.create(model=MODEL, prompt="Count: one, two, three,", max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    generated = chunks[-1].usage.completion_tokens
    assert 12 <= generated <= 12 + 12 * (time.monotonic() - start) / 60
    assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) <= generated
    try:
        client.completions.create(model=MODEL, prompt="More", max_tokens=4)
    except openai.RateLimitError as refused:
        assert "generated tokens" in refused.message and 1 <= int(refused.response.headers["Retry-After"]) <= 5
    else:  # granted only if the bucket had time to refill a token
        assert time.monotonic() - start >= 5 * (1 + generated - 12)


def test_model_access_concurrency_priority_and_hashed_keys(server) -> None:
    async def run():
        async with aiohttp.ClientSession() as session:
            status, _, body = await _complete(session, server.url, "sk-elsewhere", prompt="Hi")
            assert status == 403 and body["error"]["type"] == "permission_error"
            assert "some-other-model" not in json.dumps(body)  # names no model it may use
            async with session.get(server.url + "/v1/models", headers={"Authorization": "Bearer sk-elsewhere"}) as r:
                assert (await r.json())["data"] == []  # nor lists the one it may not
            assert (await _complete(session, server.url, HASHED_KEY, prompt="Hi"))[0] == 200
            # max_concurrent 1: a second request while a long one runs is refused
            long = asyncio.create_task(_complete(session, server.url, HASHED_KEY, prompt="Hi", max_tokens=200, ignore_eos=True))
            await until(lambda: _running(server) >= 1, "the long request running")
            status, headers, body = await _complete(session, server.url, HASHED_KEY, prompt="Hi")
            assert status == 429 and "in flight" in body["error"]["message"] and "Retry-After" in headers
            assert (await long)[0] == 200
            status, _, body = await _complete(session, server.url, "sk-free", prompt="Hi", priority="urgent")
            assert status == 400 and body["error"]["param"] == "priority"
            for key, asked in (("sk-capped", -5), ("sk-capped", 7), ("sk-free", -5)):
                assert (await _complete(session, server.url, key, prompt="Hi", priority=asked))[0] == 200
            # a prompt larger than the tenant's whole per-minute budget: a 400, never worth retrying
            status, headers, body = await _complete(session, server.url, "sk-limited", prompt="word " * 2010)
            assert status == 400 and body["error"]["code"] == "exceeds_tenant_limit" and "Retry-After" not in headers

    asyncio.run(run())
    priorities = [(r["tenant"], r["priority"]) for r in server.log_records() if r.get("msg") == "request" and r.get("tenant") in ("capped", "free")]
    assert priorities[-3:] == [("capped", 2), ("capped", 7), ("free", -5)]  # capped by the class; an uncapped tenant keeps its own


def _running(server) -> float:
    return _metric(get(server.url + "/metrics", "sk-admin")[1], "jaxserve:num_requests_running")


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_stored_responses_belong_to_their_tenant(server) -> None:
    """`previous_response_id` continues only the caller's own stored responses: another tenant's id is
    a 404, as an unknown one is, and a tenant filling its store evicts only its own."""
    free, small = (openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) for key in ("sk-free", "sk-small"))
    first = free.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError) as refused:
        small.responses.create(model=MODEL, previous_response_id=first.id, input="And another?", max_output_tokens=4)
    assert refused.value.body["code"] == "response_not_found"
    assert free.responses.create(model=MODEL, previous_response_id=first.id, input="And another?", max_output_tokens=4).previous_response_id == first.id

    store = ResponseStore(capacity=2)
    store.put("small", "resp_s", [{"role": "user", "content": "kept"}])
    for i in range(3):
        store.put("free", f"resp_{i}", [])
    assert store.get("small", "resp_s") == [{"role": "user", "content": "kept"}] and store.get("free", "resp_2") == []
    for tenant, rid in (("free", "resp_0"), ("free", "resp_s"), ("small", "resp_2")):
        with pytest.raises(Exception, match="no stored response"):
            store.get(tenant, rid)


def test_usage_and_tenant_metrics_agree_with_the_responses(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-counted", max_retries=0)
    prompt_tokens = completion_tokens = 0
    for i in range(3):
        r = client.completions.create(model=MODEL, prompt=f"Tell me a fact about the number {i}.", max_tokens=5 + i, temperature=0)
        prompt_tokens, completion_tokens = prompt_tokens + r.usage.prompt_tokens, completion_tokens + r.usage.completion_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, n=2, temperature=0.8, seed=1)
    prompt_tokens, completion_tokens = prompt_tokens + chat.usage.prompt_tokens, completion_tokens + chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)

    status, body = get(server.url + "/v1/usage?tenant=counted", "sk-counted")
    assert status == 403  # not an admin key
    assert get(server.url + "/metrics", "sk-counted")[0] == 403  # nor may it read every tenant's counters there
    status, body = get(server.url + "/v1/usage?tenant=counted", "sk-admin")
    assert status == 200
    row = json.loads(body)["data"][0]
    assert row["tenant"] == "counted"
    # 4 admitted requests; the bad one is an error, and the two 403s above two more
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"], row["errors"]) == (4, prompt_tokens, completion_tokens, 3)
    assert row["cost_usd"] > 0
    # per model: the two 403s were refused before any model was chosen
    by_model = row["models"][MODEL]
    assert list(row["models"]) == [MODEL] and (by_model["requests"], by_model["completion_tokens"], by_model["errors"]) == (4, completion_tokens, 1)
    metrics = get(server.url + "/metrics", "sk-admin")[1]
    assert _metric(metrics, "jaxserve:tenant_requests_total", tenant="counted", model_name=MODEL) == 4
    assert _metric(metrics, "jaxserve:tenant_prompt_tokens_total", tenant="counted") == prompt_tokens
    assert _metric(metrics, "jaxserve:tenant_generation_tokens_total", tenant="counted") == completion_tokens
    assert _metric(metrics, "jaxserve:tenant_errors_total", tenant="counted") == 3
    assert _metric(metrics, "jaxserve:tenant_errors_total", tenant="counted", model_name=MODEL) == 1
    # TTFT per prompt (the chat's n=2 samples share one), latency per sample; a first token that is EOS counts too
    counts = {name: _metric(metrics, f"jaxserve:tenant_{name}_count", tenant="counted", model_name=MODEL)
              for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds")}
    assert counts == {"time_to_first_token_seconds": 4, "e2e_request_latency_seconds": 5}
    assert _metric(metrics, "jaxserve:cost_per_million_tokens") > 0
    assert _metric(metrics, "jaxserve:tenant_cost_usd", tenant="counted") == pytest.approx(row["cost_usd"], rel=0.2)
    status, body = get(server.url + "/v1/usage?window=-5", "sk-admin")
    assert status == 400 and json.loads(body)["error"]["message"]


def test_fair_share_lets_a_small_tenant_through_a_flood(server) -> None:
    """Tenant `flood` fills all 16 slots and queues 32 more long streams; then tenant `small` sends one
    short request. Under fair share it preempts a flood stream and finishes while most of the flood's
    queue has not started (first come, first served would start all 32 before it)."""
    started = 0

    async def flood(session: aiohttp.ClientSession) -> None:
        nonlocal started
        body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
        async with session.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-flood"}) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: {"):
                    started += 1
                    break
            async for _ in r.content:
                pass

    preempted = _metric(get(server.url + "/metrics", "sk-admin")[1], "jaxserve:num_preemptions_total")

    async def run() -> tuple[int, int]:
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(flood(session)) for _ in range(48)]
            await until(lambda: _running(server) == 16 and _metric(get(server.url + "/metrics", "sk-admin")[1], "jaxserve:num_requests_waiting") == 32,
                        "every slot taken, the rest of the flood queued")
            status, _, _ = await _complete(session, server.url, "sk-small", prompt="Hi", max_tokens=4)
            unstarted = 48 - started
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return status, unstarted

    status, unstarted = asyncio.run(run())
    assert status == 200 and unstarted >= 24
    assert _metric(get(server.url + "/metrics", "sk-admin")[1], "jaxserve:num_preemptions_total") > preempted  # it took a flood stream's slot
    wait_for(lambda: _running(server) == 0, "the cancelled flood freed its slots")


def test_unauthenticated_requests_are_refused_before_the_body_is_read(server) -> None:
    """Headers announcing a 100 MB body, then silence: the 401 comes back without the server waiting for it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"prompt\":")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 401")


def test_sighup_reloads_keys_while_16_streams_run(server) -> None:
    async def stream(session: aiohttp.ClientSession) -> str | None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}
        finish = None
        async with session.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-counted"}) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: {"):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return finish

    async def run():
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(stream(session)) for _ in range(16)]
            await until(lambda: _running(server) >= 8, "the streams running")
            server.keys_file.write_text("keys: [broken\n")
            server.proc.send_signal(signal.SIGHUP)
            await until(lambda: any(r.get("msg", "").startswith("keys file not reloaded") for r in server.log_records()), "the bad file refused")
            assert (await _complete(session, server.url, "sk-free", prompt="Hi"))[0] == 200  # the old keys stay in force
            server.keys_file.write_text(RELOADED)
            server.proc.send_signal(signal.SIGHUP)
            await until(lambda: any(r.get("msg") == "keys file reloaded" for r in server.log_records()), "the new file loaded")
            assert (await _complete(session, server.url, "sk-newcomer", prompt="Hi"))[0] == 200
            assert (await _complete(session, server.url, "sk-free", prompt="Hi"))[0] == 401
            _, headers, _ = await _complete(session, server.url, "sk-counted", prompt="Hi")
            assert headers["x-ratelimit-limit-requests"] == "1000"
            return await asyncio.gather(*streams)

    assert asyncio.run(run()) == ["length"] * 16
    logs = server.log.read_text()
    assert "sk-limited" not in logs and "sk-counted" not in logs and HASHED_KEY not in logs  # only key ids, never keys
