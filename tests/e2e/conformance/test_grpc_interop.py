"""The official gRPC interop test cases (grpc/grpc doc/interop-test-descriptions.md) through
smesh, each over three paths:

  outbound   grpcio client -> proxy's --outbound port (authority "api") -> server
  upstream   grpcio client -> proxy's --upstream api=PORT port -> server
  mtls       grpcio client -> "web" proxy's outbound -> mesh mTLS (strict) -> "api" proxy's
             inbound -> --app server; both proxies get SPIFFE certificates from a control plane
             with join tokens

The server is an in-process grpcio TestService (stubs generated at test time from
interop_messages.proto / interop_test.proto, package grpc.testing, the field numbers of the real
ones) implementing the spec's server features: EmptyCall, UnaryCall, StreamingInputCall,
StreamingOutputCall, FullDuplexCall, HalfDuplexCall, Echo Status, Echo Metadata,
CompressedRequest, CompressedResponse; UnimplementedCall is declared and not implemented, and
grpc.testing.UnimplementedService is not registered.

grpcio hides the per-message compressed flag from both its client and its server, and the spec's
compression cases are about that flag. So every byte between the proxy and the server, and
between the client and the proxy, goes through an HTTP/2 tap (H2Tap: a TCP relay that parses the
frames it forwards, HPACK included, and records per stream the request and response headers and
every gRPC message's compressed flag and length). Every call carries an `x-interop-call-id`
header that the taps index streams by. The server's CompressedRequest check reads its tap (what
arrived on its wire); the client's compressed-response assertions read the client's tap (what the
proxy sent back). grpcio's client compresses every message of a call or none, so
client_compressed_streaming (one compressed then one uncompressed message in one call) is sent
by a small raw HTTP/2 client (the h2 package).

Beyond the spec's client assertions (clearly marked where they are made): empty_unary checks on
the wire that both messages were zero bytes (the spec's "ideally"), the compressed cases check
that the client really sent what the case says, cancel_after_first_response checks that the
cancellation reached the server, and timeout_on_sleeping_server_in_flight repeats
timeout_on_sleeping_server with a deadline long enough (300 ms) to expire while the call is at
the server (the spec's 1 ms usually expires before the request leaves the client). On the mtls
path, the server-side proxy counts every request as mTLS and none as plaintext.

The processes of each path are shared by its cases (module-scoped, killed by pid at the end).
"""
import gzip
import importlib
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import namedtuple
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

import meshlib
from meshlib import LOOPBACK, free_port, metric_sum, service, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
AUTHORITY = "api"
CALL_ID = "x-interop-call-id"
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
TD = "example.org"
CALL_TIMEOUT = 15  # seconds, every call of a case (except the deadline cases)
CODES = {c.value[0]: c for c in grpc.StatusCode}


# --------------------------------------------------------------------------- stubs

