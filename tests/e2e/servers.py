#!/usr/bin/env python3
"""Backend servers for the smesh end-to-end tests, each run as its own process.

    servers.py http --port P --name NAME [--delay SECONDS] [--flaky]
    servers.py tcp-echo --port P [--banner TEXT]
    servers.py ws-echo --port P --name NAME

All of them listen on 127.0.0.1 only and run until killed.

HTTP backend (HTTP/1.1, keep-alive, one thread per connection):
  * every request except /__stats and /__reset answers 200 with header
    `x-backend: NAME` and a JSON body {"backend", "method", "path", "host", "headers", "body_len",
    "body_sha256"};
  * query `delay=SECONDS` sleeps before answering, `status=CODE` answers that status;
  * `--delay` adds a fixed delay to every request;
  * `--flaky` answers 503 to every other request (1st, 3rd, 5th, ...), 200 to the others;
  * `--max-concurrent N` works on (sleeps for) at most N requests at once, the others wait
    their turn in arrival order: a slow upstream with bounded capacity;
  * GET /__stats answers {"requests": n, "inflight": k, "peak_inflight": m, "statuses": {...},
    "bodies": {path: {"len", "sha256"}} (the last 64 requests with a body)} (not counted);
  * GET /__reset sets the counters back to zero.

TCP echo: echoes every byte as it arrives; when the client half-closes (EOF) it sends
`EOF-SEEN\\n` and then closes its side. With --banner it first sends the banner (server speaks first).

WebSocket echo: echoes every message (text or binary), prefixed by nothing.
"""
import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.requests = 0
            self.inflight = 0
            self.peak_inflight = 0
            self.statuses = {}
            self.bodies = {}


def run_http(args):
    stats = Stats()
    name = args.name
    workers = threading.Semaphore(args.max_concurrent) if args.max_concurrent else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "e2e-backend"
        # one write per response and no Nagle: avoids 40 ms delayed-ACK stalls on keep-alive
        wbufsize = 256 * 1024
        disable_nagle_algorithm = True

        def log_message(self, fmt, *a):  # keep stderr quiet
            pass

        def _send(self, status, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else body.encode()
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.send_header("x-backend", name)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _handle(self):
            url = urlsplit(self.path)
            if url.path == "/__stats":
                with stats.lock:
                    out = {"requests": stats.requests, "inflight": stats.inflight,
                           "peak_inflight": stats.peak_inflight, "statuses": dict(stats.statuses),
                           "bodies": dict(stats.bodies)}
                return self._send(200, json.dumps(out))
            if url.path == "/__reset":
                stats.reset()
                return self._send(200, "{}")
            body_len = 0
            digest = hashlib.sha256()
            if self.headers.get("content-length"):
                data = self.rfile.read(int(self.headers["content-length"]))
                body_len = len(data)
                digest.update(data)
            elif "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    data = self.rfile.read(size)
                    body_len += len(data)
                    digest.update(data)
                    self.rfile.readline()
            if body_len:
                with stats.lock:
                    stats.bodies[url.path] = {"len": body_len, "sha256": digest.hexdigest()}
                    while len(stats.bodies) > 64:
                        stats.bodies.pop(next(iter(stats.bodies)))
            q = parse_qs(url.query)
            with stats.lock:
                stats.requests += 1
                n = stats.requests
                stats.inflight += 1
                stats.peak_inflight = max(stats.peak_inflight, stats.inflight)
            try:
                delay = args.delay + float(q.get("delay", ["0"])[0])
                if workers:
                    with workers:
                        time.sleep(delay)
                elif delay > 0:
                    time.sleep(delay)
                status = int(q.get("status", ["200"])[0])
                if args.flaky and n % 2 == 1:
                    status = 503
                with stats.lock:
                    stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
                out = {"backend": name, "method": self.command, "path": self.path,
                       "host": self.headers.get("host"), "headers": dict(self.headers.items()),
                       "body_len": body_len, "body_sha256": digest.hexdigest(), "n": n}
                self._send(status, json.dumps(out))
            finally:
                with stats.lock:
                    stats.inflight -= 1

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512
        allow_reuse_address = True

    srv = Server(("127.0.0.1", args.port), Handler)
    srv.serve_forever()


def run_tcp_echo(args):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(128)

    def serve(conn):
        with conn:
            try:
                if args.banner:
                    conn.sendall(args.banner.encode() + b"\n")
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.sendall(b"EOF-SEEN\n")
                        conn.shutdown(socket.SHUT_WR)
                        # drain until the peer closes too (bounded)
                        conn.settimeout(10)
                        try:
                            while conn.recv(65536):
                                pass
                        except OSError:
                            pass
                        return
                    conn.sendall(data)
            except OSError:
                return

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def run_ws_echo(args):
    from websockets.sync.server import serve

    def handler(ws):
        try:
            for msg in ws:
                ws.send(msg)
        except Exception:
            pass

    with serve(handler, "127.0.0.1", args.port, max_size=8 * 1024 * 1024) as srv:
        srv.serve_forever()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="kind", required=True)
    h = sub.add_parser("http")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--name", required=True)
    h.add_argument("--delay", type=float, default=0.0)
    h.add_argument("--flaky", action="store_true")
    h.add_argument("--max-concurrent", type=int, default=0)
    t = sub.add_parser("tcp-echo")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--banner", default="")
    w = sub.add_parser("ws-echo")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--name", default="ws")
    args = p.parse_args()
    {"http": run_http, "tcp-echo": run_tcp_echo, "ws-echo": run_ws_echo}[args.kind](args)


if __name__ == "__main__":
    sys.exit(main())
