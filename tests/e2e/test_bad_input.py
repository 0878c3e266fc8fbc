"""Acceptance 9: bad configuration files, oversize headers, random bytes and malformed HTTP/2."""
import random
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from meshlib import SMESH_BIN, curl, free_port, http_request, service, to_yaml

GOOD = service("api", ["127.0.0.1:9001"])


def _bad_files():
    """(id, yaml text, substrings that the error message must contain besides the file name)."""
    unknown = service("api", ["127.0.0.1:9001"])
    unknown["spec"]["endpointz"] = []
    missing = service("api", ["127.0.0.1:9001"])
    del missing["metadata"]["name"]
    bad_addr = service("api", ["127.0.0.1:9001"])
    bad_addr["spec"]["endpoints"][0]["address"] = "300.1.2.3:99999"
    bad_port = service("api", ["127.0.0.1:9001"])
    bad_port["spec"]["endpoints"][0]["address"] = "localhost-no-port"
    return [
        ("invalid_yaml", "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api\nspec: [\n", []),
        ("unknown_field", to_yaml([unknown]), ["endpointz"]),
        ("missing_field", to_yaml([missing]), ["metadata", "name"]),
        ("bad_address", to_yaml([bad_addr]), ["endpoints", "address", "300.1.2.3:99999"]),
        ("bad_address_no_port", to_yaml([bad_port]), ["endpoints", "address"]),
        ("duplicate_name", "---\n" + to_yaml([GOOD, service("api", ["127.0.0.1:9002"])]),
         ["metadata.name", "api", "document 2"]),
    ]


def _check_message(err, f, needles):
    # README (configuration reference): each error line is "FILE: document N (Kind \"name\"): FIELD.PATH: reason"
    assert re.search(re.escape(str(f)) + r": document \d+", err), \
        f"no 'FILE: document N' in the error: {err!r}"
    for n in needles:
        assert n in err, f"error does not name {n!r}: {err!r}"


BAD = _bad_files()


@pytest.mark.timeout(30)
def test_validate_accepts_good_file(run, tmp_path):
    f = tmp_path / "good.yaml"
    f.write_text(to_yaml([GOOD, service("web", ["127.0.0.1:9003"], protocol="http2")]))
    r = run.smesh("validate", "-f", f)
    assert r.returncode == 0, r.stderr
    assert "ok: 2 resources" in r.stdout + r.stderr
    v = run.smesh("--version")
    assert v.returncode == 0 and v.stdout.strip() == "smesh 0.1.0", v


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,text,needles", BAD, ids=[b[0] for b in BAD])
def test_validate_rejects_bad_file(run, tmp_path, case, text, needles):
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    r = run.smesh("validate", "-f", f)
    assert r.returncode != 0, f"validate accepted {case}: {r.stdout} {r.stderr}"
    _check_message(r.stderr, f, needles)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,text,needles", BAD, ids=[b[0] for b in BAD])
def test_proxy_refuses_to_start_with_bad_file(run, tmp_path, case, text, needles):
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    out, adm = free_port(), free_port()
    try:
        r = subprocess.run([SMESH_BIN, "proxy", "--config", str(f), "--outbound", f"127.0.0.1:{out}",
                            "--admin", f"127.0.0.1:{adm}"], capture_output=True, text=True,
                           timeout=15, stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"smesh proxy kept running with the invalid config {case}")
    assert r.returncode != 0
    _check_message(r.stderr, f, needles)


