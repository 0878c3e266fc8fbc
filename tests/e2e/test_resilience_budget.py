"""Issue 6, acceptance 4: with every endpoint failing, retries stay within the retry budget:
the upstream sees at most (1 + ratio) x the client requests plus the minimum."""
import math
import time

import pytest

from meshlib import backend_policy, http_route, metric_sum, parallel_requests, service


@pytest.mark.timeout(120)
def test_retries_stay_within_the_budget(run):
    a = run.http_backend("a")
    b = run.http_backend("b")
    ratio, min_rps, ttl = 0.2, 5, 10
    px = run.proxy([
        service("api", [a.address, b.address]),
        http_route("api-route", ["api"], [{
            "retry": {"attempts": 3, "codes": [503], "backoff": "1ms"},
        }]),
        backend_policy("api-policy", "api", retry_budget={
            "ratio": ratio, "minRetriesPerSecond": min_rps, "ttl": f"{ttl}s"}),
    ])
    n = 600
    t0 = time.monotonic()
    rs = parallel_requests(px.outbound, n, threads=6, path="/?status=503")
    elapsed = time.monotonic() - t0
    assert len(rs) == n and all(r.status == 503 for r in rs), {r.status for r in rs}
    upstream = a.stats()["requests"] + b.stats()["requests"]
    windows = math.ceil(elapsed / ttl)
    bound = (1 + ratio) * n + min_rps * ttl * windows
    print(f"budget: {n} client requests, upstream saw {upstream} (bound {bound:.0f}, "
          f"without a budget {4 * n}) in {elapsed:.1f}s")
    assert n <= upstream <= bound, (upstream, bound)
    samples = px.metrics()
    skipped = metric_sum(samples, "smesh_retries_skipped_total", reason="budget")
    retried = metric_sum(samples, "smesh_retries_total", service="api")
    assert retried == upstream - n, (retried, upstream)
    assert skipped > 0
