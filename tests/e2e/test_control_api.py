"""Control plane, acceptance 1 (issue 4): apply / get / delete round trips in YAML and JSON,
validation errors that name file, document and field and change nothing, and the admin token
on every write (CLI and raw HTTP)."""
import json
import os
import stat

import pytest
import yaml

from meshlib import curl, grpc_route, http_route, service, to_yaml


def _state(cp):
    """Everything stored, by kind, as the API returns it (to show that nothing changed)."""
    out = {}
    for kind in ("service", "httproute"):
        r = cp.api("GET", f"/api/v1/resources/{kind}", token=False)
        assert r.status == 200, r
        out[kind] = sorted((json.dumps(i, sort_keys=True) for i in r.json()["items"]))
    return out


def _write(run, name, text):
    path = os.path.join(run.workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _applied_lines(cp_result):
    return sorted(line.strip() for line in cp_result.stdout.splitlines() if line.strip())


@pytest.mark.timeout(60)
def test_apply_get_delete_round_trip_yaml(run):
    cp = run.control()
    # a fresh store gets a generated admin token, readable by the owner only
    mode = stat.S_IMODE(os.stat(cp.token_file).st_mode)
    assert mode == 0o600, oct(mode)
    assert len(cp.token) >= 16

    svc = service("api", ["127.0.0.1:9001", "127.0.0.1:9002"], lb="round_robin")
    route = http_route("api-route", ["api"],
                       [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                         "backendRefs": [{"name": "api"}]}])
    f = _write(run, "mesh.yaml", to_yaml([svc, route]))

    r = cp.cli("apply", "-f", f)
    assert r.returncode == 0, r
    assert _applied_lines(r) == ["HTTPRoute/api-route created", "Service/api created"], r.stdout

    r = cp.cli("apply", "-f", f)
    assert r.returncode == 0, r
    assert _applied_lines(r) == ["HTTPRoute/api-route unchanged", "Service/api unchanged"], r.stdout

    # get in YAML: what was applied comes back
    r = cp.cli("get", "service", "api", "-o", "yaml")
    assert r.returncode == 0, r
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(docs) == 1, r.stdout
    got = docs[0]
    assert got["kind"] == "Service" and got["metadata"]["name"] == "api", got
    assert [e["address"] for e in got["spec"]["endpoints"]] == ["127.0.0.1:9001", "127.0.0.1:9002"], got
    assert got["spec"]["loadBalancer"] == "round_robin", got

    r = cp.cli("get", "httproute", "-o", "yaml")
    assert r.returncode == 0, r
    routes = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["metadata"]["name"] for d in routes] == ["api-route"], r.stdout
    assert routes[0]["spec"]["rules"][0]["matches"][0]["path"]["value"] == "/v1", routes

    # change one field: configured, and get shows the change
    svc2 = service("api", ["127.0.0.1:9001", "127.0.0.1:9003"], lb="round_robin")
    f2 = _write(run, "mesh2.yaml", to_yaml([svc2, route]))
    r = cp.cli("apply", "-f", f2)
    assert r.returncode == 0, r
    assert _applied_lines(r) == ["HTTPRoute/api-route unchanged", "Service/api configured"], r.stdout
    got = yaml.safe_load(cp.cli("get", "service", "api", "-o", "yaml").stdout)
    assert [e["address"] for e in got["spec"]["endpoints"]] == ["127.0.0.1:9001", "127.0.0.1:9003"], got

    # a Service still referenced by a route cannot be deleted (409), and stays
    before = _state(cp)
    r = cp.cli("delete", "service", "api")
    assert r.returncode != 0, r
    assert "409" in r.stderr and "api-route" in r.stderr, r.stderr
    assert _state(cp) == before
    r = cp.api("DELETE", "/api/v1/resources/service/api")
    assert r.status == 409, r

    # delete the route, then the service: both gone
    r = cp.cli("delete", "httproute", "api-route")
    assert r.returncode == 0, r
    r = cp.cli("delete", "service", "api")
    assert r.returncode == 0, r
    r = cp.cli("get", "service", "api")
    assert r.returncode != 0 and "404" in r.stderr, r
    assert cp.api("GET", "/api/v1/resources/httproute/api-route", token=False).status == 404
    assert _state(cp) == {"service": [], "httproute": []}
    # deleting what is not there is a 404, not a success
    r = cp.cli("delete", "service", "api")
    assert r.returncode != 0 and "404" in r.stderr, r


