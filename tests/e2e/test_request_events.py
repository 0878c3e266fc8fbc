"""Issue 14 item 3: the request and connection events, seen through their consumers.

`smesh_grpc_responses_total` counts finished gRPC calls by the gRPC status from the trailers
(or a trailers-only head) while `smesh_responses_total` keeps the HTTP status; the access log
has one line per HTTP request when its response body ended (route, dst, upstream, tries, peer,
grpc_status, bytes, end) and one line per opaque connection (tcp, connect, upgrade) when it
closed (bytes both ways)."""
import os
import re
import socket
import subprocess
import threading
from concurrent import futures

import grpc
import pytest
from websockets.sync.client import connect as ws_connect

from meshlib import (LOOPBACK, KeepAliveClient, free_port, http_route, metric_sum, service,
                     wait_until)

GRPC_SVC = "grpcsvc"

# ---------------------------------------------------------------------------- access log

# TIME DIRECTION CLIENT "REQUEST" STATUS TO_HEADms key=value ... [error="..."]
_REQUEST_LINE = re.compile(r'^(\S+) (\S+) (\S+) "([^"]*)" (\d{3}) ([\d.]+)ms (.*)$')
# TIME DIRECTION CLIENT KIND key=value ...
_CONNECTION_LINE = re.compile(r'^(\S+) (\S+) (\S+) (tcp|connect|upgrade) (.*)$')
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _fields(rest):
    return {k: v for k, v in _FIELD.findall(rest)}


def read_log(path):
    """(request lines, connection lines) of the access log, each a dict; raises on a line
    that is neither."""
    if not os.path.exists(path):
        return [], []
    requests, connections = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # only whole lines: the writer may be half-way through the last one
    for line in text[:text.rfind("\n") + 1].splitlines():
        m = _REQUEST_LINE.match(line)
        if m:
            d = _fields(m.group(7))
            d.update(line=line, direction=m.group(2), client=m.group(3), request=m.group(4),
                     status=int(m.group(5)))
            requests.append(d)
            continue
        m = _CONNECTION_LINE.match(line)
        assert m, f"access-log line in neither format: {line!r}"
        d = _fields(m.group(5))
        d.update(line=line, direction=m.group(2), client=m.group(3), kind=m.group(4))
        connections.append(d)
    return requests, connections


def wait_request_lines(log, pred, n, what):
    """The request lines matching pred once there are n of them (polled, 10 s at most)."""
    def got():
        ls = [l for l in read_log(log)[0] if pred(l)]
        return ls if len(ls) >= n else None
    return wait_until(got, 10, what=what)


def wait_connection_lines(log, kind, n=1):
    def got():
        ls = [c for c in read_log(log)[1] if c["kind"] == kind]
        return ls if len(ls) >= n else None
    return wait_until(got, 10, what=f"{n} access-log connection line(s) of kind {kind}")


# ---------------------------------------------------------------------------- gRPC

class _Failing:
    """An in-process grpcio Echo server: Unary answers OK; Fail aborts with UNAVAILABLE before
    any message (a trailers-only response); ServerStream sends one message, then aborts with
    UNAVAILABLE (the status in the trailers)."""

    def __init__(self, pb2, pb2_grpc):
        class Servicer(pb2_grpc.EchoServicer):
            def Unary(self, req, ctx):
                return pb2.Msg(text=req.text)

            def Fail(self, req, ctx):
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "down before any message")

            def ServerStream(self, req, ctx):
                yield pb2.Msg(text="first")
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "down after one message")

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.so_reuseport", 0)])
        pb2_grpc.add_EchoServicer_to_server(Servicer(), self.server)
        self.port = free_port()
        assert self.server.add_insecure_port(f"{LOOPBACK}:{self.port}") == self.port
        self.server.start()

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"


@pytest.fixture
def failing_grpc(grpc_stubs):
    srv = _Failing(*grpc_stubs)
    try:
        yield srv
    finally:
        srv.server.stop(grace=None)


