"""The client bounds what it parses of a reply: a hostile server's small reply cannot
make it build objects worth a thousand times its size (red team round 4, M3), and a
download into memory is capped (L2).

A fake server on 127.0.0.1 answers raw bytes written here. Each reply is counted from
the wire before protobuf parses it (`calls.reply_parser`): a listing with more entries
than `calls.MAX_REPLY_ENTRIES`, or a reply with more fields, nested ones included, than
`calls.MAX_REPLY_FIELDS`, is refused with a `ProtocolError`; one at the limit is parsed.
The limits are lowered per test where a reply at the real limit would be slow to build.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelhost.client import (
    AsyncModelHostClient,
    ChannelConfig,
    DataLossError,
    ModelHostClient,
    ProtocolError,
    ResourceExhaustedError,
    calls,
    transfers,
    wire,
)
from modelhost.v1 import modelhost_pb2 as pb

MiB = 1 << 20
Reply = bytes | list[bytes]
"""A unary reply's bytes, or a stream's messages."""


def _field(number: int, payload: bytes) -> bytes:
    return wire.varint(number << 3 | 2) + wire.varint(len(payload)) + payload


class RawServer(grpc.GenericRpcHandler):
    """Answers each ModelHost method with `replies[name]`, raw bytes as they are."""

    def __init__(self, replies: dict[str, Reply]) -> None:
        self.replies = replies

    def service(self, details: Any) -> Any:
        reply = self.replies.get(details.method.rsplit("/", 1)[-1])
        if isinstance(reply, list):
            return grpc.unary_stream_rpc_method_handler(lambda request, context: iter(reply))
        if reply is not None:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: reply)
        return None


@contextmanager
def serving(**replies: Reply) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([RawServer(replies)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def call(target: str, aio: bool, method: str, *args: Any) -> Any:
    """`method(*args)` on a fresh blocking or asyncio client."""
    if aio:

        async def run() -> Any:
            async with AsyncModelHostClient(target) as client:
                return await getattr(client, method)(*args)

        return asyncio.run(run())
    with ModelHostClient(target) as client:
        return getattr(client, method)(*args)


CLIENTS = pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])


def _refused(target: str, aio: bool, method: str, *args: Any) -> str:
    with pytest.raises(ProtocolError) as caught:
        call(target, aio, method, *args)
    return caught.value.message


# Listings: entries


EMPTY_ENTRIES = {  # a listing of empty entries: 2 bytes each
    "ListModels": ("list_models", "models"),
    "ListCheckpoints": ("list_checkpoints", "checkpoints"),
    "ListArchitectures": ("list_architectures", "architectures"),
}


@CLIENTS
@pytest.mark.parametrize("rpc", sorted(EMPTY_ENTRIES))
def test_a_listing_over_its_entry_limit_is_refused_unparsed(aio: bool, rpc: str) -> None:
    """One more empty entry than the real limit: a reply of 200 KB that would have
    become 40 to 200 MB of Python objects."""
    method, what = EMPTY_ENTRIES[rpc]
    most = calls.MAX_REPLY_ENTRIES
    with serving(**{rpc: b"\x0a\x00" * (most + 1)}) as target:
        message = _refused(target, aio, method)
    assert message == (
        f"the server's {rpc}Response has more than {most} {what}; the client takes at "
        f"most {most} (MAX_REPLY_ENTRIES, or ChannelConfig.max_reply_entries)"
    )


def test_a_listing_at_its_entry_limit_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "MAX_REPLY_ENTRIES", 50)
    one = _field(1, b"m") + _field(17, b"layer.weight")  # a name and a missing key
    with serving(ListModels=_field(1, one) * 50) as target:
        models = call(target, False, "list_models")
    assert [(m.name, m.missing_keys) for m in models] == [("m", ("layer.weight",))] * 50
    with serving(ListModels=_field(1, one) * 51) as target:
        assert "more than 50 models" in _refused(target, False, "list_models")


@CLIENTS
def test_predict_outputs_over_the_entry_limit_are_refused(
    aio: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls, "MAX_REPLY_ENTRIES", 50)
    x = np.zeros((1, 2), np.float32)

    def outputs(count: int) -> bytes:  # {"0": [], "1": [], ...}, each float32 of shape [0]
        return b"".join(
            _field(3, _field(1, b"%d" % i) + _field(2, b"\x08\x01\x12\x01\x00"))
            for i in range(count)
        )

    with serving(Predict=outputs(50)) as target:
        assert len(call(target, aio, "predict", "m", x)) == 50
    with serving(Predict=outputs(51)) as target:
        assert "PredictResponse has more than 50 outputs" in _refused(
            target, aio, "predict", "m", x
        )


# Every reply: fields, nested ones included


def _model_info(fields: int) -> bytes:
    """A ModelInfo of `fields` fields: a name, then empty missing keys."""
    return _field(1, b"m") + _field(17, b"") * (fields - 1)


@CLIENTS
def test_a_reply_over_its_field_limit_is_refused_unparsed(
    aio: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls, "MAX_REPLY_FIELDS", 1000)
    with serving(GetModel=_model_info(1000)) as target:
        assert len(call(target, aio, "get_model", "m").missing_keys) == 999
    with serving(GetModel=_model_info(1001)) as target:
        message = _refused(target, aio, "get_model", "m")
    assert message == (
        "the server's ModelInfo has more than 1000 fields, nested ones included (the last "
        "one read: missing_keys); the client parses at most 1000 (MAX_REPLY_FIELDS; raise "
        "it with ChannelConfig(max_reply_fields=...))"
    )


def test_nested_fields_count_at_the_real_limit() -> None:
    """A listing of one model with MAX_REPLY_FIELDS empty missing keys: 8 MB that protobuf
    and ModelInfo would have made about 500 MB of."""
    nested = _field(1, _model_info(calls.MAX_REPLY_FIELDS))
    with serving(ListModels=nested) as target:
        message = _refused(target, False, "list_models")
    assert "(the last one read: models.missing_keys)" in message


@CLIENTS
def test_predict_replies_have_their_own_field_limit(
    aio: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """top_k rows: at the limit they come back; one field more is refused."""
    monkeypatch.setattr(calls, "MAX_PREDICT_REPLY_FIELDS", 300)
    row = _field(4, _field(1, b"\x07") + _field(2, b"\x00\x00\x80\x3f"))  # 3 fields
    x = np.zeros((100, 2), np.float32)
    with serving(Predict=row * 100) as target:
        rows = call(target, aio, "predict", "m", x)
    assert rows == {}  # no top_k asked: the outputs map is empty
    with serving(Predict=row * 100 + _field(4, b"")) as target:
        message = _refused(target, aio, "predict", "m", x)
    assert "more than 300 fields" in message
    assert "(the last one read: top_k); the client parses at most 300" in message
    assert "(MAX_PREDICT_REPLY_FIELDS; raise it with ChannelConfig(max_reply_fields" in message


@CLIENTS
def test_a_large_predict_reply_is_read_as_before(aio: bool) -> None:
    """64 MiB of raw output in a handful of fields: nowhere near a limit."""
    y = np.arange(16 * MiB, dtype=np.float32)
    tensor = wire.tensor(pb.DATA_TYPE_FLOAT32, y.shape, y.tobytes())
    entry = _field(1, b"output") + _field(2, b"".join(tensor))
    with serving(Predict=_field(3, entry)) as target:
        got = call(target, aio, "predict", "m", np.zeros((1, 2), np.float32))
    assert np.array_equal(got, y)


@CLIENTS
def test_a_download_header_over_the_field_limit_is_refused(
    aio: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stream's messages are counted too: a header of 100,000 metadata entries."""
    monkeypatch.setattr(calls, "MAX_REPLY_FIELDS", 1000)
    metadata = _field(5, _field(1, b"k") + _field(2, b"v")) * 100_000
    header = _field(1, _field(1, b"x") + metadata)
    with serving(DownloadCheckpoint=[header, _field(2, b"data")]) as target:
        message = _refused(target, aio, "download_checkpoint", "x", tmp_path / "x.pt")
    assert "the server's DownloadCheckpointResponse has more than 1000 fields" in message
    assert "(the last one read: info.metadata" in message
    assert list(tmp_path.iterdir()) == []


