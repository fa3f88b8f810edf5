"""Nested fields are counted before protobuf parses a request (red team round 4, M2).

`wire.check_fields` counts every field a parse would read, nested messages and map
entries included, from tags and lengths alone; `request_limits.entry_limited` refuses a
ModelInfer (or a Predict left to protobuf) with more than FIELDS_PER_ENTRY fields per
entry its limits allow. Before, 64 MiB of empty `bytes_contents` entries in one input
cost the server 1.2 GB. A run of unpacked scalars (typed contents sent unpacked) counts
as one field, as a packed run does: it makes one array, not an object per element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import serve
from helpers.watched import Watched
from modelhost.client import ModelHostClient, codec, wire
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server import Server, Settings, request_limits, running
from modelhost.server.errors import LimitExceeded
from modelhost.v1 import modelhost_pb2 as pb

Code = grpc.StatusCode
INFER = "/inference.GRPCInferenceService/ModelInfer"
PREDICT = "/modelhost.v1.ModelHost/Predict"
Infer = oip.ModelInferRequest
Input = Infer.InferInputTensor
DAMAGE = b"\x2a\x05\x0a"  # an input whose length runs past the end: protobuf refuses it
UNKNOWN = b"\x30\x01"  # field 6 of PredictRequest: the fast reader leaves it to protobuf


def _field(number: int, payload: bytes) -> bytes:
    return wire.varint(number << 3 | 2) + wire.varint(len(payload)) + payload


def _input(*fields: bytes) -> bytes:
    """An `inputs` entry of a ModelInferRequest named "input", FP32, shape [N, 4]."""
    return _field(5, _field(1, b"input") + _field(2, b"FP32") + b"".join(fields))


def _contents(*fields: bytes) -> bytes:
    return _field(5, b"".join(fields))


# wire.check_fields


def _counts(data: bytes, fields: int) -> bool:
    """Whether `check_fields` counts `fields` fields in a ModelInferRequest: it lets that
    many pass, and refuses one fewer (numbers in runs are not what it counts here)."""
    wire.check_fields(data, Infer.DESCRIPTOR, fields, numbers=1 << 30)
    try:
        wire.check_fields(data, Infer.DESCRIPTOR, fields - 1, numbers=1 << 30)
    except wire.TooManyFields:
        return True
    return False


def test_counting_stops_at_the_first_field_over_the_limit() -> None:
    """A million empty bytes_contents (2 MB): the count reads 100 fields and stops."""
    flood = Watched(b"\x0a\x01m" + _input(_contents(b"\x42\x00" * 1_000_000)) + DAMAGE)
    with pytest.raises(wire.TooManyFields) as caught:
        wire.check_fields(flood, Infer.DESCRIPTOR, 100)
    assert caught.value.path == "inputs.contents.bytes_contents"
    assert str(caught.value) == (
        "more than 100 fields (nested ones included) at inputs.contents.bytes_contents"
    )
    assert flood.furthest < 300  # of 2 MB: the headers, then 100 fields at most


@pytest.mark.parametrize(
    ("request_", "path"),
    [
        (Infer(inputs=[Input(parameters={str(i): oip.InferParameter() for i in range(9)})]),
         "inputs.parameters"),
        (Infer(outputs=[Infer.InferRequestedOutputTensor(parameters={"a": oip.InferParameter(
            string_param="b")} | {str(i): oip.InferParameter() for i in range(9)})]),
         "outputs.parameters"),
        (Infer(inputs=[Input(contents=oip.InferTensorContents(bytes_contents=[b""] * 20))]),
         "inputs.contents.bytes_contents"),
        (Infer(parameters={str(i): oip.InferParameter(bool_param=True) for i in range(9)}),
         "parameters"),
    ],
)  # fmt: skip
def test_the_refusal_names_the_field(request_: Infer, path: str) -> None:
    with pytest.raises(wire.TooManyFields) as caught:
        wire.check_fields(request_.SerializeToString(), Infer.DESCRIPTOR, 12)
    assert caught.value.path.startswith(path), caught.value.path


def _unpacked(number: int, kind: int, values: list[bytes]) -> bytes:
    return b"".join(wire.varint(number << 3 | kind) + value for value in values)


UNPACKED = {  # typed contents, each element with its own tag, as no protobuf writer packs
    "int64": (
        _unpacked(3, 0, [wire.varint(v) for v in [0, 1, 300, 1 << 40, -1, 7]]),
        oip.InferTensorContents(int64_contents=[0, 1, 300, 1 << 40, -1, 7]),
    ),
    "fp32": (
        _unpacked(6, 5, [np.float32(v).tobytes() for v in [1.5, -2, 0]]),
        oip.InferTensorContents(fp32_contents=[1.5, -2, 0]),
    ),
    "fp64": (
        _unpacked(7, 1, [np.float64(v).tobytes() for v in [1.5, 3]]),
        oip.InferTensorContents(fp64_contents=[1.5, 3]),
    ),
    "bool": (
        _unpacked(1, 0, [b"\x01", b"\x00", b"\x01"]),
        oip.InferTensorContents(bool_contents=[True, False, True]),
    ),
}


@pytest.mark.parametrize("kind", sorted(UNPACKED))
def test_a_run_of_unpacked_scalars_counts_as_one_field(kind: str) -> None:
    """As protobuf writes them (packed) or not, typed contents cost the same count."""
    raw, contents = UNPACKED[kind]
    written = Infer(inputs=[Input(contents=contents)]).SerializeToString()
    unpacked = _field(5, _field(5, raw))
    assert Infer.FromString(unpacked) == Infer.FromString(written)
    assert _counts(written, 3)  # the input, its contents, the run
    assert _counts(unpacked, 3)
    # A million elements: one field, skipped without a Python step per element.
    many = _field(5, _field(5, raw * 200_000))
    assert _counts(many, 3)


def test_numbers_in_varint_runs_are_counted() -> None:
    """A packed run is one field, but each of its varints (a byte at least) becomes 8
    bytes parsed: they are counted exactly against `numbers`; an unpacked run's at most
    one per 2 bytes; fixed-width runs parse to their own size and are not counted."""
    packed = _field(5, _field(5, _field(3, bytes(range(1, 101)) + wire.varint(300))))
    wire.check_fields(packed, Infer.DESCRIPTOR, 10, numbers=101)
    with pytest.raises(wire.TooManyFields) as caught:
        wire.check_fields(packed, Infer.DESCRIPTOR, 10, numbers=100)
    assert (caught.value.what, caught.value.path) == ("numbers", "inputs.contents.int64_contents")
    unpacked = _field(5, _field(5, _unpacked(3, 0, [b"\x01"] * 100)))
    wire.check_fields(unpacked, Infer.DESCRIPTOR, 10, numbers=100)
    with pytest.raises(wire.TooManyFields):
        wire.check_fields(unpacked, Infer.DESCRIPTOR, 10, numbers=99)
    floats = _field(5, _field(5, _field(6, np.ones(1000, np.float32).tobytes())))
    wire.check_fields(floats, Infer.DESCRIPTOR, 10, numbers=0)


def test_a_shape_holds_at_most_max_rank_numbers_in_a_run() -> None:
    """Red team 6's M1: a shape of 64 MiB of 0x01 bytes parsed into 512 MiB of int64."""
    ok = _input(_field(3, b"\x01" * codec.MAX_RANK))
    wire.check_fields(b"\x0a\x01m" + ok, Infer.DESCRIPTOR, 10, numbers=1 << 30)
    big = _input(_field(3, b"\x01" * 1_000_000))
    with pytest.raises(wire.TooManyFields) as caught:
        wire.check_fields(b"\x0a\x01m" + big, Infer.DESCRIPTOR, 10, numbers=1 << 30)
    assert (caught.value.what, caught.value.path) == (wire.IN_ONE_FIELD, "inputs.shape")
    for split in (  # red team 7's H1 and M1: protobuf joins every run of the field
        _field(3, b"\x01" * 64) * 2,
        _field(3, b"\x01" * 64) + _unpacked(3, 0, [b"\x01"]),
        _field(3, b"\x01" * 64) + b"\x98\x80\x00\x01",  # one element, its tag overlong
    ):
        assert len(Input.FromString(split).shape) > codec.MAX_RANK  # as protobuf reads it
        with pytest.raises(wire.TooManyFields) as caught:
            wire.check_fields(b"\x0a\x01m" + _input(split), Infer.DESCRIPTOR, 10, 1 << 30)
        assert (caught.value.what, caught.value.path) == (wire.IN_ONE_FIELD, "inputs.shape")
    predict = _field(3, _field(1, b"x") + _field(2, _field(2, b"\x01" * 1_000_000)))
    with pytest.raises(wire.TooManyFields, match=r"at inputs\.value\.shape$"):
        wire.check_fields(predict, pb.PredictRequest.DESCRIPTOR, 10, numbers=1 << 30)


