"""The client's hand-written wire format and upload stream; the server's chunk parser."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelhost.client import codec, transfers, wire
from modelhost.server import malloc, messages, request_limits
from modelhost.v1 import modelhost_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, (2 << 20) + 3])
def test_framed_chunks_are_the_serialized_request(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for source in (data, memoryview(data)):
        framed = wire.chunk_message(source)
        assert framed == pb.SaveCheckpointRequest(chunk=data).SerializeToString()
        assert pb.SaveCheckpointRequest.FromString(framed).chunk == data


def test_upload_stream_is_a_header_then_the_bytes() -> None:
    data = bytes(range(256)) * 100
    upload = transfers.Upload("c", data, metadata={"k": "v"}, overwrite=True, chunk_bytes=1000)
    messages = [pb.SaveCheckpointRequest.FromString(frame) for frame in upload]
    assert messages[0].header.name == "c" and messages[0].header.overwrite
    assert messages[0].header.upload.size_bytes == len(data)
    assert b"".join(message.chunk for message in messages[1:]) == data
    assert all(len(message.chunk) <= 1000 for message in messages[1:])


PREDICT_CASES = {
    "float32 image": {"x": np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)},
    "two inputs": {"a": np.ones((2, 3), dtype=np.int64), "b": np.zeros((2,), dtype=np.bool_)},
    "big-endian, strided": {"x": np.arange(20, dtype=">f8").reshape(4, 5)[:, ::2]},
    "scalar and empty": {"s": np.array(3.5, dtype=np.float16), "e": np.zeros((0, 4), np.uint8)},
    "negative values": {"": np.array([-1, -(2**40)], dtype=np.int64)},
}


@pytest.mark.parametrize("inputs", PREDICT_CASES.values(), ids=PREDICT_CASES.keys())
@pytest.mark.parametrize(
    ("model", "version", "images", "top_k"),
    [("m", 0, [], 0), ("ümlaut-model", 7, [b"", b"\xff\xd8jpeg"], 5), ("", 2**40, [], -3)],
)
def test_predict_request_is_what_protobuf_builds(
    inputs: dict[str, np.ndarray], model: str, version: int, images: list[bytes], top_k: int
) -> None:
    expected = pb.PredictRequest(
        model=model,
        version=version,
        inputs={name: codec.encode(array) for name, array in inputs.items()},
        images=images,
        top_k=top_k,
    )
    raws = {name: codec.raw(array) for name, array in inputs.items()}
    written = wire.predict_request(model, version, raws, images, top_k)
    assert pb.PredictRequest.FromString(written) == expected
    assert len(written) == expected.ByteSize()


def test_raw_is_a_view_when_no_copy_is_needed() -> None:
    array = np.arange(12, dtype="<f4").reshape(3, 4)
    _, shape, data = codec.raw(array)
    assert shape == (3, 4)
    assert isinstance(data, memoryview) and np.shares_memory(np.asarray(data), array)


def test_prefetch_keeps_order_and_passes_errors_on() -> None:
    assert list(transfers.Prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    prefetch = transfers.Prefetch(failing())
    assert next(prefetch) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(prefetch)
    with pytest.raises(StopIteration):
        next(prefetch)


def test_prefetch_thread_stops_when_the_consumer_leaves() -> None:
    produced = threading.Event()

    def endless() -> Iterator[int]:
        count = 0
        while True:
            count += 1
            if count > 10:
                produced.set()
            yield count

    prefetch = transfers.Prefetch(endless(), depth=2)
    assert next(prefetch) == 1
    prefetch.close()
    prefetch._thread.join(timeout=5)
    assert not prefetch._thread.is_alive()
    assert not produced.is_set()  # it stopped at the queue's depth, not at the end


def test_malloc_settings_yield_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert not malloc.keep_large_buffers()


def test_malloc_settings_apply_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert malloc.keep_large_buffers()


_REUSE = """
import resource, sys, torch
import modelhost.server.app  # the server's imports, as it runs
from modelhost.server import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_large_buffers()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def run():  # like a CPU model's activations: blocks of 3-30 MB, each freed after the next
    x = torch.ones(7_500_000)
    for size in (6_400_000, 3_200_000, 7_000_000, 1_600_000, 800_000):
        x = torch.full((size,), 1.0) + x[:1]
    return x.sum()

