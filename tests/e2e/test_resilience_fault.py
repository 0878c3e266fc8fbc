"""Issue 6, acceptance 7: fault injection. A 50% abort with 503 and a 100 ms delay on 20% are
measured within tolerance over 1,000 requests; gRPC clients get the configured grpc-status."""
import grpc
import pytest

from meshlib import http_route, metric_sum, parallel_requests, service


@pytest.mark.timeout(120)
def test_abort_and_delay_shares(run):
    be = run.http_backend("b")
    px = run.proxy([
        service("api", [be.address]),
        http_route("api-route", ["api"], [{
            "filters": [{"type": "FaultInjection", "faultInjection": {
                "delay": {"fixedDelay": "100ms", "percent": 20},
                "abort": {"httpStatus": 503, "percent": 50}}}],
        }]),
    ])
    n = 1000
    rs = parallel_requests(px.outbound, n, threads=8)
    assert len(rs) == n
    aborted = [r for r in rs if r.status == 503]
    assert all(r.header("smesh-fault-injected") == "abort" for r in aborted)
    assert all(r.status in (200, 503) for r in rs)
    delayed = [r for r in rs if r.elapsed >= 0.1]
    abort_share, delay_share = len(aborted) / n, len(delayed) / n
    print(f"fault: aborted {abort_share:.1%} (50%), delayed {delay_share:.1%} (20%)")
    # 5 sigma for 1000 draws at 50% (sigma 1.6 points): 3 sigma fails a run in a few hundred.
    assert abs(abort_share - 0.50) <= 0.08, abort_share
    assert abs(delay_share - 0.20) <= 0.05, delay_share
    # aborted requests never reached the backend
    assert be.stats()["requests"] == n - len(aborted)
    m = px.metrics()
    assert metric_sum(m, "smesh_faults_injected_total", service="api", kind="abort") == len(aborted)
    assert abs(metric_sum(m, "smesh_faults_injected_total", service="api", kind="delay") - len(delayed)) <= 0.03 * n


@pytest.mark.timeout(60)
def test_grpc_abort_status(run, grpc_server, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    px = run.proxy([
        service("echo", [grpc_server.address], protocol="grpc"),
        http_route("echo-route", ["echo"], [{
            "filters": [{"type": "FaultInjection", "faultInjection": {
                "abort": {"grpcStatus": 14, "percent": 100}}}],
        }]),
    ])
    ch = grpc.insecure_channel(f"127.0.0.1:{px.outbound}",
                               options=[("grpc.enable_http_proxy", 0), ("grpc.default_authority", "echo")])
    try:
        with pytest.raises(grpc.RpcError) as ei:
            pb2_grpc.EchoStub(ch).Unary(pb2.Msg(text="x"), timeout=10)
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    assert grpc_server.state["calls"] == 0
