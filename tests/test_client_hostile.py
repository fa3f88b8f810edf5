"""The client and the CLI against a hostile (or broken) server: a fake ModelHost on
127.0.0.1, built on the generated stubs, that announces huge downloads, stalls, sends
replies over the message limit or malformed ones, and puts terminal escapes in its
strings. Every failure is a `ModelHostError`, bounded in time, memory and disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelhost.cli import main
from modelhost.client import (
    AsyncModelHostClient,
    ChannelConfig,
    DataLossError,
    DeadlineExceededError,
    ModelHostClient,
    ModelHostError,
    ProtocolError,
    ResourceExhaustedError,
    calls,
)
from modelhost.client.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pbg

MiB = 1 << 20
ESCAPES = "x\x1b[2J\x1b[31mPWNED\x1b]0;title\x07\r\nhint: fake"
"""A string that clears the screen, turns red, sets the window title and fakes a line."""


def _canned(rpc: str) -> Callable[..., Any]:
    def answer(self: Fake, request: Any, context: grpc.ServicerContext) -> Any:
        delay = self.delays.get(rpc, 0.0)
        if delay:
            self.released.wait(delay)
        error = self.errors.get(rpc)
        if error:
            context.abort(grpc.StatusCode.NOT_FOUND, error)
        return self.replies[rpc]

    return answer


class Fake(pbg.ModelHostServicer):
    """A hostile ModelHost. Unary calls answer `replies[rpc]` after `delays[rpc]`
    seconds, or fail with `errors[rpc]`; streams are set per test. Anything that waits
    waits on `released`, set when the server stops, so no handler outlives its test."""

    SaveCheckpoint = _canned("SaveCheckpoint")
    DownloadCheckpoint = _canned("DownloadCheckpoint")  # replies: a list of messages
    ListCheckpoints = _canned("ListCheckpoints")
    GetCheckpoint = _canned("GetCheckpoint")
    DeleteCheckpoint = _canned("DeleteCheckpoint")
    LoadModel = _canned("LoadModel")
    UnloadModel = _canned("UnloadModel")
    ListModels = _canned("ListModels")
    GetModel = _canned("GetModel")
    ListArchitectures = _canned("ListArchitectures")
    Predict = _canned("Predict")

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}
        self.delays: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.health = health_pb2.HealthCheckResponse.SERVING
        self.released = threading.Event()
        self.cancelled = threading.Event()  # a stream handler saw its call end
        self.sent = 0  # download bytes the server managed to send
        self.received = 0  # upload bytes it read


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        return health_pb2.HealthCheckResponse(status=self.fake.health)


@contextmanager
def serving(fake: Fake) -> Iterator[str]:
    """Serves `fake` on 127.0.0.1 (any free port); yields the target."""
    server = grpc.server(
        futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", -1)]
    )
    pbg.add_ModelHostServicer_to_server(fake, server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(fake), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        fake.released.set()
        server.stop(0).wait()


def call(target: str, aio: bool, method: str, *args: Any, client: Any = None, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)` on a fresh blocking or asyncio client made with the
    keyword arguments in `client`."""
    options = client or {}
    if aio:

        async def run() -> Any:
            async with AsyncModelHostClient(target, **options) as c:
                return await getattr(c, method)(*args, **kwargs)

        return asyncio.run(run())
    with ModelHostClient(target, **options) as c:
        return getattr(c, method)(*args, **kwargs)


def fails(error: type[ModelHostError], within: float, run: Callable[[], Any]) -> ModelHostError:
    """Asserts `run` raises `error` within `within` seconds; returns it."""
    started = time.monotonic()
    with pytest.raises(error) as caught:
        run()
    assert time.monotonic() - started < within
    return caught.value


CLIENTS = pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])


# Downloads: bounded in bytes and in time