run(), run()
before = faults()
for _ in range(20):
    run()
print((faults() - before) // 20)
"""


def test_large_buffers_are_reused_without_page_faults() -> None:
    """A CPU model's activations, freed and allocated again each run, fault in no pages
    (with glibc's defaults, 10,000-17,000 per run of this pattern)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults_per_run(mode: str) -> int:
        command = [sys.executable, "-c", _REUSE, mode]
        return int(subprocess.run(command, env=env, capture_output=True, check=True).stdout)

    kept = faults_per_run("keep")
    assert kept < 1_000, kept  # a rare fresh block: 0-498 in 16 runs here
    # The test can tell the two apart: with glibc's defaults this pattern faults 14,000-
    # 17,000 pages per run, but a process sometimes keeps blocks (glibc raises its mmap
    # threshold as mapped blocks are freed): 2,062 once in CI, 4,889 once loaded. The most of 3.
    default = 0
    for _ in range(3):
        default = max(default, faults_per_run("default"))
        if default > 3_000:
            break
    assert default > 3_000, default


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_384, (2 << 20) + 3])
def test_server_parses_framed_chunks_as_views_of_the_message(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    parsed = request_limits.parse_save_request(wire.chunk_message(data))
    assert isinstance(parsed, memoryview) and parsed.tobytes() == data


@pytest.mark.parametrize(
    "message",
    [
        pb.SaveCheckpointRequest(header=pb.SaveCheckpointHeader(name="c")),
        pb.SaveCheckpointRequest(),
    ],
    ids=["header", "empty"],
)
def test_server_parses_other_messages_with_protobuf(message: pb.SaveCheckpointRequest) -> None:
    assert request_limits.parse_save_request(message.SerializeToString()) == message


@pytest.mark.parametrize(
    "wire",
    [
        b"\x12\x03abc\x12\x01z",  # two chunk fields: the last one wins
        b"\x12\x05abc",  # length past the end
        b"\x12\x80",  # truncated length
        b"\x12\x01a\x08\x01",  # a chunk, then another field
    ],
)
def test_server_parses_unusual_chunk_encodings_like_protobuf(wire: bytes) -> None:
    """The fast path only takes a message that is exactly one chunk field."""
    try:
        expected: object = pb.SaveCheckpointRequest.FromString(wire)
    except Exception as error:
        expected = type(error)
    try:
        parsed: object = request_limits.parse_save_request(wire)
    except Exception as error:
        parsed = type(error)
    assert parsed == expected


def test_download_chunks_are_framed_and_parsed_like_protobuf() -> None:
    parse = wire.chunk_parser(pb.DownloadCheckpointResponse.FromString)
    data = bytes(range(256)) * 40
    framed = wire.chunk_message(data)
    assert framed == pb.DownloadCheckpointResponse(chunk=data).SerializeToString()
    view = parse(framed)
    assert isinstance(view, memoryview) and view.tobytes() == data
    info = pb.DownloadCheckpointResponse(info=pb.CheckpointInfo(name="c", size_bytes=3))
    assert parse(info.SerializeToString()) == info
    serialize = messages.serialize_download_response
    assert serialize(framed) is framed
    assert serialize(info) == info.SerializeToString()


def _fields_of(request: pb.PredictRequest | wire.PredictRequestView) -> tuple[object, ...]:
    """What the server reads of a PredictRequest, in a form both kinds compare by."""
    inputs = {
        name: (int(t.dtype), list(t.shape), bytes(t.data)) for name, t in request.inputs.items()
    }
    return request.model, request.version, inputs, list(request.images), request.top_k


@pytest.mark.parametrize("inputs", PREDICT_CASES.values(), ids=PREDICT_CASES.keys())
def test_server_reads_predict_inputs_as_views_of_the_message(inputs: dict[str, np.ndarray]) -> None:
    raws = {name: codec.raw(array) for name, array in inputs.items()}
    written = wire.predict_request("ümlaut", -5, raws, [b"\xff\xd8"], -3)
    parsed = request_limits.predict_parser(256, 256)(written)
    assert isinstance(parsed, wire.PredictRequestView)
    assert _fields_of(parsed) == _fields_of(pb.PredictRequest.FromString(written))
    for name, tensor in parsed.inputs.items():
        if len(tensor.data):  # an empty field is not written: nothing to view
            assert isinstance(tensor.data, memoryview) and tensor.data.obj is written
        decoded = codec.to_numpy(tensor)
        assert decoded.shape == inputs[name].shape
        np.testing.assert_array_equal(decoded, inputs[name])


_TENSOR = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2], data=b"ab").SerializeToString()


