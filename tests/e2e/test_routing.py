"""Beyond the numbered acceptance items, behaviour the issue asks for: HTTPRoute matches, weighted
backendRefs with subsets, Expect: 100-continue, gRPC status for proxy errors, the access log."""
import collections
import json
import os

import grpc
import pytest

from meshlib import (KeepAliveClient, curl, free_port, http_request, http_route, service, to_yaml,
                     wait_until)


@pytest.mark.timeout(60)
def test_route_matches_select_backends(run):
    names = ["exact", "prefix", "regex", "method", "header", "query", "fallback"]
    be = {n: run.http_backend(n) for n in names}
    svcs = [service(f"svc-{n}", [be[n].address]) for n in names]
    rules = [
        {"matches": [{"path": {"type": "Exact", "value": "/exact"}}], "backendRefs": [{"name": "svc-exact"}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}], "backendRefs": [{"name": "svc-prefix"}]},
        {"matches": [{"method": "DELETE"}], "backendRefs": [{"name": "svc-method"}]},
        {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backendRefs": [{"name": "svc-header"}]},
        {"matches": [{"queryParams": [{"name": "debug", "value": "1"}]}], "backendRefs": [{"name": "svc-query"}]},
        {"backendRefs": [{"name": "svc-fallback"}]},
    ]
    # RegularExpression precedence against a catch-all is implementation-specific in the
    # Gateway API, so the regex rule lives on its own route without a catch-all
    re_rules = [{"matches": [{"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}}],
                 "backendRefs": [{"name": "svc-regex"}]}]
    px = run.proxy(svcs + [service("api", [be["fallback"].address]),
                           service("api-re", [be["fallback"].address]),
                           http_route("api-route", ["api"], rules),
                           http_route("api-re-route", ["api-re"], re_rules)])

    def via(path, method="GET", headers=None, host="api"):
        r = http_request(px.outbound, path, host=host, method=method, headers=headers)
        assert r.status == 200, (path, r)
        return r.header("x-backend")

    assert via("/exact") == "exact"
    assert via("/exact/more") == "fallback"          # Exact is exact
    assert via("/v2") == "prefix"
    assert via("/v2/users") == "prefix"
    assert via("/v2x") == "fallback"                 # PathPrefix matches whole segments
    assert via("/items/42", host="api-re") == "regex"
    r = http_request(px.outbound, "/items/abc", host="api-re")
    assert r.status == 404 and r.header("smesh-proxy-error"), r
    assert via("/anything", method="DELETE") == "method"
    assert via("/anything", headers={"x-canary": "1"}) == "header"
    assert via("/anything", headers={"x-canary": "2"}) == "fallback"
    assert via("/anything?debug=1") == "query"
    assert via("/anything?debug=0") == "fallback"


@pytest.mark.timeout(60)
def test_no_route_match_is_404_and_no_endpoints_is_503(run):
    a = run.http_backend("a")
    px = run.proxy([
        service("api", [a.address]),
        service("empty", []),
        http_route("api-route", ["api"], [{"matches": [{"path": {"type": "PathPrefix", "value": "/only"}}]}]),
    ])
    r = http_request(px.outbound, "/only/x")
    assert r.status == 200, r
    r = http_request(px.outbound, "/elsewhere")
    assert r.status == 404 and r.header("smesh-proxy-error"), r
    r = http_request(px.outbound, "/", host="empty")
    assert r.status == 503 and r.header("smesh-proxy-error"), r
    assert a.stats()["requests"] == 1


@pytest.mark.timeout(90)
def test_weighted_backend_refs_with_subsets(run):
    v1 = run.http_backend("v1")
    v2 = run.http_backend("v2")
    px = run.proxy([
        service("api", [{"address": v1.address, "labels": {"version": "v1"}},
                        {"address": v2.address, "labels": {"version": "v2"}}], lb="round_robin"),
        http_route("split", ["api"], [{"backendRefs": [
            {"name": "api", "subset": {"version": "v1"}, "weight": 90},
            {"name": "api", "subset": {"version": "v2"}, "weight": 10},
        ]}]),
    ])
    cl = KeepAliveClient(px.outbound)
    counts = collections.Counter()
    try:
        for i in range(1000):
            r = cl.get(f"/w{i}")
            assert r.status == 200, r
            counts[r.header("x-backend")] += 1
    finally:
        cl.close()
    assert 0.04 <= counts["v2"] / 1000 <= 0.17, counts
    assert counts["v1"] + counts["v2"] == 1000, counts


@pytest.mark.timeout(60)
def test_expect_100_continue_upload(run):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])])
    f = os.path.join(run.workdir, "upload.bin")
    with open(f, "wb") as fh:
        fh.write(os.urandom(3_000_000))
    r = curl("-H", "Host: api", "-H", "Expect: 100-continue", "--expect100-timeout", "10",
             "--data-binary", f"@{f}", "-w", "\n%{http_code}", f"http://127.0.0.1:{px.outbound}/up")
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"200", r.stdout[-300:]
    assert json.loads(body)["body_len"] == 3_000_000


