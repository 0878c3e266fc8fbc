"""Issue 6, acceptance 6: mirroring. The shadow receives the configured share, its responses
and failures never reach the client, and a slow shadow does not slow the client down."""
import time

import pytest

from meshlib import (SwitchBackend, free_port, http_route, metric_sum, parallel_requests, service,
                     wait_until)


def mirrored(primary, shadow_address, percent):
    return [
        service("api", [primary.address]),
        service("shadow", [shadow_address]),
        http_route("api-route", ["api"], [{
            "filters": [{"type": "RequestMirror",
                         "requestMirror": {"backendRef": {"name": "shadow"}, "percent": percent}}],
        }]),
    ]


@pytest.mark.timeout(120)
def test_shadow_gets_its_share_and_cannot_slow_the_client(run):
    primary = run.http_backend("primary")
    shadow = run.http_backend("shadow", delay=1.0)   # a slow shadow
    px = run.proxy(mirrored(primary, shadow.address, 50))
    n = 400
    t0 = time.monotonic()
    rs = parallel_requests(px.outbound, n, threads=4, path="/m{i}", headers={"content-type": "text/plain"})
    elapsed = time.monotonic() - t0
    assert all(r.status == 200 and r.header("x-backend") == "primary" for r in rs)
    slowest = max(r.elapsed for r in rs)
    print(f"mirror: {n} requests in {elapsed:.2f}s, slowest {slowest * 1000:.0f} ms (shadow takes 1 s)")
    assert slowest < 0.5, slowest

    def settled():
        m = px.metrics()
        done = sum(metric_sum(m, "smesh_mirror_requests_total", service="shadow", result=k)
                   for k in ("sent", "failed", "dropped"))
        return done if done == shadow.stats()["requests"] and done > 0 else None
    mirrored_n = wait_until(settled, 20, interval=0.2, what="mirrors to finish")
    share = shadow.stats()["requests"] / n
    print(f"mirror: shadow got {share:.1%} (configured 50%)")
    assert 0.40 <= share <= 0.60, share
    assert primary.stats()["requests"] == n
    assert metric_sum(px.metrics(), "smesh_mirror_requests_total", service="shadow", result="sent") == mirrored_n


@pytest.mark.timeout(60)
def test_failing_and_dead_shadows_are_invisible(run):
    primary = run.http_backend("primary")
    failing = SwitchBackend("failing", fail_ratio=1.0, fail_status=500)
    try:
        px = run.proxy(mirrored(primary, failing.address, 100))
        rs = parallel_requests(px.outbound, 100, threads=2)
        assert all(r.status == 200 and r.header("x-backend") == "primary" for r in rs)
        wait_until(lambda: failing.requests == 100, 10, what="shadow to see every request")
        assert set(failing.statuses) == {500}
    finally:
        failing.close()
    dead = f"127.0.0.1:{free_port()}"
    px.write_config(mirrored(primary, dead, 100))
    wait_until(lambda: px.reloads("ok") >= 2, 10, what="reload")
    rs = parallel_requests(px.outbound, 50, threads=2)
    assert all(r.status == 200 and r.header("x-backend") == "primary" for r in rs)
    wait_until(lambda: metric_sum(px.metrics(), "smesh_mirror_requests_total", service="shadow",
                                  result="failed") >= 50, 10, what="failed mirrors counted")
