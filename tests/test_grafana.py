"""The Grafana dashboard (`deploy/grafana/jaxserve.json`) imports and reads only what the server exports:
its JSON is checked against what Grafana's import needs, every PromQL query (panels, repeated rows,
template variables) is taken apart, and each metric and label it names is looked up in the `/metrics`
of a real server that has every family on it: a tiny random model with n-gram speculation, tenants
with a cost, a structured-output request, and a second model whose load fails (a 5xx)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess, get, post
from tests.tiny_models import tiny_config, tiny_params, write_gguf

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "jaxserve.json"
GRID_COLUMNS = 24
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text"}
DATASOURCE_UIDS = {"${datasource}", "${DS_PROMETHEUS}"}  # the datasource variable, or the import's input
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval"}
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series
# PromQL's functions, aggregations and keywords: any other bare name in a query is a metric
PROMQL_WORDS = {
    "abs", "absent", "and", "avg", "avg_over_time", "bool", "bottomk", "by", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count", "count_over_time", "delta", "deriv", "floor", "group", "group_left", "group_right", "histogram_quantile", "idelta",
    "ignoring", "increase", "irate", "label_replace", "last_over_time", "max", "max_over_time", "min", "min_over_time", "offset",
    "on", "or", "quantile", "quantile_over_time", "rate", "resets", "round", "scalar", "sort", "sort_desc", "stddev", "sum",
    "sum_over_time", "time", "topk", "unless", "vector", "without",
}
AGGREGATIONS = "sum|avg|min|max|count|group|stddev|topk|bottomk|quantile"
METRIC = re.compile(r"jaxserve:[a-zA-Z0-9_:]+")
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"[^"]*"\s*')
GROUPED = re.compile(rf"\b({AGGREGATIONS})\s+(by|without)\s*\(([^)]*)\)\s*\(")
MATCHING = re.compile(r"\b(on|ignoring)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*([a-zA-Z_]\w*)\s*\)")


# ---- the dashboard, taken apart ----------------------------------------------------------------


def _object(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key repeats in one object of the dashboard: {sorted(k for k in keys if keys.count(k) > 1)}"
    return dict(pairs)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(), object_pairs_hook=_object)


def _panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too."""
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every panel target and every query variable's metric expression."""
    out = [(f"panel {p['id']} '{p['title']}' {t['refId']}", t["expr"], t.get("legendFormat", ""))
           for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = LABEL_VALUES.fullmatch(query)
            assert match, f"variable {var['name']}: only label_values(metric, label) queries are used here, got {query!r}"
            out.append((f"variable {var['name']} (label_values)", match.group(1), "{{" + match.group(2) + "}}"))
    return out


def _balanced(expr: str, start: int) -> str:
    """The text inside the parenthesis opening at `start`."""
    depth = 0
    for i in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[start + 1 : i]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def _labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse(expr: str) -> dict:
    """A query's metrics with the labels each selector matches on, and its grouping and matching
    labels; AssertionError for a name that is neither a jaxserve metric nor PromQL, for a
    postfix `by`, or for a malformed selector."""
    assert expr.count("(") == expr.count(")"), expr
    selectors: list[tuple[str, list[str]]] = []
    for m in SELECTOR.finditer(expr):
        assert m.group(1), f"a selector without a metric name in {expr!r}"
        assert METRIC.fullmatch(m.group(1)), f"{m.group(1)!r} is neither a jaxserve metric nor PromQL, in {expr!r}"
        body = m.group(2).strip()
        matchers = [x for x in body.split(",") if x.strip()] if body else []
        assert all(MATCHER.fullmatch(x) for x in matchers), f"malformed matchers {{{body}}} in {expr!r}"
        selectors.append((m.group(1), [MATCHER.fullmatch(x).group(1) for x in matchers]))
    grouped = []
    for m in GROUPED.finditer(expr):
        inner = _balanced(expr, m.end() - 1)
        grouped.append((m.group(2), _labels(m.group(3)), METRIC.findall(inner)))
    assert len(grouped) == len(re.findall(r"\b(by|without)\b", expr)), f"write aggregations as `sum by (...) (...)` in {expr!r}"
    matching = [label for m in MATCHING.finditer(expr) for label in _labels(m.group(2))]
    assert not re.search(r"group_(left|right)\s*\(", expr), f"group_left/right with labels is not used: {expr!r}"
    # the bare names left once strings, selectors, ranges, label lists, variables and numbers are gone
    bare = re.sub(r'"[^"]*"', " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\$\{[^}]*\}|\$\w+", " ", bare)
    bare = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", bare)
    metrics = []
    for name in NAME.findall(bare):
        if name in PROMQL_WORDS:
            continue
        assert METRIC.fullmatch(name), f"{name!r} is neither a jaxserve metric nor PromQL, in {expr!r}"
        metrics.append(name)
    assert metrics, f"no metric in {expr!r}"
    return {"metrics": metrics, "selectors": selectors, "grouped": grouped, "matching": matching}


def _variables(text: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", text)}


# ---- a server with every family -------------------------------------------------------------------

KEYS = """
keys:
  sk-ops: {tenant: ops, admin: true}
  sk-alpha: {tenant: alpha}
  sk-beta: {tenant: beta, requests_per_minute: 1, burst: 1}
"""
SPEC = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}'
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """Every sample name on a real server's /metrics, with the labels it carries."""
    folder = tmp_path_factory.mktemp("grafana")
    cfg = tiny_config()
    model = write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg))
    (folder / "keys.yaml").write_text(KEYS)
    (folder / "models.yaml").write_text(f"models:\n  - {{name: tiny, model: {model}}}\n"
                                        f"  - {{name: broken, model: {folder / 'missing.gguf'}, lazy: true}}\n")
    args = ["--config", str(folder / "models.yaml"), "--max-num-seqs", "2", "--num-pages", "16", "--max-model-len", "128", "--no-warmup",
            "--api-keys-file", str(folder / "keys.yaml"), "--cost-per-hour", "3.6", "--speculative-config", SPEC]
    with ServerProcess(args, folder / "log.txt") as server:
        url = server.url + "/v1/completions"
        repeats = {"model": "tiny", "prompt": [5, 6, 7] * 3, "max_tokens": 8, "ignore_eos": True}
        assert post(url, repeats, "sk-alpha")[0] == 200
        assert post(url, {**repeats, "stream": True}, "sk-beta")[0] == 200
        assert post(url, repeats, "sk-beta")[0] == 429  # beta's quota: one a minute
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
        assert post(server.url + "/v1/chat/completions", chat, "sk-alpha")[0] == 200
        assert post(url, {**repeats, "model": "broken"}, "sk-alpha")[0] == 503  # its load fails: a routed request's error
        status, text = get(server.url + "/metrics", "sk-ops")
        assert status == 200
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