@pytest.mark.timeout(60)
def test_apply_get_delete_round_trip_json(run):
    cp = run.control()
    svc = service("api", ["127.0.0.1:9001"])
    other = service("web", ["127.0.0.1:9005"])
    route = http_route("api-route", ["api"], [{"backendRefs": [{"name": "api"}]}])

    # a .json file through the CLI (one JSON document)
    f = _write(run, "api.json", json.dumps(svc))
    r = cp.cli("apply", "-f", f)
    assert r.returncode == 0, r
    assert _applied_lines(r) == ["Service/api created"], r.stdout

    # a directory with a .json and a .yaml file: one apply
    d = os.path.join(run.workdir, "dir")
    os.mkdir(d)
    _write(run, "dir/route.json", json.dumps(route))
    _write(run, "dir/web.yaml", to_yaml([other]))
    r = cp.cli("apply", "-f", d)
    assert r.returncode == 0, r
    assert _applied_lines(r) == ["HTTPRoute/api-route created", "Service/web created"], r.stdout

    # raw HTTP, JSON request body
    svc3 = service("api", ["127.0.0.1:9001", "127.0.0.1:9004"])
    r = cp.apply_json([("svc.json", json.dumps(svc3))])
    assert r.status == 200, r
    body = r.json()
    assert {(a["kind"], a["name"], a["result"]) for a in body["applied"]} == {("Service", "api", "configured")}, body

    # get -o json, CLI and HTTP
    r = cp.cli("get", "service", "api", "-o", "json")
    assert r.returncode == 0, r
    got = json.loads(r.stdout)
    assert got["metadata"]["name"] == "api"
    assert [e["address"] for e in got["spec"]["endpoints"]] == ["127.0.0.1:9001", "127.0.0.1:9004"], got
    r = cp.cli("get", "service", "-o", "json")
    assert r.returncode == 0, r
    assert sorted(i["metadata"]["name"] for i in json.loads(r.stdout)) == ["api", "web"], r.stdout
    r = cp.cli("get", "httproute", "api-route", "-o", "json")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["spec"]["parentRefs"] == [{"name": "api"}], r.stdout
    r = cp.api("GET", "/api/v1/resources/service/web", token=False)
    assert r.status == 200 and r.json()["spec"]["endpoints"] == [{"address": "127.0.0.1:9005"}], r

    # raw HTTP YAML body with ?file=
    r = cp.api("POST", "/api/v1/apply?file=web.yaml",
               body=to_yaml([service("web", ["127.0.0.1:9006"])]))
    assert r.status == 200, r
    assert cp.api("GET", "/api/v1/resources/service/web", token=False).json()["spec"]["endpoints"] == \
        [{"address": "127.0.0.1:9006"}]

    # delete over HTTP
    # standard input, YAML
    r = cp.cli("apply", "-f", "-", input=to_yaml([service("web", ["127.0.0.1:9007"])]))
    assert r.returncode == 0 and _applied_lines(r) == ["Service/web configured"], r
    assert cp.api("GET", "/api/v1/resources/service/web", token=False).json()["spec"]["endpoints"] == \
        [{"address": "127.0.0.1:9007"}]

    r = cp.api("DELETE", "/api/v1/resources/service/web")
    assert r.status == 200, r
    assert cp.api("GET", "/api/v1/resources/service/web", token=False).status == 404
    r = cp.api("DELETE", "/api/v1/resources/httproute/api-route")
    assert r.status == 200, r
    r = cp.cli("delete", "service", "api")
    assert r.returncode == 0, r
    assert _state(cp) == {"service": [], "httproute": []}