@pytest.mark.timeout(60)
def test_grpc_client_gets_unavailable_for_proxy_errors(run, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    dead = f"127.0.0.1:{free_port()}"
    px = run.proxy([service("deadsvc", [dead], protocol="grpc")])
    for authority in ("no-such-service", "deadsvc"):
        ch = grpc.insecure_channel(f"127.0.0.1:{px.outbound}",
                                   options=[("grpc.enable_http_proxy", 0),
                                            ("grpc.default_authority", authority)])
        try:
            with pytest.raises(grpc.RpcError) as ei:
                pb2_grpc.EchoStub(ch).Unary(pb2.Msg(text="x"), timeout=10)
        finally:
            ch.close()
        e = ei.value
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (authority, e)
        md = dict(e.trailing_metadata() or ()) | dict(e.initial_metadata() or ())
        assert "smesh-proxy-error" in md, (authority, md, e.details())


@pytest.mark.timeout(60)
def test_access_log_has_a_line_per_request(run):
    be = run.http_backend("b1")
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("api", [be.address])], extra_args=["--access-log", log])
    cl = KeepAliveClient(px.outbound)
    try:
        for i in range(25):
            assert cl.get(f"/logged-{i}").status == 200
    finally:
        cl.close()

    def lines():
        if not os.path.exists(log):
            return None
        ls = [l for l in open(log, encoding="utf-8", errors="replace").read().splitlines() if "/logged-" in l]
        return ls if len(ls) >= 25 else None
    got = wait_until(lines, 5, what="25 access-log lines")
    assert len(got) == 25
    assert all("200" in l for l in got), got[:3]


@pytest.mark.timeout(60)
def test_a_subset_matching_no_endpoint_is_warned_about_and_named_in_the_error(run):
    """Issue 15 item 6: a route to a subset no endpoint has is valid, but `validate` and
    `apply` warn, and the proxy's 503 names the subset (the reason header is unchanged)."""
    be = run.http_backend("v1")
    resources = [service("api", [{"address": be.address, "labels": {"version": "v1"}}]),
                 http_route("api-route", ["api"], [
                     {"matches": [{"headers": [{"name": "x-v", "value": "3"}]}],
                      "backendRefs": [{"name": "api", "subset": {"version": "v3"}}]},
                     {"backendRefs": [{"name": "api", "subset": {"version": "v1"}}]}])]
    px = run.proxy(resources)
    checked = run.smesh("validate", "-f", px.config_path)
    assert checked.returncode == 0, checked.stderr
    assert ('warning: HTTPRoute/api-route: api{version=v3} matches no endpoint of "api" now'
            in checked.stderr), checked.stderr
    assert "version=v1}" in checked.stderr and "api{version=v1} matches" not in checked.stderr, checked.stderr

    assert http_request(px.outbound, "/", host="api").status == 200
    r = http_request(px.outbound, "/", host="api", headers={"x-v": "3"})
    assert r.status == 503, r
    assert r.header("smesh-proxy-error") == "no endpoints", r
    assert "none in api{version=v3}" in r.body.decode(), r.body

    cp = run.control()
    text = to_yaml(resources)
    applied = cp.cli("apply", "-f", "-", input=text)
    assert applied.returncode == 0, applied.stderr
    assert "HTTPRoute/api-route created" in applied.stdout, applied.stdout
    assert ('warning: HTTPRoute/api-route: api{version=v3} matches no endpoint of "api" now'
            in applied.stderr), applied.stderr
