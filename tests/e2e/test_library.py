"""Issue 18 (the library, `smesh::Mesh`), first increment: the example program
crates/smesh/examples/orders.rs, with the mesh linked in, calls a Service fronted by two
sidecars through a control plane: every call succeeds through retries on 503, both
endpoints are used, the sidecars see the program's SPIFFE identity over mTLS (an
AuthorizationPolicy lets only `orders` in, and their access logs name it), the program
renews its certificate, is listed among the proxies, and its /metrics has the proxy's metric
names. With the control plane killed it keeps calling on its last configuration without an
error, and resyncs when the control plane is back."""
import json
import os
import time

import pytest

from meshlib import SMESH_BIN, LOOPBACK, free_port, http_request, metric_sum, parse_metrics, wait_until

TD = "example.org"
# `cargo build --examples` puts the example next to the smesh binary (scripts/test).
EXAMPLE_BIN = os.path.join(os.path.dirname(SMESH_BIN), "examples", "orders")

RESOURCES = """apiVersion: smesh.io/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {certificateTtl: 6s}
---
apiVersion: smesh.io/v1
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


def rounds(proc):
    """The example's JSON lines so far, one per round of calls."""
    if proc.poll() is not None:
        raise RuntimeError(f"orders exited with {proc.poll()}:\n{proc.tail()}")
    return [json.loads(line) for line in proc.stdout().splitlines() if line.startswith("{")]


def start_inventory(run, cp, n, flaky):
    """n sidecar-fronted `inventory` apps, registered; their apps, sidecars and access logs."""
    apps, sidecars, logs = [], [], []
    for i in range(n):
        app = run.http_backend(f"inventory-{i}", flaky=flaky)
        log = os.path.join(run.workdir, f"inventory-{i}.access.log")
        sidecars.append(run.mesh_proxy([cp.url], service="inventory", app_port=app.port, name=f"inventory-{i}",
                                       extra_args=["--token-file", token_file(run, cp, "inventory", f"inv{i}"),
                                                   "--access-log", log]))
        apps.append(app)
        logs.append(log)
    wait_until(lambda: len(cp.endpoints("inventory")) == n, 10, what=f"{n} inventory endpoints registered")
    return apps, sidecars, logs


def start_orders(run, cp, admin, *extra):
    return run.spawn([EXAMPLE_BIN, "--control", cp.url, "--service", "orders",
                      "--token-file", token_file(run, cp, "orders", "orders"),
                      "--target", "inventory", "--admin", f"{LOOPBACK}:{admin}", *extra],
                     "orders", env={**os.environ, "RUST_LOG": "info"})


def library_metrics(admin):
    resp = http_request(admin, "/metrics", host="admin")
    assert resp.status == 200, resp
    return parse_metrics(resp.body.decode())


@pytest.mark.timeout(120)
def test_library_calls_sidecars_with_retries_mtls_and_registers_with_metrics(run):
    assert os.path.exists(EXAMPLE_BIN), f"{EXAMPLE_BIN} missing: cargo build --workspace --examples"
    cp = run.control(extra_args=["--trust-domain", TD])
    r = cp.cli("apply", "-f", "-", input=RESOURCES)
    assert r.returncode == 0, r.stderr
    apps, sidecars, logs = start_inventory(run, cp, 2, flaky=True)
    # Only `orders` may call inventory: a caller without that identity is refused.
    denied = http_request(sidecars[0].inbound, "/plain", host="inventory")
    assert denied.status == 403, denied

    admin = free_port()
    n = 20
    orders = start_orders(run, cp, admin, "--requests", n)
    wait_until(lambda: rounds(orders), 60, interval=0.1, what="the example's summary line")
    result = rounds(orders)[0]

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
    samples = library_metrics(admin)
    assert metric_sum(samples, "smesh_requests_total", direction="outbound", service="inventory") == n
    assert metric_sum(samples, "smesh_retries_total", service="inventory") >= 1
    # the certificate (6 s) is renewed, as a proxy's is
    wait_until(lambda: metric_sum(library_metrics(admin), "smesh_identity_certifications_total", result="ok") >= 2,
               15, interval=0.2, what="the library's certificate renewal")