@pytest.mark.timeout(60)
def test_invalid_resources_name_file_document_field_and_change_nothing(run):
    cp = run.control()
    good = [service("api", ["127.0.0.1:9001"]),
            http_route("api-route", ["api"], [{"backendRefs": [{"name": "api"}]}])]
    r = cp.cli("apply", "-f", _write(run, "good.yaml", to_yaml(good)))
    assert r.returncode == 0, r
    before = _state(cp)

    # YAML via the CLI: document 1 is fine (a new Service), document 2 has an unknown field
    bad_doc = service("api", ["127.0.0.1:9009"])
    bad_doc["spec"]["loadBalancr"] = "ewma"
    f = _write(run, "bad-field.yaml", to_yaml([service("web", ["127.0.0.1:9002"]), bad_doc]))
    r = cp.cli("apply", "-f", f)
    assert r.returncode != 0, r
    assert "bad-field.yaml" in r.stderr and "loadBalancr" in r.stderr and "document 2" in r.stderr, r.stderr
    assert "400" in r.stderr, r.stderr
    assert r.stdout.strip() == "", r.stdout
    assert _state(cp) == before

    # JSON via the CLI: an invalid address
    bad = service("api", ["127.0.0.1:notaport"])
    r = cp.cli("apply", "-f", _write(run, "bad-address.json", json.dumps(bad)))
    assert r.returncode != 0, r
    assert "bad-address.json" in r.stderr and "address" in r.stderr and "notaport" in r.stderr, r.stderr
    assert _state(cp) == before

    # standard input (`-f -`): the error names the document and field
    r = cp.cli("apply", "-f", "-", input=to_yaml([service("web", ["127.0.0.1:9002"]), bad_doc]))
    assert r.returncode != 0 and "loadBalancr" in r.stderr and "document 2" in r.stderr, r
    assert _state(cp) == before

    # a directory: one good file and one bad file: all or nothing
    d = os.path.join(run.workdir, "mixed")
    os.mkdir(d)
    _write(run, "mixed/a-good.yaml", to_yaml([service("web", ["127.0.0.1:9002"])]))
    _write(run, "mixed/b-bad.yaml", to_yaml([http_route("web-route", ["nosuch"], [])]))
    r = cp.cli("apply", "-f", d)
    assert r.returncode != 0, r
    assert "b-bad.yaml" in r.stderr and "nosuch" in r.stderr and "parentRefs" in r.stderr, r.stderr
    assert _state(cp) == before

    # raw HTTP, JSON request: a route to a Service that does not exist
    r = cp.apply_json([("ok.yaml", to_yaml([service("web", ["127.0.0.1:9002"])])),
                       ("routes.json", json.dumps(http_route("r", ["api"], [{"backendRefs": [{"name": "ghost"}]}])))])
    assert r.status == 400, r
    text = r.body.decode()
    assert "routes.json" in text and "backendRefs" in text and "ghost" in text, text
    assert _state(cp) == before

    # raw HTTP, YAML body: a missing required field; a document that is not YAML
    nameless = service("x", ["127.0.0.1:9002"])
    del nameless["metadata"]["name"]
    r = cp.api("POST", "/api/v1/apply?file=nameless.yaml", body=to_yaml([nameless]))
    assert r.status == 400, r
    assert "nameless.yaml" in r.body.decode() and "name" in r.body.decode(), r
    r = cp.api("POST", "/api/v1/apply?file=garbage.yaml", body="kind: [unclosed\n")
    assert r.status == 400 and "garbage.yaml" in r.body.decode(), r
    r = cp.api("POST", "/api/v1/apply?file=kind.yaml",
               body="apiVersion: smesh.io/v1\nkind: Servise\nmetadata: {name: a}\nspec: {}\n")
    assert r.status == 400 and "kind.yaml" in r.body.decode() and "Servise" in r.body.decode(), r
    assert _state(cp) == before


