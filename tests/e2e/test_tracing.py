"""Issue 16, tracing (acceptance 5): a real OTLP/gRPC receiver (grpcio, the collector's
TraceService from the `opentelemetry-proto` package) gets the spans of a request that
crosses two meshed proxies (web's outbound -> mTLS -> api's inbound -> app): one trace id,
each span the child of the one before; the app sees the last client span as its parent.
With head sampling at 0, every failed or slow request is still exported, and no fast
successful one. A proxy with a static configuration file traces too, and its spans carry
the mesh's decisions (retry, timeout, injected fault) as events."""
import os
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from meshlib import LOOPBACK, free_port, http_request, http_route, metric_sum, service, wait_until

TD = "example.org"
API = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 80, protocol: http}]\n"
MESH = ("apiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {tracing: {collector: '%s', sampling: %s, slowThreshold: 300ms}}\n")
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with its resource's service.name."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans = []
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        assert self.server.add_insecure_port(f"{LOOPBACK}:{self.port}") == self.port
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = attrs(rs.resource.attributes).get("service.name")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]

    def trace_ids(self):
        with self.lock:
            return {s.trace_id.hex() for _, s in self.spans}

    def count(self):
        with self.lock:
            return len(self.spans)


def attrs(kvs):
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


@pytest.fixture
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.server.stop(grace=None)


def token_file(run, cp, service):
    r = cp.cli("token", "create", "--service", service, "--ttl", "1h")
    assert r.returncode == 0, r.stderr
    path = os.path.join(run.workdir, f"{service}.token")
    with open(path, "w") as f:
        f.write(r.stdout.strip() + "\n")
    return path


def mesh(run, receiver, sampling):
    """A control plane with tracing on, and two meshed proxies: web (a client) and api."""
    cp = run.control(extra_args=["--trust-domain", TD])
    r = cp.cli("apply", "-f", "-", input=API + "---\n" + MESH % (f"{LOOPBACK}:{receiver.port}", sampling))
    assert r.returncode == 0, r.stderr
    proxies = []
    for service in ("api", "web"):
        app = run.http_backend(f"{service}-app")
        proxies.append(run.mesh_proxy([cp.url], service=service, app_port=app.port,
                                      name=f"{service}-proxy",
                                      extra_args=["--token-file", token_file(run, cp, service)]))
    for px in proxies:
        wait_until(lambda: "collector" in px.config_text(), 15, what=f"tracing to reach {px.name}")
    return proxies


def traceparent_of(resp):
    """The traceparent the app received (the echo backend answers with its headers)."""
    headers = {k.lower(): v for k, v in resp.json()["headers"].items()}
    return headers["traceparent"]