def h2_response_frames(port, path, body_file, workdir):
    """The response frames of one gRPC POST made with `nghttp -nv` (h2c prior knowledge):
    [(type, headers dict, end_stream)], type HEADERS or DATA."""
    out = subprocess.run(["nghttp", "-n", "-v", "-t", "8", "-H", ":method: POST",
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          "-d", body_file, f"http://{LOOPBACK}:{port}{path}"],
                         capture_output=True, timeout=10, stdin=subprocess.DEVNULL, cwd=workdir)
    frames, pending = [], {}
    for line in out.stdout.decode("latin-1").splitlines():
        m = re.match(r"^\[\s*[\d.]+\] recv \(stream_id=\d+\) ([^:]\S*|:\S+): (.*)$", line)
        if m:
            pending[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^\[\s*[\d.]+\] recv (HEADERS|DATA) frame <length=\d+, flags=(0x[0-9a-f]+), stream_id=[1-9]", line)
        if m:
            end_stream = bool(int(m.group(2), 16) & 0x1)
            frames.append((m.group(1), pending if m.group(1) == "HEADERS" else {}, end_stream))
            pending = {}
    return frames


@pytest.mark.timeout(60)
def test_grpc_status_counted_from_trailers_and_trailers_only(run, failing_grpc, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    # The two failure shapes really are what the server sends (asked directly, not via smesh).
    body = os.path.join(run.workdir, "req.bin")
    msg = pb2.Msg(text="x").SerializeToString()
    with open(body, "wb") as f:
        f.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    only = h2_response_frames(failing_grpc.port, "/e2e.Echo/Fail", body, run.workdir)
    assert [(t, e) for t, _, e in only] == [("HEADERS", True)], only
    assert only[0][1].get("grpc-status") == "14", only
    after = h2_response_frames(failing_grpc.port, "/e2e.Echo/ServerStream", body, run.workdir)
    assert [t for t, _, _ in after] == ["HEADERS", "DATA", "HEADERS"], after
    assert "grpc-status" not in after[0][1] and after[2][1].get("grpc-status") == "14", after
    assert after[2][2], after

    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service(GRPC_SVC, [failing_grpc.address], protocol="grpc", port=50051)],
                   extra_args=["--access-log", log])
    ch = grpc.insecure_channel(f"{LOOPBACK}:{px.outbound}",
                               options=[("grpc.enable_http_proxy", 0),
                                        ("grpc.default_authority", GRPC_SVC)])
    try:
        stub = pb2_grpc.EchoStub(ch)
        assert stub.Unary(pb2.Msg(text="fine"), timeout=10).text == "fine"
        with pytest.raises(grpc.RpcError) as trailers_only:
            stub.Fail(pb2.Msg(text="x"), timeout=10)
        assert trailers_only.value.code() == grpc.StatusCode.UNAVAILABLE, trailers_only.value
        got = []
        with pytest.raises(grpc.RpcError) as in_trailers:
            for m in stub.ServerStream(pb2.Msg(text="x"), timeout=10):
                got.append(m.text)
        assert in_trailers.value.code() == grpc.StatusCode.UNAVAILABLE, in_trailers.value
        assert got == ["first"]
    finally:
        ch.close()

    def counted():
        m = px.metrics()
        done = (metric_sum(m, "smesh_grpc_responses_total", service=GRPC_SVC, grpc_status="14") >= 2
                and metric_sum(m, "smesh_grpc_responses_total", service=GRPC_SVC, grpc_status="0") >= 1)
        return m if done else None
    m = wait_until(counted, 10, what="gRPC responses counted")
    assert metric_sum(m, "smesh_grpc_responses_total", service=GRPC_SVC, grpc_status="14") == 2
    assert metric_sum(m, "smesh_grpc_responses_total", service=GRPC_SVC, grpc_status="0") == 1
    assert metric_sum(m, "smesh_grpc_responses_total", service=GRPC_SVC) == 3
    # the HTTP view is unchanged: three 200s (gRPC failures travel inside a 200)
    assert metric_sum(m, "smesh_responses_total", service=GRPC_SVC, status_code="200") == 3
    assert metric_sum(m, "smesh_responses_total", service=GRPC_SVC) == 3

    lines = wait_request_lines(log, lambda l: "/e2e.Echo/" in l["request"], 3, "3 gRPC access-log lines")
    by_method = {l["request"].split()[1].rsplit("/", 1)[1]: l for l in lines}
    assert set(by_method) == {"Unary", "Fail", "ServerStream"}, lines
    for method, code, bytes_ in (("Unary", "0", None), ("Fail", "14", "0"), ("ServerStream", "14", None)):
        l = by_method[method]
        assert l["status"] == 200, l["line"]
        assert l["grpc_status"] == code, l["line"]
        assert l["end"] == "complete", l["line"]
        assert l["dst"] == GRPC_SVC and l["upstream"] == failing_grpc.address, l["line"]
        assert l["request"] == f"POST {GRPC_SVC}/e2e.Echo/{method} HTTP/2.0", l["line"]
        if bytes_ is not None:
            assert l["bytes"] == bytes_, l["line"]
    # the streamed message (5-byte gRPC frame header + the encoded Msg) went through
    first = pb2.Msg(text="first").SerializeToString()
    assert int(by_method["ServerStream"]["bytes"]) == 5 + len(first), by_method["ServerStream"]["line"]


