"""Issue 5: the CA root can be rotated with the new root trusted alongside the old one.
`smesh ca rotate` makes a new signing root and pushes the two-root trust bundle to every
proxy; proxies renew onto the new root; `smesh ca retire` drops the old root once no valid
certificate needs it. Under continuous mTLS load (strict mode, 10 s certificates) not one
request fails, and the control plane's own TLS follows the rotation."""
import os
import threading
import time

import pytest

from meshlib import KeepAliveClient, metric_sum, wait_until
from test_identity_control import TlsControlPlane, token_file, tls_proxy

MESH = """apiVersion: smesh.io/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {mtls: strict, certificateTtl: 10s}
---
apiVersion: smesh.io/v1
kind: Service
metadata: {name: api}
spec: {ports: [{port: 80, protocol: http}]}
"""


class Load:
    """Requests from web's app side to api, one after another, until stopped (at most 120 s)."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failed = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        c = KeepAliveClient(self.port, host="api")
        deadline = time.monotonic() + 120
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    r = c.get("/rotation")
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(r.status)
                except OSError as e:
                    self.failed.append(repr(e))
                    c.close()
                    c = KeepAliveClient(self.port, host="api")
        finally:
            c.close()

    def finish(self):
        self.stop.set()
        self.thread.join(15)


def roots_in(path):
    with open(path) as f:
        return f.read().count("BEGIN CERTIFICATE")


def ca_show(cp):
    r = cp.cli("ca", "show")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.timeout(150)
def test_root_rotation_under_mtls_load_fails_no_request(run):
    cp = TlsControlPlane(run).start()
    r = cp.cli("apply", "-f", "-", input=MESH)
    assert r.returncode == 0, r.stderr
    api = tls_proxy(run, cp, "api", tok=token_file(run, cp, "api"))
    web = tls_proxy(run, cp, "web", tok=token_file(run, cp, "web"))
    wait_until(lambda: "api" in web.config_text() and "spiffe://" in web.config_text(), 15,
               what="web's configuration with api's identity")
    before = ca_show(cp)
    assert "also trusted" not in before, before
    assert roots_in(cp.ca) == 1

    load = Load(web.outbound)
    try:
        wait_until(lambda: load.ok > 50, 20, what="load flowing")
        rotated = cp.cli("ca", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert rotated.stdout.count("also trusted") == 1, rotated.stdout
        old_root = before.split("signing root")[1].split()[0]
        assert old_root in rotated.stdout.split("also trusted")[1], rotated.stdout
        # Both roots reach the CLI's bundle file and every proxy.
        wait_until(lambda: roots_in(cp.ca) == 2, 10, what="ca.pem with both roots")
        for px in (api, web):
            wait_until(lambda px=px: "roots=2" in px.stderr(), 15, what=f"{px.name} trusting both roots")

        # Certificates from the old root are still valid: retiring it now would cut them off.
        early = cp.cli("ca", "retire")
        assert early.returncode != 0
        assert "still valid" in early.stderr, early.stderr

        # Within a certificate lifetime every proxy has renewed onto the new root; then the
        # old root can go (and the CLI, reading the rewritten ca.pem, still reaches the
        # control plane, whose own certificate now comes from the new root).
        def retired():
            r = cp.cli("ca", "retire")
            return r.returncode == 0
        wait_until(retired, 30, interval=1, what="the old root retired")
        assert "also trusted" not in ca_show(cp)
        wait_until(lambda: roots_in(cp.ca) == 1, 10, what="ca.pem with the new root only")
        for px in (api, web):
            wait_until(lambda px=px: "roots=1" in px.stderr(), 15, what=f"{px.name} trusting the new root only")
        # Traffic keeps flowing on the new root alone, through further renewals.
        served = load.ok
        renewed = {px.name: metric_sum(px.metrics(), "smesh_identity_certifications_total", result="ok")
                   for px in (api, web)}

        def renewed_again():
            return all(metric_sum(px.metrics(), "smesh_identity_certifications_total", result="ok")
                       > renewed[px.name] for px in (api, web))
        wait_until(renewed_again, 20, interval=0.5, what="renewals on the new root alone")
        assert load.ok > served + 100, (served, load.ok)
    finally:
        load.finish()
    assert not load.failed, f"{len(load.failed)} failed requests: {load.failed[:5]}"
    for px in (api, web):
        assert metric_sum(px.metrics(), "smesh_identity_certifications_total", result="ok") >= 3
    # The API shows roots, never a key.
    shown = cp.api("GET", "/api/v1/ca", token=False)
    assert shown.status == 200 and b"PRIVATE KEY" not in shown.body


def test_rotation_needs_the_admin_token_and_a_stored_root(run):
    cp = TlsControlPlane(run).start()
    r = cp.cli("ca", "rotate", token=False)
    assert r.returncode != 0 and "401" in r.stderr, r.stderr
    r = cp.cli("ca", "retire")
    assert r.returncode != 0 and "no previous root" in r.stderr, r.stderr
    bundle = cp.cli("ca", "show", "--bundle")
    assert bundle.returncode == 0 and bundle.stdout.count("BEGIN CERTIFICATE") == 1, bundle
    with open(cp.ca) as f:
        assert f.read().strip() == bundle.stdout.strip()
    assert os.path.exists(cp.ca)
