"""Several models and versions behind one endpoint, without a model in sight: the traffic split, the
router (lazy loads, eviction, drains, promote and rollback, adapters) over stand-in engines, model
specs, the `serve` flags that name models, and the rollout driver's decisions."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time

import pytest

from jaxserve.engine.interface import ModelInfo
from jaxserve.errors import UserError
from jaxserve.config import ServerConfig
from jaxserve.rollout import RolloutPlan, judge, run_rollout
from jaxserve.server.deployment import DRAINING, FAILED, LOADING, READY, UNLOADED
from jaxserve.server.model_spec import ModelSpec
from jaxserve.server.protocol import ApiError
from jaxserve.server.router import LOAD_BACKOFF, LOAD_BACKOFF_MAX, ModelRouter
from jaxserve.server.traffic import TrafficSplit, key_point
from tests.server_process import until


# ---- the split ----------------------------------------------------------------------------------------


def test_a_90_10_split_sends_10_percent_of_1000_users_to_v2_and_each_user_always_to_one_version() -> None:
    split = TrafficSplit.parse({"v1": 0.9, "v2": 0.1}, ["v1", "v2"])
    users = [f"user-{i}" for i in range(1000)]
    first = {u: split.pick("chat", u, random.Random()) for u in users}
    assert 0.07 <= sum(v == "v2" for v in first.values()) / len(users) <= 0.13
    for i in range(3):  # again, on any replica's random state: the same version
        assert all(split.pick("chat", u, random.Random(i)) == first[u] for u in users)
    # The hash is SHA-256 of the model and the key: the same after a restart, on any machine.
    assert (key_point("chat", "alice"), key_point("chat", "bob")) == (0.15561692071528652, 0.7959155329196035)
    # The canary was loaded last, so its users keep it as its share grows.
    wider = TrafficSplit.parse({"v1": 0.5, "v2": 0.5}, ["v1", "v2"])
    assert all(wider.pick("chat", u, random.Random()) == "v2" for u in users if first[u] == "v2")
    # Without a key, requests are split at random by the same weights.
    rng = random.Random(7)
    assert 0.07 <= sum(split.pick("chat", None, rng) == "v2" for _ in range(1000)) / 1000 <= 0.13


@pytest.mark.parametrize("body,message", [
    ({"v1": 0.8, "v2": 0.1}, "sum to 0.9"),
    ({"v1": 0.9, "v3": 0.1}, "unknown version(s) 'v3'"),
    ({"v1": 1.2, "v2": -0.2}, "must be a number in [0, 1]"),
    ({"v1": "all"}, "must be a number in [0, 1]"),
    ([0.9, 0.1], "JSON object of version -> share"),
    ({}, "JSON object of version -> share"),
])
def test_a_split_must_sum_to_one_over_known_versions(body, message) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        TrafficSplit.parse(body, ["v1", "v2"])


# ---- model specs and flags ------------------------------------------------------------------------------


def test_model_specs_from_flags_and_mappings() -> None:
    assert ModelSpec.from_flag("chat=/models/x") == ModelSpec("chat", "/models/x")
    assert ModelSpec.from_flag("smollm2-135m-instruct") == ModelSpec("", "smollm2-135m-instruct")
    assert ModelSpec.from_flag("/data/a=b/model") == ModelSpec("", "/data/a=b/model")  # a path may hold '='
    assert ModelSpec.from_flag("chat=mystore@3").version == "3"  # a model store's version names the served version
    spec = ModelSpec.from_mapping({"name": "chat", "model": "m", "version": "v2", "lazy": True, "devices": [2, 3], "tensor_parallel_size": 2}, "x")
    assert (spec.id, spec.lazy, spec.devices, spec.tensor_parallel_size) == ("chat@v2", True, (2, 3), 2)
    for data, message in [({"name": "chat"}, "'model' is required"), ({"name": "a/b", "model": "m"}, "'name' must be"),
                          ({"name": "c", "model": "m", "lazzy": True}, "unknown field 'lazzy'"),
                          ({"name": "c", "model": "m", "lazy": "yes"}, "'lazy' must be"),
                          ({"name": "c", "model": "m", "devices": [0, 0]}, "distinct device indices"), ("chat", "a mapping")]:
        with pytest.raises(UserError, match=message):
            ModelSpec.from_mapping(data, "models[0]")


def test_serve_model_flags_repeat_and_replace_the_config_files(tmp_path) -> None:
    from jaxserve.cli import _model_specs, _parse

    config = tmp_path / "c.yaml"
    config.write_text("model: from-yaml\nmodels:\n  - {name: extra, model: /m/extra, lazy: true}\n")
    args = _parse(["serve", "--config", str(config)])
    assert [(s.name, s.source, s.lazy) for s in _model_specs(args)] == [("", "from-yaml", False), ("extra", "/m/extra", True)]
    args = _parse(["serve", "--config", str(config), "--model", "a=/m/a", "--model", "b=/m/b"])  # flags replace the YAML's model
    assert [(s.name, s.source) for s in _model_specs(args)] == [("a", "/m/a"), ("b", "/m/b"), ("extra", "/m/extra")]
    assert [s.source for s in _model_specs(_parse(["serve"]))] == ["smollm2-135m-instruct"]
    with pytest.raises(UserError, match="name every model but one"):
        _model_specs(_parse(["serve", "--model", "x", "--model", "y"]))


# ---- the router over stand-in engines ----------------------------------------------------------------------


class FakeEngine:
    """What the router uses of an `AsyncEngine`."""

    def __init__(self, name: str) -> None:
        self.info = ModelInfo(name, 100, 64, None)
        self.error: BaseException | None = None
        self.running = False

    def start(self) -> None:
        self.running = True

    def warmup(self, progress: bool = True) -> None:
        pass

    async def shutdown(self) -> None:
        self.running = False

    def subscribe(self, callback) -> None:  # the server's step metrics
        pass


def _router(max_loaded: int | None = None) -> tuple[ModelRouter, list[str]]:
    built: list[str] = []  # every version built; a broken one as "broken:NAME@VERSION"

    def build(spec: ModelSpec) -> list[FakeEngine]:
        if spec.source == "broken":
            built.append(f"broken:{spec.id}")
            raise UserError("model path not found: broken")
        built.append(spec.id)
        return [FakeEngine(spec.source)]

    return ModelRouter(build, max_loaded, warmup=True), built


def _status(call) -> ApiError:
    with pytest.raises(ApiError) as e:
        call()
    return e.value


async def _loaded(router: ModelRouter, name: str, version: str = "default") -> None:
    await until(lambda: router.models[name].versions[version].state != LOADING, f"{name}@{version} loaded")


def test_lazy_models_load_on_first_use_and_evict_the_least_recently_used_idle_one() -> None:
    async def run() -> None:
        router, built = _router(max_loaded=2)
        router.add(ModelSpec("base", "src-base"), [FakeEngine("src-base")])
        for name in ("a", "b"):
            router.add(ModelSpec(name, f"src-{name}", lazy=True))
        await router.start()
        assert router.models["base"].versions["default"].state == READY and built == []
        a = router.route("a", None).deployment
        error = _status(lambda: router.ensure_ready(a))
        assert error.status == 503 and error.retry_after and a.state == LOADING
        await _loaded(router, "a")
        router.ensure_ready(a)  # ready now
        b = router.route("b", None).deployment
        b_error = _status(lambda: router.ensure_ready(b))
        assert b_error.status == 503 and a.state == UNLOADED and a.engines == []  # a was idle: evicted to make room
        await _loaded(router, "b")
        b.load = [1]  # b has a request in flight: it cannot be evicted, and base is not lazy
        busy = _status(lambda: router.ensure_ready(a))
        assert busy.status == 503 and "too few are idle" in busy.message and a.state == UNLOADED
        b.load = [0]
        _status(lambda: router.ensure_ready(a))
        await _loaded(router, "a")
        assert (a.state, b.state) == (READY, UNLOADED) and built == ["a@default", "b@default", "a@default"]
        router.add(ModelSpec("bad", "broken", lazy=True))
        bad = router.route("bad", None).deployment
        _status(lambda: router.ensure_ready(bad))
        await _loaded(router, "bad")
        assert bad.state == FAILED and "model path not found: broken" in bad.error
        assert router.models["base"].versions["default"].state == READY

    asyncio.run(run())


def test_unknown_models_pinned_versions_and_adapters() -> None:
    router, _ = _router()
    router.add(ModelSpec("base", "src-base", version="v1"), [FakeEngine("src-base")])
    router.add(ModelSpec("other", "src-other"), [FakeEngine("src-other")])
    missing = _status(lambda: router.route("gpt-5", None))
    assert missing.status == 404 and "'base', 'base@v1', 'other'" in missing.message
    assert "'other'" not in _status(lambda: router.route("gpt-5", None, visible=lambda m: m == "base")).message
    assert router.route(None, None).model == "base" and router.route("base@v1", None).deployment.version == "v1"
    router.add_adapter("base-sql", "base", "sql", "/adapters/sql")
    route = router.route("base-sql", "user-1")
    assert (route.model, route.adapter, route.deployment.version) == ("base-sql", "sql", "v1")
    listing = {x.id: (x.root, x.parent) for x in router.listing()}
    assert listing == {"base": ("src-base", None), "base@v1": ("src-base", None), "other": ("src-other", None), "base-sql": ("/adapters/sql", "base")}
    with pytest.raises(UserError, match="already served"):
        router.add_adapter("other", "base", "x")
    with pytest.raises(UserError, match="no model 'nope'"):
        router.add_adapter("x", "nope", "x")
    router.remove_adapter("base-sql")
    assert _status(lambda: router.route("base-sql", None)).status == 404
    router.add_adapter("pinned-sql", "base@v1", "sql")
    router.models["base"].versions["v1"].state = DRAINING  # its base version going away: no longer listed or routed
    assert "pinned-sql" not in [x.id for x in router.listing()] and _status(lambda: router.route("pinned-sql", None)).status == 404


def test_promote_rollback_and_unload_after_draining() -> None:
    async def run() -> None:
        router, _ = _router()
        router.add(ModelSpec("chat", "src-v1", version="v1"), [FakeEngine("src-v1")])
        await router.start()
        router.load_version(ModelSpec("chat", "src-v2", version="v2"))
        assert _status(lambda: router.promote("chat", "v2")).status == 409  # still loading
        assert _status(lambda: router.unload("chat", "v2")).status == 409
        await _loaded(router, "chat", "v2")
        assert _status(lambda: router.load_version(ModelSpec("chat", "x", version="v2"))).status == 409
        model = router.models["chat"]
        assert model.split.as_dict() == {"v1": 1.0}  # a new version gets no traffic until told
        assert _status(lambda: router.set_split("chat", {"v1": 0.5, "v2": 0.4})).status == 400
        assert _status(lambda: router.set_split("chat", {"v1": 0.5, "v9": 0.5})).status == 400
        assert _status(lambda: router.set_split("nope", {"v1": 1})).status == 404
        router.set_split("chat", {"v1": 0.9, "v2": 0.1})
        assert router.rollback("chat") == "v1" and model.split.as_dict() == {"v1": 1.0}  # a canary rolled back
        assert _status(lambda: router.rollback("chat")).status == 409  # nothing before v1
        router.promote("chat", "v2")
        assert (model.production, model.previous, model.split.as_dict()) == ("v2", "v1", {"v2": 1.0})
        only = _status(lambda: router.unload("chat", "v2"))
        assert only.status == 409 and only.code == "only_version_with_traffic"
        assert _status(lambda: router.unload("chat", "v9")).status == 404
        assert router.rollback("chat") == "v1" and (model.production, model.previous) == ("v1", None)
        v2 = model.versions["v2"]
        engine = v2.engines[0]
        v2.load = [3]  # three requests still running on v2
        router.unload("chat", "v2")
        assert v2.state == DRAINING and all(router.route("chat", f"u{i}").deployment.version == "v1" for i in range(50))
        assert _status(lambda: router.route("chat@v2", None)).status == 404
        await asyncio.sleep(0.2)
        assert "v2" in model.versions and engine.running  # waits for them
        v2.load = [0]
        await until(lambda: "v2" not in model.versions, "v2 unloaded")
        assert not engine.running
        # Unloading a version that shares traffic scales the others up; production moves to the largest.
        router.load_version(ModelSpec("chat", "src-v3", version="v3"))
        await _loaded(router, "chat", "v3")
        router.set_split("chat", {"v1": 0.7, "v3": 0.3})
        router.unload("chat", "v1")
        assert model.split.as_dict() == {"v3": 1.0} and model.production == "v3"
        await until(lambda: "v1" not in model.versions, "v1 unloaded")

    asyncio.run(run())


def test_a_lazy_version_whose_load_failed_waits_out_a_doubling_backoff_without_evicting_anything() -> None:
    async def run() -> None:
        router, built = _router(max_loaded=2)
        router.add(ModelSpec("base", "src-base"), [FakeEngine("src-base")])
        router.add(ModelSpec("idle", "src-idle", lazy=True))
        router.add(ModelSpec("bad", "broken", lazy=True))
        await router.start()
        idle, bad = router.models["idle"].versions["default"], router.models["bad"].versions["default"]
        _status(lambda: router.ensure_ready(idle))
        await _loaded(router, "idle")
        _status(lambda: router.ensure_ready(bad))  # base and idle loaded: idle is evicted to try
        await _loaded(router, "bad")
        assert bad.state == FAILED and idle.state == UNLOADED and built == ["idle@default", "broken:bad@default"]
        _status(lambda: router.ensure_ready(idle))
        await _loaded(router, "idle")
        for _ in range(3):  # within the backoff: a 503 saying when, no load and no eviction
            error = _status(lambda: router.ensure_ready(bad))
            assert error.status == 503 and LOAD_BACKOFF - 5 < error.retry_after <= LOAD_BACKOFF and "tried again in" in error.message
        assert (bad.state, idle.state) == (FAILED, READY) and built == ["idle@default", "broken:bad@default", "idle@default"]
        assert router.model("bad").state()["versions"][0]["retry_in"] > LOAD_BACKOFF - 5
        bad.retry_at = time.monotonic()  # the backoff is over: one more try (evicting idle), then twice as long
        assert _status(lambda: router.ensure_ready(bad)).status == 503 and bad.state == LOADING and idle.state == UNLOADED
        await _loaded(router, "bad")
        assert bad.state == FAILED and built[-1] == "broken:bad@default"
        assert 2 * LOAD_BACKOFF - 5 < _status(lambda: router.ensure_ready(bad)).retry_after <= 2 * LOAD_BACKOFF
        bad.failed_loads, bad.retry_at = 9, time.monotonic()  # a long run of failures: the backoff stops growing
        _status(lambda: router.ensure_ready(bad))
        await _loaded(router, "bad")
        assert LOAD_BACKOFF_MAX - 5 < _status(lambda: router.ensure_ready(bad)).retry_after <= LOAD_BACKOFF_MAX

    asyncio.run(run())


def test_a_draining_lazy_version_gets_no_traffic_and_routing_never_names_a_version_gone() -> None:
    async def run() -> None:
        router, _ = _router()
        router.add(ModelSpec("chat", "src-v1", version="v1"), [FakeEngine("src-v1")])
        router.add(ModelSpec("chat", "src-v2", version="v2", lazy=True))
        router.add(ModelSpec("chat", "broken", version="v3", lazy=True))
        await router.start()
        model = router.models["chat"]
        router.set_split("chat", {"v1": 0.5, "v2": 0.5})  # a lazy version loads on demand: it may be given traffic
        router.unload("chat", "v2")
        assert model.versions["v2"].state == DRAINING and model.split.as_dict() == {"v1": 1.0}
        refused = _status(lambda: router.set_split("chat", {"v1": 0.5, "v2": 0.5}))
        assert refused.status == 409 and "being unloaded" in refused.message and model.split.as_dict() == {"v1": 1.0}
        await until(lambda: "v2" not in model.versions, "v2 unloaded")
        assert all(router.route("chat", f"u{i}").deployment.version == "v1" for i in range(50))
        # A lazy version whose load failed may still be given traffic (it loads again on demand).
        _status(lambda: router.ensure_ready(model.versions["v3"]))
        await _loaded(router, "chat", "v3")
        router.set_split("chat", {"v1": 0.5, "v3": 0.5})
        router.set_split("chat", {"v1": 1.0})
        # Should a split ever name a version no longer served, its requests go to production, not a KeyError.
        model.split = TrafficSplit.parse({"v1": 0.5, "v3": 0.5}, ["v1", "v3"])
        del model.versions["v3"]
        assert {router.route("chat", f"u{i}").deployment.version for i in range(50)} == {"v1"}

    asyncio.run(run())


def test_a_version_whose_engines_died_may_not_be_promoted_or_given_traffic() -> None:
    async def run() -> None:
        router, _ = _router()
        router.add(ModelSpec("chat", "src-v1", version="v1"), [FakeEngine("src-v1")])
        router.add(ModelSpec("chat", "src-v2", version="v2"), [FakeEngine("src-v2")])
        await router.start()
        model, v2 = router.models["chat"], router.models["chat"].versions["v2"]
        router.set_split("chat", {"v1": 0.9, "v2": 0.1})
        v2.engines[0].error = RuntimeError("device lost")
        assert v2.state == READY and not v2.healthy
        for refused in (_status(lambda: router.promote("chat", "v2")), _status(lambda: router.set_split("chat", {"v1": 0.5, "v2": 0.5}))):
            assert refused.status == 409 and "unhealthy" in refused.message and "device lost" in refused.message
        assert (model.production, model.split.as_dict()) == ("v1", {"v1": 0.9, "v2": 0.1})
        summary = model.state()["versions"][1]
        assert (summary["state"], summary["healthy"], summary["failed_replicas"], summary["engine_error"]) == ("ready", False, 1, "device lost")
        assert router.rollback("chat") == "v1" and model.split.as_dict() == {"v1": 1.0}  # a rollback always works
        # A non-lazy version still loading may not be given traffic either.
        router.load_version(ModelSpec("chat", "src-v3", version="v3"))
        assert _status(lambda: router.set_split("chat", {"v1": 0.5, "v3": 0.5})).status == 409
        await _loaded(router, "chat", "v3")
        router.set_split("chat", {"v1": 0.5, "v3": 0.5})

    asyncio.run(run())


# ---- the server over stand-in engines ------------------------------------------------------------------------

ADMIN = "sk-admin"


def test_a_dead_canary_counts_its_refused_requests_and_shows_unhealthy_while_the_server_stays_in_service() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from jaxserve.server.app import Server

    async def run() -> None:
        router, _ = _router()
        router.add(ModelSpec("chat", "src-v1", version="v1"), [FakeEngine("src-v1")])
        router.add(ModelSpec("chat", "src-v2", version="v2"), [FakeEngine("src-v2")])
        router.add(ModelSpec("other", "src-other"), [FakeEngine("src-other")])
        server = Server(router, ServerConfig(admin_api_key=ADMIN, warmup=False))
        await router.start()
        server.ready = True
        router.set_split("chat", {"v1": 0.5, "v2": 0.5})
        v1, v2 = router.models["chat"].versions["v1"], router.models["chat"].versions["v2"]
        v2.engines[0].error = RuntimeError("device lost")
        admin = {"Authorization": f"Bearer {ADMIN}"}
        users = [u for u in (f"user-{i}" for i in range(100)) if router.models["chat"].split.pick("chat", u, random.Random()) == "v2"][:5]
        async with TestClient(TestServer(server.app())) as client:
            for user in users:
                r = await client.post("/v1/completions", json={"model": "chat", "prompt": "hi", "user": user})
                assert r.status == 503 and "stopped after an error" in (await r.json())["error"]["message"]
            stats = await (await client.get("/admin/models/chat/stats?window=60", headers=admin)).json()
            assert (stats["versions"]["v2"]["requests"], stats["versions"]["v2"]["errors"]) == (5, 5)
            assert server.metrics.errors.labels("chat", "v2")._value.get() == 5 and server.metrics.routed.labels("chat", "v2")._value.get() == 5
            # Refusing a tokenize is no inference outcome.
            assert (await client.post("/tokenize", json={"model": "chat@v2", "prompt": "hi"})).status == 503
            assert v2.stats(60)["requests"] == 5
            assert (await client.post("/admin/models/chat/promote", json={"version": "v2"}, headers=admin)).status == 409
            assert (await client.put("/admin/models/chat/traffic", json={"v1": 0.9, "v2": 0.1}, headers=admin)).status == 409
            state = await (await client.get("/admin/models/chat", headers=admin)).json()
            assert [(v["version"], v["healthy"]) for v in state["versions"]] == [("v1", True), ("v2", False)]
            # The probes: still in service, the dead canary shown.
            for path in ("/health", "/ready"):
                r = await client.get(path)
                body = await r.json()
                assert r.status == 200, (path, body)
                chat = body["models"]["chat"]
                assert chat["healthy"] and chat["versions"]["v2"] == {"state": "ready", "healthy": False, "error": "device lost"}
                assert chat["versions"]["v1"]["healthy"] and body["models"]["other"]["healthy"]
            # One model's production dead: that model is unready, the server still serves the other.
            v1.engines[0].error = RuntimeError("v1 lost")
            body = await (await client.get("/ready")).json()
            assert not body["models"]["chat"]["ready"] and body["models"]["other"]["ready"] and body["status"] == "ready"
            assert (await client.get("/health")).status == 200
            # Every model's production dead: out of service.
            router.models["other"].versions["default"].engines[0].error = RuntimeError("other lost")
            health, ready = await client.get("/health"), await client.get("/ready")
            assert (health.status, ready.status) == (503, 503)
            assert (await health.json())["error"] == "v1 lost" and (await ready.json())["status"] == "engine failed"
            assert server.engine_error is not None  # what `serve`'s watch reads

    asyncio.run(run())


def test_the_admin_key_may_not_be_a_tenant_key_in_the_keys_file(tmp_path, caplog) -> None:
    from jaxserve.server.app import Server

    router, _ = _router()
    router.add(ModelSpec("chat", "src-v1"), [FakeEngine("src-v1")])
    keys = tmp_path / "keys.yaml"
    for entry in (ADMIN, "sha256:" + hashlib.sha256(ADMIN.encode()).hexdigest()):  # the key itself, or its digest
        keys.write_text(f'keys:\n  "sk-team-a": {{tenant: a}}\n  "{entry}": {{tenant: b}}\n')
        with pytest.raises(UserError, match="admin API key is also an API key"):
            Server(router, ServerConfig(api_keys_file=str(keys), admin_api_key=ADMIN))
    keys.write_text('keys:\n  "sk-team-a": {tenant: a}\n')
    server = Server(router, ServerConfig(api_keys_file=str(keys), admin_api_key=ADMIN))
    keys.write_text(f'keys:\n  "sk-team-a": {{tenant: a}}\n  "{ADMIN}": {{tenant: b}}\n')
    with caplog.at_level(logging.ERROR, logger="jaxserve.server"):
        server.reload_keys()  # refused: the old file stays in force
    assert "admin API key is also an API key" in caplog.text
    assert server.keys.find(ADMIN) is None and server.keys.find("sk-team-a") is not None
    Server(router, ServerConfig(api_keys_file=str(keys)))  # without an admin key, nothing to clash with


# ---- the rollout driver ------------------------------------------------------------------------------------


class FakeAdmin:
    """The admin API as the rollout sees it: a canary whose figures at each stage are given."""

    def __init__(self, canary_per_stage: list[dict], production_per_stage: list[dict] | None = None, canary_state: dict | None = None) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.canary_state = {"version": "v2", "state": "ready", "healthy": True, "error": None, "engine_error": None, **(canary_state or {})}
        self.figures = iter(canary_per_stage)
        steady = {"requests": 200, "errors": 1, "error_rate": 0.005, "e2e_p99": 2.0, "ttft_p99": 0.5}
        self.production = iter(production_per_stage or [steady] * len(canary_per_stage))

    def call(self, method: str, path: str, body: object = None) -> dict:
        self.calls.append((method, path.split("?")[0].removeprefix("/admin/models/chat"), body))
        if method == "GET" and path.startswith("/admin/models/chat/stats"):
            return {"versions": {"v1": next(self.production), "v2": next(self.figures)}}
        if method == "GET":
            return {"production": "v1", "versions": [{"version": "v1", "state": "ready", "healthy": True}, self.canary_state]}
        return {}


GOOD = {"requests": 40, "errors": 0, "error_rate": 0.0, "e2e_p99": 2.2, "ttft_p99": 0.5}


def test_a_rollout_promotes_after_good_stages_and_rolls_back_at_a_regression() -> None:
    plan = RolloutPlan("chat", "v2", (10, 50, 100), interval=300)
    admin = FakeAdmin([GOOD, GOOD, GOOD])
    slept: list[float] = []
    report = run_rollout(plan, admin, sleep=slept.append)
    assert report["outcome"] == "promoted" and slept == [300, 300, 300]
    traffic = [body for method, path, body in admin.calls if path == "/traffic"]
    assert traffic == [{"v1": 0.9, "v2": 0.1}, {"v1": 0.5, "v2": 0.5}, {"v2": 1.0}]
    assert admin.calls[-1] == ("POST", "/promote", {"version": "v2"})

    failing = {**GOOD, "errors": 4, "error_rate": 0.1}
    admin = FakeAdmin([GOOD, failing])
    report = run_rollout(plan, admin, sleep=lambda s: None)
    assert report["outcome"] == "rolled_back" and "error rate 0.1000" in report["reason"] and len(report["stages"]) == 2
    assert admin.calls[-1] == ("POST", "/rollback", None)

    slow = {**GOOD, "e2e_p99": 3.5}
    assert "p99 e2e latency 3.500 s exceeds 1.5x" in judge(plan, {"error_rate": 0.005, "e2e_p99": 2.0}, slow)
    few = {**failing, "requests": 3}  # too few to judge: passes
    assert run_rollout(plan, FakeAdmin([few, GOOD, GOOD]), sleep=lambda s: None)["outcome"] == "promoted"
    # At 100% production serves only a few stragglers: the canary is judged against the stage before.
    steady = {"requests": 200, "errors": 1, "error_rate": 0.005, "e2e_p99": 2.0, "ttft_p99": 0.5}
    stragglers = {"requests": 30, "errors": 0, "error_rate": 0.0, "e2e_p99": 0.5, "ttft_p99": 0.1}
    report = run_rollout(plan, FakeAdmin([GOOD, GOOD, GOOD], [steady, steady, stragglers]), sleep=lambda s: None)
    assert report["outcome"] == "promoted" and report["stages"][-1]["production"] == steady
    with pytest.raises(UserError, match="end at 100"):
        RolloutPlan("chat", "v2", (10, 50))


def test_a_rollout_rolls_back_a_canary_that_got_no_traffic_or_is_unhealthy() -> None:
    plan = RolloutPlan("chat", "v2", (10, 50, 100), interval=300)
    none = {"requests": 0, "errors": 0, "error_rate": 0.0, "e2e_p99": None, "ttft_p99": None}
    # No canary request while production had 200: the canary took none of its share.
    admin = FakeAdmin([none, GOOD, GOOD])
    report = run_rollout(plan, admin, sleep=lambda s: None)
    assert report["outcome"] == "rolled_back" and "no requests while production had 200" in report["reason"] and len(report["stages"]) == 1
    assert admin.calls[-1] == ("POST", "/rollback", None) and ("POST", "/promote", {"version": "v2"}) not in admin.calls
    # Zero canary requests that could be chance (production had few), or no traffic at all: unjudged, as before.
    quiet = {**none, "requests": 3, "error_rate": 0.0}
    assert run_rollout(plan, FakeAdmin([none, none, GOOD], [quiet, none, none]), sleep=lambda s: None)["outcome"] == "promoted"
    # At 100% any production request with none on the canary fails the stage.
    steady = {"requests": 200, "errors": 1, "error_rate": 0.005, "e2e_p99": 2.0, "ttft_p99": 0.5}
    report = run_rollout(plan, FakeAdmin([GOOD, GOOD, none], [steady, steady, quiet]), sleep=lambda s: None)
    assert report["outcome"] == "rolled_back" and "no requests while production had 3" in report["reason"]
    # The server shows the canary's engines dead: rolled back whatever its figures (its stats may be too few to judge).
    admin = FakeAdmin([GOOD], canary_state={"healthy": False, "engine_error": "device lost"})
    report = run_rollout(plan, admin, sleep=lambda s: None)
    assert report["outcome"] == "rolled_back" and "unhealthy" in report["reason"] and "device lost" in report["reason"]
    assert admin.calls[-1] == ("POST", "/rollback", None)


# ---- per-model engine settings ---------------------------------------------------------------------------


def test_each_model_gets_its_own_settings_devices_and_replicas(tmp_path) -> None:
    """A model's own settings override the `serve` flags; `devices` places its replicas (the tests have
    eight CPU devices)."""
    import jax

    from jaxserve.server.engine_factory import EngineFactory
    from tests.tiny_models import TINY_ENGINE, tiny_config, tiny_params, write_hf_folder

    cfg = tiny_config()
    write_hf_folder(tmp_path / "tiny", cfg, tiny_params(cfg))
    factory = EngineFactory(TINY_ENGINE, unroll_layers=False)
    spec = ModelSpec("t", str(tmp_path / "tiny"), tensor_parallel_size=2, data_parallel_size=2, devices=(4, 5, 6, 7), max_num_seqs=4,
                     num_pages=32, kv_cache_dtype="bfloat16")
    engines = factory.build(spec)
    assert [e.limits.max_num_seqs for e in engines] == [4, 4] and {e.limits.kv_cache_dtype for e in engines} == {"bfloat16"}
    assert [e.limits.kv_cache_tokens for e in engines] == [31 * TINY_ENGINE.page_size] * 2
    devices = jax.devices()
    assert [list(e._engine.runner.mesh.devices.flat) for e in engines] == [devices[4:6], devices[6:8]]
    plain = factory.build(ModelSpec("t", str(tmp_path / "tiny")))
    assert len(plain) == 1 and plain[0].limits.max_num_seqs == TINY_ENGINE.max_num_seqs
    for devices, message in [((4, 5), "needs 4"), ((5, 6, 7, 8), "device 8 does not exist")]:
        with pytest.raises(UserError, match=message):
            factory.build(dataclasses.replace(spec, devices=devices))
