"""Issue 4, acceptance 5: HA on a real 3-member etcd cluster (Debian etcd-server, started here)
with two control replicas. Kill one replica mid-load: proxies move to the other with no failed
request. Kill one etcd member: applies and KV writes still succeed; nothing acknowledged is
lost."""
import os
import shutil
import signal
import threading
import time

import pytest

from meshlib import (LOOPBACK, SMESH_BIN, ControlPlane, KeepAliveClient, free_port, http_request,
                     wait_until)

ETCD = shutil.which("etcd") or "/usr/bin/etcd"

pytestmark = pytest.mark.skipif(not os.path.exists(ETCD), reason="etcd-server is not installed")


class EtcdCluster:
    """Three etcd members on loopback, each its own process (group), data in the test's dir."""

    def __init__(self, run, n=3):
        self.run = run
        self.members = []
        peers = [(f"m{i}", free_port(), free_port()) for i in range(n)]
        cluster = ",".join(f"{name}=http://{LOOPBACK}:{peer}" for name, peer, _ in peers)
        token = f"smesh-test-{os.getpid()}-{peers[0][1]}"  # the same for every member
        for name, peer, client in peers:
            data = os.path.join(run.workdir, f"etcd-{name}")
            proc = run.spawn([
                ETCD, "--name", name, "--data-dir", data,
                "--listen-peer-urls", f"http://{LOOPBACK}:{peer}",
                "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{peer}",
                "--listen-client-urls", f"http://{LOOPBACK}:{client}",
                "--advertise-client-urls", f"http://{LOOPBACK}:{client}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--heartbeat-interval", "50", "--election-timeout", "500",
            ], f"etcd-{name}")
            self.members.append((proc, client))

    @property
    def urls(self):
        return [f"http://{LOOPBACK}:{c}" for _, c in self.members]

    def wait_healthy(self, timeout=30):
        def healthy():
            for proc, client in self.members:
                if proc.poll() is not None:
                    raise RuntimeError(f"etcd exited: {proc.tail()}")
                try:
                    r = http_request(client, "/health", host=f"{LOOPBACK}:{client}", timeout=1)
                except OSError:
                    return False
                if r.status != 200 or b'"true"' not in r.body:
                    return False
            return True
        wait_until(healthy, timeout, interval=0.1, what="etcd cluster health")


class EtcdControl(ControlPlane):
    """`smesh control --store etcd:...` (replicas share the cluster and a token file)."""

    def __init__(self, runner, etcd_urls, token_file, name):
        super().__init__(runner, token_file=token_file, name=name)
        self.etcd_urls = etcd_urls

    def args(self):
        return [SMESH_BIN, "control", "--listen", f"{LOOPBACK}:{self.port}",
                "--store", "etcd:" + ",".join(self.etcd_urls),
                "--admin-token-file", self.token_file_arg, "--lease-ttl", "4s", "--log-level", "info"]


SERVICE = """apiVersion: smesh.io/v1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80, protocol: http}]
"""

ROUTE = """apiVersion: smesh.io/v1
kind: HTTPRoute
metadata: {name: api-route}
spec:
  parentRefs: [{name: api}]
  rules:
  - timeouts: {request: %s}
"""


@pytest.mark.timeout(180)
def test_two_replicas_on_a_three_member_etcd(run):
    cluster = EtcdCluster(run)
    cluster.wait_healthy()
    token_file = os.path.join(run.workdir, "admin-token")
    with open(token_file, "w") as f:
        f.write("test-admin-token-0123456789\n")
    os.chmod(token_file, 0o600)
    a = EtcdControl(run, cluster.urls, token_file, "control-a").start()
    b = EtcdControl(run, cluster.urls, token_file, "control-b").start()

    r = a.cli("apply", "-f", "-", input=SERVICE)
    assert r.returncode == 0, r.stderr
    # both replicas serve what either wrote
    r = b.cli("get", "service", "api", "-o", "json")
    assert r.returncode == 0 and '"api"' in r.stdout, (r.stdout, r.stderr)

    app = run.http_backend("api-app")
    urls = [a.url, b.url]
    api = run.mesh_proxy(urls, service="api", app_port=app.port, name="api-proxy")
    client = run.mesh_proxy(urls, name="client-proxy")
    wait_until(lambda: http_request(client.outbound, "/warm", host="api").status == 200, 10,
               what="traffic through the mesh")

    # continuous load through the mesh while a replica dies
    stop = threading.Event()
    results = {"ok": 0, "failed": []}

    def load():
        c = KeepAliveClient(client.outbound, host="api")
        deadline = time.monotonic() + 60
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    resp = c.get("/load")
                    if resp.status == 200:
                        results["ok"] += 1
                    else:
                        results["failed"].append(resp.status)
                except OSError as e:
                    results["failed"].append(repr(e))
        finally:
            c.close()

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_until(lambda: results["ok"] > 200, 10, what="load running")
        a.kill9()
        # proxies reconnect to b: a change applied there reaches the client proxy
        r = b.cli("apply", "-f", "-", input=ROUTE % "7s")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: "7s" in client.config_text(), 15, interval=0.1,
                   what="the change applied on replica b to reach the client proxy")

        def both_on_b():
            out = b.cli("get", "proxies", "-o", "json").stdout
            return out.count(b.url.split("//")[1]) >= 2 and "api-proxy" not in out or \
                out.count(f'"{LOOPBACK}:{b.port}"') >= 2
        wait_until(both_on_b, 20, interval=0.2, what="both proxies connected to replica b")
        seen = results["ok"]
        wait_until(lambda: results["ok"] > seen + 200, 10, what="load continuing")
    finally:
        stop.set()
        t.join(timeout=30)
    assert not results["failed"], f"{len(results['failed'])} failed requests: {results['failed'][:5]}"
    assert results["ok"] > 400, results["ok"]
    # the api endpoint is still registered (its lease moved to replica b)
    r = b.cli("get", "endpoints", "api", "-o", "json")
    assert r.returncode == 0 and api.inbound_address in r.stdout, (r.stdout, r.stderr)

    # kill one etcd member: writes keep succeeding; every acknowledged one is kept
    victim, _ = cluster.members[0]
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    acked = {}
    deadline = time.monotonic() + 30
    i = 0
    while len(acked) < 30 and time.monotonic() < deadline:
        r = b.cli("kv", "put", f"ha/key{i}", f"value-{i}", timeout=40)
        if r.returncode == 0:
            acked[f"ha/key{i}"] = f"value-{i}"
        i += 1
    assert len(acked) >= 30, f"only {len(acked)} of {i} KV writes acknowledged with one etcd member down"
    r = b.cli("apply", "-f", "-", input=ROUTE % "9s")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "9s" in client.config_text(), 15, interval=0.1,
               what="a change applied with one etcd member down to reach the proxy")
    for key, value in acked.items():
        r = b.cli("kv", "get", key)
        assert r.returncode == 0 and r.stdout.strip() == value, (key, r.stdout, r.stderr)
    assert http_request(client.outbound, "/after", host="api").status == 200