@pytest.mark.timeout(60)
def test_grpc_call_without_status_counts_as_none(run):
    """A gRPC request answered by a plain HTTP backend (200, a JSON body, no grpc-status)."""
    be = run.http_backend("plain")
    px = run.proxy([service("plain", [be.address], protocol="http")])
    cl = KeepAliveClient(px.outbound, host="plain")
    try:
        r = cl.get("/e2e.Echo/Unary", method="POST", body=b"\x00\x00\x00\x00\x00",
                   headers={"content-type": "application/grpc", "te": "trailers"})
    finally:
        cl.close()
    assert r.status == 200 and "grpc-status" not in r.headers, r

    def counted():
        m = px.metrics()
        return m if metric_sum(m, "smesh_grpc_responses_total", service="plain") >= 1 else None
    m = wait_until(counted, 10, what="gRPC response counted")
    assert metric_sum(m, "smesh_grpc_responses_total", service="plain", grpc_status="none") == 1
    assert metric_sum(m, "smesh_grpc_responses_total", service="plain") == 1


# ---------------------------------------------------------------------------- HTTP fields

@pytest.mark.timeout(60)
def test_access_log_fields_of_a_plain_request(run):
    be = run.http_backend("b1")
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("api", [be.address])], extra_args=["--access-log", log])
    cl = KeepAliveClient(px.outbound, host="api")
    try:
        r = cl.get("/plain-fields?x=1")
        client = "%s:%d" % cl.conn.sock.getsockname()
    finally:
        cl.close()
    assert r.status == 200 and r.body, r
    (l,) = wait_request_lines(log, lambda l: "/plain-fields" in l["request"], 1, "the request's line")
    assert l["request"] == "GET api/plain-fields HTTP/1.1", l["line"]
    assert l["direction"] == "outbound" and l["client"] == client, l["line"]
    assert l["status"] == 200, l["line"]
    assert l["dst"] == "api", l["line"]
    assert l["upstream"] == be.address, l["line"]
    assert l["tries"] == "1", l["line"]
    assert l["peer"] == "-", l["line"]
    assert l["grpc_status"] == "-", l["line"]
    assert l["bytes"] == str(len(r.body)), l["line"]
    assert l["end"] == "complete", l["line"]
    assert "error" not in l, l["line"]
    assert float(l["total"].removesuffix("ms")) >= 0, l["line"]


@pytest.mark.timeout(60)
def test_access_log_counts_tries_of_a_retried_request(run):
    flaky = run.http_backend("flaky", flaky=True)  # 503, 200, 503, 200, ...
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([
        service("api", [flaky.address]),
        http_route("api-route", ["api"], [{
            "retry": {"attempts": 2, "codes": [503], "backoff": "10ms", "perTryTimeout": "2s"},
        }]),
    ], extra_args=["--access-log", log])
    n = 3
    cl = KeepAliveClient(px.outbound, host="api")
    try:
        bodies = []
        for i in range(n):
            r = cl.get(f"/retried-{i}")
            assert r.status == 200, r
            bodies.append(r.body)
    finally:
        cl.close()
    assert flaky.stats()["statuses"] == {"503": n, "200": n}
    lines = wait_request_lines(log, lambda l: "/retried-" in l["request"], n, f"{n} access-log lines")
    assert len(lines) == n, [l["line"] for l in lines]
    for i, l in enumerate(sorted(lines, key=lambda l: l["request"])):
        assert l["tries"] == "2", l["line"]  # 3 x 503 + 3 x 200 above: each took exactly 2
        assert l["status"] == 200 and l["end"] == "complete", l["line"]
        assert l["route"] == "api-route" and l["dst"] == "api", l["line"]
        assert l["upstream"] == flaky.address, l["line"]
        assert l["bytes"] == str(len(bodies[i])), l["line"]


# ---------------------------------------------------------------------------- cut-off body