# Downloads into memory


def _header(size: int) -> bytes:
    info = pb.CheckpointInfo(
        name="x", size_bytes=size, sha256="0" * 64, format=pb.CHECKPOINT_FORMAT_STATE_DICT
    )
    return pb.DownloadCheckpointResponse(info=info).SerializeToString()


@CLIENTS
def test_a_download_into_memory_is_capped(aio: bool, tmp_path: Path) -> None:
    """Announced one byte over the cap: refused at the header without `dest`, taken
    (here to a checksum that fails) with it."""
    size = transfers.MAX_MEMORY_DOWNLOAD_BYTES + 1
    stream = [_header(size), wire.chunk_message(bytes(MiB))]
    with serving(DownloadCheckpoint=stream) as target:
        with pytest.raises(ResourceExhaustedError) as caught:
            call(target, aio, "download_checkpoint", "x")
        assert caught.value.message == (
            f"download: the server announced {size:,} bytes, more than a download into "
            f"memory keeps ({size - 1:,}, MAX_MEMORY_DOWNLOAD_BYTES); pass dest= to write it "
            "to a file"
        )
        with pytest.raises(DataLossError, match="does not match"):
            call(target, aio, "download_checkpoint", "x", tmp_path / "x.pt")


def test_a_download_into_memory_at_the_cap_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfers, "MAX_MEMORY_DOWNLOAD_BYTES", MiB)
    stream = [_header(MiB), wire.chunk_message(bytes(MiB))]
    with (
        serving(DownloadCheckpoint=stream) as target,
        pytest.raises(DataLossError, match="does not match"),  # got as far as its checksum
    ):
        call(target, False, "download_checkpoint", "x")


