"""Helpers for the smesh end-to-end tests: processes, ports, HTTP, config and metrics.

Everything listens on 127.0.0.1 only. Every wait is a poll with a bounded deadline.
"""
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SMESH_BIN = os.environ.get("SMESH_BIN") or os.path.join(REPO, "target", "debug", "smesh")
SERVERS_PY = os.path.join(HERE, "servers.py")
LOOPBACK = "127.0.0.1"

# Environment for every child process and for this one: never go through an HTTP proxy.
for _v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
           "grpc_proxy", "GRPC_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_v, None)


# --------------------------------------------------------------------------- ports

_handed_out = set()


def free_port():
    """A TCP port on 127.0.0.1 nothing listens on right now, never the same twice in a run."""
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def can_connect(port, timeout=0.5):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Poll pred() until it returns a truthy value or the deadline passes; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes

class Proc:
    """A child process in its own process group, stdout/stderr captured to files."""

    def __init__(self, cmd, name, workdir, env=None, cwd=None):
        self.cmd = [str(c) for c in cmd]
        self.name = name
        self.stdout_path = os.path.join(workdir, f"{name}.stdout")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      env=env, cwd=cwd)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    def alive(self):
        return self.popen.poll() is None

    def wait(self, timeout):
        return self.popen.wait(timeout=timeout)

    def signal(self, sig):
        self.popen.send_signal(sig)

    def stderr(self):
        self._err.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stdout(self):
        self._out.flush()
        with open(self.stdout_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def kill(self):
        """Kill the whole process group (by its id) and reap the child."""
        try:
            if self.popen.poll() is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            else:
                # the leader is gone; its group may still hold children
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            for f in (self._out, self._err):
                try:
                    f.close()
                except OSError:
                    pass

    def tail(self, n=4000):
        return self.stderr()[-n:]


class Runner:
    """Owns the processes and the temp dir of one test; cleanup() kills everything it started."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def spawn(self, cmd, name, **kw):
        # unique file names for repeated names
        base, i = name, 1
        while any(p.name == name for p in self.procs):
            i += 1
            name = f"{base}-{i}"
        p = Proc(cmd, name, self.workdir, **kw)
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep killing the others
                pass

    # ---- backends

    def _wait_listening(self, proc, port, what, timeout=15):
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.poll()}: {proc.tail()}")
            return can_connect(port)
        wait_until(ready, timeout, what=f"{what} on port {port}")

    def http_backend(self, name, delay=0.0, flaky=False, max_concurrent=None):
        port = free_port()
        cmd = [sys.executable, SERVERS_PY, "http", "--port", port, "--name", name]
        if delay:
            cmd += ["--delay", delay]
        if flaky:
            cmd += ["--flaky"]
        if max_concurrent:
            cmd += ["--max-concurrent", max_concurrent]
        p = self.spawn(cmd, f"http-{name}")
        self._wait_listening(p, port, f"http backend {name}")
        return HttpBackend(name, port, p)

    def tcp_echo(self, banner=""):
        port = free_port()
        cmd = [sys.executable, SERVERS_PY, "tcp-echo", "--port", port]
        if banner:
            cmd += ["--banner", banner]
        p = self.spawn(cmd, "tcp-echo")
        self._wait_listening(p, port, "tcp echo")
        return Backend("tcp-echo", port, p)

    def ws_echo(self):
        port = free_port()
        p = self.spawn([sys.executable, SERVERS_PY, "ws-echo", "--port", port], "ws-echo")
        self._wait_listening(p, port, "websocket echo")
        return Backend("ws-echo", port, p)

    def nghttpd(self, docroot):
        port = free_port()
        p = self.spawn(["nghttpd", "--no-tls", "-a", LOOPBACK, "-d", docroot, port], "nghttpd")
        self._wait_listening(p, port, "nghttpd")
        return Backend("nghttpd", port, p)

    # ---- the proxy

    def proxy(self, resources, upstreams=None, app_port=None, extra_args=(), wait_ready=True,
              name="smesh"):
        """Write resources to a config file and start `smesh proxy` on ports picked here.

        upstreams: list of service names; each gets its own --upstream port.
        app_port: when given, --inbound listens and forwards to 127.0.0.1:app_port.
        """
        px = Proxy(self, resources, upstreams or [], app_port, list(extra_args), name)
        px.start(wait_ready=wait_ready)
        return px

    # ---- the control plane (test_control_*.py)

    def control(self, **kw):
        """Start `smesh control` (see ControlPlane) and wait until it answers."""
        return ControlPlane(self, **kw).start()

    def mesh_proxy(self, control_urls, wait_ready=True, **kw):
        """Start `smesh proxy --control ...` (see ControlledProxy)."""
        px = ControlledProxy(self, control_urls, **kw)
        px.start(wait_ready=wait_ready)
        return px

    def smesh(self, *args, timeout=30):
        """Run a short-lived smesh command to completion (bounded); returns CompletedProcess."""
        return subprocess.run([SMESH_BIN, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Backend:
    name: str
    port: int
    proc: Proc

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"


class HttpBackend(Backend):
    def stats(self):
        r = http_request(self.port, "/__stats", host="backend", timeout=5)
        assert r.status == 200, r
        return json.loads(r.body)

    def reset(self):
        http_request(self.port, "/__reset", host="backend", timeout=5)


# --------------------------------------------------------------------------- config

def service(name, endpoints, protocol="http", port=80, lb=None, hostnames=None):
    """A Service resource. endpoints: list of 'ip:port' strings or dicts."""
    eps = [e if isinstance(e, dict) else {"address": e} for e in endpoints]
    p = {"port": port}
    if protocol:
        p["protocol"] = protocol
    spec = {"ports": [p], "endpoints": eps}
    if lb:
        spec["loadBalancer"] = lb
    if hostnames:
        spec["hostnames"] = list(hostnames)
    return {"apiVersion": "smesh.io/v1", "kind": "Service", "metadata": {"name": name},
            "spec": spec}


def http_route(name, parents, rules, hostnames=None):
    spec = {"parentRefs": [{"name": p} for p in parents], "rules": rules}
    if hostnames:
        spec["hostnames"] = list(hostnames)
    return {"apiVersion": "smesh.io/v1", "kind": "HTTPRoute", "metadata": {"name": name},
            "spec": spec}


def grpc_route(name, parents, rules, hostnames=None):
    r = http_route(name, parents, rules, hostnames)
    r["kind"] = "GRPCRoute"
    return r


def to_yaml(resources):
    return yaml.safe_dump_all(resources, sort_keys=False)


def write_atomic(path, text):
    """Write text to path by writing a temp file in the same dir and renaming it over path."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".cfg-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Proxy:
    def __init__(self, runner, resources, upstreams, app_port, extra_args, name):
        self.runner = runner
        self.name = name
        self.config_path = os.path.join(runner.workdir, f"{name}-mesh.yaml")
        self.outbound = free_port()
        self.admin = free_port()
        self.inbound = free_port() if app_port else None
        self.app_port = app_port
        self.upstream = {svc: free_port() for svc in upstreams}
        self.extra_args = extra_args
        self.proc = None
        if isinstance(resources, str):
            write_atomic(self.config_path, resources)
        else:
            write_atomic(self.config_path, to_yaml(resources))

    def args(self):
        a = [SMESH_BIN, "proxy", "--config", self.config_path,
             "--outbound", f"{LOOPBACK}:{self.outbound}", "--admin", f"{LOOPBACK}:{self.admin}",
             "--log-level", "info"]
        if self.app_port:
            a += ["--inbound", f"{LOOPBACK}:{self.inbound}", "--app", f"{LOOPBACK}:{self.app_port}"]
        for svc, port in self.upstream.items():
            a += ["--upstream", f"{svc}={LOOPBACK}:{port}"]
        return a + [str(x) for x in self.extra_args]

    def start(self, wait_ready=True):
        if not os.path.exists(SMESH_BIN):
            raise RuntimeError(f"smesh binary not found at {SMESH_BIN} (set SMESH_BIN or build it)")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        self.proc = self.runner.spawn(self.args(), self.name, env=env)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"smesh exited with {self.proc.poll()} before ready:\n{self.proc.tail()}")
            try:
                r = http_request(self.admin, "/ready", host="admin", timeout=1)
                return r.status == 200
            except OSError:
                return False
        # the spec: /ready is 200 once the listeners are up. (No probe connections to the
        # data-plane ports here: they would count in the proxy's TCP metrics.)
        wait_until(ready, timeout, what="smesh /ready")

    def alive(self):
        return self.proc.alive()

    def stderr(self):
        return self.proc.stderr()

    def get(self, path="/", host="api", **kw):
        return http_request(self.outbound, path, host=host, **kw)

    def admin_get(self, path, timeout=5):
        return http_request(self.admin, path, host=f"{LOOPBACK}:{self.admin}", timeout=timeout)

    def metrics_text(self):
        r = self.admin_get("/metrics")
        assert r.status == 200, f"/metrics answered {r.status}"
        return r.body.decode()

    def metrics(self):
        return parse_metrics(self.metrics_text())

    def write_config(self, resources):
        write_atomic(self.config_path, resources if isinstance(resources, str) else to_yaml(resources))

    def sighup(self):
        self.proc.signal(signal.SIGHUP)

    def reloads(self, result="ok"):
        return metric_sum(self.metrics(), "smesh_config_reloads_total", result=result)


