"""Issue 6, acceptance 8 (second half): a mesh-wide rate limit. A BackendPolicy `rateLimit` with
`scope: mesh` on Service api is enforced on the inbound side by api's own proxies, each allowing
the limit divided by api's live endpoints in the snapshot the control plane pushes. Three api
proxies (each with its own app) behind one client proxy, ~300 req/s offered for 10 s: the total
let through holds within 10% of 100 req/s. One api proxy stops: the control plane drops its
endpoint, the two left rebalance to 50 req/s each, and the total still holds."""
import signal
import time

import pytest

from meshlib import assert_rate_limited, metric_sum, offered_load, service, to_yaml, wait_until

LIMIT, OFFERED, SECONDS = 100, 300, 10.0
SHARE = "smesh_rate_limit_share_requests_per_second"


def share(px):
    return metric_sum(px.metrics(), SHARE, service="api")


def limited(pxs):
    return sum(metric_sum(p.metrics(), "smesh_rate_limited_total", service="api", route="inbound")
               for p in pxs)


def wait_for_split(cp, client, apis, timeout=15):
    """Until the control plane lists exactly these api proxies, each of them enforces
    LIMIT / len(apis), and the client sends to exactly them."""
    want = LIMIT / len(apis)
    addresses = sorted(p.inbound_address for p in apis)

    def settled():
        if sorted(e["address"] for e in cp.endpoints("api")) != addresses:
            return False
        if any(abs(share(p) - want) > 1e-6 for p in apis):
            return False
        text = client.config_text()
        return text.count("address: 127.0.0.1:") == len(apis) and all(a in text for a in addresses)
    wait_until(settled, timeout, interval=0.1, what=f"the limit split across {len(apis)} api proxies")


@pytest.mark.timeout(150)
def test_mesh_wide_limit_is_split_across_live_proxies_and_rebalances(run):
    cp = run.control()
    path = f"{run.workdir}/mesh.yaml"
    with open(path, "w") as f:
        # round_robin: the split is even, so the client spreads requests evenly (with ewma,
        # a proxy answering 429 quickly would draw more of them and its share of the limit
        # would be used by fewer requests: the mesh would let less through, never more).
        f.write(to_yaml([
            service("api", [], lb="round_robin"),
            {"apiVersion": "smesh.io/v1", "kind": "BackendPolicy", "metadata": {"name": "api-limit"},
             "spec": {"targetRef": {"name": "api"},
                      "rateLimit": {"requestsPerSecond": LIMIT, "burst": 9, "scope": "mesh"}}},
        ]))
    r = cp.cli("apply", "-f", path)
    assert r.returncode == 0, r

    apps = [run.http_backend(f"app{i}") for i in range(3)]
    apis = [run.mesh_proxy(cp.url, service="api", app_port=app.port, name=f"api{i}", wait_ready=False)
            for i, app in enumerate(apps)]
    for p in apis:
        p.wait_ready()
    client = run.mesh_proxy(cp.url, name="client")
    wait_for_split(cp, client, apis)

    # three proxies: 33.3 req/s each
    statuses, sample, elapsed = offered_load(client.outbound, OFFERED, SECONDS, threads=12)
    ok, refused = assert_rate_limited(statuses, elapsed, LIMIT, "meshlimit 3 proxies")
    assert sample.get("smesh-proxy-error") == "rate limited", sample
    assert int(sample.get("retry-after", "0")) >= 1, sample
    served = [a.stats()["requests"] for a in apps]
    print(f"meshlimit 3 proxies: let through per proxy {served} ({[round(s / elapsed, 1) for s in served]}/s)")
    assert sum(served) == ok
    for s in served:
        assert abs(s / elapsed - LIMIT / 3) <= 0.15 * LIMIT / 3, served
    assert limited(apis) == refused

    # one stops (SIGTERM: it says goodbye and its endpoint leaves the next snapshot)
    gone = apis.pop()
    before = limited(apis)
    t0 = time.monotonic()
    gone.proc.signal(signal.SIGTERM)
    wait_for_split(cp, client, apis)
    print(f"meshlimit: rebalanced to {LIMIT / len(apis):.0f}/s per proxy {time.monotonic() - t0:.2f}s after SIGTERM")
    gone.proc.wait(timeout=30)
    for a in apps:
        a.reset()

    # two proxies: 50 req/s each
    statuses, _, elapsed = offered_load(client.outbound, OFFERED, SECONDS, threads=12)
    ok, refused = assert_rate_limited(statuses, elapsed, LIMIT, "meshlimit 2 proxies")
    served = [a.stats()["requests"] for a in apps]
    print(f"meshlimit 2 proxies: let through per proxy {served} ({[round(s / elapsed, 1) for s in served]}/s)")
    assert served[2] == 0 and sum(served) == ok, served
    for s in served[:2]:
        assert abs(s / elapsed - LIMIT / 2) <= 0.15 * LIMIT / 2, served
    assert limited(apis) - before == refused
