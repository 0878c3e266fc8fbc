"""Issue 6, acceptance 9: load shedding. A slow upstream with bounded capacity (4 requests at
once, 40 ms each: 100 req/s; the rest wait in line) behind a proxy whose BackendPolicy has an
adaptive concurrency limit. Critical requests (header `smesh-priority: critical`) alone at
50 req/s give the unloaded p99. Then 3x overload: the same critical load plus 250 req/s to a
route marked `priority: sheddable` (whose clients claim `critical` in the header, which the
route caps). Critical p99 stays within 2x of the unloaded p99, sheddable requests are the ones
refused (fast 503 `load shed`), and smesh_load_shed_total counts them by priority."""
import collections
import time

import pytest

from meshlib import Paced, http_route, metric_sum, service

CAPACITY, SERVICE_TIME = 4, 0.040  # the upstream: 100 req/s
CRITICAL_RATE, SHEDDABLE_RATE = 50, 250  # together 3x what the upstream can serve
UNLOADED_SECONDS, OVERLOAD_SECONDS = 6.0, 10.0


def run_load(port, plan, seconds):
    """plan: {label: (rate, threads, path, headers)}; all start together. Returns
    {label: results}."""
    start = time.monotonic() + 0.3
    running = {label: Paced(port, rate, seconds, threads=threads, host="slow", path=path, headers=headers,
                            start=start)
               for label, (rate, threads, path, headers) in plan.items()}
    # Each result: (status, latency, the smesh-proxy-error header or the client's error).
    return {label: [(s, lat, h.get("smesh-proxy-error", h.get("error"))) for s, lat, h in load.join().results]
            for label, load in running.items()}


def p99(latencies):
    s = sorted(latencies)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def summary(label, results):
    statuses = collections.Counter(r[0] for r in results)
    ok = [r[1] for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    p50 = sorted(ok)[len(ok) // 2] if ok else 0
    print(f"shedding {label}: {len(results)} sent, {dict(statuses)}, "
          f"ok p50 {p50 * 1e3:.1f} ms p99 {p99(ok) * 1e3 if ok else 0:.1f} ms, "
          f"refused latency max {max((r[1] for r in refused), default=0) * 1e3:.1f} ms")
    return statuses, ok, refused


@pytest.mark.timeout(120)
def test_critical_keeps_its_latency_while_sheddable_is_refused_first(run):
    be = run.http_backend("slow", delay=SERVICE_TIME, max_concurrent=CAPACITY)
    policy = {"apiVersion": "smesh.io/v1", "kind": "BackendPolicy", "metadata": {"name": "slow-policy"},
              "spec": {"targetRef": {"name": "slow"},
                       # start the limit near twice what the upstream takes; tolerance: let the
                       # average latency rise to 1.25x the no-load latency before limiting
                       "adaptiveConcurrency": {"initialLimit": 8, "tolerance": 1.25}}}
    route = http_route("slow-route", ["slow"], [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/batch"}}], "priority": "sheddable"},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
    ])
    px = run.proxy([service("slow", [be.address]), route, policy])
    critical = (CRITICAL_RATE, 8, "/api", {"smesh-priority": "critical"})

    # unloaded: critical requests alone (half the upstream's capacity)
    base = run_load(px.outbound, {"critical": critical}, UNLOADED_SECONDS)["critical"]
    statuses, ok, _ = summary("unloaded critical", base)
    assert statuses == {200: len(base)}, statuses
    unloaded_p99 = p99(ok)
    be.reset()
    before = px.metrics()

    # 3x overload: the same critical load plus sheddable requests (the header claims
    # critical; the route says sheddable, and a route's priority is a ceiling)
    results = run_load(px.outbound, {
        "critical": critical,
        "sheddable": (SHEDDABLE_RATE, 10, "/batch/job", {"smesh-priority": "critical"}),
    }, OVERLOAD_SECONDS)
    c_statuses, c_ok, c_refused = summary("overload critical", results["critical"])
    s_statuses, s_ok, s_refused = summary("overload sheddable", results["sheddable"])
    m = px.metrics()
    limit = metric_sum(m, "smesh_adaptive_concurrency_limit", service="slow")
    baseline = metric_sum(m, "smesh_adaptive_concurrency_baseline_seconds", service="slow")
    stats = be.stats()
    overload_p99 = p99(c_ok)
    print(f"shedding: critical p99 {overload_p99 * 1e3:.1f} ms under 3x overload vs {unloaded_p99 * 1e3:.1f} ms "
          f"unloaded ({overload_p99 / unloaded_p99:.2f}x); limit {limit:.2f}, baseline {baseline * 1e3:.1f} ms; "
          f"upstream served {stats['requests']} ({stats['requests'] / OVERLOAD_SECONDS:.0f}/s), "
          f"at most {stats['peak_inflight']} in flight at once")

    for label, st in (("critical", c_statuses), ("sheddable", s_statuses)):
        assert set(st) <= {200, 503}, (label, st)
    assert all(r[2] == "load shed" for r in c_refused + s_refused)
    # critical traffic keeps its latency and is (almost) never refused ...
    assert overload_p99 <= 2 * unloaded_p99, (overload_p99, unloaded_p99)
    assert len(c_refused) <= 0.01 * len(results["critical"]), c_statuses
    # ... sheddable traffic is what gets refused, fast
    assert len(s_refused) >= 0.6 * len(results["sheddable"]), s_statuses
    assert max(r[1] for r in s_refused) < unloaded_p99, "a refusal waits for nothing"
    # and the upstream is still kept busy with what critical traffic leaves
    assert stats["requests"] == len(c_ok) + len(s_ok)
    assert stats["requests"] >= 0.6 * CAPACITY / SERVICE_TIME * OVERLOAD_SECONDS, stats
    # the metrics count exactly the refusals, by priority
    shed = {p: metric_sum(m, "smesh_load_shed_total", service="slow", priority=p)
            - metric_sum(before, "smesh_load_shed_total", service="slow", priority=p)
            for p in ("critical", "normal", "sheddable")}
    assert shed == {"critical": len(c_refused), "normal": 0, "sheddable": len(s_refused)}, shed
    errors = (metric_sum(m, "smesh_proxy_errors_total", reason="load shed")
              - metric_sum(before, "smesh_proxy_errors_total", reason="load shed"))
    assert errors == len(c_refused) + len(s_refused)
    assert 1 <= limit <= 16, limit