# --------------------------------------------------------------------------- HTTP client

@dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    elapsed: float = 0.0
    reason: str = ""

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return (f"Response(status={self.status}, headers={self.headers}, "
                f"body={self.body[:300]!r}, elapsed={self.elapsed:.3f})")


def _do(conn, method, path, host, headers, body):
    conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    hdrs = dict(headers or {})
    if body is not None and not any(k.lower() == "content-length" for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    for k, v in hdrs.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    return r, data


def http_request(port, path="/", host="api", method="GET", headers=None, body=None, timeout=10):
    """One request on a fresh connection to 127.0.0.1:port. host=None: no Host header override."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        r, data = _do(conn, method, path, host, headers, body)
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data,
                        time.monotonic() - t0, r.reason)
    finally:
        conn.close()


class KeepAliveClient:
    """HTTP/1.1 keep-alive client on one connection; reconnects only when the server closed it."""

    def __init__(self, port, host="api", timeout=10):
        self.port, self.host, self.timeout = port, host, timeout
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)

    def get(self, path="/", headers=None, method="GET", body=None):
        t0 = time.monotonic()
        try:
            r, data = _do(self.conn, method, path, self.host, headers, body)
        except Exception:
            self.conn.close()
            raise
        if r.will_close:
            self.conn.close()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data,
                        time.monotonic() - t0, r.reason)

    def close(self):
        self.conn.close()


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass
class Sample:
    name: str
    labels: dict = field(default_factory=dict)
    value: float = 0.0


def parse_metrics(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"unparsable metrics line: {line!r}")
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append(Sample(m.group(1), labels, float(m.group(3))))
    return out


def metric_sum(samples, name, **labels):
    """Sum of the samples called name whose labels include all of labels (missing = 0)."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def metric_names(samples):
    return {s.name for s in samples}


# --------------------------------------------------------------------------- curl

def curl(*args, timeout=20):
    """Run curl (proxy variables are removed from the environment above); returns CompletedProcess."""
    cmd = ["curl", "-sS", "--max-time", str(timeout - 2), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- load

def run_load(port, n, threads=8, host="api", path="/", time_limit=60.0):
    """Send n GETs over `threads` keep-alive connections (bounded by n and time_limit).

    Returns (counts by x-backend header, list of failures as strings, requests done).
    """
    lock = threading.Lock()
    counts = collections.Counter()
    failures = []
    state = {"next": 0}
    deadline = time.monotonic() + time_limit

    def worker():
        c = KeepAliveClient(port, host=host, timeout=10)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if state["next"] >= n:
                        return
                    state["next"] += 1
                try:
                    r = c.get(path)
                except Exception as e:  # any transport error is a client-visible failure
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    if r.status != 200:
                        failures.append(f"status {r.status} {r.header('smesh-proxy-error')} {r.body[:200]!r}")
                    else:
                        counts[r.header("x-backend")] += 1
        finally:
            c.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()) + 15)
    return counts, failures, state["next"]