@pytest.mark.timeout(60)
def test_grpcroute_apply_get_validation_and_references(run):
    """GRPCRoute through the control plane: applied and read back (`grpcroute`/`grpcroutes`),
    a bad one rejected naming file, document, field and reason, and a Service it refers to
    (as a parent or a backend) cannot be deleted."""
    cp = run.control()
    api, canary = service("api", ["127.0.0.1:9001"]), service("api-canary", ["127.0.0.1:9002"])
    route = grpc_route("api-grpc", ["api"], [
        {"matches": [{"method": {"service": "pkg.v1.Api", "method": "Get"},
                      "headers": [{"name": "x-canary", "value": "yes"}]}],
         "backendRefs": [{"name": "api-canary", "weight": 10}, {"name": "api", "weight": 90}],
         "retry": {"attempts": 2, "codes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
         "filters": [{"type": "FaultInjection",
                      "faultInjection": {"abort": {"grpcStatus": "UNAVAILABLE", "percent": 1}}}]}])
    r = cp.cli("apply", "-f", _write(run, "grpc.yaml", to_yaml([api, canary, route])))
    assert r.returncode == 0, r
    assert "GRPCRoute/api-grpc created" in _applied_lines(r), r.stdout

    for kind in ("grpcroute", "grpcroutes", "GRPCRoute"):
        r = cp.cli("get", kind, "-o", "yaml")
        assert r.returncode == 0, r
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("GRPCRoute", "api-grpc")], r.stdout
        rule = docs[0]["spec"]["rules"][0]
        assert rule["matches"][0]["method"] == {"type": "Exact", "service": "pkg.v1.Api", "method": "Get"}, rule
        assert rule["retry"]["codes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"], rule
        assert rule["filters"][0]["faultInjection"]["abort"]["grpcStatus"] == 14, rule
    assert cp.api("GET", "/api/v1/resources/grpcroute/api-grpc", token=False).status == 200

    # a bad GRPCRoute: rejected, nothing changes
    bad = grpc_route("api-grpc", ["api"], [{"matches": [{"method": {"service": "pkg.v1.Api", "method": "Get!"}}]}])
    r = cp.cli("apply", "-f", _write(run, "grpc-bad.yaml", to_yaml([bad])))
    assert r.returncode != 0 and "400" in r.stderr, r
    assert 'grpc-bad.yaml: document 1 (GRPCRoute "api-grpc"): spec.rules[0].matches[0].method.method: ' \
        'invalid method "Get!"' in r.stderr, r.stderr
    got = yaml.safe_load(cp.cli("get", "grpcroute", "api-grpc", "-o", "yaml").stdout)
    assert got["spec"]["rules"][0]["matches"][0]["method"]["method"] == "Get", got

    # the backend and the parent are both referenced
    for svc in ("api-canary", "api"):
        r = cp.cli("delete", "service", svc)
        assert r.returncode != 0 and "409" in r.stderr and "api-grpc" in r.stderr, r.stderr
    r = cp.cli("delete", "grpcroute", "api-grpc")
    assert r.returncode == 0 and "GRPCRoute/api-grpc deleted" in r.stdout, r
    for svc in ("api-canary", "api"):
        assert cp.cli("delete", "service", svc).returncode == 0