@pytest.mark.timeout(120)
def test_library_keeps_calling_without_the_control_plane_and_resyncs(run):
    assert os.path.exists(EXAMPLE_BIN), f"{EXAMPLE_BIN} missing: cargo build --workspace --examples"
    cp = run.control(extra_args=["--trust-domain", TD])
    r = cp.cli("apply", "-f", "-", input=RESOURCES.replace("certificateTtl: 6s", "certificateTtl: 1h"))
    assert r.returncode == 0, r.stderr
    start_inventory(run, cp, 2, flaky=False)
    admin = free_port()
    orders = start_orders(run, cp, admin, "--requests", 5, "--rounds", 100000, "--pause-ms", 50)
    wait_until(lambda: len(rounds(orders)) >= 2, 60, interval=0.1, what="two rounds of calls")

    cp.kill9()
    killed_at, before = time.monotonic(), len(rounds(orders))
    # bounded: the rounds go on (5 calls, 50 ms apart) for 3 s of a missing control plane
    wait_until(lambda: time.monotonic() - killed_at >= 3 and len(rounds(orders)) >= before + 5, 30,
               interval=0.1, what="rounds of calls without the control plane")
    during = rounds(orders)[before:]
    assert all(r["ok"] == 5 and r["errors"] == [] for r in during), during

    # back on the same port and store: the library reconnects and gets what changed since
    cp2 = cp.restart()
    extra = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: extra}\nspec: {ports: [{port: 80}]}\n"
    r = cp2.cli("apply", "-f", "-", input=extra)
    assert r.returncode == 0, r.stderr

    def resynced():
        resp = http_request(admin, "/config", host="admin")
        return resp.status == 200 and "name: extra" in resp.body.decode()
    wait_until(resynced, 20, interval=0.1, what="the new resource in the library's /config")
    assert [p for p in cp2.proxies() if p["proxy_id"].startswith("orders-")], cp2.proxies()
    after = rounds(orders)[-3:]
    assert all(r["ok"] == 5 and r["errors"] == [] for r in after), after


SERVED = """apiVersion: smesh.io/v1
kind: Service
metadata: {name: orders}
spec: {ports: [{port: 80, protocol: http}]}
---
apiVersion: smesh.io/v1
kind: AuthorizationPolicy
metadata: {name: web-calls-orders}
spec:
  targetRef: {name: orders}
  rules: [{from: [{service: web}]}]
"""


@pytest.mark.timeout(120)
def test_library_serves_inbound_calls_under_authorization_and_registers_its_endpoint(run):
    assert os.path.exists(EXAMPLE_BIN), f"{EXAMPLE_BIN} missing: cargo build --workspace --examples"
    cp = run.control(extra_args=["--trust-domain", TD])
    r = cp.cli("apply", "-f", "-", input=SERVED)
    assert r.returncode == 0, r.stderr
    port, admin = free_port(), free_port()
    run.spawn([EXAMPLE_BIN, "--control", cp.url, "--service", "orders",
               "--token-file", token_file(run, cp, "orders", "orders"),
               "--serve", f"{LOOPBACK}:{port}", "--admin", f"{LOOPBACK}:{admin}"],
              "orders", env={**os.environ, "RUST_LOG": "info"})
    address = f"{LOOPBACK}:{port}"
    wait_until(lambda: [e for e in cp.endpoints("orders") if e["address"] == address], 30, interval=0.1,
               what="the library's endpoint registered")
    ep = [e for e in cp.endpoints("orders") if e["address"] == address][0]
    assert ep["identity"] == f"spiffe://{TD}/service/orders", ep
    mine = [p for p in cp.proxies() if p["service"] == "orders"]
    assert len(mine) == 1 and mine[0]["address"] == address, cp.proxies()

    callers = {}
    for name in ("web", "evil"):
        app = run.http_backend(f"{name}-app")
        callers[name] = run.mesh_proxy([cp.url], service=name, app_port=app.port, name=f"{name}-proxy",
                                       extra_args=["--token-file", token_file(run, cp, name, name)])

    def served_through(name):
        resp = callers[name].get("/orders/7", host="orders", timeout=5)
        return resp if resp.status != 503 else None  # not yet routed: the endpoint is on its way
    resp = wait_until(lambda: served_through("web"), 10, what="web's call to orders")
    assert resp.status == 200 and resp.header("x-backend") == "orders-library", resp
    assert resp.body.decode() == "orders: GET /orders/7\n", resp
    # another service is denied by the library's inbound side, over mTLS, before the app
    resp = callers["evil"].get("/orders/8", host="orders", timeout=5)
    assert resp.status == 403 and resp.header("smesh-proxy-error") == "forbidden", resp
    assert f"spiffe://{TD}/service/evil" in resp.body.decode(), resp
    # and a plaintext caller without an identity too
    assert http_request(port, "/orders/9", host="orders").status == 403

    samples = library_metrics(admin)
    assert metric_sum(samples, "smesh_requests_total", direction="inbound", service="orders") == 1
    assert metric_sum(samples, "smesh_inbound_requests_by_tls_total", service="orders", tls="true") == 2