@pytest.fixture(scope="module")
def pb():
    """grpc.testing messages and services, generated with grpcio-tools into a temp dir."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="smesh-e2e-interop-")
    try:
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}",
                          os.path.join(HERE, "interop_messages.proto"),
                          os.path.join(HERE, "interop_test.proto")])
        assert rc == 0, f"protoc failed with {rc}"
        sys.path.insert(0, out)
        try:
            messages = importlib.import_module("interop_messages_pb2")
            test_grpc = importlib.import_module("interop_test_pb2_grpc")
        finally:
            sys.path.remove(out)
        yield SimpleNamespace(m=messages, svc=test_grpc)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- the HTTP/2 tap

Msg = namedtuple("Msg", "compressed length")  # one gRPC message as it crossed the wire


class Wire:
    """What a tap saw of one HTTP/2 stream: header blocks each way (the request's, and the
    response's headers then trailers), and the gRPC messages each way."""

    def __init__(self):
        self.request_headers = []   # list of header blocks: [(name, value), ...]
        self.response_headers = []
        self.c2s = []               # [Msg]
        self.s2c = []
        self.ended = {"c2s": False, "s2c": False}  # END_STREAM seen
        self.resets = []            # [(direction, RST_STREAM error code)]

    def request_header(self, name, default=None):
        for k, v in (self.request_headers[0] if self.request_headers else []):
            if k == name:
                return v
        return default


class _Direction:
    """Parses the frames of one direction of one tapped connection as they are forwarded."""
    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, tap, conn_no, c2s):
        import hpack
        self.tap, self.conn_no, self.c2s = tap, conn_no, c2s
        self.dir = "c2s" if c2s else "s2c"
        self.buf = bytearray()
        self.preface_left = len(self.PREFACE) if c2s else 0
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 24  # whatever the peers agreed on
        self.decoder.max_header_list_size = 1 << 24
        self.block = None        # (stream id, bytearray) while CONTINUATION frames follow
        self.framing = {}        # stream id -> [message prefix bytes so far, body bytes to skip]
        self.broken = False

    def feed(self, data):
        if self.broken:
            return
        try:
            self._feed(data)
        except Exception as e:  # the bytes are still forwarded; the record is incomplete
            self.broken = True
            self.tap.errors.append(f"conn {self.conn_no} {self.dir}: {e!r}")

    def _feed(self, data):
        self.buf += data
        if self.preface_left:
            n = min(self.preface_left, len(self.buf))
            start = len(self.PREFACE) - self.preface_left
            if bytes(self.buf[:n]) != self.PREFACE[start:start + n]:
                raise ValueError("not an HTTP/2 connection preface")
            del self.buf[:n]
            self.preface_left -= n
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + length:
                return
            ftype, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9:9 + length])
            del self.buf[:9 + length]
            self._frame(ftype, flags, sid, payload)

    def _frame(self, ftype, flags, sid, p):
        if ftype in (0x0, 0x1) and flags & 0x1 and sid:  # END_STREAM
            with self.tap.lock:
                self.tap._wire(self.conn_no, sid).ended[self.dir] = True
        if ftype == 0x0:  # DATA
            if flags & 0x8:  # PADDED
                p = p[1:len(p) - p[0]]
            self._data(sid, p)
        elif ftype == 0x1:  # HEADERS
            off, pad = 0, 0
            if flags & 0x8:
                pad, off = p[0], 1
            if flags & 0x20:  # PRIORITY
                off += 5
            frag = p[off:len(p) - pad]
            if flags & 0x4:  # END_HEADERS
                self._headers(sid, frag)
            else:
                self.block = (sid, bytearray(frag))
        elif ftype == 0x9:  # CONTINUATION
            self.block[1].extend(p)
            if flags & 0x4:
                sid, block = self.block
                self.block = None
                self._headers(sid, bytes(block))
        elif ftype == 0x3 and sid:  # RST_STREAM
            with self.tap.lock:
                self.tap._wire(self.conn_no, sid).resets.append((self.dir, int.from_bytes(p[:4], "big")))
        elif ftype == 0x5:  # PUSH_PROMISE: never in gRPC
            raise ValueError("PUSH_PROMISE")

    def _headers(self, sid, block):
        hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.decoder.decode(block, raw=True)]
        with self.tap.lock:
            wire = self.tap._wire(self.conn_no, sid)
            if self.c2s:
                wire.request_headers.append(hdrs)
                for k, v in hdrs:
                    if k == CALL_ID:
                        self.tap.by_call[v] = wire
            else:
                wire.response_headers.append(hdrs)

    def _data(self, sid, data):
        st = self.framing.setdefault(sid, [bytearray(), 0])
        i, n = 0, len(data)
        found = []
        while i < n:
            if st[1]:
                k = min(st[1], n - i)
                st[1] -= k
                i += k
                continue
            take = data[i:i + 5 - len(st[0])]
            st[0] += take
            i += len(take)
            if len(st[0]) == 5:
                length = int.from_bytes(st[0][1:5], "big")
                found.append(Msg(bool(st[0][0] & 1), length))
                st[0] = bytearray()
                st[1] = length
        if found:
            with self.tap.lock:
                wire = self.tap._wire(self.conn_no, sid)
                (wire.c2s if self.c2s else wire.s2c).extend(found)


