"""Issue 6, acceptance 6: mirroring. The shadow receives the configured share, its responses
and failures never reach the client, and a slow shadow does not slow the client down."""
import hashlib
import json
import os
import socket
import threading
import time

import pytest

from meshlib import (SwitchBackend, curl, free_port, http_route, metric_sum, parallel_requests,
                     service, wait_until)


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


def chunked_upload(run, px, name, size, path):
    """POSTs `size` random bytes with Transfer-Encoding: chunked (length unknown to the proxy);
    returns (status, response JSON, sha256 of what was sent, seconds taken)."""
    data = os.urandom(size)
    file = os.path.join(run.workdir, name)
    with open(file, "wb") as f:
        f.write(data)
    t0 = time.monotonic()
    out = curl("-s", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{file}",
               "-H", "Host: api", "-w", "\n%{http_code}", f"http://127.0.0.1:{px.outbound}{path}")
    elapsed = time.monotonic() - t0
    body, code = out.stdout.rsplit(b"\n", 1)
    return int(code), json.loads(body), hashlib.sha256(data).hexdigest(), elapsed


@pytest.mark.timeout(60)
def test_a_streamed_body_is_mirrored_whole(run):
    primary = run.http_backend("primary")
    shadow = run.http_backend("shadow")
    px = run.proxy(mirrored(primary, shadow.address, 100))
    size = 3 * 1024 * 1024 + 17
    status, resp, digest, _ = chunked_upload(run, px, "upload", size, "/upload")
    assert status == 200, resp
    assert resp["backend"] == "primary"
    assert (resp["body_len"], resp["body_sha256"]) == (size, digest)
    # The shadow got the same bytes, streamed alongside (not buffered first).
    got = wait_until(lambda: shadow.stats()["bodies"].get("/upload"), 10, what="the mirrored upload")
    assert got == {"len": size, "sha256": digest}
    wait_until(lambda: metric_sum(px.metrics(), "smesh_mirror_requests_total", service="shadow",
                                  result="sent") == 1, 10, what="the mirror counted as sent")


@pytest.mark.timeout(60)
def test_a_shadow_that_stops_reading_is_cut_off_without_holding_up_the_client(run):
    """A shadow that accepts and never reads: the mirror's copy falls behind, is cut off (a
    failed mirror) and the client's upload goes on at full speed."""
    primary = run.http_backend("primary")
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(16)
    held = []
    stop = threading.Event()

    def hold():
        stuck.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = stuck.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            held.append(conn)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        px = run.proxy(mirrored(primary, f"127.0.0.1:{stuck.getsockname()[1]}", 100))
        size = 48 * 1024 * 1024
        status, resp, digest, elapsed = chunked_upload(run, px, "big", size, "/big")
        print(f"mirror: {size >> 20} MiB upload with a stuck shadow took {elapsed:.2f}s")
        assert status == 200, resp
        assert (resp["body_len"], resp["body_sha256"]) == (size, digest)
        assert held, "the mirror never connected to the shadow"
        # Had the client waited for the shadow, it would have stalled until the mirror's
        # 10 s timeout released it.
        assert elapsed < 8, elapsed
        wait_until(lambda: metric_sum(px.metrics(), "smesh_mirror_requests_total", service="shadow",
                                      result="failed") == 1, 15, what="the cut mirror counted as failed")
        assert metric_sum(px.metrics(), "smesh_mirror_requests_total", service="shadow", result="sent") == 0
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        stuck.close()
