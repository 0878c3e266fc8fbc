"""Issue 6, acceptance 5: a 90/10 canary split over 2,000 requests lands within 3 percentage
points; a header match sends marked requests to v2 only; shifting weights with a reload drops
no request."""
import threading
import time

import pytest

from meshlib import http_route, parallel_requests, run_load, service, wait_until


def canary(px_backends, w1, w2):
    v1, v2 = px_backends
    return [
        service("api", [{"address": v1.address, "labels": {"version": "v1"}},
                        {"address": v2.address, "labels": {"version": "v2"}}]),
        http_route("api-route", ["api"], [
            {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
             "backendRefs": [{"name": "api", "subset": {"version": "v2"}}]},
            {"backendRefs": [{"name": "api", "subset": {"version": "v1"}, "weight": w1},
                             {"name": "api", "subset": {"version": "v2"}, "weight": w2}]},
        ]),
    ]


@pytest.mark.timeout(120)
def test_split_header_pin_and_weight_shift(run):
    v1, v2 = run.http_backend("v1"), run.http_backend("v2")
    px = run.proxy(canary((v1, v2), 90, 10))
    counts, failures, done = run_load(px.outbound, 2000, threads=8)
    assert not failures and done == 2000, failures[:5]
    share = counts["v2"] / 2000
    print(f"canary: v2 share {share:.2%} of 2000 (configured 10%)")
    assert abs(share - 0.10) <= 0.03, counts

    marked = parallel_requests(px.outbound, 200, threads=4, headers={"x-canary": "true"})
    assert {r.header("x-backend") for r in marked} == {"v2"}
    assert all(r.status == 200 for r in marked)

    # shift 90/10 -> 50/50 -> 0/100 while traffic flows: nothing fails
    result = {}

    def load():
        result["out"] = run_load(px.outbound, 4000, threads=4, time_limit=90)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    for w1, w2 in ((50, 50), (0, 100)):
        time.sleep(0.5)
        before = px.reloads("ok")
        px.write_config(canary((v1, v2), w1, w2))
        wait_until(lambda: px.reloads("ok") > before, 10, what=f"reload to {w1}/{w2}")
    t.join(120)
    counts, failures, done = result["out"]
    assert not failures, failures[:5]
    assert counts["v1"] + counts["v2"] == done
    after = parallel_requests(px.outbound, 100, threads=4)
    assert {r.header("x-backend") for r in after} == {"v2"}


def test_cookie_match_pins_sticky_canary_users(run):
    """A `cookies` match (smesh's extension to HTTPRoute matches) sends requests carrying
    canary=1 among their cookies to v2, and nothing else."""
    v1, v2 = run.http_backend("v1"), run.http_backend("v2")
    px = run.proxy([
        service("api", [{"address": v1.address, "labels": {"version": "v1"}},
                        {"address": v2.address, "labels": {"version": "v2"}}]),
        http_route("api-route", ["api"], [
            {"matches": [{"cookies": [{"name": "canary", "value": "1"}]}],
             "backendRefs": [{"name": "api", "subset": {"version": "v2"}}]},
            {"backendRefs": [{"name": "api", "subset": {"version": "v1"}}]},
        ]),
    ])
    pinned = parallel_requests(px.outbound, 50, threads=4, headers={"cookie": "session=abc; canary=1"})
    assert all(r.status == 200 for r in pinned)
    assert {r.header("x-backend") for r in pinned} == {"v2"}
    for cookie in ("session=abc; canary=10", "canary1=1", "session=canary=1"):
        others = parallel_requests(px.outbound, 20, threads=4, headers={"cookie": cookie})
        assert {r.header("x-backend") for r in others} == {"v1"}, cookie