class H2Tap:
    """A TCP relay on a free port to 127.0.0.1:target that records the HTTP/2 it forwards.
    The bytes it has parsed are only forwarded after they are recorded, so whoever reads them
    on the other side can look them up here at once."""

    def __init__(self, target_port, name):
        self.target, self.name = target_port, name
        self.lock = threading.Lock()
        self.streams = {}   # (connection number, stream id) -> Wire
        self.by_call = {}   # x-interop-call-id -> Wire
        self.errors = []
        self.conns = 0
        self.socks = []
        self.stop = threading.Event()
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, self.port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, name=f"tap-{name}", daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def _wire(self, conn_no, sid):  # with self.lock held
        return self.streams.setdefault((conn_no, sid), Wire())

    def wire(self, call_id, timeout=3):
        """The Wire of the stream whose request carried call_id."""
        return wait_until(lambda: self.by_call.get(call_id), timeout, what=f"{self.name} tap: call {call_id}")

    def messages(self, call_id, c2s, at_least=0, timeout=3):
        """A copy of the messages of call_id's stream in one direction (at least at_least)."""
        wire = self.wire(call_id, timeout)

        def enough():
            with self.lock:
                got = list(wire.c2s if c2s else wire.s2c)
            return [got] if len(got) >= at_least else None
        return wait_until(enough, timeout, what=f"{self.name} tap: {at_least} messages of {call_id}")[0]

    def wait_for(self, call_id, pred, what, timeout=5):
        """Poll until pred(wire) holds (under the tap's lock) for call_id's stream."""
        wire = self.wire(call_id, timeout)

        def check():
            with self.lock:
                return pred(wire)
        return wait_until(check, timeout, what=f"{self.name} tap: {what} ({call_id})")

    def _accept(self):
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += 1
                conn_no = self.conns
                self.socks += [client, upstream]
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b, c2s in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, _Direction(self, conn_no, c2s)),
                                 name=f"tap-{self.name}-{conn_no}", daemon=True).start()

    def _pipe(self, a, b, direction):
        try:
            while not self.stop.is_set():
                data = a.recv(262144)
                if not data:
                    break
                direction.feed(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.sock.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.thread.join(2)


# --------------------------------------------------------------------------- the server

def _call_id(ctx):
    for k, v in ctx.invocation_metadata():
        if k == CALL_ID:
            return v
    return None


def make_servicer(pb, state):
    """The TestService; state.tap (set once the tap exists) is the server's tap: what arrived
    on the server's wire."""
    m = pb.m

    def payload(size):
        return m.Payload(type=m.COMPRESSABLE, body=b"\0" * size)

    def echo_metadata(ctx, compression=None):
        """Echo Metadata (and the call's compression, which must precede initial metadata)."""
        md = ctx.invocation_metadata()
        initial = [(k, v) for k, v in md if k == ECHO_INITIAL]
        trailing = [(k, v) for k, v in md if k == ECHO_TRAILING]
        if compression is not None:
            ctx.set_compression(compression)
        if initial:
            ctx.send_initial_metadata(initial)
        if trailing:
            ctx.set_trailing_metadata(trailing)

    def echo_status(ctx, status):
        """Echo Status: end the call with the requested status (OK: carry on)."""
        if status.code:
            ctx.abort(CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message)

    def check_compression(ctx, expected, index):
        """CompressedRequest: request message `index` of this call must have arrived with the
        compressed flag set (and a grpc-encoding) if expected, without it otherwise; as the
        C++ interop server, INVALID_ARGUMENT when not."""
        cid = _call_id(ctx)
        if cid is None:
            if expected:
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"no {CALL_ID}: cannot tell whether the request was compressed")
            return
        msgs = state.tap.messages(cid, c2s=True, at_least=index + 1)
        encoding = state.tap.wire(cid).request_header("grpc-encoding", "identity")
        if expected:
            if encoding == "identity":
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Expected compression but got uncompressed request from client.")
            if not msgs[index].compressed:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Requested compression in a compressable request, but compression bit "
                          "in message flags not set.")
        elif msgs[index].compressed:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      "Didn't request compression, but compression bit in message flags set.")

    def respond(ctx, req):
        """One response per ResponseParameters, compressed as asked (the call's compression
        was set before its initial metadata)."""
        for p in req.response_parameters:
            if p.interval_us:
                time.sleep(min(p.interval_us, 5_000_000) / 1e6)
            want = p.compressed.value if p.HasField("compressed") else req.response_compressed.value
            if not want:
                ctx.disable_next_message_compression()
            yield m.StreamingOutputCallResponse(payload=payload(p.size))

    class TestService(pb.svc.TestServiceServicer):
        def EmptyCall(self, req, ctx):
            echo_metadata(ctx)
            return m.Empty()

        def UnaryCall(self, req, ctx):
            echo_metadata(ctx, grpc.Compression.Gzip if req.response_compressed.value else None)
            check_compression(ctx, req.expect_compressed.value, 0)
            echo_status(ctx, req.response_status)
            return m.SimpleResponse(payload=payload(req.response_size))

        def StreamingInputCall(self, it, ctx):
            echo_metadata(ctx)
            total = 0
            for i, req in enumerate(it):
                check_compression(ctx, req.expect_compressed.value, i)
                total += len(req.payload.body)
            return m.StreamingInputCallResponse(aggregated_payload_size=total)

        def StreamingOutputCall(self, req, ctx):
            compress = req.response_compressed.value or any(
                p.compressed.value for p in req.response_parameters)
            echo_metadata(ctx, grpc.Compression.Gzip if compress else None)
            echo_status(ctx, req.response_status)
            yield from respond(ctx, req)

        def FullDuplexCall(self, it, ctx):
            echo_metadata(ctx)
            for req in it:
                echo_status(ctx, req.response_status)
                yield from respond(ctx, req)

        def HalfDuplexCall(self, it, ctx):
            echo_metadata(ctx)
            reqs = list(it)
            for req in reqs:
                echo_status(ctx, req.response_status)
            for req in reqs:
                yield from respond(ctx, req)

        # UnimplementedCall: the generated servicer's, UNIMPLEMENTED

    return TestService()