# ---- tests ------------------------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    """What Grafana's import reads: the export format's input, the top-level fields, and panels
    that each have an id, a type, a title, a place on the 24-column grid and Prometheus targets."""
    text, d = DASHBOARD.read_text(), _dashboard()
    assert text == json.dumps(d, indent=2, ensure_ascii=False) + "\n", "keep the file pretty-printed with a 2-space indent"
    for key in ("__inputs", "__requires", "title", "uid", "schemaVersion", "version", "panels", "templating", "time", "refresh", "tags"):
        assert key in d, key
    assert d["title"] and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"]) and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["time"]["from"].startswith("now-") and d["time"]["to"] == "now"
    assert [(i["name"], i["type"], i["pluginId"]) for i in d["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert set(re.findall(r"\$\{(DS_\w+)\}", text)) == {"DS_PROMETHEUS"}  # every input is used, and only declared ones are
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert len(variables) == len(d["templating"]["list"]), "variable names repeat"
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"  # the import's choice
    assert {"model_name", "tenant", "version", "instance"} <= set(variables)

    def datasource_ok(ds) -> bool:
        return isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get("uid") in DATASOURCE_UIDS

    for var in variables.values():
        if var["type"] == "query":
            assert datasource_ok(var["datasource"]), var["name"]
            assert var["multi"] and var["includeAll"], f"{var['name']}: repeats and regex matchers (=~) need multi-value"
    required = {r["id"] for r in d["__requires"] if r["type"] == "panel"}
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "panel ids must be unique integers"
    for p in panels:
        where = f"panel {p['id']} '{p.get('title')}'"
        assert p["type"] in PANEL_TYPES and p["title"], where
        assert p["type"] == "row" or p["type"] in required, f"{where}: its type is missing from __requires"
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), where
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= GRID_COLUMNS and g["h"] >= 1 and g["y"] >= 0, where
        for var in _variables(p["title"] + json.dumps(p.get("targets", []))) - {"DS_PROMETHEUS"}:
            assert var in variables or var in BUILTIN_VARIABLES, f"{where} uses an undefined ${var}"
        if p["type"] == "row":
            assert p["gridPos"]["w"] == GRID_COLUMNS and p["gridPos"]["h"] == 1, where
            assert isinstance(p["collapsed"], bool) and (p["collapsed"] or not p["panels"]), f"{where}: an open row's panels follow it"
            if "repeat" in p:
                assert p["repeat"] in variables and variables[p["repeat"]]["multi"], where
            continue
        assert datasource_ok(p["datasource"]), where
        assert p["targets"], f"{where} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), f"{where}: refIds must be set and unique"
        for t in p["targets"]:
            assert t["expr"].strip() and datasource_ok(t.get("datasource", p["datasource"])), where
    # no two panels on the same cells: the open layout, and each collapsed row's own panels below it
    layouts = [d["panels"]] + [r["panels"] for r in d["panels"] if r["type"] == "row" and r["collapsed"]]
    for row in (r for r in d["panels"] if r["type"] == "row" and r["collapsed"]):
        assert all(p["gridPos"]["y"] > row["gridPos"]["y"] and p["type"] != "row" for p in row["panels"]), row["title"]
    for layout in layouts:
        cells = {}
        for p in layout:
            g = p["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap at {(x, y)}"
                    cells[(x, y)] = p["id"]


def test_the_query_parser_catches_what_it_must() -> None:
    """The parser below the metric check: it finds metrics, selector and grouping labels, and
    refuses names that are not ours."""
    q = parse('sum by (tier) (rate(jaxserve:prefix_cache_hits_total{model_name=~"$model_name"}[$__rate_interval])) '
              "/ ignoring (tier) group_left sum(rate(jaxserve:prefix_cache_queries_total[5m]))")
    assert q["metrics"] == ["jaxserve:prefix_cache_hits_total", "jaxserve:prefix_cache_queries_total"]
    assert q["selectors"] == [("jaxserve:prefix_cache_hits_total", ["model_name"])]
    assert q["grouped"] == [("by", ["tier"], ["jaxserve:prefix_cache_hits_total"])] and q["matching"] == ["tier"]
    assert parse("histogram_quantile(0.99, sum by (le) (rate(jaxserve:batch_size_bucket[1m])))")["metrics"] == ["jaxserve:batch_size_bucket"]
    for bad, why in (
        ("rate(node_cpu_seconds_total[5m])", "neither a jaxserve metric"),
        ("jaxserve:num_compiles + up", "neither a jaxserve metric"),
        ('sum(up{job="jaxserve"})', "neither a jaxserve metric"),
        ("sum(rate(jaxserve:request_success_total[5m])) by (model_name)", "write aggregations as"),
        ('{__name__="jaxserve:server_ready"}', "without a metric name"),
        ("jaxserve:server_ready{instance=~$instance}", "malformed matchers"),
    ):
        with pytest.raises(AssertionError, match=why):
            parse(bad)


def test_dashboard_covers_the_server_areas() -> None:
    """Rows for requests and errors, latency, scheduling, caches, compiles, structured output,
    speculation and tenants, with a row repeated per tenant and one per model."""
    d = _dashboard()
    used = {m for _, expr, _ in _queries(d) for m in parse(expr)["metrics"]}
    for name in (
        "jaxserve:request_success_total", "jaxserve:http_requests_total", "jaxserve:request_errors_total",
        "jaxserve:time_to_first_token_seconds_bucket", "jaxserve:inter_token_latency_seconds_bucket", "jaxserve:e2e_request_latency_seconds_bucket",
        "jaxserve:num_requests_running", "jaxserve:num_requests_waiting", "jaxserve:kv_cache_usage_perc", "jaxserve:host_kv_cache_usage_perc",
        "jaxserve:host_prefix_cache_usage_perc", "jaxserve:prefix_cache_hits_total", "jaxserve:prefix_cache_queries_total",
        "jaxserve:batch_size_bucket", "jaxserve:num_compiles", "jaxserve:structured_requests_total", "jaxserve:grammar_compile_seconds_bucket",
        "jaxserve:spec_decode_num_accepted_tokens_total", "jaxserve:spec_decode_num_draft_tokens_total", "jaxserve:tenant_requests_total",
        "jaxserve:tenant_rate_limited_total", "jaxserve:tenant_cost_usd",
    ):
        assert name in used, f"the dashboard shows no {name}"
    rows = [p for p in d["panels"] if p["type"] == "row"]
    assert {r.get("repeat") for r in rows} >= {"tenant", "model_name"}
    for row in rows:
        if "repeat" in row:  # each repeated panel reads its row's value
            assert row["panels"] and all(f"${row['repeat']}" in json.dumps(p["targets"]) for p in row["panels"]), row["title"]


def test_every_queried_metric_and_label_is_exported(exported) -> None:
    """Each metric a query reads is a sample on /metrics, and each label it filters, groups, matches
    or names in a legend is one that metric carries (or one Prometheus adds when it scrapes)."""
    assert any(name.startswith("jaxserve:spec_decode_") for name in exported) and "jaxserve:tenant_cost_usd" in exported
    labels = {name: carried | TARGET_LABELS for name, carried in exported.items()}
    queries = _queries(_dashboard())
    assert len(queries) > 50
    for where, expr, legend in queries:
        q = parse(expr)
        for name in q["metrics"]:
            assert name in exported, f"{where} reads {name}, which /metrics does not have"
        for name, matched in q["selectors"]:
            for label in matched:
                assert label in labels[name], f"{where} filters {name} by '{label}', which it does not carry"
        for how, grouping, inside in q["grouped"]:
            for name in inside:
                for label in grouping:
                    assert label in labels[name], f"{where} aggregates {name} {how} '{label}', which it does not carry"
        for label in q["matching"]:
            assert any(label in labels[name] for name in q["metrics"]), f"{where} matches on '{label}', which no metric carries"
        # a legend names labels the result keeps: those grouped by, or (no aggregation) those the metric carries
        kept = {label for how, grouping, _ in q["grouped"] if how == "by" for label in grouping} or set.intersection(
            *(labels[name] for name in q["metrics"]))
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in kept, f"{where}: the legend names '{label}', which the query's result does not keep"
