"""Acceptance 4: load balancing over three endpoints, one 50 ms slower; one endpoint dead."""
import pytest

from meshlib import free_port, http_request, run_load, service

N = 3000


def _three(run, lb):
    fast1 = run.http_backend("fast1")
    fast2 = run.http_backend("fast2")
    slow = run.http_backend("slow", delay=0.05)
    px = run.proxy([service("api", [fast1.address, fast2.address, slow.address], lb=lb)])
    return px, (fast1, fast2, slow)


@pytest.mark.timeout(120)
def test_ewma_avoids_slow_endpoint(run):
    px, backends = _three(run, "ewma")
    counts, failures, done = run_load(px.outbound, N, threads=8, time_limit=80)
    assert not failures, failures[:10]
    assert sum(counts.values()) == N, (counts, done)
    share = counts["slow"] / N
    assert share < 0.15, f"ewma sent {counts['slow']}/{N} ({share:.1%}) to the slow endpoint: {counts}"
    # the backends agree with what the client saw
    assert [b.stats()["requests"] for b in backends] == [counts["fast1"], counts["fast2"], counts["slow"]]


@pytest.mark.timeout(120)
def test_round_robin_spreads_evenly(run):
    px, backends = _three(run, "round_robin")
    counts, failures, done = run_load(px.outbound, N, threads=8, time_limit=80)
    assert not failures, failures[:10]
    assert sum(counts.values()) == N, (counts, done)
    for name in ("fast1", "fast2", "slow"):
        share = counts[name] / N
        assert 0.28 <= share <= 0.39, f"round_robin gave {name} {share:.1%}: {counts}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lb", ["ewma", "round_robin"])
def test_dead_endpoint_invisible_to_clients(run, lb):
    a = run.http_backend("a")
    b = run.http_backend("b")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    px = run.proxy([service("api", [a.address, dead, b.address], lb=lb)])
    counts, failures, done = run_load(px.outbound, 600, threads=4, time_limit=60)
    assert not failures, f"{len(failures)} client-visible failures, e.g. {failures[:5]}"
    assert counts["a"] + counts["b"] == 600, counts
    assert counts["a"] > 0 and counts["b"] > 0, counts
    # and single fresh-connection GETs too (no pooled connection to hide behind)
    for i in range(30):
        r = http_request(px.outbound, f"/single/{i}")
        assert r.status == 200, r
