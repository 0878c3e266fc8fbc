"""Control plane, acceptance 4 and 6 (issue 4).

4: kill the control plane (SIGKILL): traffic between existing proxies continues with zero errors
   for 30 s; restart it on the same port and store: the proxies reconnect and a new change
   reaches them.
6: embedded store: kill -9 the control plane during a loop of applies and KV puts; after a
   restart every acknowledged write is there.
"""
import base64
import threading
import time
import uuid

import pytest

from meshlib import KeepAliveClient, http_request, http_route, service, to_yaml, wait_until


class Load:
    """Requests through a proxy's outbound port (two keep-alive clients, one new connection per
    request) until stopped; failures are kept with the time they happened."""

    def __init__(self, port, host="api", max_requests=500_000):
        self.port, self.host, self.max = port, host, max_requests
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.backends = {}
        self.threads = [threading.Thread(target=self._run, args=(ka,), daemon=True)
                        for ka in (True, True, False)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def mark(self):
        with self.lock:
            return self.ok, len(self.failures)

    def _run(self, keepalive):
        cl = KeepAliveClient(self.port, host=self.host, timeout=5) if keepalive else None
        n = 0
        try:
            while not self.stop.is_set() and n < self.max:
                n += 1
                try:
                    r = cl.get(f"/k{n}") if keepalive else http_request(self.port, f"/n{n}", host=self.host, timeout=5)
                except Exception as e:
                    with self.lock:
                        self.failures.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                    continue
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                        b = r.header("x-backend")
                        self.backends[b] = self.backends.get(b, 0) + 1
                    else:
                        self.failures.append((time.monotonic(), f"status {r.status} {r.header('smesh-proxy-error')} {r.body[:120]!r}"))
                # a gentle load: the point is continuity, not throughput (2 cores)
                time.sleep(0.002)
        finally:
            if cl:
                cl.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def _write(run, name, resources):
    path = f"{run.workdir}/{name}"
    with open(path, "w") as f:
        f.write(to_yaml(resources))
    return path


@pytest.mark.timeout(120)
def test_proxies_keep_routing_without_the_control_plane_and_resync_after_restart(run):
    cp = run.control()
    a, b = run.http_backend("api-a"), run.http_backend("api-b")
    api = run.mesh_proxy(cp.url, name="api", service="api", app_port=a.port)
    client = run.mesh_proxy(cp.url, name="client")
    # api: a Service resource without static endpoints (routes can refer to it); its endpoint
    # is the registered one
    r = cp.cli("apply", "-f", _write(run, "b.yaml", [service("api", []), service("api-b", [b.address])]))
    assert r.returncode == 0, r
    wait_until(lambda: b"api-b" in client.admin_get("/config").body, 5, what="api-b at the client")
    assert client.get("/", host="api").header("x-backend") == "api-a"

    load = Load(client.outbound).start()
    try:
        wait_until(lambda: load.mark()[0] >= 50, 10, what="load flowing")
        ok0, _ = load.mark()
        before = cp.proxies()
        assert len(before) == 2 and len({p["acked_version"] for p in before}) == 1, before
        v_before = before[0]["acked_version"]
        cp.kill9()
        killed_at = time.monotonic()
        # 30 s without any control plane; the proxies stay ready and keep routing
        deadline = killed_at + 30
        while time.monotonic() < deadline:
            assert client.admin_get("/ready").status == 200
            assert api.admin_get("/ready").status == 200
            with load.lock:
                if load.failures:
                    break
            time.sleep(0.5)
        ok1, _ = load.mark()
        with load.lock:
            outage_failures = list(load.failures)
        assert not outage_failures, (f"{len(outage_failures)} failed requests while the control plane was "
                                     f"down (first at +{outage_failures[0][0] - killed_at:.2f}s): "
                                     f"{[f for _, f in outage_failures[:5]]}")
        assert ok1 - ok0 >= 1000, f"only {ok1 - ok0} requests in 30 s without the control plane"
        assert api.alive() and client.alive()

        # restart on the same port and store, and apply a change at once: the proxies reconnect
        # (jittered backoff, at most 5 s between attempts) and the change reaches both
        restarted_at = time.monotonic()
        cp2 = cp.restart()
        marker = f"/m-{uuid.uuid4().hex}"
        route = http_route("api-route", ["api"], [
            {"matches": [{"path": {"type": "PathPrefix", "value": marker}}], "backendRefs": [{"name": "api-b"}]},
            {"backendRefs": [{"name": "api"}]}])
        r = cp2.cli("apply", "-f", _write(run, "route.yaml", [route]))
        assert r.returncode == 0, r
        for px in (client, api):
            wait_until(lambda: marker.encode() in px.admin_get("/config").body, 8, interval=0.02,
                       what=f"the change after the restart at {px.name}")
        reconnect_s = time.monotonic() - restarted_at

        # both acked it on their new streams (acks are recorded by the live session only)
        def acked_new():
            items = cp2.proxies()
            return (sorted(p["service"] for p in items) == ["", "api"]
                    and all(p["acked_version"] > v_before and p["acked_version"] == p["sent_version"]
                            for p in items))
        wait_until(acked_new, 5, interval=0.05, what="both proxies acking after the restart")
        assert [e["address"] for e in cp2.endpoints("api")] == [api.inbound_address]
        assert client.get(marker + "/x", host="api").header("x-backend") == "api-b"
        assert client.get("/other", host="api").header("x-backend") == "api-a"
        mark = load.mark()[0]
        wait_until(lambda: load.mark()[0] >= mark + 100, 10, what="load after the change")
    finally:
        load.finish()
    # nothing failed across the restart and the resync either
    with load.lock:
        failures = list(load.failures)
    assert not failures, (f"{len(failures)} failed requests after the control plane came back "
                          f"(restart at +{restarted_at - killed_at:.1f}s after the kill, "
                          f"change at both proxies {reconnect_s:.1f}s after the restart): "
                          f"{[(round(t - restarted_at, 2), f) for t, f in failures[:5]]}")


class Writers:
    """Writes in loops until stopped, recording what the control plane acknowledged."""

    def __init__(self, cp, run, tag):
        self.cp, self.run, self.tag = cp, run, tag
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.applied = {}      # Service name -> endpoint address
        self.kv = {}           # key -> (value, index)
        self.unknown = 0       # writes whose outcome was not acknowledged either way
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._apply_cli, self._apply_http, self._kv_http, self._kv_cli)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def counts(self):
        with self.lock:
            return len(self.applied), len(self.kv)

    def _apply_cli(self):
        for i in range(10_000):
            if self.stop.is_set():
                return
            name = f"svc-{self.tag}-cli-{i}"
            addr = f"127.0.0.1:{10000 + i}"
            path = _write(self.run, f"{name}.yaml", [service(name, [addr])])
            try:
                r = self.cp.cli("apply", "-f", path, timeout=10)
            except Exception:
                with self.lock:
                    self.unknown += 1
                continue
            with self.lock:
                if r.returncode == 0 and f"Service/{name} created" in r.stdout:
                    self.applied[name] = addr
                else:
                    self.unknown += 1

    def _apply_http(self):
        for i in range(10_000):
            if self.stop.is_set():
                return
            name = f"svc-{self.tag}-http-{i}"
            addr = f"127.0.0.1:{20000 + i}"
            try:
                r = self.cp.api("POST", f"/api/v1/apply?file={name}.yaml",
                                body=to_yaml([service(name, [addr])]), timeout=5)
            except Exception:
                with self.lock:
                    self.unknown += 1
                continue
            with self.lock:
                if r.status == 200:
                    self.applied[name] = addr
                else:
                    self.unknown += 1

    def _kv_http(self):
        for i in range(100_000):
            if self.stop.is_set():
                return
            key, value = f"crash/{self.tag}/http/{i}", f"value-{self.tag}-{i}-{uuid.uuid4().hex[:8]}"
            try:
                r = self.cp.api("PUT", f"/v1/kv/{key}", body=value, timeout=5)
            except Exception:
                with self.lock:
                    self.unknown += 1
                continue
            with self.lock:
                if r.status == 200 and r.json() is True:
                    self.kv[key] = (value, int(r.header("x-smesh-index")))
                else:
                    self.unknown += 1

    def _kv_cli(self):
        for i in range(10_000):
            if self.stop.is_set():
                return
            key, value = f"crash/{self.tag}/cli/{i}", f"cli-{self.tag}-{i}"
            try:
                r = self.cp.cli("kv", "put", key, value, timeout=10)
            except Exception:
                with self.lock:
                    self.unknown += 1
                continue
            with self.lock:
                out = r.stdout.strip()
                if r.returncode == 0 and out.startswith("ok (index "):
                    self.kv[key] = (value, int(out[len("ok (index "):-1]))
                else:
                    self.unknown += 1

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(20)


