"""Issue 6: BackendPolicy `connectionPool` settings. Idle HTTP/1.1 connections to a Service's
endpoints are kept at most `maxIdlePerEndpoint` per worker and closed after `idleTimeout`;
`maxIdlePerEndpoint: 0` opens a connection per request. Connections are counted from the
kernel's table (/proc/net/tcp), as the upstream sees them."""
import pytest

from meshlib import backend_policy, parallel_requests, service, wait_until


def established_to(port):
    """ESTABLISHED TCP connections whose remote end is 127.0.0.1:port (the proxy's side)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and remote == f"0100007F:{port:04X}":
                n += 1
    return n


def pooled(be, pool):
    policy = backend_policy("api-pool", "api")
    policy["spec"]["connectionPool"] = pool
    return [service("api", [be.address]), policy]


@pytest.mark.timeout(60)
def test_idle_connections_are_capped_and_closed_after_the_idle_timeout(run):
    be = run.http_backend("b1", delay=0.3)
    px = run.proxy(pooled(be, {"idleTimeout": "1500ms", "maxIdlePerEndpoint": 2}))
    rs = parallel_requests(px.outbound, 8, threads=8)
    assert all(r.status == 200 for r in rs), [r.status for r in rs]
    # Eight ran at once over eight connections; only two stay for reuse.
    wait_until(lambda: established_to(be.port) == 2, 5, interval=0.05, what="the pool to keep 2 idle connections")
    # A request now reuses one of them.
    assert px.get("/again").status == 200
    assert established_to(be.port) == 2
    # Idle past the timeout: closed by the proxy.
    wait_until(lambda: established_to(be.port) == 0, 5, interval=0.1, what="idle connections to close")


@pytest.mark.timeout(60)
def test_no_reuse_when_max_idle_is_zero(run):
    be = run.http_backend("b1")
    px = run.proxy(pooled(be, {"maxIdlePerEndpoint": 0, "connectTimeout": "250ms"}))
    for i in range(5):
        assert px.get(f"/r{i}").status == 200
    wait_until(lambda: established_to(be.port) == 0, 5, interval=0.05, what="every connection closed")


def test_bad_connection_pool_is_rejected_naming_the_field(run, tmp_path):
    be = run.http_backend("b1")
    px = run.proxy(pooled(be, {"idleTimeout": "30s"}))
    before = px.reloads("rejected")
    px.write_config(pooled(be, {"idleTimeout": "0s"}))
    wait_until(lambda: px.reloads("rejected") > before, 10, what="the bad config to be rejected")
    assert "spec.connectionPool.idleTimeout: must be at least 1ms" in px.stderr()
    assert px.get("/still").status == 200
