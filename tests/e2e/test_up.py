"""Issue 4, acceptance 8: `smesh up` starts the demo mesh, the demo answers through the mesh
(web's proxy reaches api v1 and v2, and api reaches the TCP service db), and Ctrl-C (SIGINT to
`smesh up` alone) leaves no process behind."""
import os
import signal
import subprocess
import socket

import pytest

from meshlib import SMESH_BIN, http_request, wait_until
from meshlib import UP_OFFSETS as OFFSETS, child_pids as _children, free_up_base as _free_base, pid_alive as _alive


@pytest.mark.timeout(120)
def test_smesh_up_demo_answers_through_the_mesh_and_ctrl_c_stops_everything(run, tmp_path, monkeypatch):
    # the demo also writes where it runs to the user's state dir: this test's own
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    base = _free_base()
    up = run.spawn([SMESH_BIN, "up", "--port", base, "--data", tmp_path / "data", "--no-load"], "up")
    wait_until(lambda: "demo mesh is up" in up.stdout() or up.poll() is not None, 60, interval=0.1,
               what="smesh up banner")
    assert up.poll() is None, f"smesh up exited: {up.stderr()[-3000:]}"
    children = _children(up.pid)
    # control plane, four demo apps, four proxies
    assert len(children) == 9, children

    # web -> api -> db, all through proxies
    r = http_request(base, "/hello", host="web")
    assert r.status == 200, r
    text = r.body.decode()
    assert "web v1 answered GET /hello" in text, text
    assert "api v" in text and "echo: hello from api" in text, text

    # the canary split reaches both versions through web's proxy; the header pins v2
    versions = set()
    for i in range(60):
        r = http_request(base, f"/v/{i}", host="api")
        assert r.status == 200, r
        versions.add(r.header("x-demo-app"))
    assert versions == {"api v1", "api v2"}, versions
    for i in range(5):
        r = http_request(base, "/canary", host="api", headers={"x-canary": "true"})
        assert r.header("x-demo-app") == "api v2", r

    # the control plane speaks TLS only; the CLI trusts it with the CA in the data dir, and
    # every proxy's stream is authenticated by its certificate
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}
    env.update(SMESH_CONTROL=f"https://127.0.0.1:{base + 40}", SMESH_TOKEN_FILE=str(data / "admin-token"),
               SMESH_CONTROL_CA=str(data / "ca.pem"))
    proxies = subprocess.run([SMESH_BIN, "get", "proxies"], capture_output=True, text=True, timeout=30, env=env,
                             cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proxies.returncode == 0, proxies.stderr
    assert sum(1 for line in proxies.stdout.splitlines()[1:] if line.strip()) == 4, proxies.stdout
    endpoints = subprocess.run([SMESH_BIN, "get", "endpoints", "api", "-o", "json"], capture_output=True,
                               text=True, timeout=30, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert endpoints.returncode == 0, endpoints.stderr
    assert endpoints.stdout.count("spiffe://") == 2, endpoints.stdout

    # Ctrl-C: SIGINT to `smesh up` only; it must stop every child itself
    up.signal(signal.SIGINT)
    assert up.wait(30) == 0, up.stderr()[-3000:]
    wait_until(lambda: not any(_alive(c) for c in children), 10, what="demo processes to exit")
    for off in OFFSETS:
        s = socket.socket()
        try:
            s.settimeout(0.5)
            assert s.connect_ex(("127.0.0.1", base + off)) != 0, f"port {base + off} still open"
        finally:
            s.close()


@pytest.mark.timeout(120)
def test_smesh_up_library_mode_runs_web_with_the_mesh_linked_in(run, tmp_path):
    """Issue 18, acceptance 4: `smesh up --library` runs web with the `smesh` library instead
    of a proxy: it answers on web's port, calls api through the mesh (mTLS, the canary
    split), and is listed with the proxies and registered with its SPIFFE ID."""
    base = _free_base()
    up = run.spawn([SMESH_BIN, "up", "--port", base, "--data", tmp_path / "data", "--no-load", "--library"], "up")
    wait_until(lambda: "demo mesh is up" in up.stdout() or up.poll() is not None, 60, interval=0.1,
               what="smesh up banner")
    assert up.poll() is None, f"smesh up exited: {up.stderr()[-3000:]}"
    children = _children(up.pid)
    # control plane, four demo apps, three proxies (none for web)
    assert len(children) == 8, children

    versions = set()
    for i in range(30):
        r = http_request(base, f"/hello/{i}", host="web")
        assert r.status == 200, r
        text = r.body.decode()
        assert f"web v1 answered GET /hello/{i}" in text and "echo: hello from api" in text, text
        versions.update(v for v in ("api v1", "api v2") if v in text)
    assert versions == {"api v1", "api v2"}, versions

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}
    env.update(SMESH_CONTROL=f"https://127.0.0.1:{base + 40}", SMESH_TOKEN_FILE=str(data / "admin-token"),
               SMESH_CONTROL_CA=str(data / "ca.pem"))
    proxies = subprocess.run([SMESH_BIN, "get", "proxies"], capture_output=True, text=True, timeout=30, env=env,
                             cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proxies.returncode == 0, proxies.stderr
    assert sum(1 for line in proxies.stdout.splitlines()[1:] if line.strip()) == 4, proxies.stdout
    endpoints = subprocess.run([SMESH_BIN, "get", "endpoints", "web", "-o", "json"], capture_output=True,
                               text=True, timeout=30, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert endpoints.returncode == 0, endpoints.stderr
    assert "spiffe://" in endpoints.stdout and f"127.0.0.1:{base}" in endpoints.stdout, endpoints.stdout

    up.signal(signal.SIGINT)
    assert up.wait(30) == 0, up.stderr()[-3000:]
    wait_until(lambda: not any(_alive(c) for c in children), 10, what="demo processes to exit")