def _verify(cp, writers):
    lost = []
    r = cp.api("GET", "/api/v1/resources/service", token=False)
    assert r.status == 200, r
    stored = {s["metadata"]["name"]: [e["address"] for e in s["spec"]["endpoints"]] for s in r.json()["items"]}
    for w in writers:
        for name, addr in w.applied.items():
            if stored.get(name) != [addr]:
                lost.append(f"Service {name}: acknowledged with {addr}, stored {stored.get(name)}")
        for key, (value, index) in w.kv.items():
            r = cp.api("GET", f"/v1/kv/{key}", token=False)
            if r.status != 200:
                lost.append(f"kv {key}: acknowledged at index {index}, now {r.status}")
                continue
            e = r.json()[0]
            got = base64.b64decode(e["Value"]).decode()
            if got != value or e["ModifyIndex"] != index:
                lost.append(f"kv {key}: acknowledged {value!r} at index {index}, stored {got!r} at {e['ModifyIndex']}")
    return lost


@pytest.mark.timeout(150)
def test_kill9_during_writes_loses_nothing_acknowledged(run):
    cp = run.control()
    all_writers = []
    max_index = 0
    for cycle in range(5):
        w = Writers(cp, run, f"c{cycle}").start()
        all_writers.append(w)
        try:
            # kill while every writer is busy: after some of each kind were acknowledged
            wait_until(lambda: w.counts()[0] >= 6 and w.counts()[1] >= 60 + 20 * cycle, 30, interval=0.01,
                       what=f"writes acknowledged in cycle {cycle}")
            cp.kill9()
        finally:
            w.finish()
        n_apply, n_kv = w.counts()
        assert n_apply >= 6 and n_kv >= 60, (n_apply, n_kv)
        cp = cp.restart()
        lost = _verify(cp, all_writers)
        assert not lost, (f"cycle {cycle}: {len(lost)} acknowledged writes missing after kill -9 and "
                          f"restart (of {sum(len(x.applied) + len(x.kv) for x in all_writers)}): {lost[:10]}")
        # indexes never go backwards: a new write is numbered after everything acknowledged
        max_index = max([max_index] + [i for x in all_writers for _, i in x.kv.values()])
        r = cp.api("PUT", f"/v1/kv/after/{cycle}", body="x")
        assert r.status == 200 and r.json() is True, r
        assert int(r.header("x-smesh-index")) > max_index, (r.header("x-smesh-index"), max_index)
        max_index = int(r.header("x-smesh-index"))
    # the kills landed inside the write loops (some writes were cut off, outcome unknown)
    assert sum(w.unknown for w in all_writers) >= 1, [w.counts() for w in all_writers]
    # the store is still writable and consistent: a route over an acknowledged Service applies
    some = next(iter(all_writers[0].applied))
    r = cp.cli("apply", "-f", _write(run, "route.yaml",
                                     [http_route("final", [some], [{"backendRefs": [{"name": some}]}])]))
    assert r.returncode == 0, r
