"""Issue 15: `smesh up` off the happy path, as a new user meets it. A second demo in the same
directory (or on the same ports) is refused at once and leaves the first untouched; a child
that exits stops the demo within a second, named with its log; a --port that does not fit is
refused; state kept from an earlier demo that refuses this one is named, and --reset clears it;
the CLI finds a running demo by itself, from any directory."""
import json
import os
import signal
import subprocess
import time

import pytest

from meshlib import (SMESH_BIN, child_pids, free_up_base, http_request, pid_alive, pid_cmdline,
                     wait_until)

POLICY = """apiVersion: smesh.io/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {mtls: strict, defaultPolicy: allow, certificateTtl: 24h}
---
apiVersion: smesh.io/v1
kind: AuthorizationPolicy
metadata: {name: web-reads-api}
spec:
  targetRef: {name: api}
  action: Allow
  rules:
  - from: [{service: web}]
    to:
    - methods: [GET]
      paths: ["/api/*"]
      ports: [8080]
"""


@pytest.fixture(autouse=True)
def _own_state_dir(monkeypatch, tmp_path):
    """The demo also writes where it runs to the user's state dir: this test's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}


def _start(run, base, cwd, *extra, name="up"):
    """`smesh up` in cwd (its ./smesh-data unless --data is given); waits for its banner."""
    up = run.spawn([SMESH_BIN, "up", "--port", base, "--no-load", *extra], name, cwd=cwd, env=_env())
    wait_until(lambda: "demo mesh is up" in up.stdout() or up.poll() is not None, 60, interval=0.1,
               what="smesh up banner")
    assert up.poll() is None, f"smesh up exited: {up.stderr()[-3000:]}"
    return up


def _smesh(*args, cwd, timeout=30, env=None):
    return subprocess.run([SMESH_BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env or _env(), stdin=subprocess.DEVNULL)


def _snapshot(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def _stop(up):
    up.signal(signal.SIGINT)
    assert up.wait(30) == 0, up.stderr()[-3000:]


@pytest.mark.timeout(120)
def test_a_second_up_is_refused_at_once_and_the_first_is_untouched(run, tmp_path):
    base = free_up_base()
    first = _start(run, base, tmp_path)
    children = child_pids(first.pid)
    assert len(children) == 9, children
    logs = tmp_path / "smesh-data" / "logs"
    before = _snapshot(logs)
    assert any(n.endswith(".token") for n in before), before.keys()

    # the same directory: refused by the data directory's lock, whatever the ports
    started = time.monotonic()
    second = _smesh("up", "--port", free_up_base(), "--no-load", cwd=tmp_path, timeout=20)
    assert time.monotonic() - started < 3, second.stderr
    assert second.returncode != 0
    err = second.stderr
    assert "already running" in err and f"pid {first.pid}" in err, err
    assert f"https://127.0.0.1:{base + 40}" in err and str(tmp_path / "smesh-data") in err, err
    assert f"kill {first.pid}" in err and "Ctrl-C" in err, err
    assert "is up" not in second.stdout, second.stdout
    # --reset must not delete a running demo's state either
    resetting = _smesh("up", "--port", free_up_base(), "--no-load", "--reset", cwd=tmp_path, timeout=20)
    assert resetting.returncode != 0 and "already running" in resetting.stderr, resetting.stderr

    # another directory, the same ports: refused naming the port and --port
    other = tmp_path / "other"
    other.mkdir()
    third = _smesh("up", "--port", base, "--no-load", cwd=other, timeout=20)
    assert third.returncode != 0
    assert f"port {base + 40} (the control plane) is not free" in third.stderr, third.stderr
    assert "--port" in third.stderr, third.stderr
    assert not (other / "smesh-data" / "logs").exists()

    # the first demo: its logs and tokens intact (logs may only have grown), still serving
    after = _snapshot(logs)
    assert set(after) == set(before), (set(after) ^ set(before))
    for name, old in before.items():
        assert after[name].startswith(old), f"{name} was rewritten"
    assert all(pid_alive(c) for c in children)
    r = http_request(base, "/hello", host="web")
    assert r.status == 200 and "echo: hello from api" in r.body.decode(), r
    _stop(first)


@pytest.mark.timeout(120)
def test_a_child_that_exits_stops_the_demo_within_a_second_naming_it_and_its_log(run, tmp_path):
    base = free_up_base()
    up = _start(run, base, tmp_path)
    admin = f"127.0.0.1:{base + 351}"
    db_proxy = [c for c in child_pids(up.pid) if admin in pid_cmdline(c)]
    assert len(db_proxy) == 1, db_proxy
    os.kill(db_proxy[0], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: "proxy-db exited" in up.stderr(), 10, interval=0.02, what="smesh up to say so")
    assert time.monotonic() - killed < 1.0, "smesh up noticed late"
    assert up.wait(10) != 0
    err = up.stderr()
    log = str(tmp_path / "smesh-data" / "logs" / "proxy-db.log")
    assert "proxy-db exited" in err and "SIGKILL" in err, err
    assert f"Last lines of its log {log}" in err and "smesh proxy ready" in err, err


@pytest.mark.timeout(60)
def test_a_child_failing_at_start_is_named_with_its_log_at_once(run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "smesh.redb").write_bytes(b"this is not a store\n" * 100)
    started = time.monotonic()
    up = run.spawn([SMESH_BIN, "up", "--port", free_up_base(), "--no-load", "--data", data], "up",
                   env=_env())
    rc = up.wait(20)
    assert rc != 0
    assert time.monotonic() - started < 5, "waited for a timeout instead of watching the child"
    err = up.stderr()
    assert "control exited" in err, err
    assert f"Last lines of its log {data / 'logs' / 'control.log'}" in err, err
    assert "did not come up" not in err and "not ready within" not in err, err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("port", ["65500", "65185"])
def test_a_port_that_does_not_fit_is_refused(run, tmp_path, port):
    r = _smesh("up", "--port", port, "--no-load", "--data", tmp_path / "data", cwd=tmp_path)
    assert r.returncode != 0
    assert f"--port {port}" in r.stderr and "at most 65184" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.timeout(180)
def test_kept_state_that_refuses_the_demo_is_named_and_reset_clears_it(run, tmp_path):
    base = free_up_base()
    first = _start(run, base, tmp_path)
    env = _env()
    env.update(SMESH_CONTROL=f"https://127.0.0.1:{base + 40}",
               SMESH_TOKEN_FILE=str(tmp_path / "smesh-data" / "admin-token"),
               SMESH_CONTROL_CA=str(tmp_path / "smesh-data" / "ca.pem"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    applied = _smesh("apply", "-f", policy, cwd=tmp_path, env=env)
    assert applied.returncode == 0, applied.stderr
    _stop(first)

    # the README's policy denies the demo's own requests: said, with what was kept and --reset
    refused = run.spawn([SMESH_BIN, "up", "--port", base, "--no-load"], "up-refused", cwd=tmp_path,
                        env=_env())
    assert refused.wait(60) != 0
    err = refused.stderr()
    assert "kept from earlier demos" in err and "AuthorizationPolicy/web-reads-api" in err, err
    assert "denied" in err and "proxy-api-v" in err and "default policy" in err, err
    assert "smesh up --reset" in err, err

    up = _start(run, base, tmp_path, "--reset", name="up-reset")
    assert "deleted the state of earlier demos" in up.stderr(), up.stderr()
    assert "kept from" not in up.stderr(), up.stderr()
    r = http_request(base, "/hello", host="web")
    assert r.status == 200 and "echo: hello from api" in r.body.decode(), r
    listed = _smesh("get", "authorizationpolicy", "-o", "json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "web-reads-api" not in listed.stdout, listed.stdout
    _stop(up)


@pytest.mark.timeout(120)
def test_the_cli_finds_the_running_demo_from_any_directory_with_no_exports(run, tmp_path):
    base = free_up_base()
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    up = _start(run, base, demo_dir)
    data = demo_dir / "smesh-data"
    banner = up.stdout()
    # absolute paths and the binary's full path, so the banner works as printed
    assert f"{data}/admin-token" in banner and f"{data}/ca.pem" in banner, banner
    assert os.path.abspath(SMESH_BIN) in banner, banner
    with open(data / "endpoint.json") as f:
        endpoint = json.load(f)
    assert endpoint["control"] == f"https://127.0.0.1:{base + 40}", endpoint
    assert endpoint["ca"] == str(data / "ca.pem") and endpoint["pid"] == up.pid, endpoint
    assert (tmp_path / "state" / "smesh" / "endpoint.json").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (demo_dir, elsewhere):
        proxies = _smesh("get", "proxies", cwd=cwd)
        assert proxies.returncode == 0, proxies.stderr
        assert sum(1 for line in proxies.stdout.splitlines()[1:] if line.strip()) == 4, proxies.stdout
    # a write takes the demo's token too
    put = _smesh("kv", "put", "demo/greeting", "hello", cwd=elsewhere)
    assert put.returncode == 0, put.stderr
    got = _smesh("kv", "get", "demo/greeting", cwd=elsewhere)
    assert got.returncode == 0 and got.stdout.strip() == "hello", (got.stdout, got.stderr)
    # a read needs no token: a token file that is not there is only a warning
    env = _env()
    env["SMESH_TOKEN_FILE"] = str(elsewhere / "no-such-token")
    services = _smesh("get", "services", "-o", "json", cwd=elsewhere, env=env)
    assert services.returncode == 0, services.stderr
    assert '"web"' in services.stdout and "no-such-token" in services.stderr, services
    # plain HTTP to the TLS port: told what to use instead
    plain = _smesh("get", "services", "--control", f"http://127.0.0.1:{base + 40}", cwd=elsewhere)
    assert plain.returncode != 0
    assert (f"this control plane speaks TLS: use https://127.0.0.1:{base + 40} with --control-ca"
            in plain.stderr), plain.stderr

    _stop(up)
    assert not (data / "endpoint.json").exists()
    assert not (tmp_path / "state" / "smesh" / "endpoint.json").exists()
