"""Issue 5: the control plane's own API over TLS (`smesh control --tls`) and authenticated
proxy streams: a proxy spends its join token for a certificate, then opens its Discovery
stream with that certificate; the certificate, not what the proxy claims, decides which
service's endpoint it may register; a stream ends when its certificate expires and the
proxy comes back with the renewed one."""
import http.client
import json
import os
import socket
import ssl
import subprocess
import threading

import pytest

from meshlib import LOOPBACK, SMESH_BIN, ControlPlane, wait_until

TD = "example.org"


class TlsControlPlane(ControlPlane):
    """`smesh control --tls`: clients trust the mesh root it writes to DIR/ca.pem."""

    def __init__(self, runner, **kw):
        kw.setdefault("extra_args", ["--tls", "--trust-domain", TD])
        super().__init__(runner, **kw)

    @property
    def url(self):
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def ca(self):
        return os.path.join(self.store_dir, "ca.pem")

    def context(self):
        return ssl.create_default_context(cafile=self.ca)

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"smesh control exited with {self.proc.poll()}:\n{self.proc.tail()}")
            if not os.path.exists(self.ca):
                return False
            try:
                return self.api("GET", "/healthz", token=False, timeout=1).status == 200
            except (OSError, ssl.SSLError):
                return False
        wait_until(ready, timeout, what="smesh control https /healthz")

    def cli(self, *args, env_extra=None, **kw):
        env = {"SMESH_CONTROL_CA": self.ca}
        env.update(env_extra or {})
        return super().cli(*args, env_extra=env, **kw)

    def api(self, method, path, body=None, token=True, headers=None, timeout=10):
        h = dict(headers or {})
        if token is True:
            h["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPSConnection(LOOPBACK, self.port, timeout=timeout, context=self.context())
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read())
        finally:
            conn.close()


class Reply:
    def __init__(self, status, body):
        self.status = status
        self.body = body

    def json(self):
        return json.loads(self.body)


def token_file(run, cp, service):
    r = cp.cli("token", "create", "--service", service)
    assert r.returncode == 0, r.stderr
    path = os.path.join(run.workdir, f"{service}-{os.urandom(3).hex()}.token")
    with open(path, "w") as f:
        f.write(r.stdout.strip() + "\n")
    return path


def tls_proxy(run, cp, service, tok=None, wait_ready=True, app=True):
    extra = ["--control-ca", cp.ca]
    if tok:
        extra += ["--token-file", tok]
    port = run.http_backend(f"{service}-app").port if app else None
    return run.mesh_proxy([cp.url], service=service, app_port=port, name=f"{service}-proxy",
                          extra_args=extra, wait_ready=wait_ready)


def endpoints(cp, service):
    r = cp.api("GET", f"/api/v1/endpoints/{service}", token=False)
    if r.status == 404:
        return []
    assert r.status == 200, r.body
    return r.json()["endpoints"]