def _header(
    size: int, format: pb.CheckpointFormat.ValueType = pb.CHECKPOINT_FORMAT_STATE_DICT
) -> pb.DownloadCheckpointResponse:
    info = pb.CheckpointInfo(name="x", size_bytes=size, sha256="0" * 64, format=format)
    return pb.DownloadCheckpointResponse(info=info)


ENDLESS = 256 * MiB
"""What an endless download sends at most. A client that cuts it off stops it long before:
the sender learns of the cut late, after what HTTP/2's flow-control windows let it
buffer (they grow on loopback: 19.6 MiB was seen on a loaded machine)."""


class EndlessDownload(Fake):
    """Announces `announced` bytes, then streams zeros (ENDLESS at most: a real attacker
    never stops) for as long as the client takes them."""

    def __init__(
        self,
        announced: int,
        format: pb.CheckpointFormat.ValueType = pb.CHECKPOINT_FORMAT_STATE_DICT,
    ) -> None:
        super().__init__()
        self.announced, self.format = announced, format

    def DownloadCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield _header(self.announced, self.format)
        chunk = pb.DownloadCheckpointResponse(chunk=bytes(256 << 10))
        while context.is_active() and self.sent < ENDLESS:
            yield chunk
            self.sent += len(chunk.chunk)


OVERSIZED: dict[str, tuple[int, type[ModelHostError], str]] = {
    # case: (the size announced, the error, its words); the client's cap is 1 MiB
    "announced-over-the-cap": (
        2**62,
        ResourceExhaustedError,
        "more than max_download_bytes (1,048,576)",
    ),
    "more-than-announced": (
        MiB // 2,
        DataLossError,
        f"more than the {MiB // 2} bytes it announced",
    ),
}


