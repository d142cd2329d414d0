"""The deployment files agree with the server: no Docker or cluster runs here, so the manifests are
parsed and every path, port, flag and metric they name is checked against a real running server."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jaxserve.cli import build_parser
from tests.server_process import ServerProcess, get
from tests.tiny_models import tiny_config, tiny_params, write_gguf

DEPLOY = Path(__file__).parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
# what Kubernetes, LeaderWorkerSet and SLURM fill in at run time
RUNTIME_VALUES = {"$(LWS_LEADER_ADDRESS)": "10.0.0.1", "$(LWS_GROUP_SIZE)": "2", "$(LWS_WORKER_INDEX)": "1"}


def _documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _containers(doc: dict) -> list[dict]:
    """Containers of a Deployment, or of a LeaderWorkerSet's leader and worker templates."""
    spec = doc.get("spec", {})
    templates = [spec.get("template")] + [spec.get("leaderWorkerTemplate", {}).get(k) for k in ("leaderTemplate", "workerTemplate")]
    return [c for t in templates if t for c in t["spec"]["containers"]]


def _serve_args(args: list[str]) -> list[str]:
    """Arguments with the values the cluster substitutes at run time."""
    out = []
    for arg in args:
        for name, value in RUNTIME_VALUES.items():
            arg = arg.replace(name, value)
        out.append(arg)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server (a tiny random model) on the port layout the images use."""
    folder = tmp_path_factory.mktemp("deploy")
    cfg = tiny_config()
    model = write_gguf(folder / "tiny.gguf", cfg, tiny_params(cfg))
    limits = ["--max-num-seqs", "2", "--num-pages", "16", "--max-model-len", "128", "--no-warmup"]  # probes, not speed
    with ServerProcess(["--model", str(model), *limits], folder / "log.txt") as proc:
        yield proc


def test_manifests_parse_and_name_what_they_need() -> None:
    kinds = {doc["kind"] for doc in _documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "LeaderWorkerSet"} <= kinds
    assert len(MANIFESTS) >= 3


def test_probe_paths_and_ports_exist_in_the_server(server) -> None:
    probed = set()
    for doc in _documents():
        for container in _containers(doc):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    get_spec = container[probe]["httpGet"]
                    assert get_spec["port"] in ports, f"{doc['metadata']['name']}: {probe} names an undeclared port"
                    assert ports[get_spec["port"]] == 8000  # what the images and the CLI default listen on
                    status, _ = get(server.url + get_spec["path"])
                    assert status == 200, f"{probe} {get_spec['path']} answered {status}"
                    probed.add((probe, get_spec["path"]))
    assert ("livenessProbe", "/health") in probed and ("readinessProbe", "/ready") in probed
    for doc in _documents():
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] == "http"


def test_every_serve_argument_is_a_real_flag() -> None:
    parser, _ = build_parser()
    commands = [c.get("args", []) for doc in _documents() for c in _containers(doc)]
    sbatch = (DEPLOY / "slurm" / "multihost.sbatch").read_text()
    serve_line = re.search(r"jaxserve serve (.*?)\"", sbatch.replace("\\\n", " "), re.S).group(1)
    serve_line = serve_line.replace("$coordinator", "10.0.0.1:7100").replace("\\$SLURM_NTASKS", "2").replace("\\$SLURM_PROCID", "1")
    commands.append(shlex.split(serve_line))
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        entry = re.search(r"^ENTRYPOINT (\[.*\])", (DEPLOY / dockerfile).read_text(), re.M).group(1)
        argv = yaml.safe_load(entry)
        assert argv[:2] == ["jaxserve", "serve"] and argv[argv.index("--port") + 1] == "8000"
        assert "EXPOSE 8000" in (DEPLOY / dockerfile).read_text()
        commands.append(argv[2:])
        for line in re.findall(r"^COPY (\S+) ", (DEPLOY / dockerfile).read_text(), re.M):
            assert (DEPLOY.parent / line).exists(), f"{dockerfile} copies missing {line}"
    for args in commands:
        parser.parse_args(["serve", *_serve_args(args)])  # exits (fails the test) on an unknown flag


def test_autoscaling_metric_is_exported(server) -> None:
    hpa = next(doc for doc in _documents() if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = metric.replace("jaxserve_", "jaxserve:", 1)  # how prometheus-adapter renames it (deploy/README.md)
    _, text = get(server.url + "/metrics")
    assert re.search(rf"^{re.escape(exported)}{{", text, re.M), f"{exported} is not on /metrics"


def test_alert_rules_name_only_exported_metrics(server) -> None:
    """Every series an alert reads is on /metrics of a server that has answered a request (and has a tenant)."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert {"JaxserveHighErrorRate", "JaxserveSlowFirstToken", "JaxserveKVCacheFull", "JaxserveQueueDeep"} <= {r["alert"] for r in rules}
    get(server.url + "/v1/models")
    from tests.server_process import post

    assert post(server.url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})[0] == 200
    _, text = get(server.url + "/metrics")
    exported = set(re.findall(r"^(jaxserve:[a-z_]+)", text, re.M))
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "warn", "info") and rule["annotations"]["summary"]
        for name in re.findall(r"jaxserve:[a-z_]+", rule["expr"]):
            if name.startswith("jaxserve:tenant_"):  # per-tenant families appear with the first tenant (a keys file)
                assert f"# TYPE {name} counter" in text, name
            else:
                assert name in exported, f"{rule['alert']} reads {name}, which /metrics does not have"
