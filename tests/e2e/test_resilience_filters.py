"""Issue 6, acceptance 10 (filters part): request and response header modifiers, URL
rewrites (hostname, full path, prefix) and redirects behave as configured."""
import pytest

from meshlib import http_request, http_route, service


@pytest.mark.timeout(60)
def test_header_modifiers(run):
    be = run.http_backend("b")
    px = run.proxy([
        service("api", [be.address]),
        http_route("api-route", ["api"], [{
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-set", "value": "configured"}],
                    "add": [{"name": "x-add", "value": "added"}],
                    "remove": ["x-secret"]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "x-served-by", "value": "smesh"}],
                    "remove": ["x-backend"]}},
            ],
        }]),
    ])
    r = http_request(px.outbound, "/h", headers={"x-set": "client", "x-add": "client", "x-secret": "s"})
    assert r.status == 200, r
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert seen["x-set"] == "configured"
    assert seen["x-add"] in ("client, added", "client,added") or "added" in seen["x-add"], seen
    assert "x-secret" not in seen
    assert r.header("x-served-by") == "smesh"
    assert r.header("x-backend") is None


@pytest.mark.timeout(60)
def test_url_rewrites(run):
    be = run.http_backend("b")
    px = run.proxy([
        service("api", [be.address]),
        http_route("api-route", ["api"], [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {
                 "hostname": "backend.internal",
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/full"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {
                 "path": {"type": "ReplaceFullPath", "replaceFullPath": "/replaced"}}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/strip"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]},
        ]),
    ])
    r = http_request(px.outbound, "/old/items/7?q=1")
    assert r.status == 200, r
    assert r.json()["path"] == "/new/items/7?q=1"
    assert r.json()["host"] == "backend.internal"
    r = http_request(px.outbound, "/full?x=2")
    assert r.json()["path"] == "/replaced?x=2" and r.json()["host"] == "api", r
    r = http_request(px.outbound, "/strip/a/b")
    assert r.json()["path"] == "/a/b", r


@pytest.mark.timeout(60)
def test_redirects(run):
    be = run.http_backend("b")
    px = run.proxy([
        service("api", [be.address]),
        http_route("api-route", ["api"], [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/secure"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                 "scheme": "https", "statusCode": 301}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                 "hostname": "new.example", "port": 8080,
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/here"}}}]},
            {"backendRefs": [{"name": "api"}]},
        ]),
    ])
    r = http_request(px.outbound, "/secure/login?next=1", host="api:80")
    assert r.status == 301 and r.header("location") == "https://api/secure/login?next=1", r
    r = http_request(px.outbound, "/moved/x")
    assert r.status == 302 and r.header("location") == "http://new.example:8080/here/x", r
    assert be.stats()["requests"] == 0
    assert http_request(px.outbound, "/other").status == 200