@pytest.mark.timeout(120)
def test_a_two_hop_request_is_one_trace_with_linked_spans(run, receiver):
    api, web = mesh(run, receiver, 1.0)
    resp = http_request(web.outbound, "/hello", host="api")
    assert resp.status == 200, resp
    version, trace_id, app_parent, flags = traceparent_of(resp).split("-")
    assert (version, flags) == ("00", "01")

    spans = wait_until(lambda: (t := receiver.trace(trace_id)) and len(t) >= 4 and t, 20,
                       what="the trace's four spans at the collector")
    assert len(spans) == 4, spans
    servers = {attrs(s.attributes)["smesh.direction"]: (svc, s) for svc, s in spans if s.kind == SERVER}
    clients = [(svc, s) for svc, s in spans if s.kind == CLIENT]
    assert set(servers) == {"outbound", "inbound"} and len(clients) == 2, spans
    (web_svc, web_server), (api_svc, api_server) = servers["outbound"], servers["inbound"]
    assert (web_svc, api_svc) == ("web", "api")
    web_client = next(s for svc, s in clients if s.parent_span_id == web_server.span_id)
    api_client = next(s for svc, s in clients if s.parent_span_id == api_server.span_id)
    # web's server span starts the trace; each span is the child of the one before it.
    assert web_server.parent_span_id == b""
    assert api_server.parent_span_id == web_client.span_id
    assert api_client.span_id.hex() == app_parent
    for s in (web_server, web_client, api_server, api_client):
        a = attrs(s.attributes)
        assert a["http.request.method"] == "GET" and a["url.path"] == "/hello", a
        assert a["http.response.status_code"] == 200, a
        assert s.status.code != trace_pb2.Status.STATUS_CODE_ERROR
        assert s.start_time_unix_nano <= s.end_time_unix_nano
    assert attrs(api_server.attributes)["smesh.peer.identity"] == f"spiffe://{TD}/service/web"
    assert attrs(web_client.attributes)["network.peer.address"] == LOOPBACK
    assert attrs(web_server.attributes)["server.address"] == "api"

    # A caller's trace is continued (its span is web's parent); an invalid one is replaced.
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = http_request(web.outbound, "/continued", host="api", headers={"traceparent": caller})
    assert traceparent_of(resp).split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    spans = wait_until(lambda: (t := receiver.trace("0af7651916cd43dd8448eb211c80319c")) and len(t) >= 4 and t,
                       20, what="the continued trace's spans")
    outbound = [s for _, s in spans if s.kind == SERVER and attrs(s.attributes)["smesh.direction"] == "outbound"]
    assert [s.parent_span_id.hex() for s in outbound] == ["b7ad6b7169203331"]
    resp = http_request(web.outbound, "/broken", host="api",
                        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"})
    assert traceparent_of(resp).split("-")[1] != "0af7651916cd43dd8448eb211c80319c"
    # Where traces start tells which app does not pass traceparent on (for `smesh check`).
    web_m, api_m = web.metrics(), api.metrics()
    assert metric_sum(web_m, "smesh_trace_requests_total", direction="outbound", trace="started") == 2
    assert metric_sum(web_m, "smesh_trace_requests_total", direction="outbound", trace="continued") == 1
    assert metric_sum(api_m, "smesh_trace_requests_total", direction="inbound", trace="continued") == 3
    assert metric_sum(api_m, "smesh_trace_requests_total", direction="inbound", trace="started") == 0


@pytest.mark.timeout(120)
def test_with_head_sampling_off_only_failed_and_slow_requests_are_exported(run, receiver):
    api, web = mesh(run, receiver, 0)
    sent = {}

    def send(kind, path):
        # The caller's trace says "not sampled": the head decision is no.
        trace_id = os.urandom(16).hex()
        parent = f"00-{trace_id}-{os.urandom(8).hex()}-00"
        resp = http_request(web.outbound, path, host="api", headers={"traceparent": parent})
        sent[trace_id] = (kind, resp.status)
        return trace_id

    for i in range(10):
        send("fast", f"/ok/{i}")
    expected = [send("failed", f"/fail/{i}?status=500") for i in range(3)]
    expected += [send("slow", f"/slow/{i}?delay=0.5") for i in range(2)]
    expected += [send("failed", f"/fail/{i}?status=503") for i in range(2)]
    assert sorted(status for _, status in sent.values()) == [200] * 12 + [500] * 3 + [503] * 2

    # Both proxies' spans of every failed and slow request arrive (server + client each).
    def all_arrived():
        return all(len(receiver.trace(t)) >= 4 for t in expected)
    wait_until(all_arrived, 30, what="the failed and slow requests' spans")
    # Each proxy's queue is exported in order, and the last request kept is in: anything
    # kept before it (a fast request, wrongly) would be at the collector by now.
    def exported():
        return sum(metric_sum(px.metrics(), "smesh_trace_spans_exported_total") for px in (api, web))
    wait_until(lambda: exported() == receiver.count(), 10, what="the proxies to count their exports")
    assert receiver.count() == 4 * len(expected), receiver.count()
    fast = {t for t, (kind, _) in sent.items() if kind == "fast"}
    assert not fast & receiver.trace_ids(), "a fast successful request was exported"
    for t in expected:
        kind = sent[t][0]
        for _, s in receiver.trace(t):
            a = attrs(s.attributes)
            failed = s.status.code == trace_pb2.Status.STATUS_CODE_ERROR
            assert failed == (kind == "failed"), (kind, s)
            if kind == "failed":
                assert a["error.type"] in ("500", "503"), a
            if s.kind == SERVER:
                assert a["smesh.sampled_by"] == ("error" if kind == "failed" else "slow"), a
    assert sum(metric_sum(px.metrics(), "smesh_trace_spans_dropped_total") for px in (api, web)) == 0


def events(span):
    return {e.name: attrs(e.attributes) for e in span.events}


@pytest.mark.timeout(90)
def test_a_static_proxy_reports_retries_timeouts_and_faults_as_span_events(run, receiver):
    flaky = run.http_backend("flaky", flaky=True)
    slow = run.http_backend("slow")
    mesh = {"apiVersion": "smesh.io/v1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
            "spec": {"tracing": {"collector": f"{LOOPBACK}:{receiver.port}", "sampling": 1}}}
    px = run.proxy([
        mesh,
        service("flaky", [flaky.address]),
        service("slow", [slow.address]),
        service("faulty", [slow.address]),
        http_route("retried", ["flaky"], [{"retry": {"attempts": 1, "codes": [503], "backoff": "10ms"}}]),
        http_route("bounded", ["slow"], [{"timeouts": {"request": "200ms"}}]),
        http_route("aborted", ["faulty"], [{"filters": [{"type": "FaultInjection", "faultInjection": {
            "abort": {"httpStatus": 503, "percent": 100}}}]}]),
    ])

    def server_span(host, path, status):
        resp = http_request(px.outbound, path, host=host)
        assert resp.status == status, resp

        def found():
            with receiver.lock:
                return [s for _, s in receiver.spans
                        if s.kind == SERVER and attrs(s.attributes).get("url.path") == path.split("?")[0]]
        span = wait_until(found, 20, what=f"the server span of {path}")[0]
        # A request's spans come in one Export call: its tries are in too.
        return span, [s for _, s in receiver.trace(span.trace_id.hex()) if s.kind == CLIENT]

    # The first try gets the flaky backend's 503, the retry its 200.
    span, tries = server_span("flaky", "/retried", 200)
    assert events(span)["retry"] == {"http.request.resend_count": 1, "smesh.previous_outcome": "503"}
    statuses = sorted(attrs(t.attributes)["http.response.status_code"] for t in tries)
    assert statuses == [200, 503]
    assert all(t.parent_span_id == span.span_id for t in tries)

    span, tries = server_span("slow", "/bounded?delay=2", 504)
    assert events(span)["timeout"] == {"smesh.proxy_error": "timeout"}
    assert attrs(span.attributes)["error.type"] == "timeout"
    assert [attrs(t.attributes)["error.type"] for t in tries] == ["timeout"]

    span, tries = server_span("faulty", "/aborted", 503)
    assert events(span)["fault"] == {"smesh.fault": "abort"}
    assert tries == [] and span.status.code == trace_pb2.Status.STATUS_CODE_ERROR

    # A request the proxy refuses before routing it still continues its caller's trace.
    caller = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    assert http_request(px.outbound, "/nowhere", host="unknown", headers={"traceparent": caller}).status == 404
    spans = wait_until(lambda: receiver.trace("5bf92f3577b34da6a3ce929d0e0e4736"), 20, what="the refused request's span")
    a = attrs(spans[0][1].attributes)
    assert spans[0][1].parent_span_id.hex() == "00f067aa0ba902b7" and a["error.type"] == "unknown_authority", a
    assert events(spans[0][1])["proxy_error"] == {"smesh.proxy_error": "unknown authority"}


@pytest.mark.timeout(60)
def test_a_grpc_failure_in_the_trailers_is_exported_at_head_sampling_zero(run, receiver, grpc_server,
                                                                     grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    mesh = {"apiVersion": "smesh.io/v1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
            "spec": {"tracing": {"collector": f"{LOOPBACK}:{receiver.port}", "sampling": 0}}}
    px = run.proxy([mesh, service("echo", [grpc_server.address], protocol="grpc", port=50051)])
    channel = grpc.insecure_channel(f"{LOOPBACK}:{px.outbound}", options=[
        ("grpc.enable_http_proxy", 0), ("grpc.default_authority", "echo:50051")])
    try:
        stub = pb2_grpc.EchoStub(channel)
        assert stub.Unary(pb2.Msg(text="fine"), timeout=10).text == "fine"
        with pytest.raises(grpc.RpcError) as failed:
            stub.Fail(pb2.Msg(text="x"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The OK call came first: once the failure is in, it would be too had it been kept.
        spans = wait_until(lambda: receiver.count() >= 2 and receiver.spans, 20, what="the failed call's spans")
    finally:
        channel.close()
    paths = {attrs(s.attributes)["url.path"] for _, s in spans}
    assert paths == {"/e2e.Echo/Fail"}, paths
    server = next(s for _, s in spans if s.kind == SERVER)
    a = attrs(server.attributes)
    assert (a["rpc.system"], a["rpc.grpc.status_code"], a["http.response.status_code"]) == ("grpc", 9, 200), a
    assert a["error.type"] == "9" and server.status.code == trace_pb2.Status.STATUS_CODE_ERROR
