"""Acceptance 3: WebSocket echo round trip and TCP echo (with half-close) through the proxy."""
import os
import socket
import time

import pytest
from websockets.sync.client import connect

from meshlib import metric_sum, service, wait_until


def _ws_roundtrip(sock, host):
    with connect(f"ws://{host}/echo", sock=sock, open_timeout=10, close_timeout=5,
                 max_size=8 * 1024 * 1024) as ws:
        ws.send("hello through smesh")
        assert ws.recv(timeout=10) == "hello through smesh"
        blob = os.urandom(300_000)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        for i in range(20):
            ws.send(f"msg-{i}")
        assert [ws.recv(timeout=10) for _ in range(20)] == [f"msg-{i}" for i in range(20)]


@pytest.mark.timeout(60)
def test_websocket_echo_via_outbound_by_host(run):
    ws = run.ws_echo()
    px = run.proxy([service("ws", [ws.address])])
    sock = socket.create_connection(("127.0.0.1", px.outbound), timeout=10)
    _ws_roundtrip(sock, "ws")


@pytest.mark.timeout(60)
def test_websocket_echo_via_upstream_port(run):
    ws = run.ws_echo()
    px = run.proxy([service("ws", [ws.address])], upstreams=["ws"])
    sock = socket.create_connection(("127.0.0.1", px.upstream["ws"]), timeout=10)
    _ws_roundtrip(sock, f"127.0.0.1:{px.upstream['ws']}")


def _recv_all(sock, deadline_s=10):
    sock.settimeout(deadline_s)
    chunks = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        d = sock.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)
    raise TimeoutError("no EOF from the proxy")


@pytest.mark.timeout(60)
def test_tcp_echo_with_half_close_via_upstream_port(run):
    echo = run.tcp_echo()
    px = run.proxy([service("echo", [echo.address], protocol="tcp", port=7)], upstreams=["echo"])
    port = px.upstream["echo"]

    # full duplex: one small exchange first
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"ping\n")
        got = b""
        s.settimeout(10)
        while len(got) < 5:
            d = s.recv(100)
            assert d, "connection closed before the echo"
            got += d
        assert got == b"ping\n"
        # then a large payload, and half-close: the echo of everything plus the server's
        # EOF marker must still arrive, proving the FIN reached the server and our read side stayed open
        data = os.urandom(1_000_000)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        rest = _recv_all(s)
    finally:
        s.close()
    assert len(rest) == len(data) + len(b"EOF-SEEN\n")
    assert rest == data + b"EOF-SEEN\n"

    def counted():
        m = px.metrics()
        return (metric_sum(m, "smesh_tcp_connections_closed_total", service="echo") >= 1 and m)
    m = wait_until(counted, 5, what="tcp connection closed counter")
    assert metric_sum(m, "smesh_tcp_connections_opened_total", service="echo") == 1
    assert metric_sum(m, "smesh_tcp_read_bytes_total", service="echo") == 5 + len(data)
    assert metric_sum(m, "smesh_tcp_write_bytes_total", service="echo") == len(rest) + 5


@pytest.mark.timeout(60)
def test_tcp_server_speaks_first_via_upstream_port(run):
    """Detection must time out and fall back to TCP so a server-speaks-first protocol works."""
    echo = run.tcp_echo(banner="220 hello from server")
    px = run.proxy([service("banner", [echo.address], protocol=None, port=25)],
                   upstreams=["banner"])
    with socket.create_connection(("127.0.0.1", px.upstream["banner"]), timeout=10) as s:
        s.settimeout(5)
        t0 = time.monotonic()
        got = b""
        while not got.endswith(b"\n"):
            d = s.recv(100)
            assert d, "closed before the banner"
            got += d
        assert got == b"220 hello from server\n"
        assert time.monotonic() - t0 < 4
        s.sendall(b"QUIT\n")
        got = b""
        while len(got) < 5:
            d = s.recv(100)
            assert d
            got += d
        assert got == b"QUIT\n"


@pytest.mark.timeout(60)
def test_tcp_connect_tunnel_via_outbound(run):
    echo = run.tcp_echo()
    px = run.proxy([service("echo", [echo.address], protocol="tcp", port=7)])
    with socket.create_connection(("127.0.0.1", px.outbound), timeout=10) as s:
        s.sendall(b"CONNECT echo:7 HTTP/1.1\r\nHost: echo:7\r\n\r\n")
        s.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(1)
            assert d, f"closed during CONNECT response: {head!r}"
            head += d
        assert head.split(b" ")[1] == b"200", head
        s.sendall(b"tunnelled bytes")
        s.shutdown(socket.SHUT_WR)
        assert _recv_all(s) == b"tunnelled bytesEOF-SEEN\n"
