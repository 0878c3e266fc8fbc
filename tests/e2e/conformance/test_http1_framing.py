"""HTTP/1 framing and request smuggling on the outbound port (RFC 9110, RFC 9112).

Every case writes raw bytes to the proxy's outbound port and checks both sides:
  * what the client got back (status, headers, how many responses, whether the proxy closed),
  * exactly what the upstream received: the upstream here is `RecordingUpstream`, a raw-socket
    server in a thread of this process that keeps every byte of every connection, parses the
    requests itself (strictly: CRLF line endings, no obs-fold, Content-Length digits only,
    chunked with hex sizes and CRLFs) and answers each complete request with a small fixed 200
    (`ok METHOD TARGET`). Bytes it cannot parse are kept as "unparsed" and fail the checks.

The cases marked NEW describe behaviour being implemented now in crates/proxy (duplicate and
missing Host, absolute-form Host rewrite, 400 for malformed chunked bodies, h2c upgrade
stripping, --header-read-timeout); they fail against a binary without it.
"""
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from websockets.sync.client import connect as ws_connect

from meshlib import LOOPBACK, metric_sum, service, wait_until

CRLF = b"\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An HTTP/2 SETTINGS frame (empty) to follow the preface.
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n"


# --------------------------------------------------------------------------- recording upstream

class Malformed(Exception):
    pass


@dataclass
class UpRequest:
    conn: int
    seq: int
    method: str
    target: str
    version: str
    headers: list          # [(lowercase name, value)] in order, values as received (latin-1)
    body: bytes
    raw: bytes
    problems: list = field(default_factory=list)

    def values(self, name):
        return [v for n, v in self.headers if n == name.lower()]

    def __repr__(self):
        return (f"UpRequest(conn={self.conn}, {self.method} {self.target} {self.version}, "
                f"headers={self.headers}, body={self.body[:80]!r}, problems={self.problems})")


@dataclass
class UpConn:
    idx: int
    raw: bytearray = field(default_factory=bytearray)
    parsed: int = 0            # bytes of raw consumed by complete requests
    upgraded: bool = False     # answered 101: from then on bytes are only recorded
    errors: list = field(default_factory=list)
    closed: bool = False

    def unparsed(self):
        return bytes(self.raw[self.parsed:])


def _is_token(b):
    return bool(b) and all(c > 0x20 and c < 0x7F and c not in b'"(),/:;<=>?@[\\]{}' for c in b)


def _parse_chunked(buf, pos):
    """(body, end offset) of a strict chunked body starting at pos; None: incomplete."""
    body = bytearray()
    for _ in range(100_000):  # bounded: one iteration per chunk
        eol = buf.find(CRLF, pos)
        if eol < 0:
            if b"\n" in buf[pos:] or b"\r" in buf[pos:-1]:
                raise Malformed(f"chunk line without CRLF: {bytes(buf[pos:pos + 40])!r}")
            return None
        line = bytes(buf[pos:eol])
        if b"\n" in line or b"\r" in line:
            raise Malformed(f"bare CR/LF in chunk line {line!r}")
        size_text, _, _ext = line.partition(b";")
        if not size_text or len(size_text) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Malformed(f"bad chunk size line {line[:60]!r}")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            for _ in range(1000):  # trailer section, then the empty line
                eol = buf.find(CRLF, pos)
                if eol < 0:
                    return None
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if not line:
                    return bytes(body), pos
                if b"\n" in line or b"\r" in line or b":" not in line:
                    raise Malformed(f"bad trailer line {line!r}")
            raise Malformed("too many trailer lines")
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != CRLF:
            raise Malformed(f"chunk data not followed by CRLF: {bytes(buf[pos + size:pos + size + 2])!r}")
        pos += size + 2
    raise Malformed("too many chunks")


def parse_request(buf, conn, seq):
    """(UpRequest, bytes used) for the first complete request in buf; None: incomplete."""
    end = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (end < 0 or lf < end):
        raise Malformed(f"head ends with bare LF: {bytes(buf[:200])!r}")
    if end < 0:
        if len(buf) > 1 << 20:
            raise Malformed("head over 1 MB")
        return None
    head = bytes(buf[:end])
    problems = []
    lines = head.split(CRLF)
    for line in lines:
        if b"\n" in line or b"\r" in line:
            problems.append(f"bare CR/LF in head line {line!r}")
        if b"\x00" in line:
            problems.append(f"NUL in head line {line!r}")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not _is_token(parts[0]):
        problems.append(f"bad request line {lines[0]!r}")
        parts = (parts + [b"", b"", b""])[:3]
    method, target, version = (p.decode("latin-1") for p in parts)
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            problems.append(f"obs-fold line {line!r}")
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _is_token(name):
            problems.append(f"bad header line {line!r}")
            continue
        headers.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
    req = UpRequest(conn, seq, method, target, version, headers, b"", b"", problems)
    te, cl = req.values("transfer-encoding"), req.values("content-length")
    pos = end + 4
    if te and cl:
        problems.append(f"both Transfer-Encoding {te} and Content-Length {cl}")
    if te:
        codings = [c.strip().lower() for c in ",".join(te).split(",")]
        if codings[-1] != "chunked" or version != "HTTP/1.1":
            raise Malformed(f"unframeable Transfer-Encoding {te} on {version}")
        got = _parse_chunked(buf, pos)
        if got is None:
            return None
        req.body, pos = got
    elif cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise Malformed(f"bad Content-Length {cl}")
        if len(cl) > 1:
            problems.append(f"repeated Content-Length {cl}")
        n = int(cl[0])
        if len(buf) < pos + n:
            return None
        req.body = bytes(buf[pos:pos + n])
        pos += n
    req.raw = bytes(buf[:pos])
    return req, pos