@pytest.mark.parametrize(
    "wire_bytes",
    [
        b"",  # all defaults
        b"\x0a\x01m\x0a\x01n",  # model twice: the last one wins
        b"\x1a\x05\x0a\x01x\x12\x00" * 2,  # one input twice: the last one wins
        b"\x1a\x00",  # an input with neither name nor tensor
        b"\x1a\x06\x12\x04\x10\x02\x10\x03",  # shape written unpacked
        b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # version -1
        b"\x28\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # top_k -2 (sign-extended int32)
        b"\x1a\x04\x12\x02\x08\x63",  # an unknown dtype number
        b"\x30\x01",  # an unknown field: protobuf keeps it, the server never reads it
        b"\x1a\x0e\x12\x05\x08\x01\x12\x01\x02\x12\x05\x08\x02\x12\x01\x03",  # value merged
        b"\x1a" + bytes([len(_TENSOR) + 2, 0x12, len(_TENSOR)]) + _TENSOR,
        b"\x0d\x00\x00\x00\x00",  # model with the wrong wire type
        b"\x0a\x02\xc3\x28",  # model not UTF-8
        b"\x1a\x05\x0a\x01x",  # an entry past the end
        b"\x22\x80",  # truncated length
        b"\x10" + b"\xff" * 11,  # a varint of 11 bytes
        b"\x1a\x04\x12\x02\x12\x81",  # a packed shape cut inside a varint
    ],
)
def test_server_reads_predict_requests_like_protobuf(wire_bytes: bytes) -> None:
    """The same fields, or the same refusal, for encodings protobuf's writer never makes."""
    try:
        expected: object = _fields_of(pb.PredictRequest.FromString(wire_bytes))
    except Exception as error:
        expected = type(error)
    try:
        parsed: object = _fields_of(request_limits.predict_parser(256, 256)(wire_bytes))
    except Exception as error:
        parsed = type(error)
    assert parsed == expected


_REQUESTS = st.builds(
    pb.PredictRequest,
    model=st.text(max_size=8),
    version=st.integers(-(2**63), 2**63 - 1),
    inputs=st.dictionaries(
        st.text(max_size=6),
        st.builds(
            pb.Tensor,
            dtype=st.integers(-(2**31), 2**31 - 1),
            shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
            data=st.binary(max_size=20),
        ),
        max_size=3,
    ),
    images=st.lists(st.binary(max_size=10), max_size=3),
    top_k=st.integers(-(2**31), 2**31 - 1),
)


@settings(max_examples=300, deadline=None)
@given(_REQUESTS, st.data())
def test_server_reads_any_predict_request_like_protobuf(
    message: pb.PredictRequest, data: st.DataObject
) -> None:
    """Any message protobuf writes, and the same bytes damaged at one place and cut."""
    written = message.SerializeToString()
    assert _fields_of(request_limits.predict_parser(256, 256)(written)) == _fields_of(message)
    if written:
        damaged = bytearray(written)
        index = data.draw(st.integers(0, len(damaged) - 1))
        damaged[index] = data.draw(st.integers(0, 255))
        cut = bytes(damaged[: data.draw(st.integers(0, len(damaged)))])
        test_server_reads_predict_requests_like_protobuf(cut)
