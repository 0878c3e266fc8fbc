"""Issue 16, acceptance 1 and 2: golden metrics without Prometheus. Proxies fold requests into
10 s windows and push them to the control plane, which merges them and answers
`smesh stat` / `smesh edges`.

1. web -> api over mesh mTLS under a paced load, with a FaultInjection on api's route (5%
   aborted with 503, 5% delayed 300 ms): stat's RPS is within 10% of the generated rate, its
   success rate within 1 point of what the clients saw (itself near 95%), its p99 is the
   injected delay, `-o json` matches the table, and the edge web -> api shows both identities.
2. gRPC calls that fail with UNAVAILABLE in the trailers are failures in stat and in
   /metrics (`smesh_grpc_responses_total`)."""
import http.client
import json
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from meshlib import LOOPBACK, http_request, metric_sum, service, to_yaml, wait_until

TD = "example.org"
RATE, SECONDS, THREADS = 40, 45, 8
ABORT_PERCENT, DELAY_PERCENT, DELAY_MS = 5, 5, 300


def token_file(run, cp, service_name):
    r = cp.cli("token", "create", "--service", service_name)
    assert r.returncode == 0, r.stderr
    path = f"{run.workdir}/{service_name}.token"
    with open(path, "w") as f:
        f.write(r.stdout.strip() + "\n")
    return path


def meshed(run, cp, name):
    app = run.http_backend(f"{name}-app")
    return run.mesh_proxy([cp.url], service=name, app_port=app.port, name=f"{name}-proxy",
                          extra_args=["--token-file", token_file(run, cp, name)])


def apply(cp, resources):
    r = cp.cli("apply", "-f", "-", input=to_yaml(resources))
    assert r.returncode == 0, r.stderr


def stat_json(cp, *args):
    r = cp.cli("stat", *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def row(report, name):
    return next((r for r in report["rows"] if r["name"] == name), None)


class Load:
    """RATE req/s for SECONDS on a fixed schedule over THREADS keep-alive connections
    (bounded: RATE x SECONDS requests, 10 s timeout each); records (wall-clock time the
    response ended, status, latency)."""

    def __init__(self, port, host):
        self.results = []
        self.start_wall = time.time() + 0.2
        start = time.monotonic() + 0.2
        lock = threading.Lock()
        total = RATE * SECONDS

        def worker(k):
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
            try:
                for i in range(k, total, THREADS):
                    delay = start + i / RATE - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    t0 = time.monotonic()
                    try:
                        conn.request("GET", "/", headers={"Host": host})
                        r = conn.getresponse()
                        r.read()
                        status = r.status
                    except (OSError, http.client.HTTPException):
                        status = 0
                        conn.close()
                        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
                    with lock:
                        self.results.append((time.time(), status, time.monotonic() - t0))
            finally:
                conn.close()

        self.threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(THREADS)]
        for t in self.threads:
            t.start()

    def between(self, from_ms, to_ms):
        return [r for r in list(self.results) if from_ms <= r[0] * 1000 < to_ms]

    def join(self):
        for t in self.threads:
            t.join(SECONDS + 30)


def table_row(stdout, first):
    for line in stdout.splitlines():
        cols = line.split()
        if cols and cols[0] == first:
            return cols
    return None