@pytest.fixture(scope="module")
def interop_server(pb):
    """The grpcio TestService behind its tap; `address` is the tap's."""
    state = SimpleNamespace(tap=None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                         options=[("grpc.so_reuseport", 0)])
    pb.svc.add_TestServiceServicer_to_server(make_servicer(pb, state), server)
    port = free_port()
    assert server.add_insecure_port(f"{LOOPBACK}:{port}") == port
    server.start()
    state.tap = H2Tap(port, "server")
    try:
        yield SimpleNamespace(address=state.tap.address, tap=state.tap)
    finally:
        state.tap.close()
        server.stop(grace=None)


# --------------------------------------------------------------------------- the paths

class MeshPath:
    def __init__(self, name, tap, authority, proxies, inbound=None):
        self.name, self.tap, self.authority, self.proxies = name, tap, authority, proxies
        self.inbound = inbound     # mtls: the server-side proxy
        self.plaintext_base = 0

    @property
    def port(self):
        return self.tap.port

    def tls_requests(self, tls):
        return metric_sum(self.inbound.metrics(), "smesh_inbound_requests_by_tls_total",
                          service=AUTHORITY, tls=tls)

    def after_case(self):
        for px in self.proxies:
            assert px.alive(), f"{px.name} exited:\n{px.stderr()[-3000:]}"
        if self.inbound is not None:
            assert self.tls_requests("false") == self.plaintext_base, \
                "a request reached the server-side proxy in plaintext"


def _channel(port, authority):
    opts = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20)]
    if authority:
        opts.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(f"{LOOPBACK}:{port}", options=opts)


def _wait_serving(pb, path, timeout):
    """Poll with EmptyCall (a new channel each try: no reconnect backoff) until it succeeds."""
    def ok():
        ch = _channel(path.port, path.authority)
        try:
            pb.svc.TestServiceStub(ch).EmptyCall(pb.m.Empty(), timeout=2)
            return True
        except grpc.RpcError:
            return False
        finally:
            ch.close()
    wait_until(ok, timeout, interval=0.1, what=f"EmptyCall through the {path.name} path")


def _mtls_proxies(runner, server_address):
    cp = runner.control(extra_args=["--trust-domain", TD])
    text = ("apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\n"
            "spec:\n  ports: [{port: 80, protocol: grpc}]\n---\n"
            "apiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: strict}\n")
    r = cp.cli("apply", "-f", "-", input=text)
    assert r.returncode == 0, r.stderr

    def token_file(svc):
        r = cp.cli("token", "create", "--service", svc, "--ttl", "1h")
        assert r.returncode == 0, r.stderr
        path = os.path.join(runner.workdir, f"{svc}.token")
        with open(path, "w") as f:
            f.write(r.stdout.strip() + "\n")
        return path

    app_port = int(server_address.rsplit(":", 1)[1])
    api = runner.mesh_proxy([cp.url], service="api", app_port=app_port, name="api-proxy",
                            extra_args=["--token-file", token_file("api")])
    web = runner.mesh_proxy([cp.url], service="web", name="web-proxy",
                            extra_args=["--token-file", token_file("web")])
    for px in (api, web):
        wait_until(lambda: metric_sum(px.metrics(), "smesh_identity_certifications_total", result="ok") >= 1,
                   15, what=f"{px.name}'s certificate")
    wait_until(lambda: f"spiffe://{TD}/service/api" in web.config_text(), 15,
               what="api's endpoint and identity in web's config")
    return cp, api, web