class CutOffBackend:
    """A raw-socket HTTP/1.1 backend: reads a request head, answers `Content-Length: 1000`
    with only 100 bytes of body, then closes the connection."""

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((LOOPBACK, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.served = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(10)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        d = conn.recv(4096)
                        if not d:
                            break
                        head += d
                    else:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                     b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
                        self.served += 1
                except OSError:
                    pass

    def close(self):
        self.lsock.close()


@pytest.fixture
def cut_off_backend():
    be = CutOffBackend()
    try:
        yield be
    finally:
        be.close()


@pytest.mark.timeout(60)
def test_access_log_says_error_when_the_response_body_is_cut_off(run, cut_off_backend):
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("cut", [cut_off_backend.address])], extra_args=["--access-log", log])
    with socket.create_connection((LOOPBACK, px.outbound), timeout=10) as s:
        s.sendall(b"GET /cut-off HTTP/1.1\r\nHost: cut\r\n\r\n")
        s.settimeout(10)
        got = b""
        while True:  # until the proxy closes: it cannot finish a 1000-byte body
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            got += d
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got[:200]
    assert b"content-length: 1000" in head.lower(), head
    assert len(body) < 1000, "the client got a whole body the upstream never sent"
    assert cut_off_backend.served == 1
    (l,) = wait_request_lines(log, lambda l: "/cut-off" in l["request"], 1, "the cut-off request's line")
    assert l["status"] == 200, l["line"]
    assert l["end"] == "error", l["line"]
    assert l.get("error", "").startswith('"') and len(l["error"]) > 2, l["line"]
    assert l["bytes"] == "100", l["line"]
    assert l["upstream"] == cut_off_backend.address and l["dst"] == "cut", l["line"]


# ---------------------------------------------------------------------------- connections

def _recv_until_eof(sock, timeout=10):
    sock.settimeout(timeout)
    chunks = []
    while True:
        d = sock.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


def _assert_connection_line(c, kind, client, dst, upstream):
    assert c["kind"] == kind, c["line"]
    assert c["client"] == client, c["line"]
    assert c["dst"] == dst and c["upstream"] == upstream, c["line"]
    assert c["peer"] == "-", c["line"]
    assert "error" not in c, c["line"]
    assert float(c["duration"].removesuffix("ms")) > 0, c["line"]


@pytest.mark.timeout(60)
def test_websocket_upgrade_gives_one_connection_line(run):
    ws = run.ws_echo()
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("ws", [ws.address])], extra_args=["--access-log", log])
    sock = socket.create_connection((LOOPBACK, px.outbound), timeout=10)
    client = "%s:%d" % sock.getsockname()
    payload = os.urandom(20_000)
    with ws_connect("ws://ws/echo", sock=sock, open_timeout=10, close_timeout=5) as c:
        c.send(payload)
        assert c.recv(timeout=10) == payload
    (c,) = wait_connection_lines(log, "upgrade")
    _assert_connection_line(c, "upgrade", client, "ws", ws.address)
    # the upgrade request's head is not in the tunnel; the echoed message (plus framing) is
    assert int(c["bytes_in"]) > len(payload), c["line"]
    assert int(c["bytes_out"]) > len(payload), c["line"]
    assert len(read_log(log)[1]) == 1, read_log(log)[1]


@pytest.mark.timeout(60)
def test_connect_tunnel_gives_one_connection_line(run):
    echo = run.tcp_echo()
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("echo", [echo.address], protocol="tcp", port=7)],
                   extra_args=["--access-log", log])
    data = b"through the tunnel " * 100
    with socket.create_connection((LOOPBACK, px.outbound), timeout=10) as s:
        client = "%s:%d" % s.getsockname()
        s.sendall(b"CONNECT echo:7 HTTP/1.1\r\nHost: echo:7\r\n\r\n")
        s.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(1)
            assert d, f"closed during the CONNECT response: {head!r}"
            head += d
        assert head.split(b" ")[1] == b"200", head
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert _recv_until_eof(s) == data + b"EOF-SEEN\n"
    (c,) = wait_connection_lines(log, "connect")
    _assert_connection_line(c, "connect", client, "echo", echo.address)
    assert int(c["bytes_in"]) == len(data), c["line"]
    assert int(c["bytes_out"]) == len(data) + len(b"EOF-SEEN\n"), c["line"]
    assert len(read_log(log)[1]) == 1, read_log(log)[1]


@pytest.mark.timeout(60)
def test_tcp_upstream_listener_gives_a_tcp_connection_line(run):
    echo = run.tcp_echo()
    log = os.path.join(run.workdir, "access.log")
    px = run.proxy([service("echo", [echo.address], protocol="tcp", port=7)], upstreams=["echo"],
                   extra_args=["--access-log", log])
    data = os.urandom(50_000)
    with socket.create_connection((LOOPBACK, px.upstream["echo"]), timeout=10) as s:
        client = "%s:%d" % s.getsockname()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert _recv_until_eof(s) == data + b"EOF-SEEN\n"
    (c,) = wait_connection_lines(log, "tcp")
    _assert_connection_line(c, "tcp", client, "echo", echo.address)
    assert int(c["bytes_in"]) == len(data), c["line"]
    assert int(c["bytes_out"]) == len(data) + len(b"EOF-SEEN\n"), c["line"]
    assert read_log(log) == ([], [c]), read_log(log)