@pytest.mark.timeout(180)
def test_stat_shows_rate_success_latency_and_edges_of_a_faulty_route(run):
    cp = run.control(extra_args=["--trust-domain", TD])
    apply(cp, [
        {"apiVersion": "smesh.io/v1", "kind": "Service", "metadata": {"name": "api"},
         "spec": {"ports": [{"port": 80, "protocol": "http"}]}},
        {"apiVersion": "smesh.io/v1", "kind": "HTTPRoute", "metadata": {"name": "api-route"},
         "spec": {"parentRefs": [{"name": "api"}], "rules": [{"filters": [
             {"type": "FaultInjection", "faultInjection": {
                 "delay": {"fixedDelay": f"{DELAY_MS}ms", "percent": DELAY_PERCENT},
                 "abort": {"httpStatus": 503, "percent": ABORT_PERCENT}}}]}]}},
    ])
    api = meshed(run, cp, "api")
    web = meshed(run, cp, "web")
    wait_until(lambda: f"spiffe://{TD}/service/api" in web.config_text() and "api-route" in web.config_text(),
               20, interval=0.1, what="web's config with api's identity and route")
    wait_until(lambda: http_request(web.outbound, "/", host="api").status in (200, 503), 20, interval=0.1,
               what="web -> api answers")

    load = Load(web.outbound, "api")
    try:
        # The first 10 s window wholly under load, once the control plane has all of it.
        def full_window():
            report = stat_json(cp, "services", "-n", "api", "--window", "10s")
            return report if report["from_unix_ms"] >= load.start_wall * 1000 and row(report, "api") else None
        report = wait_until(full_window, SECONDS, interval=0.5, what="a full window of load in stat")
        api_row = row(report, "api")
        sent = load.between(report["from_unix_ms"], report["to_unix_ms"])
        generated = len(sent) / report["window_seconds"]
        ok = sum(1 for r in sent if r[1] == 200)
        seen = 100.0 * ok / len(sent)
        print(f"stat api: {api_row['rps']} rps (generated {generated:.1f}, nominal {RATE}), "
              f"success {api_row['success_rate']}% (clients saw {seen:.2f}%), "
              f"p50 {api_row['p50_ms']} ms, p99 {api_row['p99_ms']} ms, side {api_row['side']}")
        assert api_row["side"] == "client", api_row
        assert abs(api_row["rps"] - generated) <= 0.1 * generated, (api_row, generated)
        assert abs(api_row["rps"] - RATE) <= 0.1 * RATE, api_row
        assert abs(api_row["success_rate"] - seen) <= 1.0, (api_row, seen)
        assert abs(seen - (100 - ABORT_PERCENT)) <= 4.0, seen
        assert api_row["proxy_errors"].get("fault") is None  # faults are not proxy errors
        # p99 is the injected delay (5% of 400 requests: under 1% delayed is a 1e-5 draw), p50 far below it
        assert DELAY_MS * 0.95 <= api_row["p99_ms"] <= DELAY_MS * 1.5, api_row
        assert api_row["p50_ms"] < DELAY_MS / 3, api_row
        assert api_row["mtls_percent"] == 100.0, api_row

        # -o json matches the table (the same window: retried if a window closed between them)
        def same_window_table():
            table = cp.cli("stat", "services", "-n", "api", "--window", "10s")
            assert table.returncode == 0, table.stderr
            js = stat_json(cp, "services", "-n", "api", "--window", "10s")
            clock = time.strftime("%H:%M:%S", time.gmtime(js["to_unix_ms"] / 1000))
            return (table.stdout, js) if f"before {clock} UTC" in table.stdout else None
        table, js = wait_until(same_window_table, 20, interval=0.2, what="table and json of one window")
        print(table)
        cols = table_row(table, "api")
        j = row(js, "api")
        assert cols is not None, table
        assert cols[1] == j["side"]
        assert float(cols[2]) == pytest.approx(j["rps"], abs=0.006), (cols, j)
        assert float(cols[3].rstrip("%")) == pytest.approx(j["success_rate"], abs=0.006), (cols, j)
        assert float(cols[6].rstrip("ms")) == pytest.approx(j["p99_ms"], abs=0.006), (cols, j)
        assert "after retries" in table.splitlines()[0]
        wide = cp.cli("stat", "services", "-n", "api", "--window", "30s", "-o", "wide")
        assert wide.returncode == 0, wide.stderr
        assert "RETRIES" in wide.stdout and table_row(wide.stdout, "api"), wide.stdout

        # the edge web -> api, with the identity of each end
        edges = cp.cli("edges", "api", "--window", "30s", "-o", "json")
        assert edges.returncode == 0, edges.stderr
        edge = row(json.loads(edges.stdout), "web -> api")
        assert edge is not None, edges.stdout
        assert f"spiffe://{TD}/service/web" in edge["source_identities"], edge
        assert f"spiffe://{TD}/service/api" in edge["destination_identities"], edge
        table = cp.cli("edges", "api", "--window", "30s")
        assert table.returncode == 0, table.stderr
        print(table.stdout)
        line = table_row(table.stdout, "web")
        assert line and line[1] == "api" and f"spiffe://{TD}/service/web" in line, table.stdout

        # routes and proxies answer too; the API is open to loopback reads without a token
        r = cp.api("GET", "/api/v1/stats/routes?window=30s&name=api", token=False)
        assert r.status == 200, r
        assert any(x["route"] == "api-route" for x in r.json()["rows"]), r.json()
        proxies = stat_json(cp, "proxies", "--window", "30s")
        assert {x["service"] for x in proxies["rows"]} >= {"api", "web"}, proxies
        assert cp.api("GET", "/api/v1/stats/nope", token=False).status == 404
    finally:
        load.join()
    assert len(load.results) == RATE * SECONDS