@pytest.fixture(scope="module", params=["outbound", "upstream", "mtls"])
def mesh(request, pb, interop_server, tmp_path_factory):
    """One path's processes, shared by every case on it; all killed at the end."""
    name = request.param
    runner = meshlib.Runner(str(tmp_path_factory.mktemp(f"interop-{name}")))
    tap = None
    try:
        resources = [service(AUTHORITY, [interop_server.address], protocol="grpc")]
        if name == "outbound":
            px = runner.proxy(resources, name="smesh-outbound")
            tap = H2Tap(px.outbound, "client")
            path = MeshPath(name, tap, AUTHORITY, [px])
        elif name == "upstream":
            px = runner.proxy(resources, upstreams=[AUTHORITY], name="smesh-upstream")
            tap = H2Tap(px.upstream[AUTHORITY], "client")
            path = MeshPath(name, tap, None, [px])  # authority 127.0.0.1:port: the port decides
        else:
            cp, api, web = _mtls_proxies(runner, interop_server.address)
            tap = H2Tap(web.outbound, "client")
            path = MeshPath(name, tap, AUTHORITY, [api, web], inbound=api)
        _wait_serving(pb, path, 20)
        if path.inbound is not None:
            # the call that just answered went over mesh mTLS, and nothing in plaintext
            assert path.tls_requests("true") >= 1, path.inbound.metrics_text()
            path.plaintext_base = path.tls_requests("false")
            assert path.plaintext_base == 0, path.inbound.metrics_text()
            assert metric_sum(path.inbound.metrics(), "smesh_inbound_connections_total", tls="true") >= 1
        yield path
    finally:
        if tap is not None:
            tap.close()
        runner.cleanup()


class Client:
    """A grpcio client of one path (through the path's client-side tap)."""

    def __init__(self, pb, path, server):
        self.m, self.path, self.server = pb.m, path, server
        self.tap = path.tap
        self.channel = _channel(path.port, path.authority)
        self.stub = pb.svc.TestServiceStub(self.channel)
        self.unimplemented = pb.svc.UnimplementedServiceStub(self.channel)

    @property
    def authority(self):
        return self.path.authority or f"{LOOPBACK}:{self.path.port}"

    @staticmethod
    def md(*pairs):
        """A fresh call id and the metadata carrying it (plus pairs)."""
        cid = uuid.uuid4().hex
        return cid, ((CALL_ID, cid), *pairs)

    def close(self):
        self.channel.close()


@pytest.fixture
def client(pb, mesh, interop_server):
    c = Client(pb, mesh, interop_server)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- client helpers

def zeros(n):
    return b"\0" * n


class Pipe:
    """A request iterator the test feeds: add() sends a message, close() half-closes. Bounded:
    it ends by itself after `limit` seconds."""
    _END = object()

    def __init__(self, limit=30):
        self.q = queue.Queue()
        self.deadline = time.monotonic() + limit

    def __iter__(self):
        return self

    def __next__(self):
        try:
            item = self.q.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            raise StopIteration
        if item is self._END:
            self.q.put(self._END)
            raise StopIteration
        return item

    def add(self, msg):
        self.q.put(msg)

    def close(self):
        self.q.put(self._END)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


RawResult = namedtuple("RawResult", "status message headers trailers messages")


def raw_grpc_call(port, authority, path, messages, metadata=(), encoding="gzip", timeout=CALL_TIMEOUT):
    """One gRPC call over a new h2c connection with the h2 package, sending `messages` as given:
    [(compressed, bytes already compressed or not)], then half-closing. Returns the status,
    message, header blocks and response message bodies (decompressed)."""
    import h2.config
    import h2.connection
    import h2.events

    deadline = time.monotonic() + timeout
    body = b"".join(bytes([1 if c else 0]) + len(p).to_bytes(4, "big") + p for c, p in messages)
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
                   ("content-type", "application/grpc"), ("te", "trailers"),
                   ("grpc-encoding", encoding), ("grpc-accept-encoding", "identity,gzip"),
                   ("grpc-timeout", f"{int(timeout * 1000)}m"), ("user-agent", "smesh-e2e-raw-h2"),
                   *metadata]
        conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=not body)
        sock.sendall(conn.data_to_send())
        sent = 0 if body else None
        resp_headers, trailers, data, ended = None, None, bytearray(), False
        while not ended:
            if sent is not None and sent < len(body):
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window > 0:
                    chunk = body[sent:sent + window]
                    sent += len(chunk)
                    conn.send_data(sid, chunk, end_stream=sent == len(body))
                    sock.sendall(conn.data_to_send())
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw gRPC call to {path} did not end in {timeout}s")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before the call ended (headers {resp_headers})")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    resp_headers = [(k.decode(), v.decode()) for k, v in ev.headers]
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = [(k.decode(), v.decode()) for k, v in ev.headers]
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionError(f"stream reset with error code {ev.error_code}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY {ev.error_code}")
            if ended:
                sent = None  # the server answered (possibly before reading everything): done
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    finally:
        sock.close()
    status_block = dict(trailers if trailers is not None else (resp_headers or []))
    resp_encoding = dict(resp_headers or []).get("grpc-encoding", "identity")
    bodies, i = [], 0
    while i + 5 <= len(data):
        flag, n = data[i], int.from_bytes(data[i + 1:i + 5], "big")
        p = bytes(data[i + 5:i + 5 + n])
        i += 5 + n
        if flag & 1:
            assert resp_encoding == "gzip", f"compressed response with grpc-encoding {resp_encoding}"
            p = gzip.decompress(p)
        bodies.append(p)
    assert i == len(data), f"{len(data) - i} bytes of a partial gRPC message at the end"
    return RawResult(int(status_block.get("grpc-status", "-1")),
                     urllib.parse.unquote(status_block.get("grpc-message", "")),
                     resp_headers, trailers, bodies)


