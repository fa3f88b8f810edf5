"""The probe port (`health_port`) and health on the main port beside it.

The probe port needs no token, and gRPC buffers each stream's partial request before any
handler runs: a caller used to open thousands of half-sent health Checks on one connection,
on as many connections as it liked, for as long as it liked (+1.5 GB from 24 connections).
Now a connection has at most `PROBE_MAX_STREAMS` streams, the port at most
`PROBE_MAX_CONNECTIONS` connections, and a connection ends after `PROBE_CONNECTION_AGE_S`
(or `PROBE_CONNECTION_IDLE_S` without a stream). On the main port, health and reflection
then need a token and pass the gate like every other method: a slot, and the request read
within `request_read_timeout`.

The half-sent requests are written with a small raw HTTP/2 client (`Raw`): a gRPC client
only sends whole messages and honours the server's stream limit.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from helpers.http2 import CHECK, REFUSED_STREAM, Raw
from helpers.processes import free_port
from modelhost.server import Server, Settings, probes, running

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ENHANCE_YOUR_CALM = 11
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def probed(settings: Settings) -> Settings:
    return dataclasses.replace(settings, token=TOKEN, health_port=free_port())


def _check(port: int, **kwargs: Any) -> Any:
    """A health Check on a connection of its own (channels to one address in a process
    otherwise share one: it would wait behind the streams a test holds), which waits for
    a connection rather than fail when one was just closed."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        request = health_pb2.HealthCheckRequest()
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(request, timeout=30, wait_for_ready=True, **kwargs)


def test_a_probe_connection_holds_at_most_its_stream_cap_of_half_sent_checks(
    probed: Settings,
) -> None:
    """Past PROBE_MAX_STREAMS, a new stream on the connection is refused at once
    (RST_STREAM REFUSED_STREAM, what HTTP/2 clients retry) and its data is dropped; one
    that ends gives its place back; Checks on another connection answer meanwhile."""
    cap = probes.PROBE_MAX_STREAMS
    with running(probed) as server:
        raw = Raw(server.health_port)
        try:
            streams = [1 + 2 * k for k in range(cap + 6)]
            for stream in streams:
                raw.start(stream)
            over = streams[cap:]
            assert raw.wait(lambda: set(over) <= set(raw.resets)), raw.resets
            assert set(raw.resets) == set(over)
            assert {raw.resets[stream] for stream in over} == {REFUSED_STREAM}
            assert not raw.closed.is_set() and not raw.ended
            assert _check(server.health_port).status == SERVING

            raw.cancel(streams[0])  # a place comes back
            time.sleep(0.5)
            later = streams[-1] + 2
            raw.start(later)
            assert not raw.wait(lambda: later in raw.resets, 2), "refused with a place free"
        finally:
            raw.close()


