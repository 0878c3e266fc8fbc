"""Acceptance 8: SIGTERM with a slow request in flight."""
import errno
import signal
import socket
import threading
import time

import pytest

from meshlib import http_request, service, wait_until


def _connect_refused(port):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except ConnectionRefusedError:
        return True
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    finally:
        s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_request_and_exits_0(run, sig):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])], upstreams=["api"],
                   extra_args=["--drain-timeout", "20s"])
    result = {}

    def slow():
        try:
            result["r"] = http_request(px.outbound, "/slow?delay=3", timeout=15)
        except Exception as e:
            result["e"] = e
        result["done_at"] = time.monotonic()

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    wait_until(lambda: be.stats()["inflight"] >= 1, 5, what="slow request at the backend")
    px.proc.signal(sig)
    sent_at = time.monotonic()

    # listeners close: new connections are refused while the slow request is still running
    wait_until(lambda: _connect_refused(px.outbound), 2, what="outbound port refusing connections")
    refused_at = time.monotonic()
    assert "done_at" not in result, "the slow request ended before the listener closed"
    assert _connect_refused(px.upstream["api"]), "upstream port still accepts after the signal"
    assert px.alive(), "the proxy exited before its in-flight request finished"

    t.join(15)
    assert "e" not in result, f"in-flight request failed: {result.get('e')!r}"
    r = result["r"]
    assert r.status == 200, r
    assert r.json()["path"] == "/slow?delay=3"
    rc = px.proc.wait(timeout=10)
    assert rc == 0, f"exit code {rc}; stderr:\n{px.stderr()[-2000:]}"
    assert refused_at - sent_at < 2
    assert "panicked" not in px.stderr()


@pytest.mark.timeout(60)
def test_sigterm_idle_exits_promptly(run):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])], extra_args=["--drain-timeout", "30s"])
    # an idle keep-alive connection must not hold the drain for the full timeout
    s = socket.create_connection(("127.0.0.1", px.outbound), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        px.proc.signal(signal.SIGTERM)
        rc = px.proc.wait(timeout=15)
        assert rc == 0
        assert time.monotonic() - t0 < 10, "idle connection held the drain"
    finally:
        s.close()