def nghttp_codes(port, authority, paths, timeout=20):
    """Send GETs for all paths as concurrent streams on ONE h2c (prior knowledge) connection with
    nghttp; returns [(path, status)] from its statistics table (curl 7.88 cannot reuse h2c
    prior-knowledge connections)."""
    urls = [f"http://{LOOPBACK}:{port}{p}" for p in paths]
    r = subprocess.run(["nghttp", "-ns", "-t", str(timeout - 2), "-H", f":authority: {authority}", *urls],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = []
    for line in r.stdout.decode().splitlines():
        m = re.match(r"^\s*\d+\s+\S+\s+\S+\s+\S+\s+(\d{3})\s+\d+\s+(\S+)\s*$", line)
        if m:
            out.append((m.group(2), int(m.group(1))))
    return out


# --------------------------------------------------------------------------- smesh up
# (test_up*.py)

# Port offsets `smesh up --port BASE` uses (see crates/cli/src/up.rs).
UP_OFFSETS = [40] + [100 * i + o for i in range(4) for o in (0, 3, 11, 51)] + [120, 220]


def free_up_base():
    """A BASE for `smesh up --port BASE` whose every port is free now."""
    for _ in range(100):
        base = random.randrange(20000, 40000, 10)
        ok = True
        for off in UP_OFFSETS:
            s = socket.socket()
            try:
                s.bind((LOOPBACK, base + off))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no free port range for smesh up")


def child_pids(pid):
    """PIDs of the processes whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            out.append(int(entry))
    return out


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def pid_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


# --------------------------------------------------------------------------- control plane
# (added for the control-plane tests, test_control_*.py; nothing above depends on it)

def _clean_cli_env():
    env = dict(os.environ)
    for v in ("SMESH_CONTROL", "SMESH_TOKEN", "SMESH_TOKEN_FILE", "RUST_LOG", "SMESH_LOG"):
        env.pop(v, None)
    return env


class ControlPlane:
    """`smesh control` on a port and store picked here (or given, to restart on the same ones)."""

    def __init__(self, runner, port=None, store_dir=None, token_file=None, lease_ttl=None,
                 extra_args=(), name="control"):
        self.runner = runner
        self.port = port or free_port()
        self.store_dir = store_dir or os.path.join(runner.workdir, f"{name}-data")
        self.token_file_arg = token_file
        self.lease_ttl = lease_ttl
        self.extra_args = [str(x) for x in extra_args]
        self.name = name
        self.proc = None

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def token_file(self):
        return self.token_file_arg or os.path.join(self.store_dir, "admin-token")

    @property
    def token(self):
        with open(self.token_file) as f:
            return f.read().strip()

    def args(self):
        a = [SMESH_BIN, "control", "--listen", f"{LOOPBACK}:{self.port}",
             "--store", f"embedded:{self.store_dir}", "--log-level", "info"]
        if self.token_file_arg:
            a += ["--admin-token-file", self.token_file_arg]
        if self.lease_ttl:
            a += ["--lease-ttl", self.lease_ttl]
        return a + self.extra_args

    def start(self, wait_ready=True, timeout=20):
        if not os.path.exists(SMESH_BIN):
            raise RuntimeError(f"smesh binary not found at {SMESH_BIN} (set SMESH_BIN or build it)")
        self.proc = self.runner.spawn(self.args(), self.name, env=_clean_cli_env())
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"smesh control exited with {self.proc.poll()}:\n{self.proc.tail()}")
            try:
                return http_request(self.port, "/healthz", host=f"{LOOPBACK}:{self.port}",
                                    timeout=1).status == 200
            except OSError:
                return False
        wait_until(ready, timeout, what="smesh control /healthz")

    def kill9(self):
        """SIGKILL the control plane (by its pid) and reap it."""
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self, wait_ready=True):
        """A new process on the same port and store (the old one must be gone)."""
        return ControlPlane(self.runner, port=self.port, store_dir=self.store_dir,
                            token_file=self.token_file_arg, lease_ttl=self.lease_ttl,
                            extra_args=self.extra_args, name=self.name).start(wait_ready)

    def stderr(self):
        return self.proc.stderr() if self.proc else ""

    # ---- clients

    def cli(self, *args, token=True, input=None, timeout=30, env_extra=None):
        """Run `smesh ARGS` against this control plane: SMESH_CONTROL set, the token via
        SMESH_TOKEN_FILE when token is True (a string: that token via --token), none otherwise;
        cwd is the test's temp dir so no ./smesh-data/admin-token is found by accident."""
        env = _clean_cli_env()
        env["SMESH_CONTROL"] = self.url
        extra = []
        if token is True:
            env["SMESH_TOKEN_FILE"] = self.token_file
        elif isinstance(token, str):
            extra = ["--token", token]
        if env_extra:
            env.update(env_extra)
        argv = [str(a) for a in args]
        # flags of `smesh kv` go before its subcommand
        if extra and argv and argv[0] == "kv":
            argv = ["kv", *extra, *argv[1:]]
        else:
            argv = argv + extra
        return subprocess.run([SMESH_BIN, *argv], capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              env=env, cwd=self.runner.workdir)

    def api(self, method, path, body=None, token=True, headers=None, timeout=10):
        """One HTTP request to the API; token True: the admin token, a string: that token."""
        h = dict(headers or {})
        if token is True:
            h["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            h["Authorization"] = f"Bearer {token}"
        if isinstance(body, str):
            body = body.encode()
        return http_request(self.port, path, host=f"{LOOPBACK}:{self.port}", method=method,
                            headers=h, body=body, timeout=timeout)

    def apply_json(self, files, token=True):
        """POST /api/v1/apply with {"files": [{"name", "text"}]}; files: [(name, text)]."""
        body = json.dumps({"files": [{"name": n, "text": t} for n, t in files]})
        return self.api("POST", "/api/v1/apply", body=body, token=token,
                        headers={"Content-Type": "application/json"})

    def proxies(self):
        r = self.api("GET", "/api/v1/proxies", token=False)
        assert r.status == 200, r
        return r.json()["items"]

    def endpoints(self, service):
        """The endpoints of service as the API lists them; [] when it answers 404."""
        r = self.api("GET", f"/api/v1/endpoints/{service}", token=False)
        if r.status == 404:
            return []
        assert r.status == 200, r
        return r.json()["endpoints"]


class ControlledProxy(Proxy):
    """`smesh proxy --control URL` (no --config): a pure client, or registered with --service."""

    def __init__(self, runner, control_urls, service=None, app_port=None, labels=None,
                 lease_ttl=None, max_config_bytes=None, extra_args=(), name="proxy"):
        self.runner = runner
        self.name = name
        self.control_urls = control_urls if isinstance(control_urls, str) else ",".join(control_urls)
        self.service = service
        self.outbound = free_port()
        self.admin = free_port()
        self.app_port = app_port
        self.inbound = free_port() if app_port else None
        self.upstream = {}
        self.labels = labels
        self.lease_ttl = lease_ttl
        self.max_config_bytes = max_config_bytes
        self.extra_args = [str(x) for x in extra_args]
        self.proc = None
        self.config_path = None

    @property
    def inbound_address(self):
        return f"{LOOPBACK}:{self.inbound}" if self.inbound else None

    def args(self):
        a = [SMESH_BIN, "proxy", "--control", self.control_urls,
             "--outbound", f"{LOOPBACK}:{self.outbound}", "--admin", f"{LOOPBACK}:{self.admin}",
             "--log-level", "info"]
        if self.service:
            a += ["--service", self.service]
        if self.app_port:
            a += ["--inbound", f"{LOOPBACK}:{self.inbound}", "--app", f"{LOOPBACK}:{self.app_port}"]
        if self.labels:
            a += ["--labels", ",".join(f"{k}={v}" for k, v in self.labels.items())]
        if self.lease_ttl:
            a += ["--lease-ttl", self.lease_ttl]
        if self.max_config_bytes is not None:
            a += ["--max-config-bytes", self.max_config_bytes]
        return a + self.extra_args

    def is_ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.poll()}:\n{self.proc.tail()}")
        try:
            return http_request(self.admin, "/ready", host="admin", timeout=1).status == 200
        except OSError:
            return False

    def config_text(self):
        r = self.admin_get("/config")
        assert r.status == 200, r
        return r.body.decode()


def start_controlled_proxies(runner, control_urls, n, name="client", timeout=60, **kw):
    """Start n ControlledProxy processes at once, then wait until every one is /ready."""
    pxs = []
    for i in range(n):
        px = ControlledProxy(runner, control_urls, name=f"{name}{i}", **kw)
        px.start(wait_ready=False)
        pxs.append(px)
    pending = list(pxs)

    def all_ready():
        pending[:] = [p for p in pending if not p.is_ready()]
        return not pending
    wait_until(all_ready, timeout, interval=0.1, what=f"{n} proxies /ready")
    return pxs



# --------------------------------------------------------------------------- resilience (issue 6)
# (added for test_resilience_*.py; nothing above depends on it)

def backend_policy(name, service, circuit_breaker=None, outlier_detection=None, retry_budget=None):
    """A BackendPolicy resource targeting service."""
    spec = {"targetRef": {"name": service}}
    if circuit_breaker:
        spec["circuitBreaker"] = circuit_breaker
    if outlier_detection:
        spec["outlierDetection"] = outlier_detection
    if retry_budget:
        spec["retryBudget"] = retry_budget
    return {"apiVersion": "smesh.io/v1", "kind": "BackendPolicy", "metadata": {"name": name},
            "spec": spec}


class SwitchBackend:
    """An in-process HTTP/1.1 backend whose behaviour a test changes while it runs: it answers
    `fail_status` to a `fail_ratio` share of requests (at random), 200 to the others, after
    `delay` seconds; header `x-backend: NAME`, JSON body with path, host and headers.
    Counts requests by status in `statuses`. close() stops it."""

    def __init__(self, name, fail_ratio=0.0, fail_status=500, delay=0.0):
        import random
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.name, self.fail_ratio, self.fail_status, self.delay = name, fail_ratio, fail_status, delay
        self.lock = threading.Lock()
        self.statuses = collections.Counter()
        self.port = free_port()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 256 * 1024
            disable_nagle_algorithm = True

            def log_message(self, fmt, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                if backend.delay:
                    time.sleep(backend.delay)
                status = backend.fail_status if random.random() < backend.fail_ratio else 200
                with backend.lock:
                    backend.statuses[status] += 1
                body = json.dumps({"backend": backend.name, "path": self.path,
                                   "host": self.headers.get("host"),
                                   "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512
            allow_reuse_address = True

        self.server = Server((LOOPBACK, self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    @property
    def requests(self):
        with self.lock:
            return sum(self.statuses.values())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def parallel_requests(port, n, threads=8, host="api", path="/", headers=None, timeout=10):
    """n GETs over `threads` keep-alive connections; returns the Responses (transport errors
    as Response(status=0, body=the error)), in completion order."""
    lock = threading.Lock()
    out = []
    state = {"next": 0}

    def worker():
        c = KeepAliveClient(port, host=host, timeout=timeout)
        try:
            while True:
                with lock:
                    if state["next"] >= n:
                        return
                    state["next"] += 1
                    i = state["next"]
                try:
                    r = c.get(path.replace("{i}", str(i)), headers=headers)
                except Exception as e:
                    r = Response(0, {}, f"{type(e).__name__}: {e}".encode())
                    c = KeepAliveClient(port, host=host, timeout=timeout)
                with lock:
                    out.append(r)
        finally:
            c.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout * n)
    return out


# --------------------------------------------------------------------------- paced load

class Paced:
    """`rate` req/s for `seconds` from `start` (a time.monotonic() value; default: 0.2 s
    from now) on a fixed schedule over `threads` keep-alive connections, bounded: at most
    rate x seconds requests, 10 s timeout each. `results` fills with (status, latency
    seconds, response headers lowercased or {"error": ...}); join() waits for the threads."""

    def __init__(self, port, rate, seconds, threads=4, host="api", path="/", headers=None,
                 source=None, start=None):
        self.results = []
        self.seconds = seconds
        self.start = start if start is not None else time.monotonic() + 0.2
        lock = threading.Lock()
        total = int(rate * seconds)
        sent_headers = {"Host": host, **(headers or {})}

        def connect():
            return http.client.HTTPConnection(LOOPBACK, port, timeout=10,
                                              source_address=(source, 0) if source else None)

        def worker(k):
            conn = connect()
            try:
                for i in range(k, total, threads):
                    delay = self.start + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    t0 = time.monotonic()
                    try:
                        conn.request("GET", path, headers=sent_headers)
                        r = conn.getresponse()
                        r.read()
                        result = (r.status, time.monotonic() - t0, {k.lower(): v for k, v in r.getheaders()})
                    except (OSError, http.client.HTTPException) as e:
                        result = (0, time.monotonic() - t0, {"error": f"{type(e).__name__}: {e}"})
                        conn.close()
                        conn = connect()
                    with lock:
                        self.results.append(result)
            finally:
                conn.close()

        self.threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join(self.seconds + 30)
        return self


def offered_load(port, rate, seconds, threads=4, **kw):
    """Paced load (see Paced) run to the end: (statuses Counter, headers of one 429 or {},
    elapsed seconds)."""
    load = Paced(port, rate, seconds, threads=threads, **kw).join()
    statuses = collections.Counter(r[0] for r in load.results)
    sample = next((r[2] for r in load.results if r[0] == 429), {})
    return statuses, sample, time.monotonic() - load.start


def assert_rate_limited(statuses, elapsed, limit, label):
    """Only 200s and 429s came back, and the 200s came at `limit`/s within 10%. Returns
    (passed, refused)."""
    ok, refused = statuses[200], statuses[429]
    rate = ok / elapsed
    print(f"{label}: offered {sum(statuses.values())} in {elapsed:.1f}s, passed {ok} "
          f"({rate:.1f}/s, limit {limit}/s), 429: {refused}, other: "
          f"{ {k: v for k, v in statuses.items() if k not in (200, 429)} }")
    assert set(statuses) <= {200, 429}, statuses
    assert abs(rate - limit) <= 0.1 * limit, f"{label}: {rate:.1f}/s let through"
    return ok, refused
