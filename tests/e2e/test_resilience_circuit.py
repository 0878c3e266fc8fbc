"""Issue 6, acceptance 1: circuit breaking. With maxRequests 10 and a slow upstream, excess
requests fail fast with 503 and a reason header, accepted ones keep their latency, and
smesh_circuit_breaker_overflows_total counts the overflow; maxPendingRequests queues."""
import threading
import time

import pytest

from meshlib import backend_policy, http_request, metric_sum, service


def burst(port, n, path, host="api"):
    """n requests at once, each on its own connection; returns the Responses."""
    out = [None] * n
    go = threading.Event()

    def one(i):
        go.wait()
        try:
            out[i] = http_request(port, path, host=host, timeout=15)
        except Exception as e:  # a transport error is a failure the test reports
            out[i] = e
    ts = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join(20)
    return out


@pytest.mark.timeout(90)
def test_max_requests_fails_excess_fast_and_keeps_latency(run):
    be = run.http_backend("slow")
    px = run.proxy([
        service("api", [be.address]),
        backend_policy("api-policy", "api", circuit_breaker={"maxRequests": 10}),
    ])
    # unloaded latency of the slow path
    base = http_request(px.outbound, "/?delay=1", timeout=10)
    assert base.status == 200, base
    rs = burst(px.outbound, 30, "/?delay=1")
    assert all(not isinstance(r, Exception) for r in rs), rs
    ok = [r for r in rs if r.status == 200]
    refused = [r for r in rs if r.status == 503]
    assert len(ok) == 10 and len(refused) == 20, [r.status for r in rs]
    for r in refused:
        assert r.header("smesh-proxy-error") == "circuit open", r
        assert r.elapsed < 0.5, f"overflow took {r.elapsed:.2f}s: not fast"
    for r in ok:
        assert r.elapsed < base.elapsed + 0.5, f"accepted request took {r.elapsed:.2f}s vs {base.elapsed:.2f}s alone"
    samples = px.metrics()
    assert metric_sum(samples, "smesh_circuit_breaker_overflows_total", service="api", kind="requests") == 20
    assert be.stats()["requests"] == 11
    # the breaker lets traffic through again once the slow requests are done
    assert http_request(px.outbound, "/").status == 200


@pytest.mark.timeout(90)
def test_pending_requests_wait_for_a_slot(run):
    be = run.http_backend("slow")
    px = run.proxy([
        service("api", [be.address]),
        backend_policy("api-policy", "api",
                       circuit_breaker={"maxRequests": 2, "maxPendingRequests": 2}),
    ])
    rs = burst(px.outbound, 6, "/?delay=0.7")
    statuses = sorted(r.status for r in rs)
    assert statuses == [200, 200, 200, 200, 503, 503], statuses
    waited = sorted(r.elapsed for r in rs if r.status == 200)
    # two went at once, two waited for them
    assert waited[0] < 1.2 and waited[-1] >= 1.3, waited
    samples = px.metrics()
    assert metric_sum(samples, "smesh_circuit_breaker_overflows_total", service="api", kind="pending") == 2