class RecordingUpstream:
    """A raw-socket HTTP/1.1 upstream on 127.0.0.1 that records everything (see module doc).

    upgrade_101: a request with an Upgrade header gets `101 Switching Protocols` (echoing the
    header), and everything after it on that connection is only recorded, never parsed.
    """

    def __init__(self, upgrade_101=False):
        self.upgrade_101 = upgrade_101
        self.lock = threading.Lock()
        self.conns = []
        self.requests = []
        self.last_rx = time.monotonic()
        self._stop = threading.Event()
        self._socks = []
        self._threads = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                s, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s.settimeout(0.1)
            with self.lock:
                rec = UpConn(len(self.conns))
                self.conns.append(rec)
                self._socks.append(s)
            t = threading.Thread(target=self._serve, args=(s, rec), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, s, rec):
        buf = bytearray()
        try:
            while not self._stop.is_set():
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not d:
                    return
                with self.lock:
                    rec.raw += d
                    self.last_rx = time.monotonic()
                if rec.upgraded:
                    continue
                buf += d
                while buf and not rec.upgraded:
                    with self.lock:
                        seq = len(self.requests)
                    try:
                        got = parse_request(buf, rec.idx, seq)
                    except Malformed as e:
                        with self.lock:
                            rec.errors.append(str(e))
                        return  # close: the framing is lost
                    if got is None:
                        break
                    req, used = got
                    del buf[:used]
                    with self.lock:
                        rec.parsed += used
                        self.requests.append(req)
                    if self.upgrade_101 and req.values("upgrade"):
                        rec.upgraded = True
                        s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                  b"Upgrade: " + req.values("upgrade")[0].encode("latin-1") + b"\r\n\r\n")
                        break
                    body = f"ok {req.method} {req.target}\n".encode("latin-1")
                    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              b"Content-Length: %d\r\nX-Upstream-Seq: %d\r\n\r\n" % (len(body), req.seq) + body)
                    if any("close" in v.lower() for v in req.values("connection")):
                        return
        except OSError as e:
            with self.lock:
                rec.errors.append(f"{type(e).__name__}: {e}")
        finally:
            rec.closed = True
            try:
                s.close()
            except OSError:
                pass

    def settle(self, quiet=0.2, timeout=5):
        """Wait until nothing has arrived for `quiet` seconds, counted from the last byte or
        from now, whichever is later (bounded by timeout)."""
        since = time.monotonic()
        wait_until(lambda: time.monotonic() - max(self.last_rx, since) >= quiet, timeout,
                   what="upstream quiet")

    def all_raw(self):
        with self.lock:
            return b"".join(bytes(c.raw) for c in self.conns)

    def snapshot(self):
        with self.lock:
            return list(self.requests), [(c.idx, c.unparsed(), list(c.errors)) for c in self.conns]

    def close(self):
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(2)


# --------------------------------------------------------------------------- raw client

@dataclass
class RawResponse:
    version: str
    status: int
    headers: list
    body: bytes

    def header(self, name):
        vals = [v for n, v in self.headers if n == name.lower()]
        return vals[-1] if vals else None

    def __repr__(self):
        return f"RawResponse({self.version} {self.status}, {self.headers}, body={self.body[:120]!r})"


class RawClient:
    """One TCP connection to the proxy; reads responses with a bounded deadline."""

    def __init__(self, port, timeout=5):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self, deadline):
        """Read more into buf; False at EOF/reset or when the deadline passed."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            return False
        try:
            d = self.sock.recv(65536)
        except OSError:
            d = b""
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def read_response(self, timeout=5, head_request=False):
        """The next response, or None if the connection ended (or the deadline passed) first."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                if self.buf:
                    raise AssertionError(f"incomplete response head: {bytes(self.buf[:300])!r}")
                return None
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).split(CRLF)
        del self.buf[:end + 4]
        version, status = lines[0].split(b" ")[0].decode(), int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            n, _, v = line.partition(b":")
            headers.append((n.decode("latin-1").strip().lower(), v.strip().decode("latin-1")))
        resp = RawResponse(version, status, headers, b"")
        if head_request or status in (101, 204, 304) or 100 <= status < 200:
            return resp
        if (resp.header("transfer-encoding") or "").lower().endswith("chunked"):
            body = bytearray()
            for _ in range(10_000):
                while b"\r\n" not in self.buf:
                    if not self._fill(deadline):
                        raise AssertionError(f"truncated chunked response {resp!r}")
                i = self.buf.index(b"\r\n")
                size = int(bytes(self.buf[:i]).split(b";")[0], 16)
                while len(self.buf) < i + 2 + size + 2:
                    if not self._fill(deadline):
                        raise AssertionError(f"truncated chunked response {resp!r}")
                body += self.buf[i + 2:i + 2 + size]
                del self.buf[:i + 2 + size + 2]
                if size == 0:
                    break
            resp.body = bytes(body)
        elif resp.header("content-length") is not None:
            n = int(resp.header("content-length"))
            while len(self.buf) < n:
                if not self._fill(deadline):
                    raise AssertionError(f"truncated response body {resp!r} {bytes(self.buf)!r}")
            resp.body = bytes(self.buf[:n])
            del self.buf[:n]
        else:
            while self._fill(deadline):
                pass
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def wait_closed(self, timeout):
        """True if the proxy closed the connection (EOF/reset) within timeout; extra bytes
        that arrive meanwhile stay in buf."""
        deadline = time.monotonic() + timeout
        while not self.eof and self._fill(deadline):
            pass
        return self.eof

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def exchange(port, data, responses=1, linger=0.3, timeout=5):
    """Send data on a new connection; read up to `responses` responses, then wait `linger`
    seconds for anything else. Returns (responses, closed, extra bytes)."""
    c = RawClient(port)
    try:
        c.send(data)
        got = []
        for _ in range(responses):
            r = c.read_response(timeout)
            if r is None:
                break
            got.append(r)
        closed = c.wait_closed(linger if got else timeout)
        return got, closed, bytes(c.buf)
    finally:
        c.close()


