"""What one caller's unfinished requests may hold on the main port (red team 13, F1 and
F3; round 14, F1 and F3): a connection has at most `max_streams_per_connection` calls
open, and the requests the server holds fit `max_receiving_bytes`: one being received
counts as `max_message_bytes`, one received as its size until its call is done with it.
Requests past that wait for room with HTTP/2's small window (their bytes wait at the
caller), and get RESOURCE_EXHAUSTED if no room comes within `request_read_timeout`.
Health and reflection, which need no token where they share the main port, have a
budget of their own."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect
from helpers.http2 import CHECK, REFUSED_STREAM, Raw
from helpers.processes import free_port
from modelhost.client import ModelHostClient
from modelhost.server import Settings, devices, running, store_files
from modelhost.server.app import receiving_bytes
from modelhost.server.gate import OPEN_RECEIVING
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
    """Two requests received at a time (the least budget): callers that never send their
    request hold those turns, and the next request waits for them. Once they end, the
    next is received. (The refusal of a request that waits too long: the test of received
    requests below.)"""
    two = dataclasses.replace(
        settings, max_message_bytes=1 << 20, max_receiving_bytes=1 << 20, request_read_timeout=2
    )
    assert receiving_bytes(two) == 2 << 20  # raised to two messages
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    with running(two) as server, grpc.insecure_channel(server.target) as channel:
        stalled = [channel.stream_unary(PREDICT).future(nothing(), timeout=60) for _ in "ab"]
        until = time.monotonic() + 20
        with pytest.raises(grpc.RpcError) as waited:
            while time.monotonic() < until:  # until the stalled call has taken its turn
                channel.unary_unary(LIST)(b"", timeout=0.5)
                time.sleep(0.05)
        # It waited: its caller's deadline passed. (Whether the server's own refusal comes
        # first is a race with the stalled call's read timeout, which is as long.)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for call in stalled:
            with pytest.raises(grpc.RpcError) as timed_out:
                call.result()
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
    assert receiving_bytes(settings) == machine // 4
    limit.write_text(f"{8 << 30}\n")
    assert devices.host_memory_bytes() == min(machine, 8 << 30)
    assert receiving_bytes(settings) == min(machine, 8 << 30) // 4
    given = dataclasses.replace(settings, max_receiving_bytes=3 << 30)
    assert receiving_bytes(given) == 3 << 30
    # Review 16, 3: a budget of one message was kept from receiving by one request held
    # (of 41 bytes): at least two messages, one received and one being received.
    small = dataclasses.replace(settings, max_receiving_bytes=12345)
    assert receiving_bytes(small) == 2 * settings.max_message_bytes


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
            body = start + b"x" * (message - 2 * len(start))
            for stream in (1, 3):  # the budget's two messages: received, the window opens
                raw.open(stream, PREDICT)
                assert raw.send(stream, body, seconds=20) == len(body)
            raw.open(5, PREDICT)
            waiting = raw.send(5, body, seconds=2)
            assert waiting <= 1 << 20, f"{waiting:,} bytes of a request that waits its turn"
        finally:
            raw.close()


def _message(size: int) -> bytes:
    """The start of a gRPC message of `size` bytes: one string field (health Check's
    service, or Predict's model), its bytes to follow."""
    length = size - 5  # the field's tag and a 4-byte varint
    varint = bytes([(length >> s & 0x7F) | (0x80 if s < 21 else 0) for s in (0, 7, 14, 21)])
    return b"\0" + struct.pack(">I", size) + b"\x0a" + varint


def _tokens_without_a_probe_port(settings: Settings, *, read_timeout: float) -> Settings:
    """Tokens on, health and reflection open on the main port, messages of up to 8 MiB."""
    return dataclasses.replace(
        settings,
        token="inference-secret",
        max_message_bytes=8 << 20,
        request_read_timeout=read_timeout,
        max_streams_per_connection=0,
    )


def test_half_sent_health_checks_without_a_token_hold_at_most_their_budget(
    settings: Settings,
) -> None:
    """Round 14, F1: where probes share the main port (no --health-port), health and
    reflection need no token, and they once skipped the gate's reader: every half-sent
    Check held up to --max-message-bytes, with no limit on their number or time (12 of
    60 MiB held 723 MiB). Now `OPEN_RECEIVING` of them are received at once, from a budget
    of their own (a caller without a token cannot take the budget of calls that need
    one); the next waits with HTTP/2's small window, and each ends within
    request_read_timeout."""
    message = 6 << 20
    tokens = _tokens_without_a_probe_port(settings, read_timeout=3)
    body = _message(message) + b"x" * (message - 64)
    with running(tokens) as server:
        raw = Raw(server.port)
        try:
            streams = [1 + 2 * k for k in range(OPEN_RECEIVING + 1)]
            sent = {}
            for stream in streams:
                raw.open(stream, CHECK)
                sent[stream] = raw.send(stream, body, seconds=3 if stream < streams[-1] else 1)
            assert [sent[s] for s in streams[:-1]] == [len(body)] * OPEN_RECEIVING
            assert sent[streams[-1]] <= 1 << 20, f"{sent[streams[-1]]:,} bytes past the budget"
            # Each ends within request_read_timeout (RST_STREAM or trailers), unlike before.
            assert raw.wait(lambda: set(streams) <= set(raw.resets) | raw.ended, 20)
            with grpc.insecure_channel(server.target) as channel:  # probes answer on
                health = channel.unary_unary(CHECK)(b"", timeout=30)
            assert health == b"\x08\x01"  # SERVING
        finally:
            raw.close()


def test_a_health_check_that_does_not_parse_is_refused_without_an_error_log(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 14, F2: a body that does not parse, sent to health or reflection, made gRPC
    log an ERROR with its traceback (7 to 16 lines a call, no token needed): on both the
    main and the probe port it is INVALID_ARGUMENT now, and nothing is logged."""
    probes = dataclasses.replace(settings, health_port=free_port())
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with running(settings) as main, running(probes) as split:
        for port in (main.port, split.health_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(20):
                    with pytest.raises(grpc.RpcError) as refused:
                        channel.unary_unary(CHECK)(b"\xff\xff\xff", timeout=30)
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "not a valid Check message" in (refused.value.details() or "")
                replies = channel.stream_stream(reflection)(iter([b"\xff\xff\xff"]), timeout=30)
                with pytest.raises(grpc.RpcError) as refused:
                    list(replies)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0]


def test_received_requests_count_against_the_budget_until_their_call_ends(
    settings: Settings,
) -> None:
    """Round 14, F3: a request's turn ended once it had arrived, so whole requests waiting
    for a busy model held memory the budget never counted (20 of 30 MiB: +870 MiB against
    a 32 MiB budget). A received request now holds its size until its call ends: past the
    budget the next waits, then gets RESOURCE_EXHAUSTED; once the first call ends it is
    received. A streamed upload's messages hold it one at a time: a checkpoint larger
    than the budget still goes in."""
    budget = dataclasses.replace(
        settings,
        max_message_bytes=4 << 20,
        max_receiving_bytes=8 << 20,  # two requests of 3.5 MiB, and room for 1 MiB more
        request_read_timeout=2,
    )
    x = np.ones((229_000, 4), np.float32)  # 3.5 MiB
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", build("tiny_mlp").state_dict())
        client.load_model(
            "slow",
            architecture="slow_mlp",
            checkpoint="w",
            architecture_args={"delay": 4.0},
            batching={"max_batch_size": 1},
        )
        held = [threading.Thread(target=client.predict, args=("slow", x)) for _ in "ab"]
        for thread in held:
            thread.start()
        time.sleep(1.0)  # received: one runs for 4 s, the other waits in the queue
        expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: client.predict("slow", x),
            "--max-receiving-bytes",
        )
        for thread in held:
            thread.join(30)
        assert client.predict("slow", x[:2]).shape == (2, 3)
        big = {"w": torch.arange(4 << 20, dtype=torch.float32)}  # 16 MiB: several messages
        client.save_checkpoint("big", big)
        assert client.get_checkpoint("big").size_bytes > budget.max_receiving_bytes


def test_an_uploads_chunks_waiting_to_be_written_count_in_the_receiving_budget(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 16's note, 4: up to SPOOL_CHUNKS chunks of an upload wait in memory to be
    written, and the budget counted none of them once the next chunk was read (8 chunks
    of --max-message-bytes per upload). Each counts now until it is written: on a slow
    disk the spool holds no more than the budget has room for, and every byte comes
    back when the upload is stored, fails, or its caller leaves."""
    budget = dataclasses.replace(
        settings,
        max_message_bytes=4 << 20,
        max_receiving_bytes=16 << 20,
        request_read_timeout=10,
    )
    write = store_files.PendingWrite.write
    failing = threading.Event()

    def slow_disk(self: store_files.PendingWrite, data: bytes | memoryview) -> int:
        time.sleep(0.15)
        if failing.is_set():
            raise OSError(errno.EIO, "Input/output error")
        return write(self, data)

    monkeypatch.setattr(store_files.PendingWrite, "write", slow_disk)
    weights = {"w": torch.arange(10 << 20, dtype=torch.float32)}  # 40 MiB: 20 chunks
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        assert server.gate is not None
        receiving = server.gate.receiving
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(receiving.held)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            client.save_checkpoint("big", weights)
        finally:
            done.set()
            watcher.join()
        assert receiving.held == 0
        # The reader holds a whole message's room while it reads; the spool holds the rest
        # (of 16 MiB: before, 6 MiB at most, the message being read and the one before).
        assert max(seen) >= 10 << 20, f"at most {max(seen):,} held"
        assert torch.equal(client.download_checkpoint("big")["w"], weights["w"])
        failing.set()  # a disk error part way: the chunks never written come back
        expect(grpc.StatusCode.INTERNAL, lambda: client.save_checkpoint("bad", weights))
        failing.clear()
        wait_for(lambda: receiving.held == 0)
        # A caller that leaves part way: they come back too.
        expect(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            lambda: client.save_checkpoint("late", weights, timeout=1.0),
        )
        wait_for(lambda: receiving.held == 0)
        assert [c.name for c in client.list_checkpoints()] == ["big"]


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_open_watch_and_reflection_streams_keep_no_health_check_waiting(
    settings: Settings,
) -> None:
    """Review 16, 1 and 2: a health Watch held its request's bytes of the open budget for
    as long as its stream stayed open, and an idle reflection stream waits for its next
    request with a read posted (counted as a whole message): two of either kept every
    health Check on the main port waiting. A Watch's request counts until it is parsed
    now, and reflection has a budget of its own."""
    message = 6 << 20
    tokens = _tokens_without_a_probe_port(settings, read_timeout=30)
    length = message - 5 - 1 - 4  # gRPC's prefix, the field's tag and length
    varint = bytes([(length >> s & 0x7F) | (0x80 if s < 21 else 0) for s in (0, 7, 14, 21)])
    watch = (  # service "" (the server: known) and an unknown field 15 of 6 MiB
        b"\0" + struct.pack(">I", message - 5) + b"\x7a" + varint + b"x" * length
    )
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with running(tokens) as server:
        raw = Raw(server.port)
        try:
            for stream in (1, 3):
                raw.open(stream, "/grpc.health.v1.Health/Watch")
                assert raw.send(stream, watch, seconds=10) == len(watch)
            for stream in (5, 7):  # idle: no request yet
                raw.open(stream, reflection)
            time.sleep(0.5)
            with grpc.insecure_channel(server.target) as channel:
                for _ in range(3):
                    assert channel.unary_unary(CHECK)(b"", timeout=5) == b"\x08\x01"
            assert not {1, 3, 5, 7} & (set(raw.resets) | raw.ended)  # all still open
        finally:
            raw.close()
