"""Acceptance 1: HTTP/1.1 by Host, absolute-form, --upstream port; h2 prior knowledge; h1 -> h2-only upstream."""
import json
import os
import time

import pytest

from meshlib import curl, http_request, nghttp_codes, service


def _api(run, **kw):
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])], **kw)
    return be, px


@pytest.mark.timeout(60)
def test_http1_outbound_by_host(run):
    be, px = _api(run)
    r = curl("-H", "Host: api", "-D", "-", f"http://127.0.0.1:{px.outbound}/hello?x=1")
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    doc = json.loads(body)
    assert doc["backend"] == "b1"
    assert doc["path"] == "/hello?x=1"
    assert doc["method"] == "GET"
    # the Host "api:<port>" form is accepted too
    r2 = http_request(px.outbound, "/p", host="api:80")
    assert r2.status == 200 and r2.json()["backend"] == "b1", r2
    assert be.stats()["requests"] == 2


@pytest.mark.timeout(60)
def test_http1_outbound_post_body_and_chunked(run):
    be, px = _api(run)
    payload = os.urandom(200_000)
    r = http_request(px.outbound, "/upload", method="POST", body=payload,
                     headers={"content-type": "application/octet-stream"})
    assert r.status == 200, r
    assert r.json()["body_len"] == len(payload)
    # chunked request body
    f = os.path.join(run.workdir, "body.bin")
    with open(f, "wb") as fh:
        fh.write(payload[:50_000])
    p = curl("-H", "Host: api", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             f"http://127.0.0.1:{px.outbound}/chunked")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["body_len"] == 50_000


@pytest.mark.timeout(60)
def test_http1_absolute_form_proxy_request(run):
    be, px = _api(run)
    r = curl("-x", f"http://127.0.0.1:{px.outbound}", "-w", "\n%{http_code}", "http://api/abs/path")
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"200", r.stdout
    doc = json.loads(body)
    assert doc["backend"] == "b1"
    # the backend gets an origin-form request line
    assert doc["path"] == "/abs/path"


@pytest.mark.timeout(60)
def test_http1_through_upstream_port(run):
    be, px = _api(run, upstreams=["api"])
    # whatever the Host says, the --upstream port always reaches its service
    r = curl("-H", "Host: something-else.example", "-w", "\n%{http_code}",
             f"http://127.0.0.1:{px.upstream['api']}/via-upstream")
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"200", r.stdout
    assert json.loads(body)["path"] == "/via-upstream"
    assert be.stats()["requests"] == 1


@pytest.mark.timeout(60)
def test_http2_prior_knowledge_to_http1_backend(run):
    be, px = _api(run)
    r = curl("--http2-prior-knowledge", "--connect-to", f"api:80:127.0.0.1:{px.outbound}",
             "-w", "\n%{http_version} %{http_code}", "http://api/h2")
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"2 200", r.stdout
    doc = json.loads(body)
    assert doc["backend"] == "b1" and doc["path"] == "/h2"
    # several concurrent streams multiplexed on one connection (nghttp uses one connection for
    # all URIs); each takes 0.5 s at the backend, so together they must overlap
    t0 = time.monotonic()
    codes = nghttp_codes(px.outbound, "api", [f"/m{i}?delay=0.5" for i in range(5)])
    elapsed = time.monotonic() - t0
    assert sorted(codes) == [(f"/m{i}?delay=0.5", 200) for i in range(5)], codes
    assert elapsed < 2.2, f"5 multiplexed 0.5 s requests took {elapsed:.2f}s"
    assert be.stats()["requests"] == 6


@pytest.mark.timeout(60)
def test_http1_client_to_h2_only_upstream(run, tmp_path):
    docroot = tmp_path / "www"
    docroot.mkdir()
    content = b"served over h2c by nghttpd\n" * 100
    (docroot / "file.txt").write_bytes(content)
    ng = run.nghttpd(str(docroot))
    # sanity: the upstream really is h2-only (an HTTP/1.1 request to it directly fails)
    direct = curl("--http1.1", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://127.0.0.1:{ng.port}/file.txt")
    assert direct.returncode != 0 or direct.stdout != b"200", "nghttpd answered HTTP/1.1?"

    px = run.proxy([service("h2svc", [ng.address], protocol="http2")], upstreams=["h2svc"])
    r = curl("--http1.1", "-H", "Host: h2svc", "-w", "\n%{http_version} %{http_code}",
             f"http://127.0.0.1:{px.outbound}/file.txt")
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"1.1 200", r.stdout
    assert body == content
    # and through the --upstream port
    r = curl("--http1.1", "-w", "\n%{http_code}", f"http://127.0.0.1:{px.upstream['h2svc']}/file.txt")
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"200" and body == content, r.stdout[-200:]
    # an h2 client to the same upstream works too
    r = curl("--http2-prior-knowledge", "--connect-to", f"h2svc:80:127.0.0.1:{px.outbound}",
             "-w", "\n%{http_version} %{http_code}", "http://h2svc/file.txt")
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"2 200" and body == content, r.stdout[-200:]
    # a missing file: nghttpd's 404 passes through (not a proxy error)
    r = http_request(px.outbound, "/missing.txt", host="h2svc")
    assert r.status == 404 and r.header("smesh-proxy-error") is None, r


@pytest.mark.timeout(60)
def test_unknown_authority_is_404_with_reason_header(run):
    be, px = _api(run)
    r = http_request(px.outbound, "/", host="no-such-service")
    assert r.status == 404, r
    assert r.header("smesh-proxy-error"), r
    assert be.stats()["requests"] == 0


@pytest.mark.timeout(60)
def test_inbound_forwards_to_app(run):
    app = run.http_backend("app")
    be = run.http_backend("b1")
    px = run.proxy([service("api", [be.address])], app_port=app.port)
    r = http_request(px.inbound, "/in", host="api")
    assert r.status == 200, r
    assert r.json()["backend"] == "app"
    assert app.stats()["requests"] == 1 and be.stats()["requests"] == 0


def test_app_protocol_makes_the_inbound_side_speak_what_the_app_speaks(run):
    """An HTTP/1.1-only app behind a proxy: a client speaking h2c to the inbound port gets
    502 when the proxy passes its protocol on, 200 with --app-protocol http."""
    app = run.http_backend("app")
    be = run.http_backend("b1")

    def h2c_status(px):
        r = curl("-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                 "-H", "Host: api", f"http://127.0.0.1:{px.inbound}/h2c")
        return r.stdout

    passthrough = run.proxy([service("api", [be.address])], app_port=app.port, name="smesh-passthrough")
    assert h2c_status(passthrough) == b"502"
    told = run.proxy([service("api", [be.address])], app_port=app.port, name="smesh-told",
                     extra_args=["--app-protocol", "http"])
    assert h2c_status(told) == b"200"
    assert app.stats()["requests"] == 1