def expect_error(code, fn, *args, **kw):
    """fn(...) must raise an RpcError with `code`; returns it."""
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    assert ei.value.code() == code, ei.value
    return ei.value


# --------------------------------------------------------------------------- the cases

def empty_unary(c):
    cid, md = c.md()
    resp, call = c.stub.EmptyCall.with_call(c.m.Empty(), metadata=md, timeout=CALL_TIMEOUT)
    assert call.code() == grpc.StatusCode.OK
    assert resp is not None and isinstance(resp, c.m.Empty)
    # beyond the client assertions (the spec's "ideally"): zero bytes serialized both ways
    assert c.tap.messages(cid, c2s=True) == [Msg(False, 0)]
    assert c.tap.messages(cid, c2s=False) == [Msg(False, 0)]


def _large_request(c, **kw):
    return c.m.SimpleRequest(response_type=c.m.COMPRESSABLE, response_size=314159,
                             payload=c.m.Payload(body=zeros(271828)), **kw)


def large_unary(c):
    cid, md = c.md()
    resp, call = c.stub.UnaryCall.with_call(_large_request(c), metadata=md, timeout=CALL_TIMEOUT)
    assert call.code() == grpc.StatusCode.OK
    assert len(resp.payload.body) == 314159
    assert resp.payload.body == zeros(314159)


def client_compressed_unary(c):
    def request(expect):
        return _large_request(c, expect_compressed=c.m.BoolValue(value=expect))

    # the feature probe: uncompressed, but expect_compressed -> INVALID_ARGUMENT
    _, md = c.md()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.stub.UnaryCall, request(True), metadata=md,
                 timeout=CALL_TIMEOUT)
    for compressed in (True, False):
        cid, md = c.md()
        resp, call = c.stub.UnaryCall.with_call(
            request(compressed), metadata=md, timeout=CALL_TIMEOUT,
            compression=grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression)
        assert call.code() == grpc.StatusCode.OK
        assert len(resp.payload.body) == 314159 and resp.payload.body == zeros(314159)
        # (the test itself: the client did send the message as the case says)
        assert [m.compressed for m in c.tap.messages(cid, c2s=True)] == [compressed]


def server_compressed_unary(c):
    for compressed in (True, False):
        cid, md = c.md()
        resp, call = c.stub.UnaryCall.with_call(
            _large_request(c, response_compressed=c.m.BoolValue(value=compressed)),
            metadata=md, timeout=CALL_TIMEOUT)
        assert call.code() == grpc.StatusCode.OK
        # the compressed flag of the response message, as it reached the client
        flags = [m.compressed for m in c.tap.messages(cid, c2s=False, at_least=1)]
        assert flags == [compressed], f"response_compressed={compressed}: flags {flags}"
        assert len(resp.payload.body) == 314159 and resp.payload.body == zeros(314159)


def client_streaming(c):
    sizes = (27182, 8, 1828, 45904)
    reqs = [c.m.StreamingInputCallRequest(payload=c.m.Payload(body=zeros(n))) for n in sizes]
    _, md = c.md()
    resp, call = c.stub.StreamingInputCall.with_call(iter(reqs), metadata=md, timeout=CALL_TIMEOUT)
    assert call.code() == grpc.StatusCode.OK
    assert resp.aggregated_payload_size == 74922


