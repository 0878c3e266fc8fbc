"""Acceptance 2: gRPC through the proxy with a real grpcio client and server (stubs generated at test time)."""
import os
import queue
import time

import grpc
import pytest

from meshlib import curl, service

AUTH = "grpcsvc"


@pytest.fixture
def gmesh(run, grpc_server):
    px = run.proxy([service(AUTH, [grpc_server.address], protocol="grpc", port=50051)],
                   upstreams=[AUTH])
    return px


def _channel(port, authority=AUTH):
    opts = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20)]
    if authority:
        opts.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)


@pytest.fixture
def stub(gmesh, grpc_stubs):
    _, pb2_grpc = grpc_stubs
    ch = _channel(gmesh.outbound)
    try:
        yield pb2_grpc.EchoStub(ch)
    finally:
        ch.close()


@pytest.mark.timeout(60)
def test_grpc_unary_with_metadata_and_large_message(stub, grpc_stubs):
    pb2, _ = grpc_stubs
    payload = os.urandom(2 * 1024 * 1024)  # beyond the default h2 windows: flow control must work
    resp, call = stub.Unary.with_call(pb2.Msg(text="hi", seq=7, payload=payload), timeout=20,
                                      metadata=(("x-client", "abc"),))
    assert resp.text == "hi" and resp.seq == 7 and resp.payload == payload
    assert call.code() == grpc.StatusCode.OK
    assert ("x-echo-initial", "abc") in tuple(call.initial_metadata())
    assert ("x-echo-trailer", "unary-abc") in tuple(call.trailing_metadata())


@pytest.mark.timeout(60)
def test_grpc_unary_through_upstream_port(run, gmesh, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    ch = _channel(gmesh.upstream[AUTH], authority=None)  # authority 127.0.0.1:port: port decides
    try:
        resp = pb2_grpc.EchoStub(ch).Unary(pb2.Msg(text="via-upstream"), timeout=10)
        assert resp.text == "via-upstream"
    finally:
        ch.close()


@pytest.mark.timeout(60)
def test_grpc_server_streaming(stub, grpc_stubs):
    pb2, _ = grpc_stubs
    got = list(stub.ServerStream(pb2.Msg(text="s", count=300), timeout=20))
    assert [m.seq for m in got] == list(range(300))
    assert got[-1].text == "s-299"


@pytest.mark.timeout(60)
def test_grpc_client_streaming(stub, grpc_stubs):
    pb2, _ = grpc_stubs
    msgs = (pb2.Msg(seq=i, payload=b"x" * 1000) for i in range(100))
    resp = stub.ClientStream(msgs, timeout=20)
    assert resp.seq == 100 and resp.count == 100_000


@pytest.mark.timeout(60)
def test_grpc_bidi_streaming_interleaved(stub, grpc_stubs):
    """Each message is sent only after the echo of the previous one arrived: full duplex, no buffering."""
    pb2, _ = grpc_stubs
    q = queue.Queue()
    n = 50

    def requests():
        for _ in range(n):
            m = q.get(timeout=10)
            if m is None:
                return
            yield m

    q.put(pb2.Msg(text="m0", seq=0))
    call = stub.Bidi(requests(), timeout=30)
    seen = []
    try:
        for resp in call:
            seen.append((resp.seq, resp.text))
            nxt = resp.seq + 1
            q.put(pb2.Msg(text=f"m{nxt}", seq=nxt) if nxt < n else None)
    finally:
        q.put(None)
    assert seen == [(i, f"echo:m{i}") for i in range(n)]
    assert call.code() == grpc.StatusCode.OK


@pytest.mark.timeout(60)
def test_grpc_error_status_and_trailers_intact(stub, grpc_stubs):
    pb2, _ = grpc_stubs
    with pytest.raises(grpc.RpcError) as ei:
        stub.Fail(pb2.Msg(text="ünïcödé 100% ok"), timeout=10)
    e = ei.value
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
    assert e.details() == "nope: ünïcödé 100% ok"
    md = dict(e.trailing_metadata())
    assert md.get("x-error-detail") == "precondition-failed", md
    assert md.get("x-error-bin") == b"\x00\x01\x02\xff", md


@pytest.mark.timeout(60)
def test_grpc_expired_deadline_gives_deadline_exceeded(stub, grpc_stubs, grpc_server):
    pb2, _ = grpc_stubs
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        stub.Slow(pb2.Msg(sleep_seconds=5), timeout=0.5)
    elapsed = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
    assert elapsed < 2.5, elapsed
    # the expiry reaches the server: its call is cancelled well before the 5 s sleep ends
    assert grpc_server.state["cancelled"].wait(3), "server call not cancelled after the deadline"
    # and the proxy keeps serving gRPC afterwards
    assert stub.Unary(pb2.Msg(text="after"), timeout=10).text == "after"


@pytest.mark.timeout(60)
def test_grpc_timeout_header_enforced_by_proxy(run, grpc_stubs):
    """A gRPC request with grpc-timeout: 300m to a backend that ignores it (a plain HTTP/1 server
    that sleeps 5 s): the proxy itself must answer grpc-status 4 (DEADLINE_EXCEEDED) in bounded time."""
    pb2, _ = grpc_stubs
    be = run.http_backend("sleepy")
    px = run.proxy([service("sleepy", [be.address], protocol="http")])
    msg = pb2.Msg(text="x").SerializeToString()
    body = os.path.join(run.workdir, "req.bin")
    with open(body, "wb") as f:
        f.write(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    t0 = time.monotonic()
    r = curl("--http2-prior-knowledge", "--connect-to", f"sleepy:80:127.0.0.1:{px.outbound}",
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", "grpc-timeout: 300m", "--data-binary", f"@{body}",
             "-D", "-", "-o", "/dev/null", "http://sleepy/e2e.Echo/Slow?delay=5", timeout=15)
    elapsed = time.monotonic() - t0
    out = r.stdout.decode("latin-1").lower()
    assert r.returncode == 0, r.stderr
    assert "grpc-status: 4" in out, out
    assert elapsed < 3, f"answer took {elapsed:.2f}s for a 300 ms grpc-timeout"
