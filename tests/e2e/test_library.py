"""Issue 18 (the library, `smesh::Mesh`), first increment: the example program
crates/smesh/examples/orders.rs, with the mesh linked in, calls a Service fronted by two
sidecars through a control plane: every call succeeds through retries on 503, both
endpoints are used, the sidecars see the program's SPIFFE identity over mTLS (an
AuthorizationPolicy lets only `orders` in, and their access logs name it), the program is
listed among the proxies, and its /metrics has the proxy's metric names."""
import json
import os

import pytest

from meshlib import SMESH_BIN, LOOPBACK, free_port, http_request, metric_sum, parse_metrics, wait_until

TD = "example.org"
# `cargo build --examples` puts the example next to the smesh binary (scripts/test).
EXAMPLE_BIN = os.path.join(os.path.dirname(SMESH_BIN), "examples", "orders")

RESOURCES = """apiVersion: smesh.io/v1
kind: Service
metadata: {name: inventory}
spec: {ports: [{port: 80, protocol: http}]}
---
apiVersion: smesh.io/v1
kind: HTTPRoute
metadata: {name: inventory}
spec:
  parentRefs: [{name: inventory}]
  rules: [{retry: {attempts: 3, codes: [503], backoff: 10ms}}]
---
apiVersion: smesh.io/v1
kind: AuthorizationPolicy
metadata: {name: only-orders}
spec:
  targetRef: {name: inventory}
  rules: [{from: [{service: orders}]}]
"""


def token_file(run, cp, service, name):
    r = cp.cli("token", "create", "--service", service, "--ttl", "1h")
    assert r.returncode == 0, r.stderr
    path = os.path.join(run.workdir, f"{name}.token")
    with open(path, "w") as f:
        f.write(r.stdout.strip() + "\n")
    return path


def summary(proc):
    """The example's one JSON line, once it has printed it (None before)."""
    if proc.poll() is not None:
        raise RuntimeError(f"orders exited with {proc.poll()}:\n{proc.tail()}")
    for line in proc.stdout().splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return None


@pytest.mark.timeout(120)
def test_library_calls_sidecars_with_retries_mtls_and_registers_with_metrics(run):
    assert os.path.exists(EXAMPLE_BIN), f"{EXAMPLE_BIN} missing: cargo build --workspace --examples"
    cp = run.control(extra_args=["--trust-domain", TD])
    r = cp.cli("apply", "-f", "-", input=RESOURCES)
    assert r.returncode == 0, r.stderr
    apps, sidecars, logs = [], [], []
    for i in range(2):
        app = run.http_backend(f"inventory-{i}", flaky=True)
        log = os.path.join(run.workdir, f"inventory-{i}.access.log")
        sidecars.append(run.mesh_proxy([cp.url], service="inventory", app_port=app.port, name=f"inventory-{i}",
                                       extra_args=["--token-file", token_file(run, cp, "inventory", f"inv{i}"),
                                                   "--access-log", log]))
        apps.append(app)
        logs.append(log)
    wait_until(lambda: len(cp.endpoints("inventory")) == 2, 10, what="both inventory endpoints registered")
    # Only `orders` may call inventory: a caller without that identity is refused.
    denied = http_request(sidecars[0].inbound, "/plain", host="inventory")
    assert denied.status == 403, denied

    admin = free_port()
    n = 20
    orders = run.spawn([EXAMPLE_BIN, "--control", cp.url, "--service", "orders",
                        "--token-file", token_file(run, cp, "orders", "orders"),
                        "--target", "inventory", "--requests", n, "--admin", f"{LOOPBACK}:{admin}"],
                       "orders", env={**os.environ, "RUST_LOG": "info"})
    wait_until(lambda: summary(orders) is not None, 60, interval=0.1, what="the example's summary line")
    result = summary(orders)

    # every call succeeded, through retries on the flaky apps' 503s, on both endpoints
    assert result["ok"] == n and result["errors"] == [], result
    assert set(result["backends"]) == {"inventory-0", "inventory-1"}, result
    assert result["spiffe_id"] == f"spiffe://{TD}/service/orders", result
    for app in apps:
        assert app.stats()["statuses"].get("503", 0) >= 1, app.stats()

    # mTLS: the sidecars saw the library's identity (the policy let it in, the log names it)
    for log in logs:
        wait_until(lambda: os.path.exists(log) and "service/orders" in open(log).read(), 10,
                   what=f"a request from orders in {log}")
        assert f"peer=spiffe://{TD}/service/orders" in open(log).read()

    # registered like a proxy, with its admin address announced
    mine = [p for p in cp.proxies() if p["proxy_id"].startswith("orders-")]
    assert len(mine) == 1, cp.proxies()
    assert mine[0]["admin"] == f"{LOOPBACK}:{admin}", mine

    # the proxy's metric names, counted as the outbound port counts them
    resp = http_request(admin, "/metrics", host="admin")
    assert resp.status == 200, resp
    samples = parse_metrics(resp.body.decode())
    assert metric_sum(samples, "smesh_requests_total", direction="outbound", service="inventory") == n
    assert metric_sum(samples, "smesh_retries_total", service="inventory") >= 1
    assert metric_sum(samples, "smesh_identity_certifications_total", result="ok") >= 1
