"""A caller that stops reading a streamed reply cannot keep its slot: gRPC's flow control
holds the server's next write while the caller's window is full, and a write held for
`request_read_timeout` seconds ends the call with DEADLINE_EXCEEDED, closing its file."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from conftest import expect
from modelhost.client import ModelHostClient, ResourceExhaustedError
from modelhost.server import Server, Settings, running
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

Code = grpc.StatusCode
SLOTS = 2
TIMEOUT = 1.0
CHECKPOINT_MB = 32  # far more than the flow-control windows and socket buffers hold


@pytest.fixture
def limited(settings: Settings) -> Iterator[Server]:
    """A server with 2 slots and a 1 s request_read_timeout, storing a 32 MB "big"."""
    small = dataclasses.replace(settings, max_concurrent_rpcs=SLOTS, request_read_timeout=TIMEOUT)
    with running(small) as server:
        with ModelHostClient(server.target, timeout=60) as client:
            client.save_checkpoint("big", {"w": torch.zeros(CHECKPOINT_MB << 18)})
        yield server


def _open_files(store: Path) -> list[str]:
    """The store's files this process (the server's) has open, besides its locks."""
    paths = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            paths.append(os.readlink(fd))
    return [p for p in paths if p.startswith(str(store)) and not p.endswith((".lock", ".owner"))]


def test_a_download_nobody_reads_ends_and_frees_its_slot(
    limited: Server, settings: Settings
) -> None:
    store = Path(settings.store).resolve()
    channels = [grpc.insecure_channel(limited.target) for _ in range(SLOTS)]
    try:
        stalled = []
        for channel in channels:  # a connection each: only the stream's window fills
            call = pb_grpc.ModelHostStub(channel).DownloadCheckpoint(
                pb.DownloadCheckpointRequest(name="big"), timeout=60
            )
            assert next(call).HasField("info")  # then it reads nothing more for a while
            stalled.append(call)
        with ModelHostClient(limited.target, timeout=10) as client:
            expect(Code.RESOURCE_EXHAUSTED, client.list_checkpoints, "--max-concurrent-rpcs")
            assert _open_files(store)
            started = time.monotonic()
            while True:  # the stalled calls end, and other callers are served again
                try:
                    assert [c.name for c in client.list_checkpoints()] == ["big"]
                    break
                except ResourceExhaustedError:
                    assert time.monotonic() - started < 10 * TIMEOUT, "the slots are still held"
                    time.sleep(0.1)
        # Each stalled call ends on its own timer: one slot frees before the other.
        while _open_files(store):
            assert time.monotonic() - started < 10 * TIMEOUT, "their files are still open"
            time.sleep(0.1)
        for call in stalled:  # reading on: the messages sent before, then the status
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    pass
            assert ended.value.code() == Code.DEADLINE_EXCEEDED, ended.value
            assert "request_read_timeout" in ended.value.details()
    finally:
        for channel in channels:
            channel.close()


def test_a_slow_reader_gets_the_whole_checkpoint(limited: Server, tmp_path: Path) -> None:
    """The timeout bounds each message, not the download."""
    with ModelHostClient(limited.target, timeout=60) as client:
        started = time.monotonic()
        path = client.download_checkpoint(
            "big", tmp_path / "big.pt", progress=lambda done, total: time.sleep(TIMEOUT / 10)
        )
        assert time.monotonic() - started > TIMEOUT
        assert path.stat().st_size == client.get_checkpoint("big").size_bytes