class Unavailable:
    """An Echo service whose Unary fails with UNAVAILABLE after its headers (so the status
    comes in the trailers) when the text is "fail"."""

    def __init__(self, pb2, pb2_grpc):
        class Servicer(pb2_grpc.EchoServicer):
            def Unary(self, req, ctx):
                if req.text == "fail":
                    ctx.send_initial_metadata((("x-started", "1"),))
                    ctx.abort(grpc.StatusCode.UNAVAILABLE, "try elsewhere")
                return pb2.Msg(text=req.text)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        pb2_grpc.add_EchoServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port(f"{LOOPBACK}:0")
        self.server.start()


@pytest.mark.timeout(90)
def test_grpc_unavailable_in_trailers_is_a_failure_in_stat_and_metrics(run, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    backend = Unavailable(pb2, pb2_grpc)
    try:
        cp = run.control()
        apply(cp, [service("echo", [f"{LOOPBACK}:{backend.port}"], protocol="grpc")])
        client = run.mesh_proxy([cp.url], name="client")
        wait_until(lambda: "echo" in client.config_text(), 20, interval=0.1, what="client's config with echo")
        ch = grpc.insecure_channel(f"{LOOPBACK}:{client.outbound}",
                                   options=[("grpc.enable_http_proxy", 0), ("grpc.default_authority", "echo")])
        stub = pb2_grpc.EchoStub(ch)
        codes = []
        try:
            for i in range(40):
                try:
                    stub.Unary(pb2.Msg(text="fail" if i % 4 == 0 else "ok"), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
        finally:
            ch.close()
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == 10 and codes.count(grpc.StatusCode.OK) == 30, codes

        def all_counted():
            report = stat_json(cp, "services", "-n", "echo", "--window", "1m")
            r = row(report, "echo")
            return r if r and r["requests"] == 40 else None
        r = wait_until(all_counted, 30, interval=0.5, what="40 echo calls in stat")
        print(f"stat echo: {r}")
        assert (r["failures"], r["success_rate"]) == (10, 75.0), r
        m = client.metrics()
        assert metric_sum(m, "smesh_grpc_responses_total", service="echo", grpc_status="14") == 10
        assert metric_sum(m, "smesh_grpc_responses_total", service="echo", grpc_status="0") == 30
    finally:
        backend.server.stop(grace=None)


def _tunnel(port, payload):
    """One CONNECT tunnel to echo:7 through the proxy; returns what came back."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"CONNECT echo:7 HTTP/1.1\r\nHost: echo:7\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(1)
            assert d, head
            head += d
        assert head.split(b" ")[1] == b"200", head
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = s.recv(4096)
            if not d:
                return got
            got += d


@pytest.mark.timeout(60)
def test_tcp_connections_and_bytes_show_in_stat(run):
    echo = run.tcp_echo()
    cp = run.control()
    apply(cp, [service("echo", [echo.address], protocol="tcp", port=7)])
    client = run.mesh_proxy([cp.url], name="client")
    wait_until(lambda: "echo" in client.config_text(), 20, interval=0.1, what="client's config with echo")
    payload = b"tunnelled bytes"
    moved = sum(len(payload) + len(_tunnel(client.outbound, payload)) for _ in range(3))

    def all_counted():
        r = row(stat_json(cp, "services", "-n", "echo", "--window", "1m"), "echo")
        return r if r and r["tcp_connections"] == 3 else None
    r = wait_until(all_counted, 30, interval=0.5, what="3 tunnels in stat")
    assert r["tcp_bytes"] == moved, (r, moved)
