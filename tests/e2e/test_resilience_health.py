"""Issue 6, acceptance 3: active health checks (BackendPolicy.healthCheck). An endpoint whose
health path fails is removed from balancing and comes back after it passes again; TCP and
gRPC (grpc.health.v1) checks; checks stop when a reload removes them;
smesh_health_checks_total and smesh_health_unhealthy_endpoints."""
import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from meshlib import (LOOPBACK, backend_policy, free_port, metric_sum, parallel_requests, service,
                     wait_until)


class HealthBackend:
    """In-process HTTP/1.1 backend: /healthz answers `health` (a status the test changes),
    everything else 200 with x-backend: NAME. Counts requests per kind."""

    def __init__(self, name):
        self.name, self.health = name, 200
        self.counts = collections.Counter()
        self.lock = threading.Lock()
        self.port = free_port()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *a):
                pass

            def do_GET(self):
                kind = "health" if self.path == "/healthz" else "traffic"
                with backend.lock:
                    backend.counts[kind] += 1
                status = backend.health if kind == "health" else 200
                body = backend.name.encode()
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((LOOPBACK, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def count(self, kind):
        with self.lock:
            return self.counts[kind]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


HTTP_CHECK = {"http": {"path": "/healthz", "expectedStatuses": [200]}, "interval": "200ms",
              "timeout": "500ms", "unhealthyThreshold": 2, "healthyThreshold": 1}


def policy(check):
    p = backend_policy("api-policy", "api")
    if check:
        p["spec"]["healthCheck"] = check
    return p


def gauge(px, svc="api"):
    return metric_sum(px.metrics(), "smesh_health_unhealthy_endpoints", service=svc)


def spread(px, n=60):
    rs = parallel_requests(px.outbound, n, threads=3)
    assert all(r.status == 200 for r in rs), [r.status for r in rs if r.status != 200][:5]
    return collections.Counter(r.header("x-backend") for r in rs)


@pytest.mark.timeout(90)
def test_failing_health_path_removes_endpoint_and_it_returns(run):
    a, b = HealthBackend("a"), HealthBackend("b")
    try:
        resources = [service("api", [a.address, b.address], lb="round_robin")]
        px = run.proxy(resources + [policy(HTTP_CHECK)], extra_args=["--workers", "2"])
        wait_until(lambda: a.count("health") >= 2 and b.count("health") >= 2, 10,
                   what="health checks to reach both endpoints")
        assert set(spread(px)) == {"a", "b"}

        b.health = 503
        t0 = time.monotonic()
        wait_until(lambda: gauge(px) == 1, 10, interval=0.05, what="b to be marked unhealthy")
        removed_after = time.monotonic() - t0
        before = b.count("traffic")
        assert spread(px, 100) == {"a": 100}
        assert b.count("traffic") == before, "an unhealthy endpoint got traffic"
        m = px.metrics()
        assert metric_sum(m, "smesh_health_checks_total", service="api", result="failure") >= 2
        assert metric_sum(m, "smesh_health_checks_total", service="api", result="success") >= 4

        b.health = 200
        t0 = time.monotonic()
        wait_until(lambda: gauge(px) == 0, 10, interval=0.05, what="b to be healthy again")
        back_after = time.monotonic() - t0
        assert set(spread(px)) == {"a", "b"}
        print(f"health: removed after {removed_after:.2f}s, back after {back_after:.2f}s "
              f"(interval 200ms, thresholds 2/1)")
        assert removed_after < 2.0 and back_after < 2.0

        # a reload without the check stops the checkers and releases the endpoint
        b.health = 503
        wait_until(lambda: gauge(px) == 1, 10, interval=0.05, what="b unhealthy again")
        px.write_config(resources + [policy(None)])
        wait_until(lambda: px.reloads() >= 2, 10, what="the reload")
        wait_until(lambda: gauge(px) == 0, 5, what="the gauge to drop with the check")
        assert set(spread(px)) == {"a", "b"}
        checks = b.count("health")
        time.sleep(0.6)
        assert b.count("health") == checks, "checks went on after the reload removed them"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_tcp_check_marks_a_dead_endpoint(run):
    a = HealthBackend("a")
    dead = f"{LOOPBACK}:{free_port()}"
    try:
        px = run.proxy([
            service("api", [a.address, dead], lb="round_robin"),
            policy({"tcp": {}, "interval": "200ms", "timeout": "300ms", "unhealthyThreshold": 1}),
        ])
        wait_until(lambda: gauge(px) == 1, 10, interval=0.05, what="the dead endpoint to be unhealthy")
        assert spread(px, 30) == {"a": 30}
        m = px.metrics()
        assert metric_sum(m, "smesh_health_checks_total", service="api", result="success") >= 1
        assert metric_sum(m, "smesh_health_checks_total", service="api", result="failure") >= 1
    finally:
        a.close()


@pytest.mark.timeout(60)
def test_grpc_health_protocol(run):
    from concurrent import futures

    state = {"status": 1, "services": []}  # 1 SERVING, 2 NOT_SERVING

    def check(request, ctx):
        state["services"].append(request)
        return bytes([0x08, state["status"]])

    handler = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    assert server.add_insecure_port(f"{LOOPBACK}:{port}") == port
    server.start()
    try:
        px = run.proxy([
            service("echo", [f"{LOOPBACK}:{port}"], protocol="grpc"),
            {**backend_policy("echo-policy", "echo"),
             "spec": {"targetRef": {"name": "echo"}, "healthCheck": {
                 "grpc": {"service": "e2e.Echo"}, "interval": "200ms", "unhealthyThreshold": 2}}},
        ])
        wait_until(lambda: metric_sum(px.metrics(), "smesh_health_checks_total", service="echo",
                                      result="success") >= 2, 10, what="passing gRPC checks")
        assert gauge(px, "echo") == 0
        assert state["services"][0] == b"\x0a\x08e2e.Echo"  # HealthCheckRequest{service}
        state["status"] = 2
        wait_until(lambda: gauge(px, "echo") == 1, 10, interval=0.05, what="NOT_SERVING to count")
        state["status"] = 1
        wait_until(lambda: gauge(px, "echo") == 0, 10, interval=0.05, what="SERVING again")
    finally:
        server.stop(grace=None)
