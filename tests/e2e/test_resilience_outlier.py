"""Issue 6, acceptance 2: outlier detection. Of three endpoints one answers 500 half the time;
it is ejected, and with retries the client success rate over 2,000 requests is >= 99.9%; it
returns to rotation after it recovers."""
import time

import pytest

from meshlib import (SwitchBackend, backend_policy, http_route, metric_sum, parallel_requests,
                     service, wait_until)


@pytest.mark.timeout(150)
def test_flaky_endpoint_is_ejected_and_returns(run):
    good = [SwitchBackend(f"good{i}") for i in range(2)]
    bad = SwitchBackend("bad", fail_ratio=0.5, fail_status=500)
    try:
        px = run.proxy([
            service("api", [b.address for b in good + [bad]], lb="round_robin"),
            http_route("api-route", ["api"], [{
                "retry": {"attempts": 2, "codes": [500, 502, 503], "backoff": "1ms"},
            }]),
            backend_policy("api-policy", "api", outlier_detection={
                "consecutive5xx": 2, "interval": "1s", "baseEjectionTime": "1s",
                "maxEjectionPercent": 34}),
        ])
        rs = parallel_requests(px.outbound, 2000, threads=8, path="/r{i}")
        failed = [r for r in rs if r.status != 200]
        assert len(rs) == 2000
        success = 1 - len(failed) / len(rs)
        print(f"outlier: success {success:.4%}, bad endpoint saw {bad.requests} of "
              f"{sum(b.requests for b in good) + bad.requests} tries")
        assert success >= 0.999, failed[:5]
        ejections = metric_sum(px.metrics(), "smesh_outlier_ejections_total", service="api")
        assert ejections >= 1
        # ejected most of the time: far fewer than its round-robin third
        assert bad.requests < 2000 / 3 * 0.8, bad.requests

        # it recovers: after its ejection ends it gets traffic again
        bad.fail_ratio = 0.0
        seen = bad.requests

        def back_in_rotation():
            parallel_requests(px.outbound, 30, threads=3)
            return bad.requests - seen >= 5
        wait_until(back_in_rotation, 40, interval=0.2, what="the recovered endpoint to get traffic")
        before = bad.requests
        rs = parallel_requests(px.outbound, 300, threads=3)
        assert all(r.status == 200 for r in rs)
        share = (bad.requests - before) / 300
        assert 0.2 <= share <= 0.45, f"recovered endpoint share {share:.2f}"
    finally:
        for b in good + [bad]:
            b.close()