def test_the_probe_port_keeps_at_most_its_cap_of_connections(
    probed: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PROBE_MAX_CONNECTIONS, a new connection is closed as soon as it is accepted;
    once one goes, a probe connects again."""
    monkeypatch.setattr(probes, "PROBE_MAX_CONNECTIONS", 3)
    with running(probed) as server:
        held = [Raw(server.health_port) for _ in range(3)]
        try:
            for raw in held:
                raw.start(1)
            extra = socket.create_connection(("127.0.0.1", server.health_port), timeout=30)
            try:
                assert extra.recv(100) == b""  # closed, without a SETTINGS frame
            except ConnectionResetError:
                pass
            finally:
                extra.close()
            held.pop().close()
            assert _check(server.health_port).status == SERVING
        finally:
            for raw in held:
                raw.close()


def test_a_probe_connection_ends_at_its_age_and_when_idle(
    probed: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection holding half-sent Checks gets GOAWAY at PROBE_CONNECTION_AGE_S and is
    closed PROBE_CONNECTION_GRACE_S later; one with no stream, at PROBE_CONNECTION_IDLE_S.
    Shortened here (30 s, 5 s, 10 s in earnest)."""
    monkeypatch.setattr(probes, "PROBE_CONNECTION_AGE_S", 1.0)
    monkeypatch.setattr(probes, "PROBE_CONNECTION_GRACE_S", 0.5)
    monkeypatch.setattr(probes, "PROBE_CONNECTION_IDLE_S", 1.0)
    with running(probed) as server:
        stalled, idle = Raw(server.health_port), Raw(server.health_port)
        try:
            stalled.start(1)
            stalled.start(3)
            assert stalled.closed.wait(30), "a connection with stalled streams stayed open"
            assert stalled.goaway
            assert idle.closed.wait(30) and idle.goaway, "an idle connection stayed open"
            assert _check(server.health_port).status == SERVING
        finally:
            stalled.close()
            idle.close()


@pytest.fixture
def main_port(probed: Settings) -> Iterator[Server]:
    """A server with a probe port and a token; on its main port one slot, and requests
    read within 3 s."""
    limited = dataclasses.replace(probed, request_read_timeout=3.0, max_concurrent_rpcs=1)
    with running(limited) as server:
        yield server


def test_on_the_main_port_a_half_sent_health_check_takes_a_slot_and_times_out(
    probed: Settings,
) -> None:
    """With a probe port, health on the main port needs a token, and a token holder's
    health Check is read like any other request: one that never arrives holds a slot
    (here the only one) and ends DEADLINE_EXCEEDED after request_read_timeout (10 s here:
    the Checks that find the slot taken must get in while it is held, on a busy CI)."""
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    slow = dataclasses.replace(probed, request_read_timeout=10.0, max_concurrent_rpcs=1)
    with running(slow) as main_port, grpc.insecure_channel(main_port.target) as channel:
        stalled = channel.stream_unary(CHECK).future(nothing(), metadata=AUTH, timeout=60)
        # Once it holds the slot (Checks sent before could take it first: then it was the
        # one refused, a race that failed this test on a busy machine).
        gate = main_port.gate
        assert gate is not None
        deadline = time.monotonic() + 30
        while gate.active < 1 and not stalled.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.active == 1 and not stalled.done()
        with pytest.raises(grpc.RpcError) as refused:
            _check(main_port.port, metadata=AUTH)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        with pytest.raises(grpc.RpcError) as caught:
            stalled.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        assert "request_read_timeout" in (caught.value.details() or "")
        never.set()
        assert _check(main_port.port, metadata=AUTH).status == SERVING


def test_on_the_main_port_a_partial_health_check_ends_within_the_read_timeout(
    main_port: Server,
) -> None:
    """Part of a message sent, the rest never: the server ends the stream (it used to keep
    it, and its partial request, until the caller went away)."""
    raw = Raw(main_port.port)
    try:
        raw.start(1, metadata=AUTH)
        assert raw.wait(lambda: 1 in raw.ended or 1 in raw.resets), "the stream stayed open"
    finally:
        raw.close()
    assert _check(main_port.port, metadata=AUTH).status == SERVING


def test_on_the_main_port_watch_and_reflection_pass_the_gate_and_keep_their_caps(
    probed: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watch (a servicer that writes its replies itself) and reflection (a stream both
    ways) work through the gate with a token, and the open-stream caps still hold."""
    monkeypatch.setattr(probes, "MAX_OPEN_STREAMS_PER_ADDRESS", 1)
    with running(probed) as server, grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="modelhost.v1.ModelHost")
        watch = health.Watch(request, metadata=AUTH, timeout=60)
        assert next(watch).status == SERVING
        with pytest.raises(grpc.RpcError) as caught:
            next(health.Watch(request, metadata=AUTH, timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert "from your address" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            next(health.Watch(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
        watch.cancel()

        deadline = time.monotonic() + 30
        while server.streams.open and time.monotonic() < deadline:
            time.sleep(0.01)  # the server sees the cancellation on its own thread
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = reflect(iter([listing]), metadata=AUTH, timeout=60)
        services = next(replies).list_services_response.service
        assert "modelhost.v1.ModelHost" in {service.name for service in services}
        assert health.Check(request, metadata=AUTH, timeout=30).status == SERVING


def test_main_port_streams_take_at_most_a_quarter_of_the_slots(probed: Settings) -> None:
    """Red team 6's L1: with a probe port, a main-port Watch holds a slot for as long as
    it is open; open Watches may take at most a quarter of max_concurrent_rpcs, so the
    other calls keep theirs."""
    gated = dataclasses.replace(probed, max_concurrent_rpcs=8)
    assert probes.OpenStreams.most_for(dataclasses.replace(gated, health_port=0)) == (
        probes.MAX_OPEN_STREAMS
    )
    with running(gated) as server, grpc.insecure_channel(server.target) as channel:
        assert server.streams.most == 2
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="modelhost.v1.ModelHost")
        watches = [health.Watch(request, metadata=AUTH, timeout=60) for _ in range(2)]
        assert all(next(watch).status == SERVING for watch in watches)
        with pytest.raises(grpc.RpcError) as caught:
            next(health.Watch(request, metadata=AUTH, timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert "2 health Watch and reflection streams are open" in str(caught.value.details())
        assert health.Check(request, metadata=AUTH, timeout=30).status == SERVING
        for watch in watches:
            watch.cancel()