def client_compressed_streaming(c):
    m = c.m
    method = "/grpc.testing.TestService/StreamingInputCall"

    def request(expect, size):
        return m.StreamingInputCallRequest(expect_compressed=m.BoolValue(value=expect),
                                           payload=m.Payload(body=zeros(size))).SerializeToString()

    # the feature probe: one uncompressed message that expects compression
    _, md = c.md()
    r = raw_grpc_call(c.path.port, c.authority, method, [(False, request(True, 27182))], metadata=md)
    assert r.status == grpc.StatusCode.INVALID_ARGUMENT.value[0], r
    # one call: a compressed message, then an uncompressed one, then half-close
    cid, md = c.md()
    r = raw_grpc_call(c.path.port, c.authority, method,
                      [(True, gzip.compress(request(True, 27182))), (False, request(False, 45904))],
                      metadata=md)
    assert r.status == 0, r
    assert len(r.messages) == 1, r
    assert m.StreamingInputCallResponse.FromString(r.messages[0]).aggregated_payload_size == 73086
    # (the test itself: what the client sent)
    assert [x.compressed for x in c.tap.messages(cid, c2s=True)] == [True, False]


def server_streaming(c):
    sizes = (31415, 9, 2653, 58979)
    req = c.m.StreamingOutputCallRequest(
        response_type=c.m.COMPRESSABLE,
        response_parameters=[c.m.ResponseParameters(size=n) for n in sizes])
    _, md = c.md()
    call = c.stub.StreamingOutputCall(req, metadata=md, timeout=CALL_TIMEOUT)
    bodies = [r.payload.body for r in call]
    assert call.code() == grpc.StatusCode.OK
    assert [len(b) for b in bodies] == list(sizes)
    assert all(b == zeros(len(b)) for b in bodies)


def server_compressed_streaming(c):
    m = c.m
    req = m.StreamingOutputCallRequest(response_type=m.COMPRESSABLE, response_parameters=[
        m.ResponseParameters(size=31415, compressed=m.BoolValue(value=True)),
        m.ResponseParameters(size=92653, compressed=m.BoolValue(value=False))])
    cid, md = c.md()
    call = c.stub.StreamingOutputCall(req, metadata=md, timeout=CALL_TIMEOUT)
    bodies = [r.payload.body for r in call]
    assert call.code() == grpc.StatusCode.OK
    assert len(bodies) == 2
    flags = [x.compressed for x in c.tap.messages(cid, c2s=False, at_least=2)]
    assert flags == [True, False], f"compressed flags of the responses as they reached the client: {flags}"
    assert [len(b) for b in bodies] == [31415, 92653]
    assert all(b == zeros(len(b)) for b in bodies)


PING_PONG = ((31415, 27182), (9, 8), (2653, 1828), (58979, 45904))  # (response size, payload size)


def _duplex_request(c, response_size, payload_size):
    return c.m.StreamingOutputCallRequest(
        response_type=c.m.COMPRESSABLE,
        response_parameters=[c.m.ResponseParameters(size=response_size)],
        payload=c.m.Payload(body=zeros(payload_size)))


def ping_pong(c):
    _, md = c.md()
    with Pipe() as pipe:
        call = c.stub.FullDuplexCall(pipe, metadata=md, timeout=CALL_TIMEOUT)
        sizes = []
        for response_size, payload_size in PING_PONG:
            pipe.add(_duplex_request(c, response_size, payload_size))
            resp = next(call)
            sizes.append(len(resp.payload.body))
            assert resp.payload.body == zeros(response_size)
        pipe.close()
        assert next(call, None) is None, "more than four responses"
    assert call.code() == grpc.StatusCode.OK
    assert sizes == [31415, 9, 2653, 58979]


def empty_stream(c):
    _, md = c.md()
    with Pipe() as pipe:
        call = c.stub.FullDuplexCall(pipe, metadata=md, timeout=CALL_TIMEOUT)
        pipe.close()
        responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert responses == []


def cancel_after_begin(c):
    _, md = c.md()
    with Pipe() as pipe:
        fut = c.stub.StreamingInputCall.future(pipe, metadata=md, timeout=CALL_TIMEOUT)
        fut.cancel()
        assert fut.cancelled()
        assert fut.code() == grpc.StatusCode.CANCELLED


def cancel_after_first_response(c):
    cid, md = c.md()
    with Pipe() as pipe:
        call = c.stub.FullDuplexCall(pipe, metadata=md, timeout=CALL_TIMEOUT)
        pipe.add(_duplex_request(c, 31415, 27182))
        next(call)
        call.cancel()
        expect_error(grpc.StatusCode.CANCELLED, next, call)
    assert call.code() == grpc.StatusCode.CANCELLED
    # beyond the client assertions: the proxy passed the cancellation on to the server (an
    # RST_STREAM towards the server on that call's stream)
    c.server.tap.wait_for(cid, lambda w: any(d == "c2s" for d, _ in w.resets),
                          "RST_STREAM from the proxy to the server")


