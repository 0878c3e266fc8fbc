"""Acceptance 6: configuration reload (file watch and SIGHUP)."""
import collections
import os
import threading
import time

import pytest

from meshlib import KeepAliveClient, http_request, metric_sum, service, to_yaml, wait_until


@pytest.mark.timeout(60)
def test_added_endpoint_gets_traffic_within_2s(run):
    a, b, c = run.http_backend("a"), run.http_backend("b"), run.http_backend("c")
    px = run.proxy([service("api", [a.address, b.address], lb="round_robin")])
    cl = KeepAliveClient(px.outbound)
    try:
        seen = collections.Counter(cl.get("/").header("x-backend") for _ in range(20))
        assert set(seen) == {"a", "b"}, seen
        px.write_config([service("api", [a.address, b.address, c.address], lb="round_robin")])
        t0 = time.monotonic()
        got_c_after = None
        n = 0
        while time.monotonic() - t0 < 2.0 and n < 20000:
            n += 1
            r = cl.get("/")
            assert r.status == 200, r
            if r.header("x-backend") == "c":
                got_c_after = time.monotonic() - t0
                break
    finally:
        cl.close()
    assert got_c_after is not None, f"new endpoint got no traffic within 2 s ({n} requests); stderr:\n{px.stderr()[-2000:]}"
    assert c.stats()["requests"] >= 1
    assert metric_sum(px.metrics(), "smesh_config_reloads_total", result="ok") >= 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["unknown_field", "bad_address"])
def test_invalid_edit_keeps_serving_and_logs_field(run, kind):
    a, b = run.http_backend("a"), run.http_backend("b")
    px = run.proxy([service("api", [a.address])])
    assert px.get("/").header("x-backend") == "a"
    rejected_before = metric_sum(px.metrics(), "smesh_config_reloads_total", result="rejected")

    bad = service("api", [b.address])  # would move traffic to b if it were applied
    if kind == "unknown_field":
        bad["spec"]["loadBalancr"] = "ewma"
        field = "loadBalancr"
    else:
        bad["spec"]["endpoints"][0]["address"] = "127.0.0.1:notaport"
        field = "address"
    px.write_config([bad])
    fname = os.path.basename(px.config_path)

    def logged():
        for line in px.stderr().splitlines():
            if "ERROR" in line and field in line and fname in line:
                return line
        return None
    # meanwhile and afterwards the old configuration serves every request
    cl = KeepAliveClient(px.outbound)
    try:
        deadline = time.monotonic() + 5
        line = None
        while line is None and time.monotonic() < deadline:
            r = cl.get("/during")
            assert r.status == 200 and r.header("x-backend") == "a", r
            line = logged()
        assert line, f"no ERROR log line naming {field!r} and {fname!r} within 5 s:\n{px.stderr()[-3000:]}"
        for _ in range(20):
            r = cl.get("/after")
            assert r.status == 200 and r.header("x-backend") == "a", r
    finally:
        cl.close()
    assert b.stats()["requests"] == 0
    assert px.alive()
    rejected = metric_sum(px.metrics(), "smesh_config_reloads_total", result="rejected")
    assert rejected >= rejected_before + 1, rejected
    cfg = px.admin_get("/config")
    assert cfg.status == 200 and a.address.encode() in cfg.body and b.address.encode() not in cfg.body, cfg


@pytest.mark.timeout(150)
def test_no_request_fails_during_100_reloads_under_load(run):
    a, b, c = run.http_backend("a"), run.http_backend("b"), run.http_backend("c")
    cfg_a = to_yaml([service("api", [a.address, b.address], lb="round_robin")])
    cfg_b = to_yaml([service("api", [a.address, b.address, c.address], lb="ewma")])
    px = run.proxy(cfg_a)

    stop = threading.Event()
    lock = threading.Lock()
    failures, counts = [], collections.Counter()
    hard_deadline = time.monotonic() + 110

    def client(keepalive):
        cl = KeepAliveClient(px.outbound) if keepalive else None
        n = 0
        try:
            while not stop.is_set() and n < 200_000 and time.monotonic() < hard_deadline:
                n += 1
                try:
                    r = cl.get(f"/k{n}") if keepalive else http_request(px.outbound, f"/f{n}")
                except Exception as e:
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    if r.status != 200:
                        failures.append(f"status {r.status}: {r.header('smesh-proxy-error')} {r.body[:100]!r}")
                    else:
                        counts[r.header("x-backend")] += 1
        finally:
            if cl:
                cl.close()

    threads = [threading.Thread(target=client, args=(ka,), daemon=True) for ka in (True, True, False)]
    for t in threads:
        t.start()
    reloads = 0
    try:
        def done():
            with lock:
                return sum(counts.values()) + len(failures)
        for i in range(100):
            before = px.reloads("ok")
            px.write_config(cfg_b if i % 2 == 0 else cfg_a)
            px.sighup()
            wait_until(lambda: px.reloads("ok") > before, 5, interval=0.01, what=f"reload #{i + 1}")
            reloads += 1
            # let requests flow on the new snapshot before the next reload
            mark = done()
            wait_until(lambda: done() >= mark + 15, 10, interval=0.005, what="requests after a reload")
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    total = sum(counts.values())
    assert reloads == 100
    assert not failures, f"{len(failures)} failed requests of {total + len(failures)}: {failures[:10]}"
    assert total >= 1500, f"only {total} requests made during the reloads"
    assert counts["c"] > 0, f"config B (with endpoint c) never served: {counts}"
    assert px.reloads("ok") >= 100
    assert px.alive()
