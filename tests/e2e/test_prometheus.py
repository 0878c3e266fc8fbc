"""Issue 16 (Prometheus and Grafana): the shipped alert rules pass `promtool check rules` and
their `promtool test rules` unit tests; the Grafana dashboards are what `generate.py` writes,
parse, and query only metrics a proxy exports (or the shipped recording rules); and a real
Prometheus, configured with `smesh prometheus-config`, scrapes every proxy of a mesh and
computes the success rate the proxies saw."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from meshlib import (LOOPBACK, free_port, http_request, metric_names, parse_metrics, service,
                     to_yaml, wait_until)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RULES = os.path.join(ROOT, "deploy", "prometheus", "smesh-rules.yml")
RULE_TESTS = os.path.join(ROOT, "deploy", "prometheus", "smesh-rules.test.yml")
GRAFANA = os.path.join(ROOT, "deploy", "grafana")


def _promtool(*args):
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    r = _promtool("check", "rules", RULES)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("test", "rules", RULE_TESTS)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def _dashboards():
    return {f: json.load(open(os.path.join(GRAFANA, f)))
            for f in sorted(os.listdir(GRAFANA)) if f.endswith(".json")}


def _queried_names(board):
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("type") == "query"]
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\b(smesh:[a-z0-9_:]+|smesh_[a-z0-9_]+)", e))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboards_are_generated_and_name_only_recorded_rules_that_exist(tmp_path):
    # the committed JSON is what the generator writes (edit generate.py, not the JSON)
    shutil.copy(os.path.join(GRAFANA, "generate.py"), tmp_path / "generate.py")
    subprocess.run([sys.executable, str(tmp_path / "generate.py")], check=True, timeout=30)
    boards = _dashboards()
    assert set(boards) == {"smesh-mesh-overview.json", "smesh-service.json", "smesh-route.json",
                           "smesh-proxy.json"}, set(boards)
    for name, board in boards.items():
        assert json.load(open(tmp_path / name)) == board, f"{name} differs from generate.py's output"
        assert board["panels"] and all(p["targets"] for p in board["panels"]), name
    recorded = {r["record"] for g in yaml.safe_load(open(RULES))["groups"] for r in g["rules"] if "record" in r}
    for name, board in boards.items():
        missing = {n for n in _queried_names(board) if n.startswith("smesh:")} - recorded
        assert not missing, f"{name} queries recording rules that do not exist: {missing}"


def _exercise(run):
    """A proxy that has served HTTP (with a retry and a 503), a gRPC-typed call, an injected
    fault, a rate-limited request, an inbound (app) request and a TCP connection."""
    api = run.http_backend("api", flaky=True)
    echo = run.tcp_echo()
    resources = [
        service("api", [api.address]),
        service("tcp", [echo.address], protocol="tcp", port=9000),
        {"apiVersion": "smesh.io/v1", "kind": "HTTPRoute", "metadata": {"name": "api"},
         "spec": {"parentRefs": [{"name": "api"}], "rules": [
             {"matches": [{"path": {"type": "PathPrefix", "value": "/fault"}}],
              "filters": [{"type": "FaultInjection", "faultInjection": {"abort": {"percent": 100, "httpStatus": 503}}}],
              "backendRefs": [{"name": "api"}]},
             {"matches": [{"path": {"type": "PathPrefix", "value": "/limited"}}],
              "filters": [{"type": "RateLimit", "rateLimit": {"requestsPerSecond": 1, "burst": 1}}],
              "backendRefs": [{"name": "api"}]},
             {"backendRefs": [{"name": "api"}], "retry": {"attempts": 2, "codes": [503]}}]}},
    ]
    px = run.proxy(resources, upstreams=["tcp"], app_port=api.port)
    for path in ["/a", "/b", "/fault", "/limited", "/limited", "/limited"]:
        px.get(path)
    http_request(px.outbound, "/g", host="api", method="POST", body=b"\0\0\0\0\0",
                 headers={"content-type": "application/grpc", "te": "trailers"})
    http_request(px.inbound, "/in", host="api")
    import socket
    with socket.create_connection((LOOPBACK, px.upstream["tcp"]), timeout=5) as s:
        s.sendall(b"ping\n")
        s.recv(16)
    return px


def test_every_metric_a_dashboard_queries_is_exported_by_a_proxy(run):
    px = _exercise(run)
    def exported():
        return {re.sub(r"_(bucket|sum|count)$", "", n) for n in metric_names(parse_metrics(px.metrics_text()))}
    queried = set()
    for board in _dashboards().values():
        queried |= {n for n in _queried_names(board) if n.startswith("smesh_")}
    assert len(queried) >= 15, queried
    # the TCP connection's counters land when it closes
    wait_until(lambda: not (queried - exported()), 10, what=f"metrics {sorted(queried - exported())}")
    r = subprocess.run(["promtool", "check", "metrics"], input=px.metrics_text(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _prom_query(port, q):
    url = f"http://{LOOPBACK}:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.timeout(120)
def test_prometheus_scrapes_every_proxy_from_smesh_prometheus_config(run):
    cp = run.control()
    seed = os.path.join(run.workdir, "seed.yaml")
    with open(seed, "w") as f:
        f.write(to_yaml([service("other", ["127.0.0.1:9"])]))
    assert cp.cli("apply", "-f", seed).returncode == 0
    backend = run.http_backend("api", flaky=True)
    api = run.mesh_proxy(cp.url, name="api", service="api", app_port=backend.port)
    web = run.mesh_proxy(cp.url, name="web")
    wait_until(lambda: len([p for p in cp.proxies() if p.get("admin")]) == 2, 10, what="two proxies with admin addresses")

    # file_sd targets, one per proxy, labelled with what the control plane knows
    r = cp.cli("prometheus-config", token=False)
    assert r.returncode == 0, r
    groups = json.loads(r.stdout)
    assert sorted(g["targets"][0] for g in groups) == sorted(f"{LOOPBACK}:{p.admin}" for p in (api, web)), groups
    assert {g["labels"].get("service") for g in groups} == {"api", None}, groups
    sd = os.path.join(run.workdir, "targets.json")
    with open(sd, "w") as f:
        f.write(r.stdout)
    # the static form is a whole prometheus.yml
    st = cp.cli("prometheus-config", "--format", "static", "--job", "mesh", token=False)
    assert st.returncode == 0, st
    assert yaml.safe_load(st.stdout)["scrape_configs"][0]["job_name"] == "mesh", st.stdout

    # 40 requests from web to api: the flaky app answers every other one 503
    wait_until(lambda: web.get("/warm", host="api", timeout=2).status in (200, 503), 10, what="web -> api")
    statuses = [web.get(f"/r{i}", host="api").status for i in range(40)]
    sent_5xx = statuses.count(503)
    assert 10 <= sent_5xx <= 30, statuses

    port = free_port()
    config = os.path.join(run.workdir, "prometheus.yml")
    with open(config, "w") as f:
        yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [RULES],
                        "scrape_configs": [{"job_name": "smesh-proxies",
                                            "file_sd_configs": [{"files": [sd], "refresh_interval": "5s"}]}]}, f)
    run.spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={run.workdir}/tsdb",
               f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"], "prometheus")

    def scraped():
        try:
            ups = _prom_query(port, 'up{job="smesh-proxies"}')
        except OSError:
            return False
        return len(ups) == 2 and all(u["value"][1] == "1" for u in ups)
    wait_until(scraped, 30, interval=0.5, what="Prometheus scraping both proxies")

    # the success rate Prometheus computes is the one the clients saw (web's outbound side)
    q = ('sum(smesh_responses_total{job="smesh-proxies",service="api",direction="outbound",class="5xx"})'
         ' / sum(smesh_responses_total{job="smesh-proxies",service="api",direction="outbound"})')
    def ratio():
        try:
            res = _prom_query(port, q)
        except OSError:
            return None
        return float(res[0]["value"][1]) if res else None
    total = len(statuses) + 1
    wait_until(lambda: ratio() is not None and abs(ratio() - sent_5xx / total) < 0.03, 20, interval=0.5,
               what=f"PromQL failure ratio {ratio()} vs {sent_5xx}/{total} seen by the client")