# The count itself


def _refusal_of(parse: Callable[[bytes], Any], data: bytes) -> str:
    refused = parse(data)
    assert isinstance(refused, calls.Refused)
    return refused.error.message


def test_reply_parsers_parse_what_is_within_the_limits() -> None:
    method = pb.DESCRIPTOR.services_by_name["ModelHost"].methods_by_name["GetModel"]
    parse = calls.reply_parser(method)
    info = pb.ModelInfo(name="m", missing_keys=["a", "b"], architecture_args={"k": "v"})
    assert parse(info.SerializeToString()) == info
    assert "more than 4194304 fields" in _refusal_of(parse, _model_info(calls.MAX_REPLY_FIELDS + 1))


@CLIENTS
def test_a_reply_the_count_cannot_follow_is_refused_unparsed(
    aio: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 6's H1: an unknown varint of more than 64 bits (protobuf takes it) used to
    make the count give up, and the entries after it were parsed uncounted."""
    monkeypatch.setattr(calls, "MAX_REPLY_FIELDS", 1000)
    overlong = b"\x48" + b"\xff" * 9 + b"\x7f"
    with serving(GetModel=overlong + _model_info(2000)) as target:
        message = _refused(target, aio, "get_model", "m")
    assert message.startswith("the server's ModelInfo: the message cannot be read to its end")


def test_the_reply_limits_are_the_callers_to_raise() -> None:
    """A registry of more checkpoints, or a Predict of more top-k rows, than the
    defaults allow: ChannelConfig raises the limits (red team 6's L2)."""
    listing = b"\x0a\x00" * 2000
    with serving(ListCheckpoints=listing) as target:
        fewer = ChannelConfig(max_reply_entries=1000)
        with ModelHostClient(target, config=fewer) as client, pytest.raises(ProtocolError):
            client.list_checkpoints()
        with ModelHostClient(target, config=ChannelConfig(max_reply_entries=2000)) as client:
            assert len(client.list_checkpoints()) == 2000
    row = _field(4, _field(1, b"\x07") + _field(2, b"\x00\x00\x80\x3f"))  # 3 fields
    x = np.zeros((100, 2), np.float32)
    with serving(Predict=row * 100) as target:
        fewer = ChannelConfig(max_reply_fields=100)
        with ModelHostClient(target, config=fewer) as client, pytest.raises(ProtocolError) as e:
            client.predict("m", x)
        assert "twice for Predict" in e.value.message
        with ModelHostClient(target, config=ChannelConfig(max_reply_fields=150)) as client:
            assert client.predict("m", x) == {}