GROUPS_100 = b"".join(wire.varint(9 << 3 | 3) for _ in range(100)) + b"".join(
    wire.varint(9 << 3 | 4) for _ in range(100)
)  # 100 nested unknown groups, which protobuf's parser accepts (101 it refuses)
OVERLONG = b"\x48" + b"\xff" * 9 + b"\x7f"  # an unknown varint over 64 bits: accepted too


@pytest.mark.parametrize("prefix", [GROUPS_100, OVERLONG], ids=["100-groups", "overlong-varint"])
def test_what_the_count_cannot_follow_is_refused_not_parsed(prefix: bytes) -> None:
    """Red team 6's H1: the count used to give up on these and leave the message to
    protobuf, which parses them, and every nested entry after them, uncounted."""
    flood = prefix + b"\x0a\x01m" + _input(_contents(b"\x42\x00" * 100_000))
    Infer.FromString(flood)  # protobuf takes it
    with pytest.raises(wire.Unreadable):
        wire.check_fields(flood, Infer.DESCRIPTOR, 1000)
    with pytest.raises(wire.Unreadable):
        request_limits.fields_limited(Infer.FromString, Infer.DESCRIPTOR, 1000)(flood)


def test_interleaved_unpacked_scalars_count_one_each() -> None:
    """Two fields in turn break every run: each element counts, and the limit holds."""
    mixed = _unpacked(3, 0, [b"\x01"]) + _unpacked(1, 0, [b"\x01"])
    with pytest.raises(wire.TooManyFields, match=r"at inputs\.contents\.(int64|bool)_contents$"):
        wire.check_fields(_field(5, _field(5, mixed * 1000)), Infer.DESCRIPTOR, 100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_counted_or_left_to_protobuf(data: bytes) -> None:
    """Damaged or random bytes never make the count fail: a limit refuses, or protobuf
    parses (or refuses) them as it would alone."""
    limited = request_limits.infer_parser(2)
    try:
        expected: object = Infer.FromString(data)
    except DecodeError:
        expected = DecodeError
    try:
        got: object = limited(data)
    except (DecodeError, LimitExceeded) as error:
        got = type(error)
    assert got in (expected, LimitExceeded)


# The server


@pytest.fixture
def small(settings: Settings) -> Iterator[Server]:
    """A server hosting "mlp" (tiny_mlp: float32 [N, 4] -> [N, 3]), with 4 inputs at
    most per request (so ModelInfer may hold (4 * 4 + 64) * 64 = 5120 fields, Predict
    (4 + 4 + 64) * 64) and 1000 tensor elements."""
    limited = dataclasses.replace(
        settings, max_request_inputs=4, max_request_images=4, max_tensor_elements=1000
    )
    with running(limited) as server:
        with ModelHostClient(server.target, timeout=60) as client:
            serve(client, "mlp", architecture="tiny_mlp")
        yield server


INFER_FIELDS = (4 * 4 + 64) * request_limits.FIELDS_PER_ENTRY


def _call(server: Server, method: str, body: bytes) -> bytes:
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        reply: bytes = channel.unary_unary(method)(body, timeout=60)
    return reply


def _refusal(server: Server, method: str, body: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _call(server, method, body)
    return caught.value


def _body(*fields: bytes) -> bytes:
    """A ModelInfer of 2 rows of "mlp", with `fields` added to its input: 6 fields."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    shape = _field(3, wire.varint(2) + wire.varint(4))
    return b"\x0a\x03mlp" + _input(shape, *fields) + _field(7, x.tobytes())


def _rows(server: Server, *fields: bytes) -> list[int]:
    """The shape of the output of `_body(*fields)`."""
    reply = oip.ModelInferResponse.FromString(_call(server, INFER, _body(*fields)))
    return list(reply.outputs[0].shape)


FLOODS = {  # a million nested entries in one input: 2 to 10 MB
    "bytes_contents": (
        _input(_contents(b"\x42\x00" * 1_000_000)),
        "inputs.contents.bytes_contents",
    ),
    "input-parameters": (
        _input(*(_field(4, _field(1, b"%d" % i)) for i in range(1_000_000))),
        "inputs.parameters",
    ),
    "output-parameters": (
        _field(6, _field(1, b"y") + _field(2, _field(1, b"k")) * 1_000_000),
        "outputs.parameters",
    ),
    "shape-unknown-fields": (_input(b"\x48\x01" * 1_000_000), "inputs.9"),
}


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_model_infer_bounds_nested_fields(small: Server, flood: str) -> None:
    """Refused from the count: the damage after the flood is never reached (a parse
    would answer INVALID_ARGUMENT), and the server keeps serving."""
    entries, path = FLOODS[flood]
    error = _refusal(small, INFER, b"\x0a\x03mlp" + entries + DAMAGE)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert error.details().startswith(
        f"the request has more than {INFER_FIELDS} fields, nested ones included (the last "
        f"one read: {path}"
    ), error.details()
    assert error.details().endswith(
        f"the limit is {INFER_FIELDS} (64 for each entry max_request_inputs allows)"
    )
    assert _rows(small) == [2, 3]


def test_model_infer_at_the_field_limit_is_served(small: Server) -> None:
    """model_name, the input (name, datatype, shape) and the raw contents are 6 fields:
    unknown fields inside the input fill it to the limit exactly, then one more."""
    filler = INFER_FIELDS - 6
    assert _counts(_body(b"\x48\x01" * filler), INFER_FIELDS)
    assert _rows(small, b"\x48\x01" * filler) == [2, 3]
    error = _refusal(small, INFER, _body(b"\x48\x01" * (filler + 1)))
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert "(the last one read: raw_input_contents)" in error.details()
    assert _rows(small) == [2, 3]


def test_typed_contents_unpacked_up_to_max_tensor_elements_are_served(small: Server) -> None:
    """1000 FP32 elements (max_tensor_elements), each with its own tag: one run."""
    x = np.arange(1000, dtype=np.float32).reshape(250, 4)
    run = _unpacked(6, 5, [value.tobytes() for value in x.ravel()])
    shape = _field(3, wire.varint(250) + wire.varint(4))
    reply = oip.ModelInferResponse.FromString(
        _call(small, INFER, b"\x0a\x03mlp" + _input(shape, _contents(run)))
    )
    assert list(reply.outputs[0].shape) == [250, 3]


def test_predict_left_to_protobuf_bounds_nested_fields(small: Server) -> None:
    """A Predict input's tensor full of unknown fields, with an unknown field first so
    that protobuf (not the fast reader) would parse it."""
    tensor = b"\x08\x0b" + b"\x20\x01" * 1_000_000  # dtype float32, then field 4s
    entry = _field(1, b"input") + _field(2, tensor)
    error = _refusal(small, PREDICT, UNKNOWN + b"\x0a\x03mlp" + _field(3, entry) + DAMAGE)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    fields = (4 + 4 + 64) * request_limits.FIELDS_PER_ENTRY
    assert (
        f"more than {fields} fields, nested ones included (the last one read: inputs.value.4)"
        in (error.details())
    )
    assert "(64 for each entry max_request_images, max_request_inputs allows)" in error.details()
    with ModelHostClient(small.target, timeout=60) as client:
        assert client.predict("mlp", np.zeros((2, 4), np.float32)).shape == (2, 3)


def test_entry_limited_without_a_message_type_counts_top_level_only() -> None:
    """The nested count is opt-in per parser: a parser built without the message type
    leaves nested fields to protobuf, as before."""
    nested = _input(_contents(b"\x42\x00" * 10_000))
    limits = {5: request_limits.EntryLimit("input tensors", 4, "max_request_inputs")}
    assert len(request_limits.entry_limited(Infer.FromString, limits)(nested).inputs) == 1
    with pytest.raises(
        LimitExceeded, match=r"the last one read: inputs\.contents\.bytes_contents\)"
    ):
        request_limits.entry_limited(Infer.FromString, limits, Infer.DESCRIPTOR)(nested)


# Every other request: MAX_REQUEST_FIELDS

LOAD = "/modelhost.v1.ModelHost/LoadModel"
SAVE = "/modelhost.v1.ModelHost/SaveCheckpoint"
REPOSITORY_LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
MOST = request_limits.MAX_REQUEST_FIELDS


def _too_many(server: Server, call: Any, path: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert error.details() == (
        f"the request has more than {MOST} fields, nested ones included (the last one "
        f"read: {path}); the limit is {MOST}"
    )
    assert _rows(server) == [2, 3]  # and the server serves on


def test_load_model_labels_are_counted_before_they_are_parsed(small: Server) -> None:
    """Labels are bounded after the parse (MAX_LABELS), but each parsed one is an
    object: a request of more fields than any real one is refused unparsed; one of
    100,000 labels (MAX_LABELS) is parsed and goes on to the service's checks."""
    many = b"\x0a\x03mlp" + b"\x6a\x00" * (MOST + 1)  # field 13: labels, empty
    _too_many(small, lambda: _call(small, LOAD, many + DAMAGE), "labels")
    labels = b"\x0a\x03mlp" + b"\x6a\x01x" * 100_000
    error = _refusal(small, LOAD, labels)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert "needs a checkpoint" in error.details(), error.details()  # parsed, then checked


def test_a_checkpoint_header_is_counted_before_it_is_parsed(small: Server) -> None:
    """SaveCheckpoint's chunks take the fast path; its header is counted first: a header
    of more metadata entries than any real one (the proto allows 64) is refused, and
    nothing is stored."""
    metadata = _field(2, _field(1, b"k")) * (MOST // 2 + 1)  # 2 fields each
    header = _field(1, _field(1, b"w") + metadata)
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(small.target, options=options) as channel:
        save = channel.stream_unary(SAVE)
        _too_many(small, lambda: save(iter([header + DAMAGE]), timeout=60), "header.metadata")
    with ModelHostClient(small.target, timeout=60) as client:
        assert "w" not in [c.name for c in client.list_checkpoints()]


def test_an_oip_repository_load_is_counted_before_it_is_parsed(small: Server) -> None:
    parameters = _field(3, _field(1, b"k")) * (MOST // 2 + 1)  # a map entry and its key
    body = _field(2, b"mlp") + parameters + DAMAGE
    _too_many(small, lambda: _call(small, REPOSITORY_LOAD, body), "parameters.key")


# Red team 6: what the count cannot follow, and numbers in runs


def test_a_model_infer_the_count_cannot_follow_is_refused(small: Server) -> None:
    flood = OVERLONG + b"\x0a\x03mlp" + _input(_contents(b"\x42\x00" * 1_000_000))
    error = _refusal(small, INFER, flood)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert "not a valid ModelInfer message (Unreadable: the message cannot be read to its end" in (
        str(error.details())
    )
    assert _rows(small) == [2, 3]


def test_a_predict_shape_of_a_million_dimensions_is_refused_unparsed(small: Server) -> None:
    shape = _field(2, b"\x01" * 1_000_000)  # a packed run: a million int64 once parsed
    entry = _field(1, b"input") + _field(2, b"\x08\x0b" + shape)
    error = _refusal(small, PREDICT, UNKNOWN + b"\x0a\x03mlp" + _field(3, entry))
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert "inputs.value.shape has more than 64 entries" in str(error.details())
    with ModelHostClient(small.target, timeout=60) as client:
        assert client.predict("mlp", np.zeros((2, 4), np.float32)).shape == (2, 3)


def test_typed_int_contents_count_against_max_tensor_elements_before_parsing(
    small: Server,
) -> None:
    """1000 elements (max_tensor_elements) and 4 x 2 shapes of 64 are allowed: a packed
    run of 10,000 one-byte varints is refused before protobuf makes 80 KB of them."""
    ints = _field(3, b"\x01" * 10_000)
    error = _refusal(small, INFER, b"\x0a\x03mlp" + _input(_contents(ints)))
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert error.details() == (
        "the request has more than 1512 numbers (the last one read: inputs.contents.int64_contents)"
    )


def test_model_infer_checks_an_inputs_rank_before_multiplying_its_shape() -> None:
    """Behind the count: 100,000 dimensions of 2**62 took math.prod seconds (and the GIL)."""
    from modelhost.server import oip_tensors
    from modelhost.server.errors import InvalidInput

    tensor = Input(name="x", datatype="INT64", shape=[1 << 62] * (codec.MAX_RANK + 1))
    with pytest.raises(InvalidInput, match="65 dimensions; at most 64"):
        oip_tensors.decode_inputs(Infer(inputs=[tensor]))
