"""Control plane, acceptance 2 (issue 4): a proxy started with --service registers its endpoint
under a lease; another proxy discovers it (traffic within 1 s); kill -9 and the endpoint goes
within the lease TTL; a clean stop (SIGTERM, goodbye) and it goes at once."""
import signal
import time

import pytest

from meshlib import service, to_yaml, wait_until


def _addresses(cp, svc):
    return sorted(e["address"] for e in cp.endpoints(svc))


def _seed(cp, run):
    """An unrelated resource, so the mesh has a configuration before any proxy registers."""
    path = f"{run.workdir}/seed.yaml"
    with open(path, "w") as f:
        f.write(to_yaml([service("other", ["127.0.0.1:9"])]))
    r = cp.cli("apply", "-f", path)
    assert r.returncode == 0, r


@pytest.mark.timeout(90)
def test_registered_service_is_discovered_and_leaves_on_kill_and_on_sigterm(run):
    cp = run.control()
    _seed(cp, run)
    client = run.mesh_proxy(cp.url, name="client")
    backend = run.http_backend("api-v2")

    # nothing called api yet: the client cannot reach it
    r = client.get("/before", host="api")
    assert r.status != 200, r
    assert cp.api("GET", "/api/v1/endpoints/api", token=False).status == 404

    api = run.mesh_proxy(cp.url, name="api", service="api", app_port=backend.port,
                         labels={"version": "v2"}, lease_ttl="2s", wait_ready=False)
    api.wait_ready()
    ready_at = time.monotonic()
    flowed_at, last = None, None
    for _ in range(2000):  # bounded; normally a handful
        last = client.get("/through", host="api", timeout=2)
        if last.status == 200 and last.header("x-backend") == "api-v2":
            flowed_at = time.monotonic()
            break
        if time.monotonic() - ready_at > 3:
            break
        time.sleep(0.01)
    assert flowed_at is not None, f"no traffic to api within 3 s of its proxy being ready; last: {last}"
    assert flowed_at - ready_at <= 1.0, f"traffic flowed {flowed_at - ready_at:.3f}s after ready (> 1 s)"
    # it went through the api proxy's inbound port to the app
    assert backend.stats()["requests"] >= 1

    eps = cp.endpoints("api")
    assert [e["address"] for e in eps] == [api.inbound_address], eps
    assert eps[0].get("labels") == {"version": "v2"}, eps
    r = cp.cli("get", "endpoints", "api")
    assert r.returncode == 0 and api.inbound_address in r.stdout, r
    mine = [p for p in cp.proxies() if p["service"] == "api"]
    assert len(mine) == 1 and mine[0]["address"] == api.inbound_address, cp.proxies()

    # kill -9: the endpoint stays until the lease (2 s) runs out, then goes
    ttl = 2.0
    api.proc.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    api.proc.wait(timeout=10)
    wait_until(lambda: api.inbound_address not in _addresses(cp, "api"), ttl + 5, interval=0.02,
               what="the killed proxy's endpoint to expire")
    gone_after = time.monotonic() - killed_at
    # the lease TTL plus a small allowance for expiry checks and this poll
    assert gone_after <= ttl + 0.5, f"endpoint of a kill -9'ed proxy gone only after {gone_after:.2f}s (TTL {ttl}s)"
    wait_until(lambda: not [p for p in cp.proxies() if p["service"] == "api"], 3,
               what="the killed proxy to leave `smesh get proxies`")
    # and the client forgets it: the address leaves its configuration, and a request for api
    # gets the proxy's own error (the implicit Service is gone: 404; or 503: no endpoints)
    wait_until(lambda: api.inbound_address not in client.config_text(), 3,
               what="the killed endpoint to leave the client's /config")
    r = client.get("/after-kill", host="api", timeout=2)
    assert r.status in (404, 503) and r.header("smesh-proxy-error"), r

    # SIGTERM with a long lease: a goodbye takes the endpoint away at once
    api2 = run.mesh_proxy(cp.url, name="api2", service="api", app_port=backend.port, lease_ttl="30s")
    wait_until(lambda: _addresses(cp, "api") == [api2.inbound_address], 3, what="api2 registered")
    wait_until(lambda: client.get("/again", host="api", timeout=2).status == 200, 3,
               what="traffic to api2")
    api2.proc.signal(signal.SIGTERM)
    termed_at = time.monotonic()
    wait_until(lambda: api2.inbound_address not in _addresses(cp, "api"), 10, interval=0.01,
               what="the stopped proxy's endpoint to go")
    gone_after = time.monotonic() - termed_at
    assert gone_after <= 1.0, f"endpoint of a SIGTERM'ed proxy gone only after {gone_after:.2f}s (lease 30 s)"
    assert api2.proc.wait(timeout=10) == 0, api2.stderr()[-2000:]


@pytest.mark.timeout(60)
def test_default_lease_ttl_of_the_control_plane_applies(run):
    """No --lease-ttl on the proxy: the control plane's --lease-ttl (here 2 s) is the TTL."""
    cp = run.control(lease_ttl="2s")
    _seed(cp, run)
    backend = run.http_backend("api")
    api = run.mesh_proxy(cp.url, name="api", service="api", app_port=backend.port)
    wait_until(lambda: _addresses(cp, "api") == [api.inbound_address], 3, what="registration")
    api.proc.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    api.proc.wait(timeout=10)
    wait_until(lambda: not _addresses(cp, "api"), 10, interval=0.02, what="expiry")
    gone_after = time.monotonic() - killed_at
    assert gone_after <= 2.5, f"gone after {gone_after:.2f}s with --lease-ttl 2s on the control plane"


@pytest.mark.timeout(60)
def test_static_and_registered_endpoints_together(run):
    """Static endpoints in a Service still work next to registered ones."""
    cp = run.control()
    static_be = run.http_backend("static")
    reg_be = run.http_backend("registered")
    path = f"{run.workdir}/api.yaml"
    with open(path, "w") as f:
        f.write(to_yaml([service("api", [static_be.address], lb="round_robin")]))
    r = cp.cli("apply", "-f", path)
    assert r.returncode == 0, r
    client = run.mesh_proxy(cp.url, name="client")
    api = run.mesh_proxy(cp.url, name="api", service="api", app_port=reg_be.port)
    eps = {e["address"]: e["source"] for e in cp.endpoints("api")}
    assert eps == {static_be.address: "static", api.inbound_address: "registered"}, eps
    seen = set()
    for _ in range(200):
        r = client.get("/", host="api", timeout=2)
        assert r.status in (200, 503, 404), r
        if r.status == 200:
            seen.add(r.header("x-backend"))
        if seen == {"static", "registered"}:
            break
        time.sleep(0.01)
    assert seen == {"static", "registered"}, seen


@pytest.mark.timeout(30)
def test_pure_client_on_an_empty_mesh_becomes_ready(run):
    """A fresh control plane with nothing applied and nothing registered: the (empty) mesh is
    still a configuration, so a connected proxy gets it and becomes ready."""
    cp = run.control()
    px = run.mesh_proxy(cp.url, name="client", wait_ready=False)
    try:
        px.wait_ready(timeout=5)
    except TimeoutError:
        pytest.fail("a proxy connected to a fresh, empty control plane is not ready after 5 s; "
                    f"`smesh get proxies`: {cp.proxies()}")
