"""Issue 6, acceptance 10 (deadline part): a route's timeouts.request becomes the gRPC
upstream's deadline, and a client's grpc-timeout reaches the upstream decremented by the time
spent in the proxy. A small gRPC server reports the deadline it received."""
import struct
import time
from concurrent import futures

import grpc
import pytest

from meshlib import LOOPBACK, free_port, http_route, service

METHOD = "/deadline.Probe/Remaining"


@pytest.fixture
def probe():
    """A gRPC server answering with the time_remaining() it saw (a big-endian double; -1 when
    it got no deadline); a request body b"sleep" makes it wait 3 s first."""
    def remaining(request, ctx):
        left = ctx.time_remaining()
        if request == b"sleep":
            time.sleep(3)
        return struct.pack(">d", -1.0 if left is None else left)

    handler = grpc.method_handlers_generic_handler("deadline.Probe", {
        "Remaining": grpc.unary_unary_rpc_method_handler(remaining)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    assert server.add_insecure_port(f"{LOOPBACK}:{port}") == port
    server.start()
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        server.stop(grace=None)


def call(px, timeout=None, body=b""):
    ch = grpc.insecure_channel(f"{LOOPBACK}:{px.outbound}",
                               options=[("grpc.enable_http_proxy", 0), ("grpc.default_authority", "probe")])
    try:
        out = ch.unary_unary(METHOD)(body, timeout=timeout)
        return struct.unpack(">d", out)[0]
    finally:
        ch.close()


def proxy(run, addr, request_timeout=None, delay=None):
    rule = {}
    if request_timeout:
        rule["timeouts"] = {"request": request_timeout}
    if delay:
        rule["filters"] = [{"type": "FaultInjection", "faultInjection": {
            "delay": {"fixedDelay": delay, "percent": 100}}}]
    return run.proxy([service("probe", [addr], protocol="grpc"), http_route("probe-route", ["probe"], [rule])])


@pytest.mark.timeout(60)
def test_route_timeout_becomes_the_upstream_deadline(run, probe):
    px = proxy(run, probe, request_timeout="2s")
    left = call(px)
    print(f"deadline: route 2s, no client deadline -> upstream saw {left:.3f}s")
    assert 1.5 < left <= 2.0, left
    # the smaller of the client's and the route's wins
    left = call(px, timeout=10)
    assert 1.5 < left <= 2.0, left
    left = call(px, timeout=1.0)
    # (grpc-core rounds the grpc-timeout it sends up a little)
    assert 0.5 < left <= 1.05, left
    # the route deadline still ends a slow call
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        call(px, body=b"sleep")
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
    assert time.monotonic() - t0 < 2.8


@pytest.mark.timeout(60)
def test_client_deadline_is_decremented_by_proxy_time(run, probe):
    # no route timeout: only the client's grpc-timeout, minus a 300 ms delay in the proxy
    px = proxy(run, probe, delay="300ms")
    left = call(px, timeout=2.0)
    print(f"deadline: client 2s, 300ms spent in the proxy -> upstream saw {left:.3f}s")
    assert 1.2 < left <= 1.75, left
    # without any deadline the upstream gets none
    px2 = proxy(run, probe)
    # (grpcio reports "no deadline" as None or as a huge time_remaining)
    left = call(px2)
    assert left == -1.0 or left > 1e6, left