def test_second_proxy_on_the_same_ports_refuses_to_start(run):
    """SO_REUSEPORT (used for the workers' sockets) must not let a second proxy share a port."""
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])])
    for flag, port in (("--outbound", px.outbound), ("--admin", px.admin)):
        other = free_port()
        args = ["--outbound", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{other}"] if flag == "--outbound" \
            else ["--outbound", f"127.0.0.1:{other}", "--admin", f"127.0.0.1:{port}"]
        r = subprocess.run([SMESH_BIN, "proxy", "--config", px.config_path, *args], capture_output=True,
                           text=True, timeout=15, stdin=subprocess.DEVNULL, start_new_session=True)
        assert r.returncode != 0, f"a second proxy started on {flag} {port}"
        assert "already in use" in r.stderr, r.stderr
    _assert_serving(px)


# --------------------------------------------------------------------------- runtime robustness

def _assert_serving(px, be_name="b1"):
    assert px.alive(), f"proxy died: exit {px.proc.poll()}\n{px.stderr()[-3000:]}"
    r = px.get("/still-ok")
    assert r.status == 200 and r.header("x-backend") == be_name, r
    ready = px.admin_get("/ready")
    assert ready.status == 200, ready
    h2 = curl("--http2-prior-knowledge", "--connect-to", f"api:80:127.0.0.1:{px.outbound}",
              "-o", "/dev/null", "-w", "%{http_code}", "http://api/h2-still-ok")
    assert h2.stdout == b"200", h2
    assert "panicked" not in px.stderr(), px.stderr()[-3000:]


def _send_and_drain(port, data, read_timeout=3.0):
    """Send data (ignoring resets), then read until EOF or read_timeout; returns what came back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        s.settimeout(read_timeout)
        end = time.monotonic() + read_timeout
        while time.monotonic() < end:
            try:
                d = s.recv(65536)
            except (socket.timeout, OSError):
                break
            if not d:
                break
            got += d
    finally:
        s.close()
    return got


@pytest.mark.timeout(90)
def test_oversize_header_gets_431(run):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])])
    big = "a" * 100_000
    req = f"GET / HTTP/1.1\r\nHost: api\r\nX-Big: {big}\r\n\r\n".encode()
    # read concurrently with sending: the proxy may answer before reading all of it
    s = socket.create_connection(("127.0.0.1", px.outbound), timeout=10)
    got = []

    def reader():
        buf = b""
        s.settimeout(10)
        try:
            while b"\r\n" not in buf:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
        except OSError:
            pass
        got.append(buf)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        s.sendall(req)
    except OSError:
        pass
    t.join(12)
    s.close()
    assert got and got[0].startswith(b"HTTP/1.1 431"), f"got {got[:1]!r}"
    assert be.stats()["requests"] == 0
    # a header just under the default limit still passes
    r = http_request(px.outbound, "/", headers={"X-Medium": "m" * 30_000})
    assert r.status == 200, r
    # the configured limit is honoured
    px2 = run.proxy([service("api", [be.address])], extra_args=["--max-header-bytes", "16384"], name="smesh-small")
    r = http_request(px2.outbound, "/", headers={"X-Medium": "m" * 20_000})
    assert r.status == 431, r
    _assert_serving(px)


@pytest.mark.timeout(90)
def test_random_bytes_on_every_port_never_crash(run):
    be = run.http_backend("b1")
    app = run.http_backend("app")
    px = run.proxy([service("api", [be.address])], upstreams=["api"], app_port=app.port)
    ports = {"outbound": px.outbound, "inbound": px.inbound, "upstream": px.upstream["api"],
             "admin": px.admin}
    errors = []

    def hammer(name, port, seed):
        rng = random.Random(seed)
        try:
            for size in (1, 7, 24, 1000, 70_000):
                _send_and_drain(port, bytes(rng.getrandbits(8) for _ in range(size)), read_timeout=1.5)
            # half an HTTP request then garbage
            _send_and_drain(port, b"GET / HTTP/1.1\r\nHost: api\r\n"
                            + bytes(rng.getrandbits(8) for _ in range(500)), read_timeout=1.5)
            # a TLS ClientHello-like start
            _send_and_drain(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                            + bytes(rng.getrandbits(8) for _ in range(300)), read_timeout=1.5)
        except Exception as e:  # connect refused = the listener is gone
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=hammer, args=(n, p, i), daemon=True)
               for i, (n, p) in enumerate(ports.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert px.alive(), f"proxy died after random bytes:\n{px.stderr()[-3000:]}"
    _assert_serving(px)
    r = http_request(px.inbound, "/in")
    assert r.status == 200 and r.header("x-backend") == "app", r
    r = http_request(px.upstream["api"], "/up")
    assert r.status == 200 and r.header("x-backend") == "b1", r


def _frame(ftype, flags, stream, payload, length=None):
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.timeout(90)
def test_malformed_http2_frames_never_crash(run):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])], upstreams=["api"])
    settings = _frame(0x4, 0, 0, b"")
    cases = [
        # HEADERS with a garbage HPACK block
        settings + _frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\x0f\x80\x81garbage"),
        # a frame header announcing 16 MB, then a short body
        settings + _frame(0x0, 0, 1, b"xyz", length=0xFFFFFF),
        # SETTINGS with a length that is not a multiple of 6, on stream 3
        _frame(0x4, 0, 3, b"\x00\x01\x02\x03\x04"),
        # WINDOW_UPDATE with increment 0, DATA on stream 0, RST on idle stream
        settings + _frame(0x8, 0, 0, b"\x00\x00\x00\x00") + _frame(0x0, 0, 0, b"data")
        + _frame(0x3, 0, 7, b"\x00\x00\x00\x08"),
        # CONTINUATION without HEADERS, unknown frame type, PING with bad length
        settings + _frame(0x9, 0x4, 1, b"\x82") + _frame(0xEE, 0, 0, b"????") + _frame(0x6, 0, 0, b"1234"),
        # a valid request header block start then random frames
        settings + bytes(random.Random(7).getrandbits(8) for _ in range(5000)),
    ]
    for port in (px.outbound, px.upstream["api"]):
        for i, data in enumerate(cases):
            _send_and_drain(port, PREFACE + data, read_timeout=2)
            assert px.alive(), f"proxy died after malformed h2 case {i} on port {port}:\n{px.stderr()[-3000:]}"
    _assert_serving(px)
