"""Shared fixtures for the smesh end-to-end tests.

  run          a meshlib.Runner for the test: starts backends (run.http_backend, run.tcp_echo,
               run.ws_echo, run.nghttpd) and proxies (run.proxy) as real processes on free
               127.0.0.1 ports; everything it started is killed by process group afterwards,
               pass or fail.
  grpc_stubs   (session) Python modules generated from echo.proto with grpc_tools.protoc
               into a temp dir at test time.
  grpc_server  an in-process grpcio Echo server on a free port.
"""
import atexit
import importlib
import os
import shutil
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import meshlib  # noqa: E402

_live_runners = []


def _cleanup_all():
    for r in list(_live_runners):
        r.cleanup()


atexit.register(_cleanup_all)


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): pytest-timeout per-test limit")


def pytest_sessionfinish(session, exitstatus):
    _cleanup_all()


@pytest.fixture
def run(tmp_path):
    r = meshlib.Runner(str(tmp_path))
    _live_runners.append(r)
    try:
        yield r
    finally:
        try:
            r.cleanup()
        finally:
            _live_runners.remove(r)


# --------------------------------------------------------------------------- gRPC

def compile_stubs(proto_dir, name):
    """Python modules (NAME_pb2, NAME_pb2_grpc) for PROTO_DIR/NAME.proto, generated with
    grpcio-tools into a temp dir; yields them and removes the dir afterwards."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix=f"smesh-e2e-{name}-")
    try:
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
                          f"--python_out={out}", f"--grpc_python_out={out}",
                          os.path.join(proto_dir, f"{name}.proto")])
        assert rc == 0, f"protoc failed with {rc}"
        sys.path.insert(0, out)
        try:
            modules = importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")
        finally:
            sys.path.remove(out)
        yield modules
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def grpc_stubs():
    yield from compile_stubs(HERE, "echo")


@pytest.fixture(scope="session")
def smesh_stubs():
    """Stubs for smesh's own API (crates/api/proto/smesh.proto): a real gRPC client of it."""
    yield from compile_stubs(os.path.join(HERE, "..", "..", "crates", "api", "proto"), "smesh")


class GrpcServer:
    def __init__(self, port, server, state):
        self.port = port
        self.server = server
        self.state = state

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def grpc_server(grpc_stubs):
    import grpc
    from concurrent import futures

    pb2, pb2_grpc = grpc_stubs
    state = {"cancelled": threading.Event(), "lock": threading.Lock(), "calls": 0}

    class Echo(pb2_grpc.EchoServicer):
        def _count(self):
            with state["lock"]:
                state["calls"] += 1

        def Unary(self, req, ctx):
            self._count()
            md = dict(ctx.invocation_metadata())
            ctx.send_initial_metadata((("x-echo-initial", md.get("x-client", "")),))
            ctx.set_trailing_metadata((("x-echo-trailer", "unary-" + md.get("x-client", "")),))
            return pb2.Msg(text=req.text, seq=req.seq, payload=req.payload)

        def ServerStream(self, req, ctx):
            self._count()
            for i in range(req.count):
                yield pb2.Msg(text=f"{req.text}-{i}", seq=i)

        def ClientStream(self, it, ctx):
            self._count()
            n, total = 0, 0
            for m in it:
                n += 1
                total += len(m.payload)
            return pb2.Msg(text=f"got {n}", seq=n, count=total)

        def Bidi(self, it, ctx):
            self._count()
            for m in it:
                yield pb2.Msg(text="echo:" + m.text, seq=m.seq)

        def Fail(self, req, ctx):
            self._count()
            ctx.set_trailing_metadata((
                ("x-error-detail", "precondition-failed"),
                ("x-error-bin", b"\x00\x01\x02\xff"),
            ))
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "nope: " + req.text)

        def Slow(self, req, ctx):
            self._count()
            deadline = time.monotonic() + req.sleep_seconds
            while time.monotonic() < deadline:
                if not ctx.is_active():
                    state["cancelled"].set()
                    return pb2.Msg()
                time.sleep(0.01)
            return pb2.Msg(text="slow done")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = meshlib.free_port()
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound == port
    server.start()
    try:
        yield GrpcServer(port, server, state)
    finally:
        server.stop(grace=None)
