"""Issue 6, acceptance 8 (first half): local rate limits (the RateLimit HTTPRoute filter). A
100 req/s limit holds within 10% over 10 s with ~200 req/s offered, per route and per source,
with two workers sharing the buckets; excess gets 429 + retry-after (gRPC:
RESOURCE_EXHAUSTED); smesh_rate_limited_total counts it."""
import threading

import grpc
import pytest

from meshlib import LOOPBACK, assert_rate_limited, http_route, metric_sum, offered_load, service

RATE, SECONDS = 100, 10.0


def limited_route(key=None, burst=10):
    rl = {"requestsPerSecond": RATE, "burst": burst}
    if key:
        rl["key"] = key
    return http_route("api-route", ["api"], [{"filters": [{"type": "RateLimit", "rateLimit": rl}]}])


@pytest.mark.timeout(90)
def test_route_limit_holds_across_workers(run):
    be = run.http_backend("b")
    px = run.proxy([service("api", [be.address]), limited_route()], extra_args=["--workers", "2"])
    statuses, sample, elapsed = offered_load(px.outbound, 2 * RATE, SECONDS, threads=4)
    ok, limited = assert_rate_limited(statuses, elapsed, RATE, "ratelimit per route")
    assert limited >= 0.35 * sum(statuses.values())
    assert sample.get("smesh-proxy-error") == "rate limited", sample
    assert int(sample.get("retry-after", "0")) >= 1, sample
    assert be.stats()["requests"] == ok
    m = px.metrics()
    assert metric_sum(m, "smesh_rate_limited_total", service="api", route="api-route") == limited
    assert metric_sum(m, "smesh_responses_total", status_code="429") == limited


@pytest.mark.timeout(90)
def test_source_limit_is_per_client(run):
    be = run.http_backend("b")
    px = run.proxy([service("api", [be.address]), limited_route(key="source")],
                   extra_args=["--workers", "2"])
    results = {}

    def client(src):
        results[src] = offered_load(px.outbound, 2 * RATE, SECONDS, threads=3, source=src)
    ts = [threading.Thread(target=client, args=(src,)) for src in ("127.0.0.1", "127.0.0.2")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(SECONDS + 40)
    for src, (statuses, _, elapsed) in results.items():
        assert_rate_limited(statuses, elapsed, RATE, f"ratelimit source {src}")
    assert len(results) == 2


@pytest.mark.timeout(60)
def test_grpc_gets_resource_exhausted(run, grpc_server, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    px = run.proxy([
        service("echo", [grpc_server.address], protocol="grpc"),
        http_route("echo-route", ["echo"], [{"filters": [{"type": "RateLimit", "rateLimit": {
            "requestsPerSecond": 0.2, "burst": 1}}]}]),
    ])
    ch = grpc.insecure_channel(f"{LOOPBACK}:{px.outbound}",
                               options=[("grpc.enable_http_proxy", 0), ("grpc.default_authority", "echo")])
    try:
        stub = pb2_grpc.EchoStub(ch)
        assert stub.Unary(pb2.Msg(text="a"), timeout=10).text == "a"
        with pytest.raises(grpc.RpcError) as ei:
            stub.Unary(pb2.Msg(text="b"), timeout=10)
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
    assert grpc_server.state["calls"] == 1
    assert metric_sum(px.metrics(), "smesh_rate_limited_total", service="echo") == 1