def timeout_on_sleeping_server(c, timeout=0.001):
    cid, md = c.md()
    with Pipe() as pipe:
        call = c.stub.FullDuplexCall(pipe, metadata=md, timeout=timeout)
        pipe.add(c.m.StreamingOutputCallRequest(payload=c.m.Payload(body=zeros(27182))))
        expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, next, call)
    return cid


def timeout_on_sleeping_server_in_flight(c):
    """Beyond the spec: timeout_on_sleeping_server with 300 ms, which expires while the call
    is at the (sleeping) server; the expiry reaches it."""
    t0 = time.monotonic()
    cid = timeout_on_sleeping_server(c, timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert c.server.tap.wire(cid) is not None, "the request never reached the server"
    # the call ended at the server too: reset either way, or the server's trailers
    c.server.tap.wait_for(cid, lambda w: w.resets or w.ended["s2c"], "the server's call to end")


def custom_metadata(c):
    value, trailing = "test_initial_metadata_value", b"\xab\xab\xab"
    _, md = c.md((ECHO_INITIAL, value), (ECHO_TRAILING, trailing))
    resp, call = c.stub.UnaryCall.with_call(_large_request(c), metadata=md, timeout=CALL_TIMEOUT)
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.initial_metadata()).get(ECHO_INITIAL) == value, call.initial_metadata()
    assert dict(call.trailing_metadata()).get(ECHO_TRAILING) == trailing, call.trailing_metadata()

    _, md = c.md((ECHO_INITIAL, value), (ECHO_TRAILING, trailing))
    req = c.m.StreamingOutputCallRequest(
        response_type=c.m.COMPRESSABLE, response_parameters=[c.m.ResponseParameters(size=314159)],
        payload=c.m.Payload(body=zeros(271828)))
    call = c.stub.FullDuplexCall(iter([req]), metadata=md, timeout=CALL_TIMEOUT)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert [len(r.payload.body) for r in responses] == [314159]
    assert dict(call.initial_metadata()).get(ECHO_INITIAL) == value, call.initial_metadata()
    assert dict(call.trailing_metadata()).get(ECHO_TRAILING) == trailing, call.trailing_metadata()


def _status_echo(c, code, message, duplex):
    status = c.m.EchoStatus(code=code, message=message)
    _, md = c.md()
    if duplex:
        call = c.stub.FullDuplexCall(iter([c.m.StreamingOutputCallRequest(response_status=status)]),
                                     metadata=md, timeout=CALL_TIMEOUT)
        e = expect_error(CODES[code], list, call)
    else:
        e = expect_error(CODES[code], c.stub.UnaryCall, c.m.SimpleRequest(response_status=status),
                         metadata=md, timeout=CALL_TIMEOUT)
    assert e.code().value[0] == code
    assert e.details() == message, repr(e.details())


def status_code_and_message(c):
    _status_echo(c, 2, "test status message", duplex=False)
    _status_echo(c, 2, "test status message", duplex=True)


def special_status_message(c):
    _status_echo(c, 2, "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n",
                 duplex=False)


def unimplemented_method(c):
    _, md = c.md()
    expect_error(grpc.StatusCode.UNIMPLEMENTED, c.stub.UnimplementedCall, c.m.Empty(), metadata=md,
                 timeout=CALL_TIMEOUT)


def unimplemented_service(c):
    _, md = c.md()
    expect_error(grpc.StatusCode.UNIMPLEMENTED, c.unimplemented.UnimplementedCall, c.m.Empty(),
                 metadata=md, timeout=CALL_TIMEOUT)


CASES = {f.__name__: f for f in (
    empty_unary, large_unary, client_compressed_unary, server_compressed_unary, client_streaming,
    client_compressed_streaming, server_streaming, server_compressed_streaming, ping_pong,
    empty_stream, cancel_after_begin, cancel_after_first_response, timeout_on_sleeping_server,
    timeout_on_sleeping_server_in_flight, custom_metadata, status_code_and_message,
    special_status_message, unimplemented_method, unimplemented_service)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_interop(case, client):
    CASES[case](client)
    assert not client.tap.errors and not client.server.tap.errors, \
        (client.tap.errors, client.server.tap.errors)
    client.path.after_case()