def req(head_lines, body=b"", method=b"POST", target=b"/f", version=b"HTTP/1.1", eol=CRLF):
    """A raw request: request line, header lines (bytes, Host not added), empty line, body."""
    return (method + b" " + target + b" " + version + eol + b"".join(h + eol for h in head_lines)
            + eol + body)


# --------------------------------------------------------------------------- fixtures and checks

@pytest.fixture
def upstream():
    up = RecordingUpstream()
    try:
        yield up
    finally:
        up.close()


def _proxy(run, up, **kw):
    return run.proxy([service("api", [up.address])], **kw)


def assert_rejected(px, up, got, closed, extra, status=400, must_close=True, error_header=None):
    """Exactly one `status` response; nothing else; nothing (not a byte) reached the upstream."""
    assert [r.status for r in got] == [status], f"expected one {status}, got {got} extra={extra!r}"
    assert extra == b"", f"bytes after the {status}: {extra!r}"
    if must_close:
        assert closed, f"the proxy kept the connection open after {got[0]!r}"
    if error_header is not None:
        assert got[0].header("smesh-proxy-error") == error_header, got[0]
    up.settle()
    assert up.all_raw() == b"", f"the upstream received {up.all_raw()!r}"
    assert px.alive(), px.stderr()[-3000:]


def assert_forwarded_once(px, up, got, closed, extra, method, target, body, must_close=False):
    """One 200 from the upstream; the upstream saw exactly one well-formed request with this
    body, never both Transfer-Encoding and Content-Length, and no unparsed byte."""
    assert [r.status for r in got] == [200], f"expected one 200, got {got} extra={extra!r}"
    assert got[0].body == f"ok {method} {target}\n".encode(), got[0]
    assert extra == b"", f"bytes after the response (a second, smuggled response?): {extra!r}"
    if must_close:
        assert closed, "the proxy kept the connection open after a request with ambiguous framing"
    up.settle()
    reqs, conns = up.snapshot()
    assert len(reqs) == 1, f"upstream saw {len(reqs)} requests: {reqs}"
    r = reqs[0]
    assert (r.method, r.target, r.version) == (method, target, "HTTP/1.1"), r
    assert r.problems == [], r
    assert r.body == body, r
    assert not (r.values("transfer-encoding") and r.values("content-length")), r
    assert len(r.values("content-length")) <= 1, r
    assert r.values("host") == ["api"], r
    for idx, unparsed, errors in conns:
        assert unparsed == b"" and errors == [], f"upstream conn {idx}: unparsed {unparsed!r} errors {errors}"
    assert b"smuggled" not in up.all_raw()
    assert px.alive(), px.stderr()[-3000:]


def _hdr(*lines):
    return [b"Host: api", *lines]