@pytest.mark.timeout(60)
def test_writes_without_the_token_get_401(run):
    cp = run.control()
    r = cp.cli("apply", "-f", _write(run, "seed.yaml", to_yaml([service("api", ["127.0.0.1:9001"])])))
    assert r.returncode == 0, r
    r = cp.cli("kv", "put", "cfg/a", "one")
    assert r.returncode == 0, r
    before = _state(cp)
    f = _write(run, "new.yaml", to_yaml([service("web", ["127.0.0.1:9002"]),
                                         service("api", ["127.0.0.1:9009"])]))

    # CLI: no token at all, and a wrong token
    for tok in (False, "not-the-token"):
        r = cp.cli("apply", "-f", f, token=tok)
        assert r.returncode != 0 and "401" in r.stderr, (tok, r)
        r = cp.cli("delete", "service", "api", token=tok)
        assert r.returncode != 0 and "401" in r.stderr, (tok, r)
        r = cp.cli("kv", "put", "cfg/a", "changed", token=tok)
        assert r.returncode != 0 and "401" in r.stderr, (tok, r)
        r = cp.cli("kv", "delete", "cfg/a", token=tok)
        assert r.returncode != 0 and "401" in r.stderr, (tok, r)
    # SMESH_TOKEN in the environment with a wrong value
    r = cp.cli("apply", "-f", f, token=False, env_extra={"SMESH_TOKEN": "wrong"})
    assert r.returncode != 0 and "401" in r.stderr, r

    # raw HTTP: every write without the header, with a wrong token, with a non-Bearer scheme
    writes = [("POST", "/api/v1/apply?file=new.yaml", open(f).read(), {}),
              ("POST", "/api/v1/apply", json.dumps({"files": [{"name": "n.json", "text": "{}"}]}),
               {"Content-Type": "application/json"}),
              ("DELETE", "/api/v1/resources/service/api", None, {}),
              ("PUT", "/v1/kv/cfg/a", "changed", {}),
              ("PUT", "/v1/kv/cfg/new", "x", {}),
              ("DELETE", "/v1/kv/cfg/a", None, {})]
    for method, path, body, headers in writes:
        for tok, extra in ((False, {}), ("wrong", {}), (False, {"Authorization": f"Basic {cp.token}"}),
                           (False, {"Authorization": f"Bearer {cp.token}x"})):
            r = cp.api(method, path, body=body, token=tok, headers={**headers, **extra})
            assert r.status == 401, (method, path, tok, extra, r)

    # nothing changed; reads stay open on loopback without a token
    assert _state(cp) == before
    r = cp.api("GET", "/v1/kv/cfg/a?raw", token=False)
    assert r.status == 200 and r.body == b"one", r
    assert cp.api("GET", "/v1/kv/cfg/new", token=False).status == 404
    r = cp.cli("get", "service", "api", "-o", "json", token=False)
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["name"] == "api", r
    # and the right token works for the same write
    r = cp.cli("apply", "-f", f)
    assert r.returncode == 0, r


@pytest.mark.timeout(60)
def test_admin_token_file_option(run):
    tok_file = os.path.join(run.workdir, "token")
    with open(tok_file, "w") as fh:
        fh.write("s3cret-token-for-e2e\n")
    cp = run.control(token_file=tok_file)
    f = _write(run, "a.yaml", to_yaml([service("api", ["127.0.0.1:9001"])]))
    r = cp.cli("apply", "-f", f, token="s3cret-token-for-e2e")
    assert r.returncode == 0, r
    r = cp.api("PUT", "/v1/kv/k", body="v", token="s3cret-token-for-e2e")
    assert r.status == 200, r
    r = cp.api("PUT", "/v1/kv/k", body="v", token="s3cret-token-for-e2e-not")
    assert r.status == 401, r
    # a token generated in the store dir is not accepted instead of the given one
    gen = os.path.join(cp.store_dir, "admin-token")
    if os.path.exists(gen):
        with open(gen) as fh:
            other = fh.read().strip()
        if other != "s3cret-token-for-e2e":
            assert cp.api("PUT", "/v1/kv/k", body="v", token=other).status == 401


def test_unknown_rest_paths_get_404_json_and_grpc_stays_grpc(run):
    """Issue 15 item 10: a REST path that does not exist is a 404 with a JSON error, over
    HTTP/1.1 and HTTP/2; a gRPC call to an unknown method still gets grpc-status 12."""
    cp = run.control()
    for path in ("/nope", "/api/v1/nope", "/api/v2/resources/service"):
        r = cp.api("GET", path, token=False)
        assert r.status == 404, r
        assert r.header("content-type") == "application/json", r
        body = r.json()
        assert body["error"] == "not found" and body["path"] == path, body
        assert "/api/v1/" in body["message"], body
    h2 = curl("--http2-prior-knowledge", "-i", f"http://127.0.0.1:{cp.port}/nope")
    assert h2.returncode == 0, h2.stderr
    head = h2.stdout.decode()
    assert head.startswith("HTTP/2 404"), head
    assert "grpc-status" not in head, head
    grpc = curl("--http2-prior-knowledge", "-i", "-X", "POST", "-H", "content-type: application/grpc",
                "-H", "te: trailers", "--data-binary", "", f"http://127.0.0.1:{cp.port}/smesh.v1.Nope/Call")
    assert grpc.returncode == 0, grpc.stderr
    head = grpc.stdout.decode()
    assert head.startswith("HTTP/2 200") and "grpc-status: 12" in head, head
    # the real API is unchanged
    assert cp.api("GET", "/api/v1/resources/service", token=False).status == 200