@CLIENTS
@pytest.mark.parametrize("to_file", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_a_download_keeps_no_more_than_announced_nor_than_the_cap(
    tmp_path: Path, aio: bool, to_file: bool, case: str
) -> None:
    """A server announcing 2**62 bytes is refused at its header; one sending more than
    it announced is cut off at the first byte too many. Either way the stream is
    cancelled (the server stops sending), nothing is kept and no file is left."""
    announced, error, words = OVERSIZED[case]
    fake = EndlessDownload(announced)
    dest = tmp_path / "x.pt" if to_file else None
    seen: list[int] = []
    with serving(fake) as target:
        raised = fails(
            error,
            5,
            lambda: call(
                target,
                aio,
                "download_checkpoint",
                "x",
                dest,
                client={"max_download_bytes": MiB},
                progress=lambda done, total: seen.append(done),
            ),
        )
    assert words in raised.message
    assert max(seen, default=0) <= min(announced, MiB)
    assert fake.sent < ENDLESS // 4  # cut off, not read to its end
    assert list(tmp_path.iterdir()) == []  # neither dest nor dest.part


def test_a_download_to_memory_that_could_not_be_loaded_stops_at_its_header() -> None:
    """An exported program cannot be loaded safely in memory: refused before its bytes."""
    fake = EndlessDownload(32 * MiB, pb.CHECKPOINT_FORMAT_EXPORTED_PROGRAM)
    with serving(fake) as target, pytest.raises(ValueError, match="pass dest= to save it"):
        call(target, False, "download_checkpoint", "x")
    assert fake.sent < ENDLESS // 4


class StalledDownload(Fake):
    """Sends a header, then nothing (until the client gives up); with `empty`, an empty
    message or an empty chunk every 50 ms, which moves no bytes either."""

    def __init__(self, empty: bool = False) -> None:
        super().__init__()
        self.empty = empty

    def DownloadCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield _header(10)
        empty = [pb.DownloadCheckpointResponse(chunk=b""), pb.DownloadCheckpointResponse()]
        try:
            while context.is_active() and not self.released.wait(0.05):
                if self.empty:
                    yield empty[0]
                    empty.reverse()
        finally:  # also when the client's cancel ends the stream at a yield
            if not context.is_active():
                self.cancelled.set()


@CLIENTS
@pytest.mark.parametrize("to_file", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("empty", [False, True], ids=["silent", "empty-messages"])
def test_a_stalled_download_ends_with_deadline_exceeded(
    tmp_path: Path, aio: bool, to_file: bool, empty: bool
) -> None:
    """No deadline, but no bytes for `stall_timeout`: the download is cancelled."""
    fake = StalledDownload(empty)
    dest = tmp_path / "x.pt" if to_file else None
    with serving(fake) as target:
        raised = fails(
            DeadlineExceededError,
            5,
            lambda: call(
                target, aio, "download_checkpoint", "x", dest, client={"stall_timeout": 0.3}
            ),
        )
        assert fake.cancelled.wait(5)  # the server saw the call end
    assert "nothing received or sent for 0.3 s" in raised.message
    assert list(tmp_path.iterdir()) == []


class SlowUpload(Fake):
    """Reads an upload up to `read` bytes (or its end), then waits `commit` seconds (or
    until the client cancels) before answering with the sha256 of what it read."""

    def __init__(self, read: int, commit: float) -> None:
        super().__init__()
        self.read, self.commit = read, commit

    def SaveCheckpoint(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        sha256 = hashlib.sha256()
        header = next(requests).header
        try:
            for request in requests:
                sha256.update(request.chunk)
                self.received += len(request.chunk)
                if self.received >= self.read:
                    break
        except grpc.RpcError:  # cancelled while reading
            pass
        until = time.monotonic() + self.commit
        while context.is_active() and time.monotonic() < until and not self.released.is_set():
            time.sleep(0.02)
        if not context.is_active():
            self.cancelled.set()
        return pb.CheckpointInfo(
            name=header.name, size_bytes=self.received, sha256=sha256.hexdigest()
        )


@CLIENTS
def test_an_upload_the_server_stops_reading_ends_with_deadline_exceeded(aio: bool) -> None:
    fake = SlowUpload(read=MiB, commit=10)
    with serving(fake) as target:
        raised = fails(
            DeadlineExceededError,
            5,
            lambda: call(
                target,
                aio,
                "save_checkpoint",
                "x",
                bytes(16 * MiB),
                client={"stall_timeout": 0.3, "chunk_bytes": 256 << 10},
            ),
        )
        assert fake.cancelled.wait(5)
    assert "SaveCheckpoint: nothing received or sent" in raised.message


@CLIENTS
def test_an_upload_is_not_cut_while_the_server_commits_it(aio: bool) -> None:
    """The stall watch ends with the last chunk: the server may take its time to answer."""
    fake = SlowUpload(read=2 * MiB, commit=1.2)
    with serving(fake) as target:
        info = call(
            target, aio, "save_checkpoint", "x", bytes(2 * MiB), client={"stall_timeout": 0.5}
        )
    assert info.size_bytes == 2 * MiB


# Deadlines of the calls that read the server's state


@CLIENTS
def test_quick_calls_have_a_default_deadline_and_the_others_none(
    monkeypatch: pytest.MonkeyPatch, aio: bool
) -> None:
    """Without a timeout, list_* / get_* / health get QUICK_TIMEOUT; a client timeout
    replaces it; calls that change the server (a delete here) get none."""
    monkeypatch.setattr(calls, "QUICK_TIMEOUT", 0.2)
    fake = Fake()
    fake.replies = {"ListCheckpoints": pb.ListCheckpointsResponse()}
    fake.replies["DeleteCheckpoint"] = pb.DeleteCheckpointResponse()
    fake.delays = {"ListCheckpoints": 0.6, "DeleteCheckpoint": 0.6}
    with serving(fake) as target:
        fails(DeadlineExceededError, 3, lambda: call(target, aio, "list_checkpoints"))
        assert call(target, aio, "list_checkpoints", client={"timeout": 10}) == []
        assert call(target, aio, "delete_checkpoint", "x") is None


# Replies over the message limit


def test_the_default_message_limit_is_the_servers() -> None:
    options = dict(ChannelConfig().options())
    assert options["grpc.max_receive_message_length"] == DEFAULT_MAX_MESSAGE_BYTES == 256 * MiB
    assert options["grpc.max_send_message_length"] == DEFAULT_MAX_MESSAGE_BYTES
    assert dict(channel_options())["grpc.max_receive_message_length"] == 256 * MiB
    assert dict(channel_options(-1))["grpc.max_receive_message_length"] == -1


@CLIENTS
def test_a_reply_over_max_message_bytes_fails_cleanly(aio: bool) -> None:
    fake = Fake()
    big = pb.CheckpointInfo(name="big", metadata={"k": "v" * (2 * MiB)})
    fake.replies = {"ListCheckpoints": pb.ListCheckpointsResponse(checkpoints=[big])}
    with serving(fake) as target:
        limited = {"config": ChannelConfig(max_message_bytes=MiB), "timeout": 10}
        raised = fails(
            ResourceExhaustedError, 5, lambda: call(target, aio, "list_checkpoints", client=limited)
        )
        assert str(MiB) in raised.message
        assert call(target, aio, "list_checkpoints", client={"timeout": 10})[0].name == "big"


# Malformed replies


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _tensor(shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=shape, data=data)


MALFORMED: dict[str, tuple[str, Any, tuple[Any, ...], dict[str, Any], str]] = {
    # case: (rpc, its reply, the client method's arguments, keyword arguments, words)
    "created": (
        "ListCheckpoints",
        pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointInfo(created=_stamp(2**62))]),
        (),
        {},
        "CheckpointInfo in the server's reply: created (4611686018427387904 s, 0 ns)",
    ),
    "created-nanos": (
        "GetCheckpoint",
        pb.CheckpointInfo(created=_stamp(1, 2**31 - 1)),
        ("x",),
        {},
        "created (1 s, 2147483647 ns) is out of range",
    ),
    "loaded-at": (
        "ListModels",
        pb.ListModelsResponse(models=[pb.ModelInfo(loaded_at=_stamp(-(2**62)))]),
        (),
        {},
        "ModelInfo in the server's reply: loaded_at",
    ),
    "last-used": ("GetModel", pb.ModelInfo(last_used=_stamp(2**62)), ("m",), {}, "last_used"),
    "architecture-args": (
        "GetModel",
        pb.ModelInfo(architecture_args={"k": "{"}),
        ("m",),
        {},
        "malformed ModelInfo",
    ),
    "tier": ("GetModel", pb.ModelInfo(tier=99), ("m",), {}, "malformed ModelInfo"),  # type: ignore[arg-type]
    "parameter-default": (
        "ListArchitectures",
        pb.ListArchitecturesResponse(
            architectures=[
                pb.Architecture(parameters=[pb.ArchitectureParameter(name="p", default="[")])
            ]
        ),
        (),
        {},
        "malformed Architecture",
    ),
    "top-k-labels": (
        "Predict",
        pb.PredictResponse(top_k=[pb.TopClasses(indices=[1, 2], scores=[0.5], labels="abc")]),
        ("m", [[0.0]]),
        {"top_k": 2},
        "a top_k row of 2 indices, 1 scores and 3 labels",
    ),
    "tensor-bytes": (
        "Predict",
        pb.PredictResponse(outputs={"output": _tensor([2**31, 2**31], b"")}),
        ("m", [[0.0]]),
        {},
        "malformed PredictResponse in the server's reply: tensor: float32 shape",
    ),
    "output-name": (
        "Predict",
        pb.PredictResponse(outputs={"9" * 5000: _tensor([1], bytes(4)), "a": _tensor([], b"")}),
        ("m", [[0.0]]),
        {},
        "malformed PredictResponse",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_raises_protocol_error(case: str) -> None:
    """Out-of-range timestamps, inconsistent top-k rows, tensors whose bytes do not
    match their shape, bad JSON or enums: a `ProtocolError` (INTERNAL) naming what."""
    rpc, reply, args, kwargs, words = MALFORMED[case]
    fake = Fake()
    fake.replies = {rpc: reply}
    method = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", rpc).lower()  # GetModel: get_model
    with serving(fake) as target:
        raised = fails(ProtocolError, 5, lambda: call(target, False, method, *args, **kwargs))
    assert raised.code == grpc.StatusCode.INTERNAL and words in raised.message, raised


@CLIENTS
def test_a_malformed_reply_raises_protocol_error_from_both_clients(aio: bool) -> None:
    fake = Fake()
    fake.replies = {"ListModels": MALFORMED["loaded-at"][1]}
    fake.health = 99
    with serving(fake) as target:
        fails(ProtocolError, 5, lambda: call(target, aio, "list_models"))
        raised = fails(ProtocolError, 5, lambda: call(target, aio, "health"))
    assert "HealthCheckResponse" in raised.message


def test_predict_sorts_any_numeric_output_name() -> None:
    """An output named "²" (a digit to `str.isdigit`, no number to `int`) sorts as a name."""
    fake = Fake()
    outputs = {name: _tensor([1], bytes(4)) for name in ("10", "2", "\u00b2")}
    fake.replies = {"Predict": pb.PredictResponse(outputs=outputs)}
    with serving(fake) as target:
        answer = call(target, False, "predict", "m", {"a": [0.0]}, client={"timeout": 10})
    assert list(answer) == ["2", "10", "\u00b2"]


# The command line prints server strings escaped


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_cli_escapes_what_the_server_says(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Names, messages and output names are printed with their controls escaped, so
    they cannot move the cursor, recolour, retitle or fake a line."""
    np.save(tmp_path / "x.npy", np.zeros(1, np.float32))
    fake = Fake()
    checkpoint = pb.CheckpointInfo(name=ESCAPES, format=pb.CHECKPOINT_FORMAT_STATE_DICT)
    failed = pb.ModelInfo(name="m", state=pb.MODEL_STATE_FAILED, status_message=ESCAPES)
    fake.replies = {
        "ListCheckpoints": pb.ListCheckpointsResponse(checkpoints=[checkpoint]),
        "ListModels": pb.ListModelsResponse(models=[failed]),
        "Predict": pb.PredictResponse(outputs={ESCAPES: _tensor([1], bytes(4))}),
    }
    fake.errors = {"DeleteCheckpoint": ESCAPES}
    with serving(fake) as target:
        code, listed, _ = run(capsys, "list", "--target", target)
        assert code == 0
        code, as_json, _ = run(capsys, "list", "--json", "--target", target)
        assert json.loads(as_json)["checkpoints"][0]["name"] == ESCAPES  # JSON escapes itself
        code, predicted, _ = run(
            capsys, "predict", "m", str(tmp_path / "x.npy"), "--target", target
        )
        assert code == 0
        code, _, error = run(capsys, "delete", "x", "--target", target)
        assert code == 1
    escaped = "x\\x1b[2J\\x1b[31mPWNED\\x1b]0;title\\x07\\r\\nhint: fake"
    assert listed.splitlines() == [
        "models:",
        f"  m v0 failed: {escaped} (, weights )",
        "checkpoints:",
        f"  {escaped} state_dict 0 bytes sha256 ",
    ]
    assert predicted.splitlines()[0] == f"{escaped}: float32 [1]"
    assert error == f"error: NOT_FOUND: {escaped}\n"


def test_the_cli_download_takes_a_cap(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake = EndlessDownload(2 * MiB)
    with serving(fake) as target:
        dest = str(tmp_path / "x.pt")
        code, _, error = run(
            capsys, "download", "x", dest, "--max-bytes", str(MiB), "--target", target
        )
    assert code == 1 and "RESOURCE_EXHAUSTED" in error and "(1,048,576)" in error
    assert list(tmp_path.iterdir()) == []
