"""Acceptance 7: /metrics passes `promtool check metrics`; request counters equal the requests sent.
Plus the admin endpoints /live, /ready, /config."""
import socket
import subprocess

import pytest
import yaml

from meshlib import (KeepAliveClient, curl, free_port, http_request, metric_sum, service,
                     wait_until)


def promtool_check(text):
    return subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                          timeout=30)


@pytest.mark.timeout(60)
def test_metrics_pass_promtool_and_count_requests(run):
    be = run.http_backend("b1")
    other = run.http_backend("b2")
    px = run.proxy([service("api", [be.address]), service("other", [other.address])],
                   upstreams=["api"])
    ok_out, err_out, ok_up, ok_other = 37, 3, 11, 5
    cl = KeepAliveClient(px.outbound, host="api")
    try:
        for i in range(ok_out):
            assert cl.get(f"/ok{i}").status == 200
        for i in range(err_out):
            assert cl.get(f"/err{i}?status=500").status == 500
    finally:
        cl.close()
    cu = KeepAliveClient(px.upstream["api"], host="whatever")
    try:
        for i in range(ok_up):
            assert cu.get(f"/up{i}").status == 200
    finally:
        cu.close()
    co = KeepAliveClient(px.outbound, host="other")
    try:
        for i in range(ok_other):
            assert co.get(f"/o{i}").status == 200
    finally:
        co.close()
    # one HTTP/2 request too
    r = curl("--http2-prior-knowledge", "--connect-to", f"api:80:127.0.0.1:{px.outbound}",
             "-o", "/dev/null", "-w", "%{http_code}", "http://api/h2")
    assert r.stdout == b"200", r
    api_total = ok_out + err_out + ok_up + 1

    def settled():
        m = px.metrics()
        return m if metric_sum(m, "smesh_requests_total", service="api") >= api_total else None
    try:
        m = wait_until(settled, 3, what="request counters")
    except TimeoutError:
        m = px.metrics()

    assert metric_sum(m, "smesh_requests_total", service="api") == api_total
    assert metric_sum(m, "smesh_requests_total", service="other") == ok_other
    assert metric_sum(m, "smesh_requests_total", direction="outbound", service="other") == ok_other
    assert metric_sum(m, "smesh_responses_total", service="api", status_code="200",
                      **{"class": "2xx"}) == api_total - err_out
    assert metric_sum(m, "smesh_responses_total", service="api", status_code="500",
                      **{"class": "5xx"}) == err_out
    assert metric_sum(m, "smesh_request_duration_seconds_count", service="api") == api_total
    assert metric_sum(m, "smesh_request_duration_seconds_bucket", service="api", le="+Inf") == api_total
    # the backends agree
    assert be.stats()["requests"] == api_total and other.stats()["requests"] == ok_other

    text = px.metrics_text()
    res = promtool_check(text)
    assert res.returncode == 0, f"promtool check metrics failed:\n{res.stdout.decode()}{res.stderr.decode()}"
    for name in ("smesh_requests_total", "smesh_responses_total", "smesh_request_duration_seconds"):
        assert f"# TYPE {name}" in text, f"no TYPE line for {name}"


@pytest.mark.timeout(60)
def test_metrics_promtool_after_tcp_errors_and_reload(run):
    """The full metric set (after TCP traffic, a 404, a 502 and a reload) still passes promtool."""
    echo = run.tcp_echo()
    be = run.http_backend("b1")
    dead = f"127.0.0.1:{free_port()}"
    px = run.proxy([service("api", [be.address]), service("echo", [echo.address], protocol="tcp"),
                    service("dead", [dead])], upstreams=["echo"])
    with socket.create_connection(("127.0.0.1", px.upstream["echo"]), timeout=10) as s:
        s.sendall(b"abc")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(100):
            pass
    r404 = http_request(px.outbound, "/", host="nobody")
    assert r404.status == 404 and r404.header("smesh-proxy-error"), r404
    r502 = http_request(px.outbound, "/", host="dead")
    assert r502.status == 502 and r502.header("smesh-proxy-error"), r502
    before = px.reloads("ok")
    px.write_config([service("api", [be.address])])
    px.sighup()
    wait_until(lambda: px.reloads("ok") > before, 5, what="reload")
    m = px.metrics()
    assert metric_sum(m, "smesh_proxy_errors_total") >= 2
    res = promtool_check(px.metrics_text())
    assert res.returncode == 0, f"promtool check metrics failed:\n{res.stdout.decode()}{res.stderr.decode()}"


@pytest.mark.timeout(60)
def test_admin_live_ready_config(run):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address], hostnames=["api.internal"])])
    live = px.admin_get("/live")
    assert live.status == 200 and live.body.strip() == b"live", live
    ready = px.admin_get("/ready")
    assert ready.status == 200 and ready.body.strip() == b"ready", ready
    cfg = px.admin_get("/config")
    assert cfg.status == 200, cfg
    docs = [d for d in yaml.safe_load_all(cfg.body) if d]
    names = [(d.get("kind"), d.get("metadata", {}).get("name")) for d in docs]
    assert ("Service", "api") in names, names
    assert be.address.encode() in cfg.body and b"api.internal" in cfg.body
    # the extra hostname routes too
    r = px.get("/", host="api.internal")
    assert r.status == 200 and r.header("x-backend") == "b1", r