def test_api_is_served_over_tls_only_to_clients_that_trust_it(run):
    cp = TlsControlPlane(run).start()
    ok = cp.cli("get", "proxies")
    assert ok.returncode == 0, ok.stderr

    # Without a CA to check the control plane with, the CLI says what is missing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}
    env.update(SMESH_CONTROL=cp.url, SMESH_TOKEN_FILE=cp.token_file)
    bare = subprocess.run([SMESH_BIN, "get", "proxies"], capture_output=True, text=True, timeout=30,
                          env=env, cwd=run.workdir, stdin=subprocess.DEVNULL)
    assert bare.returncode != 0
    assert "--control-ca" in bare.stderr, bare.stderr

    # A CA that did not sign the control plane's certificate: the handshake fails.
    other = os.path.join(run.workdir, "other-ca.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", os.path.join(run.workdir, "other-ca.key"), "-out", other,
                    "-days", "1", "-subj", "/CN=other"], check=True, capture_output=True, timeout=30)
    wrong = cp.cli("get", "proxies", env_extra={"SMESH_CONTROL_CA": other})
    assert wrong.returncode != 0
    assert "certificate" in wrong.stderr.lower(), wrong.stderr

    # Plaintext HTTP to the TLS port gets no answer.
    with socket.create_connection((LOOPBACK, cp.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except OSError:
            pass
    assert b"HTTP/1.1 200" not in reply and b"ok" not in reply

    # openssl sees TLS 1.3 and the control plane's SPIFFE identity, verified by ca.pem.
    s_client = subprocess.run(["openssl", "s_client", "-connect", f"{LOOPBACK}:{cp.port}", "-CAfile", cp.ca,
                               "-verify_return_error", "-brief"], input="", capture_output=True, text=True,
                              timeout=30)
    out = s_client.stdout + s_client.stderr
    assert "TLSv1.3" in out, out
    assert "Verification: OK" in out, out
    cert = subprocess.run(["openssl", "s_client", "-connect", f"{LOOPBACK}:{cp.port}", "-showcerts"], input="",
                          capture_output=True, text=True, timeout=30).stdout
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=cert, capture_output=True, text=True,
                          timeout=30).stdout
    assert f"URI:spiffe://{TD}/control" in text, text


def test_proxy_streams_need_a_mesh_certificate_for_their_service(run, smesh_stubs):
    import grpc
    pb2, pb2_grpc = smesh_stubs
    cp = TlsControlPlane(run).start()

    api = tls_proxy(run, cp, "api", tok=token_file(run, cp, "api"))
    [ep] = endpoints(cp, "api")
    assert ep["identity"] == f"spiffe://{TD}/service/api", ep

    # No token, so no certificate: refused, says why, registers nothing, never configured.
    rogue = tls_proxy(run, cp, "rogue", wait_ready=False)
    wait_until(lambda: "requires the proxy's mesh certificate" in rogue.stderr(), 20,
               what="the refusal in the proxy's log")
    assert not rogue.is_ready()
    assert endpoints(cp, "rogue") == []

    # A real gRPC client: a certificate for `web`, made from our own key and CSR.
    key = os.path.join(run.workdir, "web.key")
    csr = subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                          "-nodes", "-keyout", key, "-subj", "/CN=web"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    with open(cp.ca, "rb") as f:
        root = f.read()
    options = [("grpc.ssl_target_name_override", "localhost")]
    anonymous = grpc.secure_channel(f"{LOOPBACK}:{cp.port}", grpc.ssl_channel_credentials(root), options)
    with open(token_file(run, cp, "web")) as f:
        web_token = f.read().strip()
    issued = pb2_grpc.IdentityStub(anonymous).Certify(
        pb2.CertifyRequest(service="web", csr_pem=csr, join_token=web_token), timeout=10)
    with open(key, "rb") as f:
        web_key = f.read()
    web = grpc.secure_channel(f"{LOOPBACK}:{cp.port}",
                              grpc.ssl_channel_credentials(root, web_key, issued.cert_chain_pem.encode()), options)

    def open_stream(channel, hello):
        done = threading.Event()

        def messages():
            yield pb2.ProxyMessage(hello=hello)
            done.wait(30)
        stream = pb2_grpc.DiscoveryStub(channel).Stream(messages(), timeout=20)
        return stream, done

    def first_reply(channel, hello):
        stream, done = open_stream(channel, hello)
        try:
            return next(stream)
        finally:
            done.set()
            stream.cancel()

    claim_api = pb2.Hello(proxy_id="spoof-1", version="test", endpoint=pb2.Endpoint(
        service="api", address="127.0.0.1:9", identity=f"spiffe://{TD}/service/api"))
    for channel, code in ((anonymous, grpc.StatusCode.UNAUTHENTICATED), (web, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as refused:
            first_reply(channel, claim_api)
        assert refused.value.code() == code, refused.value
    assert [e["address"] for e in endpoints(cp, "api")] == [api.inbound_address]
    anonymous.close()

    # Its own service: accepted, configured, and the identity recorded is the certificate's,
    # whatever the Hello claims.
    stream, done = open_stream(web, pb2.Hello(proxy_id="web-1", version="test", endpoint=pb2.Endpoint(
        service="web", address="127.0.0.1:9", identity=f"spiffe://{TD}/service/api")))
    try:
        snapshot = next(stream)
        assert snapshot.version > 0
        wait_until(lambda: len(endpoints(cp, "web")) == 1, 10, what="web's endpoint")
        assert endpoints(cp, "web")[0]["identity"] == f"spiffe://{TD}/service/web"
    finally:
        done.set()
        stream.cancel()
        web.close()


def test_stream_ends_with_its_certificate_and_the_proxy_comes_back(run):
    cp = TlsControlPlane(run).start()
    mesh = "apiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {certificateTtl: 6s}\n"
    r = cp.cli("apply", "-f", "-", input=mesh)
    assert r.returncode == 0, r.stderr
    api = tls_proxy(run, cp, "api", tok=token_file(run, cp, "api"))

    # Certificates live 6 s: within 20 s the first stream has ended and the proxy has come
    # back (more than once) with renewed ones, and its endpoint never left.
    def reconnected():
        assert len(endpoints(cp, "api")) == 1
        return api.stderr().count("connected to the control plane") >= 3
    wait_until(reconnected, 30, interval=0.5, what="the proxy reconnecting with renewed certificates")
    assert "stream ended with its certificate" in api.stderr()

    # And it still gets configuration.
    svc = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: fresh}\nspec:\n  ports: [{port: 80}]\n"
    r = cp.cli("apply", "-f", "-", input=svc)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "name: fresh" in api.config_text(), 15, what="the new Service at the proxy")
