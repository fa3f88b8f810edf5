"""What one caller's unfinished requests may hold on the main port (red team 13, F1 and
F3): a connection has at most `max_streams_per_connection` calls open, and at most
`max_receiving_bytes` / `max_message_bytes` requests are received at once. Half-sent
requests past that wait for their turn with HTTP/2's small window (their bytes wait at
the caller), and get RESOURCE_EXHAUSTED if no turn comes within `request_read_timeout`."""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from helpers.http2 import REFUSED_STREAM, Raw
from modelhost.server import Settings, devices, running
from modelhost.server.app import receiving_at_once
from modelhost.v1 import modelhost_pb2 as pb

PREDICT = "/modelhost.v1.ModelHost/Predict"
LIST = "/modelhost.v1.ModelHost/ListModels"


def test_a_connection_holds_at_most_its_cap_of_calls(settings: Settings) -> None:
    """Past the cap, a new stream on the connection is refused at once (REFUSED_STREAM,
    which clients retry); calls on other connections go on."""
    capped = dataclasses.replace(settings, max_streams_per_connection=4)
    with running(capped) as server:
        raw = Raw(server.port)
        try:
            streams = [1 + 2 * k for k in range(10)]
            for stream in streams:
                raw.start(stream, path=PREDICT)
            assert raw.wait(lambda: set(streams[4:]) <= set(raw.resets)), raw.resets
            assert {raw.resets[s] for s in streams[4:]} == {REFUSED_STREAM}
            assert not set(streams[:4]) & set(raw.resets)
            with grpc.insecure_channel(server.target) as channel:
                listed = channel.unary_unary(LIST)(b"", timeout=30)
            assert pb.ListModelsResponse.FromString(listed) == pb.ListModelsResponse()
        finally:
            raw.close()


def test_requests_past_the_receiving_budget_wait_for_their_turn(settings: Settings) -> None:
    """One request received at a time: a caller that never sends its request holds that
    turn; the next request waits for it, and gets RESOURCE_EXHAUSTED naming the setting
    when the turn does not come within request_read_timeout. Once the first ends, the
    next is received."""
    one = dataclasses.replace(
        settings, max_message_bytes=1 << 20, max_receiving_bytes=1 << 20, request_read_timeout=2
    )
    assert receiving_at_once(one) == 1
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    with running(one) as server, grpc.insecure_channel(server.target) as channel:
        stalled = channel.stream_unary(PREDICT).future(nothing(), timeout=60)
        with pytest.raises(grpc.RpcError) as waited:
            for _ in range(5):  # until the stalled call has reached the gate and its turn
                channel.unary_unary(LIST)(b"", timeout=30)
        assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-receiving-bytes" in (waited.value.details() or "")
        with pytest.raises(grpc.RpcError) as timed_out:
            stalled.result()
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        never.set()
        listed = channel.unary_unary(LIST)(b"", timeout=30)
        assert pb.ListModelsResponse.FromString(listed) == pb.ListModelsResponse()


def test_the_default_receiving_budget_is_a_quarter_of_the_memory(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of the container's memory limit when there is one (review 15b, M4: the machine's
    memory would leave a pod's limit unbounded)."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(devices, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "none"), str(limit)))
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert devices.host_memory_bytes() == machine
    assert receiving_at_once(settings) == machine // 4 // settings.max_message_bytes
    limit.write_text(f"{8 << 30}\n")
    assert devices.host_memory_bytes() == min(machine, 8 << 30)
    assert receiving_at_once(settings) == min(machine, 8 << 30) // 4 // (256 << 20)
    tiny = dataclasses.replace(settings, max_receiving_bytes=1)
    assert receiving_at_once(tiny) == 1  # at least one, whatever the budget


def test_a_request_waiting_for_its_turn_is_sent_no_more_than_a_small_window(
    settings: Settings,
) -> None:
    """The bytes of a half-sent request that waits for its turn stay with its caller:
    gRPC's window probing, which grew such a stream's window to tens of MiB on loopback
    after a fast upload, is off. The request being received may send all of its bytes."""
    message = 48 << 20
    one = dataclasses.replace(
        settings,
        max_message_bytes=64 << 20,
        max_receiving_bytes=64 << 20,
        request_read_timeout=10,
        max_streams_per_connection=0,
    )
    start = b"\0" + struct.pack(">I", message) + b"\x0a" + b"\x80\x80\x80\x17"  # a string
    with running(one) as server:
        raw = Raw(server.port)
        try:
            raw.open(1, PREDICT)
            body = start + b"x" * (message - 2 * len(start))
            assert raw.send(1, body, seconds=20) == len(body)  # received: the window opens
            raw.open(3, PREDICT)
            waiting = raw.send(3, body, seconds=2)
            assert waiting <= 1 << 20, f"{waiting:,} bytes of a request that waits its turn"
        finally:
            raw.close()