def test_cli_get_tables_kinds_and_tips(run, tmp_path):
    """Issue 15 item 8: lists are tables by default (-o table|wide|yaml|json), an empty list
    says so, an unknown kind lists every kind, `apply FILE` without -f gets a tip."""
    cp = run.control()
    empty = cp.cli("get", "services")
    assert empty.returncode == 0 and empty.stdout == "", empty
    assert "No resources found." in empty.stderr, empty.stderr

    f = _write(run, "mesh.yaml", to_yaml([
        service("api", [{"address": "127.0.0.1:9001", "labels": {"version": "v1"}}]),
        http_route("api-route", ["api"], [{"backendRefs": [{"name": "api"}]}])]))
    assert cp.cli("apply", "-f", f).returncode == 0
    table = cp.cli("get", "services")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SUMMARY"], table.stdout
    assert lines[1].split()[:2] == ["api", "Service"] and "static-endpoints=1" in lines[1], table.stdout
    routes = cp.cli("get", "routes", "-o", "wide")
    assert routes.returncode == 0 and "parents=api rules=1" in routes.stdout, routes
    # one named resource is still its YAML; lists still come as yaml/json when asked
    one = cp.cli("get", "service", "api")
    assert yaml.safe_load(one.stdout)["metadata"]["name"] == "api", one.stdout
    assert json.loads(cp.cli("get", "services", "-o", "json").stdout)[0]["metadata"]["name"] == "api"

    unknown = cp.cli("get", "widgets")
    assert unknown.returncode != 0
    for kind in ("service", "httproute", "authorizationpolicy", "endpoints SERVICE", "proxies", "certificates"):
        assert kind in unknown.stderr, unknown.stderr
    bad_output = cp.cli("get", "services", "-o", "xml")
    assert bad_output.returncode != 0 and "table, wide, yaml or json" in bad_output.stderr, bad_output
    tip = cp.cli("apply", f)
    assert tip.returncode != 0 and f"smesh apply -f {f}" in tip.stderr, tip.stderr
    # not a terminal: no ANSI colours in usage errors, errors or logs
    usage = cp.cli("get")
    assert usage.returncode != 0 and "<KIND>" in usage.stderr, usage.stderr
    for text in (usage.stderr, unknown.stderr, cp.stderr()):
        assert "\x1b[" not in text, text


def test_cli_connection_flags_work_before_the_subcommand(run):
    """Issue 15 item 8: `smesh --control URL get ...` as kubectl users type it; a flag there
    beats SMESH_CONTROL, as a flag after the subcommand does."""
    import subprocess
    from meshlib import SMESH_BIN
    cp = run.control()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}
    env["XDG_STATE_HOME"] = os.path.join(run.workdir, "state")  # no demo found by accident
    env["SMESH_CONTROL"] = "http://127.0.0.1:1"
    r = subprocess.run([SMESH_BIN, "--control", cp.url, "--token-file", cp.token_file,
                        "kv", "put", "k", "v"], capture_output=True, text=True, timeout=30,
                       env=env, cwd=run.workdir, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([SMESH_BIN, "--control", cp.url, "get", "services", "-o", "json"],
                       capture_output=True, text=True, timeout=30, env=env, cwd=run.workdir,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and json.loads(r.stdout) == [], (r.stdout, r.stderr)
    assert cp.api("GET", "/v1/kv/k?raw", token=False).body == b"v"