# --------------------------------------------------------------------------- CL / TE

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# (id, request bytes, expectation, forwarded body): "reject" = exactly one 400, then the
# connection closes and the upstream gets not a byte (a request appended after it must not
# become a request of its own); "forward" = exactly one 200 and exactly one clean request
# upstream with that body; "either" = one of the two; "either_close" = one of the two and the
# connection closes after the response (RFC 9112 6.1 for CL+TE).
FRAMING = [
    # CL.TE: a front end using CL would forward "0\r\n\r\nG" and leave "ET /smuggled..." behind;
    # TE wins (CL removed) or 400, and the connection closes after (RFC 9112 6.1).
    ("cl_te_both_cl_first", req(_hdr(b"Content-Length: 6", b"Transfer-Encoding: chunked"),
                                b"0\r\n\r\n" + SMUGGLED), "either_close", b""),
    ("cl_te_both_te_first", req(_hdr(b"Transfer-Encoding: chunked", b"Content-Length: 3"),
                                b"8\r\nSMUGGLED\r\n0\r\n\r\n" + SMUGGLED), "either_close", b"SMUGGLED"),
    ("cl_te_both_cl_zero", req(_hdr(b"Content-Length: 0", b"Transfer-Encoding: chunked"),
                               CHUNKED_HELLO + SMUGGLED), "either_close", b"hello"),
    # chunked must be the final coding, else 400 (RFC 9112 6.3 item 4)
    ("te_chunked_identity", req(_hdr(b"Transfer-Encoding: chunked, identity"), CHUNKED_HELLO), "reject", None),
    ("te_two_lines_identity_last", req(_hdr(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"),
                                       CHUNKED_HELLO), "reject", None),
    ("te_xchunked", req(_hdr(b"Transfer-Encoding: xchunked"), CHUNKED_HELLO), "reject", None),
    ("te_xchunked_with_cl", req(_hdr(b"Transfer-Encoding: xchunked", b"Content-Length: 5"), b"hello"),
     "reject", None),
    ("te_identity_with_cl", req(_hdr(b"Content-Length: 5", b"Transfer-Encoding: identity"), b"hello"),
     "reject", None),
    # whitespace between field name and colon: 400 (RFC 9112 5.1)
    ("te_space_before_colon", req(_hdr(b"Transfer-Encoding : chunked", b"Content-Length: 5"),
                                  b"0\r\n\r\n"), "reject", None),
    ("cl_space_before_colon", req(_hdr(b"Content-Length : 5"), b"hello"), "reject", None),
    # OWS around the value is allowed; codings are case-insensitive
    ("te_leading_tab", req(_hdr(b"Transfer-Encoding:\tchunked"), CHUNKED_HELLO), "forward", b"hello"),
    ("te_trailing_ws", req(_hdr(b"Transfer-Encoding: chunked \t"), CHUNKED_HELLO), "forward", b"hello"),
    ("te_uppercase", req(_hdr(b"Transfer-Encoding: CHUNKED"), CHUNKED_HELLO), "forward", b"hello"),
    # a control character is not OWS
    ("te_vertical_tab", req(_hdr(b"Transfer-Encoding:\x0bchunked", b"Content-Length: 5"), b"hello"),
     "reject", None),
    ("te_obs_fold", req(_hdr(b"Transfer-Encoding:", b" chunked", b"Content-Length: 5"), CHUNKED_HELLO),
     "either_close", b"hello"),
    # Content-Length
    ("cl_two_different", req(_hdr(b"Content-Length: 5", b"Content-Length: 6"), b"hello!"), "reject", None),
    ("cl_two_same", req(_hdr(b"Content-Length: 5", b"Content-Length: 5"), b"hello"), "either", b"hello"),
    ("cl_list_different", req(_hdr(b"Content-Length: 5, 6"), b"hello!"), "reject", None),
    ("cl_plus_sign", req(_hdr(b"Content-Length: +5"), b"hello"), "reject", None),
    ("cl_minus_sign", req(_hdr(b"Content-Length: -5"), b"hello"), "reject", None),
    ("cl_hex", req(_hdr(b"Content-Length: 0x5"), b"hello"), "reject", None),
    ("cl_trailing_junk", req(_hdr(b"Content-Length: 5a"), b"hello"), "reject", None),
    ("cl_inner_space", req(_hdr(b"Content-Length: 1 0"), b"helloworld"), "reject", None),
    ("cl_empty", req(_hdr(b"Content-Length: "), b""), "reject", None),
    ("cl_huge", req(_hdr(b"Content-Length: 99999999999999999999999"), b"hello"), "reject", None),
    # HTTP/1.0 has no chunked: the framing is faulty (RFC 9112 6.1)
    ("te_http10", req(_hdr(b"Transfer-Encoding: chunked"), CHUNKED_HELLO, version=b"HTTP/1.0"), "reject", None),
    ("te_http10_with_cl", req(_hdr(b"Transfer-Encoding: chunked", b"Content-Length: 5"), b"hello",
                              version=b"HTTP/1.0"), "reject", None),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,data,expect,body", FRAMING, ids=[c[0] for c in FRAMING])
def test_content_length_and_transfer_encoding(run, upstream, case, data, expect, body):
    px = _proxy(run, upstream)
    if expect == "reject":
        data += SMUGGLED  # must never become a request of its own
    got, closed, extra = exchange(px.outbound, data, linger={"forward": 0.2, "either": 0.5}.get(expect, 2))
    if expect == "reject" or (expect != "forward" and got and got[0].status == 400):
        assert_rejected(px, upstream, got, closed, extra)
    else:
        assert_forwarded_once(px, upstream, got, closed, extra, "POST", "/f", body,
                              must_close=expect == "either_close")


# --------------------------------------------------------------------------- the head itself

HEAD_CASES = [
    # obs-fold: 400, or unfolded (RFC 9112 5.2) - never forwarded folded
    ("obs_fold_space", req(_hdr(b"X-Folded: a", b" b"), method=b"GET"), "reject_or_unfold"),
    ("obs_fold_tab", req(_hdr(b"X-Folded: a", b"\tb"), method=b"GET"), "reject_or_unfold"),
    ("obs_fold_first_header", req([b"Host: api", b" X-Evil: 1"], method=b"GET"), "reject_or_unfold"),
    # bare LF line endings: 400 or read as CRLF (RFC 9112 2.2); forwarded with CRLF only
    ("bare_lf_everywhere", req(_hdr(b"X-A: 1"), method=b"GET", eol=b"\n"), "either"),
    ("bare_lf_one_line", b"GET /f HTTP/1.1\r\nHost: api\nX-A: 1\r\n\r\n", "either"),
    # CR, NUL and other controls in a field value: 400 (RFC 9110 5.5)
    ("cr_in_value", req(_hdr(b"X-A: a\rb"), method=b"GET"), "reject"),
    ("cr_as_line_end", req(_hdr(b"X-A: 1\rX-B: 2"), method=b"GET"), "reject"),
    ("nul_in_value", req(_hdr(b"X-A: a\x00b"), method=b"GET"), "reject"),
    ("nul_in_name", req(_hdr(b"X-\x00A: 1"), method=b"GET"), "reject"),
    ("space_in_name", req(_hdr(b"X A: 1"), method=b"GET"), "reject"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,data,expect", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_malformed_heads(run, upstream, case, data, expect):
    px = _proxy(run, upstream)
    if expect == "reject":
        data += SMUGGLED
    got, closed, extra = exchange(px.outbound, data, linger=2 if expect == "reject" else 0.5)
    if expect == "reject" or (got and got[0].status == 400):
        assert_rejected(px, upstream, got, closed, extra)
        return
    assert_forwarded_once(px, upstream, got, closed, extra, "GET", "/f", b"")
    r = upstream.snapshot()[0][0]
    if case.startswith("obs_fold"):
        # unfolded: the continuation became part of the value (SP-joined), not a header line
        assert not r.values("x-evil"), r
        folded = r.values("x-folded") or r.values("host")
        assert folded and all("\n" not in v and "\r" not in v for v in folded), r
    else:
        assert r.values("x-a") == ["1"], r


# --------------------------------------------------------------------------- Host

@pytest.mark.timeout(30)
@pytest.mark.parametrize("second", [b"Host: evil", b"Host: api", b"host: api:80"],
                         ids=["different", "same", "same_with_port"])
def test_duplicate_host_is_400(run, upstream, second):
    """NEW: more than one Host field line -> 400 (RFC 9112 3.2)."""
    px = _proxy(run, upstream)
    got, closed, extra = exchange(px.outbound, req([b"Host: api", second], method=b"GET"))
    assert_rejected(px, upstream, got, closed, extra, must_close=False)


@pytest.mark.timeout(30)
def test_missing_host_on_http11_is_400(run, upstream):
    """NEW: an HTTP/1.1 request without Host -> 400 `bad request` (RFC 9112 3.2)."""
    px = _proxy(run, upstream)
    got, closed, extra = exchange(px.outbound, req([b"X-A: 1"], method=b"GET"))
    assert_rejected(px, upstream, got, closed, extra, must_close=False, error_header="bad request")


@pytest.mark.timeout(30)
def test_absolute_form_overrides_a_conflicting_host(run, upstream):
    """NEW: `GET http://api/x` with `Host: other`: routed to api, and api receives `Host: api`
    (RFC 9112 3.2.2: the proxy replaces Host with the target URI's authority)."""
    other = RecordingUpstream()
    try:
        px = run.proxy([service("api", [upstream.address]), service("other", [other.address])])
        got, closed, extra = exchange(
            px.outbound, b"GET http://api/abs/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        assert [r.status for r in got] == [200], got
        assert got[0].body == b"ok GET /abs/x?q=1\n", got[0]
        upstream.settle()
        reqs, _ = upstream.snapshot()
        assert len(reqs) == 1, reqs
        r = reqs[0]
        assert (r.method, r.target, r.version) == ("GET", "/abs/x?q=1", "HTTP/1.1"), r
        assert r.problems == [], r
        assert r.values("host") == ["api"], f"upstream received Host {r.values('host')}"
        assert other.all_raw() == b"", other.all_raw()
    finally:
        other.close()


# --------------------------------------------------------------------------- malformed chunked bodies

BAD_CHUNKED = [
    ("size_overflow", b"1000000000000000A\r\nhello\r\n0\r\n\r\n"),
    ("size_0x_prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size_5g", b"5g\r\nhello\r\n0\r\n\r\n"),
    ("size_negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size_empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("size_inner_space", b"5 5\r\nhello\r\n0\r\n\r\n"),
    ("size_line_bare_lf", b"5\nhello\r\n0\r\n\r\n"),
    ("data_not_followed_by_crlf", b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("data_followed_by_bare_lf", b"5\r\nhello\n0\r\n\r\n"),
    ("last_chunk_bare_lf", b"5\r\nhello\r\n0\n\r\n"),
    ("extension_bare_lf", b"5;name=value\nhello\r\n0\r\n\r\n"),
    ("extension_over_16k", b"5;x=" + b"a" * 20_000 + b"\r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,body", BAD_CHUNKED, ids=[c[0] for c in BAD_CHUNKED])
def test_malformed_chunked_body_is_400(run, upstream, case, body):
    """NEW: a request body whose chunked framing is broken is the client's fault: 400 `bad
    request` (counted in smesh_proxy_errors_total), not 502; the upstream never gets a
    complete request."""
    px = _proxy(run, upstream)
    # whatever follows the broken body must not be read as a request: the framing is lost
    data = req(_hdr(b"Transfer-Encoding: chunked"), body, target=b"/chunk") + SMUGGLED
    got, closed, extra = exchange(px.outbound, data, linger=2)
    assert [r.status for r in got] == [400], f"got {got}"
    assert got[0].header("smesh-proxy-error") == "bad request", got[0]
    assert extra == b"", f"bytes after the 400: {extra!r}"
    assert closed, "the connection stayed open after a request body with broken framing"
    upstream.settle()
    reqs, _ = upstream.snapshot()
    assert reqs == [], f"the upstream got a complete request: {reqs}"
    assert b"smuggled" not in upstream.all_raw()
    m = wait_until(lambda: (metric_sum(px.metrics(), "smesh_proxy_errors_total", reason="bad request") >= 1
                            and px.metrics()), 3, what="bad request counted")
    assert metric_sum(m, "smesh_proxy_errors_total", direction="outbound", reason="bad request") == 1
    assert metric_sum(m, "smesh_proxy_errors_total", reason="upstream failed") == 0
    assert metric_sum(m, "smesh_proxy_errors_total", reason="connect failed") == 0
    assert px.alive(), px.stderr()[-3000:]


# --------------------------------------------------------------------------- h2c upgrade

H2C_UPGRADE = (b"GET /h2c HTTP/1.1\r\nHost: api\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n")


def _assert_no_h2c(reqs):
    for r in reqs:
        assert not r.values("upgrade"), f"the upstream received Upgrade: {r}"
        assert not r.values("http2-settings"), f"the upstream received HTTP2-Settings: {r}"
        assert all("upgrade" not in v.lower() and "http2-settings" not in v.lower()
                   for v in r.values("connection")), r


@pytest.mark.timeout(30)
def test_h2c_upgrade_is_not_forwarded(run):
    """NEW: h2c upgrade smuggling. Against an upstream that switches protocols whenever it
    sees Upgrade, the proxy must not pass `Upgrade: h2c` / HTTP2-Settings on: the client gets
    a plain HTTP/1.1 200, and what it sends afterwards (an HTTP/2 preface) never reaches the
    upstream unparsed."""
    up = RecordingUpstream(upgrade_101=True)
    try:
        px = _proxy(run, up)
        c = RawClient(px.outbound)
        try:
            c.send(H2C_UPGRADE)
            r = c.read_response()
            assert r is not None, "no response to the h2c upgrade request"
            assert (r.version, r.status) == ("HTTP/1.1", 200), f"got {r!r} (101: the proxy tunnelled h2c)"
            assert r.body == b"ok GET /h2c\n", r
            assert not r.header("upgrade"), r
            # what an h2c client sends next: the preface and SETTINGS
            c.send(H2_PREFACE + H2_SETTINGS)
            c.wait_closed(2)
        finally:
            c.close()
        # the same, pipelined with an ordinary request behind it: both parsed, both answered
        c = RawClient(px.outbound)
        try:
            c.send(H2C_UPGRADE + b"GET /after HTTP/1.1\r\nHost: api\r\n\r\n")
            first, second = c.read_response(), c.read_response()
        finally:
            c.close()
        assert first is not None and (first.status, first.body) == (200, b"ok GET /h2c\n"), first
        assert second is not None and (second.status, second.body) == (200, b"ok GET /after\n"), second
        up.settle()
        reqs, conns = up.snapshot()
        assert [(q.method, q.target) for q in reqs] == [("GET", "/h2c"), ("GET", "/h2c"), ("GET", "/after")], reqs
        _assert_no_h2c(reqs)
        assert all(q.problems == [] for q in reqs), reqs
        raw = up.all_raw()
        assert b"PRI * HTTP/2.0" not in raw and H2_PREFACE[:8] not in raw, raw
        for idx, unparsed, errors in conns:
            assert unparsed == b"" and errors == [], f"upstream conn {idx}: unparsed {unparsed!r} {errors}"
        assert px.alive(), px.stderr()[-3000:]
    finally:
        up.close()


@pytest.mark.timeout(30)
def test_websocket_upgrade_still_works(run):
    ws = run.ws_echo()
    px = run.proxy([service("ws", [ws.address])])
    sock = socket.create_connection((LOOPBACK, px.outbound), timeout=10)
    with ws_connect("ws://ws/echo", sock=sock, open_timeout=10, close_timeout=5) as conn:
        conn.send("hello framing")
        assert conn.recv(timeout=10) == "hello framing"
        blob = os.urandom(70_000)
        conn.send(blob)
        assert conn.recv(timeout=10) == blob


@pytest.mark.timeout(30)
def test_websocket_upgrade_reaches_a_recording_upstream(run):
    """The upgrade headers of a WebSocket handshake still reach the upstream, and after its
    101 the connection is a tunnel both ways."""
    up = RecordingUpstream(upgrade_101=True)
    try:
        px = _proxy(run, up)
        c = RawClient(px.outbound)
        try:
            c.send(b"GET /ws HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            r = c.read_response()
            assert r is not None and r.status == 101, r
            assert (r.header("upgrade") or "").lower() == "websocket", r
            c.send(b"tunnelled-bytes")
            wait_until(lambda: up.all_raw().endswith(b"tunnelled-bytes"), 5, what="tunnelled bytes upstream")
        finally:
            c.close()
        reqs, _ = up.snapshot()
        assert len(reqs) == 1 and reqs[0].values("upgrade") == ["websocket"], reqs
        assert reqs[0].values("sec-websocket-key") == ["dGhlIHNhbXBsZSBub25jZQ=="], reqs
    finally:
        up.close()


# --------------------------------------------------------------------------- pipelining

@pytest.mark.timeout(30)
def test_pipelined_requests_in_one_write(run, upstream):
    px = _proxy(run, upstream)
    data = (b"GET /p1 HTTP/1.1\r\nHost: api\r\n\r\n"
            b"POST /p2 HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /p3 HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    got, closed, extra = exchange(px.outbound, data, responses=3)
    assert [(r.status, r.body) for r in got] == [
        (200, b"ok GET /p1\n"), (200, b"ok POST /p2\n"), (200, b"ok POST /p3\n")], got
    assert extra == b"" and not closed, (extra, closed)
    upstream.settle()
    reqs, conns = upstream.snapshot()
    assert [(r.method, r.target, r.body) for r in reqs] == [
        ("GET", "/p1", b""), ("POST", "/p2", b"hello"), ("POST", "/p3", b"abcde")], reqs
    for r in reqs:
        assert r.problems == [] and r.values("host") == ["api"], r
        assert not (r.values("transfer-encoding") and r.values("content-length")), r
    for idx, unparsed, errors in conns:
        assert unparsed == b"" and errors == [], f"upstream conn {idx}: unparsed {unparsed!r} {errors}"


# --------------------------------------------------------------------------- slowloris

@pytest.mark.timeout(40)
def test_slow_request_head_is_closed_after_header_read_timeout(run, upstream):
    """NEW: --header-read-timeout 2s closes a client that trickles its head (one byte per
    0.5 s) after ~2 s, long before --idle-timeout (60 s); normal clients are served meanwhile."""
    px = _proxy(run, upstream, extra_args=["--header-read-timeout", "2s"])
    statuses, stop = [], threading.Event()

    def normal_client():
        for i in range(100):  # bounded; stops when the trickle ends
            if stop.is_set():
                return
            try:
                got, _, _ = exchange(px.outbound, b"GET /normal/%d HTTP/1.1\r\nHost: api\r\n\r\n" % i,
                                     responses=1, linger=0)
                statuses.append(got[0].status if got else 0)
            except OSError as e:
                statuses.append(f"{type(e).__name__}: {e}")
            stop.wait(0.2)

    t = threading.Thread(target=normal_client, daemon=True)
    t.start()
    # a keep-alive client that sits idle between requests for longer than the header timeout:
    # idleness is --idle-timeout's business, not --header-read-timeout's
    ka = RawClient(px.outbound)
    try:
        ka.send(b"GET /ka/1 HTTP/1.1\r\nHost: api\r\n\r\n")
        r = ka.read_response()
        assert r is not None and r.status == 200, r
        ka_idle_from = time.monotonic()
        # a head sent in pieces but complete within the timeout is served
        c = RawClient(px.outbound)
        try:
            for piece in (b"GET /pieces HTTP/1.1\r\n", b"Host: api\r\n", b"X-A: 1\r\n", b"\r\n"):
                c.send(piece)
                time.sleep(0.3)
            r = c.read_response()
            assert r is not None and (r.status, r.body) == (200, b"ok GET /pieces\n"), r
        finally:
            c.close()
        # slowloris: request line at once (so protocol detection is done), then a byte per 0.5 s
        c = RawClient(px.outbound)
        t0 = time.monotonic()
        closed_after = None
        try:
            c.send(b"GET /slow HTTP/1.1\r\nHost: api\r\n")
            for b in b"X-Slow: " + b"a" * 40:  # 24 s worth: longer than the deadline below
                if not c.send(bytes([b])) or c.wait_closed(0.5):
                    closed_after = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > 8:
                    break
            leftover = bytes(c.buf)
        finally:
            c.close()
        time.sleep(max(0.0, ka_idle_from + 3.0 - time.monotonic()))
        ka.send(b"GET /ka/2 HTTP/1.1\r\nHost: api\r\n\r\n")
        r = ka.read_response()
        assert r is not None and (r.status, r.body) == (200, b"ok GET /ka/2\n"), \
            f"a keep-alive connection idle for 3 s was not served: {r}"
    finally:
        ka.close()
        stop.set()
        t.join(10)
    print(f"slow client closed after {closed_after}s; {len(statuses)} normal requests meanwhile")
    assert closed_after is not None, "the trickling client was still connected after 8 s"
    assert 1.5 <= closed_after <= 4.0, f"closed after {closed_after:.2f}s (timeout 2s)"
    assert leftover == b"" or leftover.startswith(b"HTTP/1.1 408"), leftover
    assert statuses and all(s == 200 for s in statuses), statuses
    upstream.settle()
    reqs, _ = upstream.snapshot()
    assert not [r for r in reqs if r.target == "/slow"], reqs
    assert b"X-Slow" not in upstream.all_raw()
    assert len([r for r in reqs if r.target.startswith("/normal/")]) == len(statuses), (len(reqs), statuses)
    assert px.alive(), px.stderr()[-3000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,first,rest", [
    # the first bytes arrive after protocol detection's 1 s
    ("slow_start", b"GE", b"T /raw HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Internal\r\n"
                          b"X-Internal: secret\r\n\r\n"),
    # a method detection does not know
    ("extension_method", b"PURGE /x HTTP/1.1\r\nHost: api\r\nConnection: X-Internal\r\n"
                         b"X-Internal: 1\r\n\r\n", b""),
])
def test_upstream_port_of_an_http_service_never_splices_unparsed(run, upstream, case, first, rest):
    """An `--upstream` port of a service declared `protocol: http` serves HTTP whatever
    detection made of the first bytes: never a raw splice that would pass a Connection-listed
    header (and skip routes, filters and method/path authorization)."""
    px = run.proxy([service("api", [upstream.address])], upstreams=["api"])
    c = RawClient(px.upstream["api"])
    try:
        c.send(first)
        if rest:
            # past the 1 s detection timeout: poll until the proxy has given up detecting
            wait_until(lambda: metric_sum(px.metrics(), "smesh_connections_active") >= 1, 5)
            time.sleep(1.3)  # the defect needs bytes *after* the timeout; this is the input, not a sync
            c.send(rest)
        r = c.read_response()
    finally:
        c.close()
    assert r is not None, "no HTTP response: the connection was spliced or closed"
    upstream.settle()
    reqs, conns = upstream.snapshot()
    raw = upstream.all_raw()
    assert b"X-Internal" not in raw and b"x-internal" not in raw, raw
    for idx, unparsed, errors in conns:
        assert unparsed == b"", f"upstream conn {idx} got unparsed bytes {unparsed!r}"


@pytest.mark.timeout(60)
def test_extension_method_on_the_outbound_port_is_proxied(run, upstream):
    """A method detection does not list (PURGE) is still HTTP: proxied with hop-by-hop
    headers stripped, not closed silently as undeliverable opaque TCP."""
    px = _proxy(run, upstream)
    got, _, _ = exchange(px.outbound, b"PURGE /cache HTTP/1.1\r\nHost: api\r\nConnection: X-Internal\r\n"
                                      b"X-Internal: 1\r\n\r\n")
    assert [r.status for r in got] == [200], got
    upstream.settle()
    reqs, _ = upstream.snapshot()
    assert [(q.method, q.target) for q in reqs] == [("PURGE", "/cache")], reqs
    assert b"x-internal" not in upstream.all_raw().lower(), upstream.all_raw()


def _route_allowing(up, upgrades):
    return [service("api", [up.address]),
            {"apiVersion": "smesh.io/v1", "kind": "HTTPRoute", "metadata": {"name": "api-upgrades"},
             "spec": {"parentRefs": [{"name": "api"}], "rules": [{"upgrades": upgrades}]}}]


@pytest.mark.timeout(60)
def test_other_upgrades_tunnel_only_when_the_route_lists_them(run):
    """Issue 13 item 1: besides WebSocket, an upgrade protocol is tunnelled only by explicit
    opt-in on the route (`upgrades`); without it the Upgrade is stripped and the request is
    plain HTTP/1.1."""
    head = (b"GET /custom HTTP/1.1\r\nHost: api\r\nUpgrade: x-custom/1\r\nConnection: Upgrade\r\n\r\n")
    up = RecordingUpstream(upgrade_101=True)
    try:
        px = run.proxy(_route_allowing(up, ["x-custom/1"]))
        c = RawClient(px.outbound)
        try:
            c.send(head)
            r = c.read_response()
            assert r is not None and r.status == 101, r
            c.send(b"custom-protocol-bytes")
            wait_until(lambda: up.all_raw().endswith(b"custom-protocol-bytes"), 5, what="tunnelled bytes")
        finally:
            c.close()
        reqs, _ = up.snapshot()
        assert len(reqs) == 1 and reqs[0].values("upgrade") == ["x-custom/1"], reqs
    finally:
        up.close()
    # the same request without the opt-in: no Upgrade reaches the upstream, a plain 200
    up = RecordingUpstream(upgrade_101=True)
    try:
        px = run.proxy(_route_allowing(up, ["other/2"]), name="smesh-no-opt-in")
        got, _, _ = exchange(px.outbound, head)
        assert [r.status for r in got] == [200], got
        up.settle()
        reqs, _ = up.snapshot()
        assert len(reqs) == 1 and reqs[0].values("upgrade") == [], reqs
    finally:
        up.close()


@pytest.mark.timeout(30)
def test_h2c_in_route_upgrades_is_rejected(run, tmp_path):
    f = tmp_path / "h2c.yaml"
    import yaml
    f.write_text(yaml.safe_dump_all(_route_allowing(RecordingUpstreamAddress(), ["h2c"]), sort_keys=False))
    r = run.smesh("validate", "-f", f)
    assert r.returncode != 0, r
    assert "spec.rules[0].upgrades[0]" in r.stderr and "h2c cannot be tunnelled" in r.stderr, r.stderr


class RecordingUpstreamAddress:
    address = "127.0.0.1:9"


@pytest.mark.timeout(30)
def test_chunked_get_body_reaches_the_upstream(run, upstream):
    """A GET may carry a body (RFC 9110 9.3.1): framed chunked by the client, it is forwarded
    with its body, not as a bodiless GET with the body left behind."""
    px = _proxy(run, upstream)
    data = req(_hdr(b"Transfer-Encoding: chunked"), CHUNKED_HELLO, method=b"GET")
    got, closed, extra = exchange(px.outbound, data)
    assert_forwarded_once(px, upstream, got, closed, extra, "GET", "/f", b"hello")
