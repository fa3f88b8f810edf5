"""Per-request entry limits hold before protobuf parses anything, and typed OIP contents
are counted before they are converted.

The server counts a request's top-level entries from the wire (`wire.count_entries`)
and refuses one over max_request_inputs / max_request_images before protobuf makes a
message of each entry: for OIP ModelInfer always, for v1 Predict where the fast reader
leaves the message to protobuf. The end-to-end tests show the server stopped reading
early by putting damaged bytes after the entries: a parse to the end would answer
INVALID_ARGUMENT, the count answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import serve
from helpers.watched import Watched
from modelhost.client import ModelHostClient, wire
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server import Server, Settings, oip_tensors, request_limits, running
from modelhost.server.errors import InvalidArgument, InvalidInput, LimitExceeded
from modelhost.v1 import modelhost_pb2 as pb

Code = grpc.StatusCode
PREDICT = "/modelhost.v1.ModelHost/Predict"
INFER = "/inference.GRPCInferenceService/ModelInfer"
Infer = oip.ModelInferRequest

# Top-level fields of ModelInferRequest and PredictRequest, as the server counts them.
PARAMETERS, INPUTS, OUTPUTS, RAW = 4, 5, 6, 7
PREDICT_INPUTS, PREDICT_IMAGES = 3, 4
INFER_LIMITS = {PARAMETERS: 256, INPUTS: 256, OUTPUTS: 256, RAW: 256}

DAMAGE = b"\x2a\x05\x0a"  # an entry whose length runs past the end: protobuf refuses it
UNKNOWN = b"\x30\x01"  # field 6 of PredictRequest: unknown, so protobuf parses the message


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return wire.varint(number << 3 | 2) + wire.varint(len(payload)) + payload


def _inputs(count: int) -> bytes:
    """`count` ModelInferRequest inputs, each named "x" (5 bytes each)."""
    return _field(INPUTS, b"\x0a\x01x") * count


def _predict_inputs(count: int) -> bytes:
    """`count` PredictRequest input map entries, each {"x": Tensor()} (7 bytes each)."""
    return _field(PREDICT_INPUTS, b"\x0a\x01x\x12\x00") * count


# wire.count_entries


def test_counting_stops_at_the_first_entry_over_a_limit() -> None:
    """A million entries (5 MB): the count reads the 257th entry's tag and length, and
    not one byte after."""
    million = Watched(_inputs(1_000_000) + DAMAGE)
    assert wire.count_entries(million, INFER_LIMITS) == {4: 0, 5: 257, 6: 0, 7: 0}
    assert million.furthest == 256 * 5 + 1  # the 257th entry's length byte
    # Within the limit the count reads to the end, or to damage, and leaves it to protobuf.
    assert wire.count_entries(_inputs(256), INFER_LIMITS)[INPUTS] == 256
    assert wire.count_entries(_inputs(256) + b"\xff" * 11 + _inputs(9), {INPUTS: 256}) == {
        INPUTS: 256
    }


def test_entry_limited_parsers_refuse_without_calling_the_parser() -> None:
    parsed: list[bytes] = []

    def parse(data: bytes) -> bytes:
        parsed.append(data)
        return data

    limited = request_limits.entry_limited(
        parse, {INPUTS: request_limits.EntryLimit("input tensors", 256, "max_request_inputs")}
    )
    with pytest.raises(LimitExceeded) as caught:
        limited(_inputs(1_000_000) + DAMAGE)
    assert str(caught.value) == (
        "the request has at least 257 input tensors; the limit is 256 (max_request_inputs)"
    )
    assert parsed == []
    assert limited(_inputs(256)) == _inputs(256)  # at the limit: parsed as it is
    assert len(parsed) == 1


# Encodings protobuf's writer never makes: the counts are protobuf's, or protobuf refuses
# the bytes at or before the place the count stopped.
UNUSUAL = [
    b"\x40\x01" + _inputs(3),  # an unknown varint field first
    b"\x4b\x2a\x00\x2a\x00\x4c" + _inputs(3),  # an unknown group holding "inputs"
    b"\x4b\x53\x2a\x00\x54\x4c" + _inputs(3),  # nested groups
    b"\x2b\x2c" + _inputs(3),  # field 5 as a group: not an input
    b"\x28\x01\x2d\x00\x00\x00\x00\x29" + bytes(8) + _inputs(3),  # inputs' number, other types
    b"\xaa\x80\x80\x80\x00\x00" + _inputs(2),  # an input with an overlong tag
    b"\x2a\x80\x80\x00" + _inputs(2),  # an input with an overlong length
    b"\xfa\xff\xff\xff\x0f\x00" + _inputs(3),  # the largest field number
    b"\x40" + b"\xff" * 9 + b"\x01" + _inputs(3),  # a ten-byte varint
    _inputs(3) + b"\x4b",  # a group never closed
    _inputs(3) + b"\x4b\x54\x2a\x00",  # a group closed by another field's end
    _inputs(3) + b"\x4c\x2a\x00",  # a group end with no start
    _inputs(3) + b"\x4e\x00\x2a\x00",  # wire type 6
    _inputs(3) + b"\x40" + b"\xff" * 10 + b"\x01\x2a\x00",  # an eleven-byte varint
    _inputs(3) + b"\x2a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x7f",  # a length past 2**64
    _inputs(3) + b"\x2a\x81\x80\x80\x80\x10\x00",  # a length past 2**32
    _inputs(3) + b"\x2a",  # cut after a tag
    _inputs(3) + b"\x3a\x05ab",  # cut inside raw contents
    b"\x4b" * 120 + b"\x4c" * 120 + _inputs(3),  # groups deeper than protobuf allows
]


def _infer_counts(message: Infer) -> dict[int, int]:
    return {
        PARAMETERS: len(message.parameters),
        INPUTS: len(message.inputs),
        OUTPUTS: len(message.outputs),
        RAW: len(message.raw_input_contents),
    }


def _outcome(parse: Callable[[bytes], Any], data: bytes) -> object:
    try:
        return parse(data)
    except Exception as error:
        return type(error)


@pytest.mark.parametrize("data", UNUSUAL)
def test_counts_are_protobufs_for_unusual_encodings(data: bytes) -> None:
    counts = wire.count_entries(data, dict.fromkeys(INFER_LIMITS, 1 << 30))
    try:
        message = Infer.FromString(data)
    except DecodeError:
        assert counts[INPUTS] <= 3  # the inputs before the damage, no more
    else:
        assert counts == _infer_counts(message)
    limited = request_limits.infer_parser(2)
    fields = wire.count_entries(data, {wire.ALL_FIELDS: 1 << 30})[wire.ALL_FIELDS]
    if counts[INPUTS] <= 2 and fields <= 4 * 2 + wire.FIELD_SLACK:
        assert _outcome(limited, data) == _outcome(Infer.FromString, data)
    else:  # over an entry limit, or more fields than they and 64 more
        assert _outcome(limited, data) is LimitExceeded


_PARAMETER = st.builds(
    oip.InferParameter,
    bool_param=st.booleans(),
    string_param=st.text(max_size=4),
)
_PIECES = st.one_of(
    st.builds(lambda name: Infer(model_name=name), st.text(max_size=5)),
    st.builds(lambda key, value: Infer(parameters={key: value}), st.text(max_size=3), _PARAMETER),
    st.builds(
        lambda name, shape, values: Infer(
            inputs=[
                Infer.InferInputTensor(
                    name=name,
                    datatype="INT32",
                    shape=shape,
                    contents=oip.InferTensorContents(int_contents=values),
                )
            ]
        ),
        st.text(max_size=3),
        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
    ),
    st.builds(
        lambda name: Infer(outputs=[Infer.InferRequestedOutputTensor(name=name)]),
        st.text(max_size=3),
    ),
    st.builds(lambda raw: Infer(raw_input_contents=[raw]), st.binary(max_size=6)),
    st.sampled_from([b"\x40\x01", b"\x4b\x2a\x00\x4c", b"\x49" + bytes(8), b"\x4d" + bytes(4)]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12), st.data())
def test_counts_are_protobufs_for_any_message(pieces: list[Infer | bytes], data: Any) -> None:
    """Messages written field by field in any order (with unknown fields and groups
    between them): the counts are protobuf's; the same bytes damaged at one place and
    cut are parsed (or refused) as protobuf alone would, or refused over a limit."""
    written = b"".join(p if isinstance(p, bytes) else p.SerializeToString() for p in pieces)
    message = Infer.FromString(written)
    counts = wire.count_entries(written, dict.fromkeys(INFER_LIMITS, 1 << 30))
    parameters = sum(isinstance(p, Infer) and len(p.parameters) for p in pieces)
    assert counts == {**_infer_counts(message), PARAMETERS: parameters}  # map keys repeat
    limited = request_limits.infer_parser(3)
    if max(counts.values()) <= 3:
        assert limited(written) == message
    else:
        assert _outcome(limited, written) is LimitExceeded
    if written:
        damaged = bytearray(written)
        index = data.draw(st.integers(0, len(damaged) - 1))
        damaged[index] = data.draw(st.integers(0, 255))
        cut = bytes(damaged[: data.draw(st.integers(0, len(damaged)))])
        over = max(wire.count_entries(cut, dict.fromkeys(INFER_LIMITS, 3)).values()) > 3
        expected = LimitExceeded if over else _outcome(Infer.FromString, cut)
        assert _outcome(limited, cut) == expected


def test_predict_parser_counts_what_it_leaves_to_protobuf() -> None:
    parse = request_limits.predict_parser(4, 2)
    tail = _predict_inputs(1_000_000) + DAMAGE
    for data in (UNKNOWN + tail, _predict_inputs(3) + UNKNOWN + tail):
        with pytest.raises(LimitExceeded, match=r"at least 5 input tensors; the limit is 4 \("):
            parse(data)
    images = UNKNOWN + _field(PREDICT_IMAGES, b"jpeg") * 3
    with pytest.raises(LimitExceeded, match=r"at least 3 images; the limit is 2 \(max_request_im"):
        parse(images)
    within = UNKNOWN + _predict_inputs(4) + _field(PREDICT_IMAGES, b"jpeg") * 2
    assert parse(within) == pb.PredictRequest.FromString(within)
    with pytest.raises(DecodeError):  # within the limits, damage is protobuf's to refuse
        parse(UNKNOWN + _predict_inputs(4) + DAMAGE)


# End to end: a real server, hand-written requests on a raw channel.


@pytest.fixture
def small(settings: Settings) -> Iterator[Server]:
    """A server hosting "mlp" (tiny_mlp: float32 [N, 4] -> [N, 3]), with 4 inputs and 2
    images at most per request and 1000 tensor elements."""
    limited = dataclasses.replace(
        settings, max_request_inputs=4, max_request_images=2, max_tensor_elements=1000
    )
    with running(limited) as server:
        with ModelHostClient(server.target, timeout=60) as client:
            serve(client, "mlp", architecture="tiny_mlp")
        yield server


def _refusal(server: Server, method: str, body: bytes) -> grpc.RpcError:
    options = [("grpc.max_send_message_length", -1)]
    with (
        grpc.insecure_channel(server.target, options=options) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        channel.unary_unary(method)(body, timeout=60)
    return caught.value


def _infer(server: Server, request: Infer) -> oip.ModelInferResponse:
    with grpc.insecure_channel(server.target) as channel:
        reply = channel.unary_unary(INFER)(request.SerializeToString(), timeout=60)
    return oip.ModelInferResponse.FromString(reply)


def _serves(server: Server) -> None:
    """The server still answers a valid ModelInfer with the model's rows."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = Infer.InferInputTensor(name="input", datatype="FP32", shape=[2, 4])
    reply = _infer(
        server, Infer(model_name="mlp", inputs=[tensor], raw_input_contents=[x.tobytes()])
    )
    assert list(reply.outputs[0].shape) == [2, 3]


@pytest.mark.parametrize("method", [INFER, PREDICT])
def test_a_million_entries_are_refused_before_they_are_parsed(small: Server, method: str) -> None:
    """Five to seven MB of entries, then damage: refused from the count, so the server
    never read as far as the damage (a parse would have answered INVALID_ARGUMENT)."""
    if method == INFER:
        body = b"\x0a\x03mlp" + _inputs(1_000_000) + DAMAGE
    else:  # an unknown field first: the fast reader leaves the message to protobuf
        body = UNKNOWN + b"\x0a\x03mlp" + _predict_inputs(1_000_000) + DAMAGE
    error = _refusal(small, method, body)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert error.details() == (
        "the request has at least 5 input tensors; the limit is 4 (max_request_inputs)"
    )
    _serves(small)


@pytest.mark.parametrize(
    ("field", "payload", "what"),
    [
        (OUTPUTS, b"\x0a\x01y", "requested outputs"),
        (RAW, b"\x00", "raw_input_contents entries"),
        (PARAMETERS, b"\x0a\x01k\x12\x02\x08\x01", "parameters"),
    ],
)
def test_model_infer_bounds_each_repeated_field(
    small: Server, field: int, payload: bytes, what: str
) -> None:
    body = b"\x0a\x03mlp" + _field(field, payload) * 100_000 + DAMAGE
    error = _refusal(small, INFER, body)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert f"at least 5 {what}; the limit is 4 (max_request_inputs)" in error.details()
    _serves(small)


def test_predict_images_over_the_limit_with_an_unknown_field(small: Server) -> None:
    body = UNKNOWN + b"\x0a\x03mlp" + _field(PREDICT_IMAGES, b"jpeg") * 100_000 + DAMAGE
    error = _refusal(small, PREDICT, body)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert "at least 3 images; the limit is 2 (max_request_images)" in error.details()


FILLERS = {  # half a million fields that are no entries
    "repeated-scalar": b"\x0a\x03mlp" * 500_000,  # protobuf keeps the last
    "unknown-field": b"\x30\x00" * 500_000,  # kept as unknown
    "one-big-group": b"\x5b" + b"\x30\x00" * 500_000 + b"\x5c",  # an unknown group, kept
    "nested-groups": b"\x5b" * 500_000,  # protobuf refuses it past depth 100
}


@pytest.mark.parametrize("method", [INFER, PREDICT])
@pytest.mark.parametrize("filler", FILLERS)
def test_filler_fields_are_bounded_before_they_are_parsed(
    small: Server, method: str, filler: str
) -> None:
    """Fields that are no entries cost the fast reader or the count a Python step each
    (groups included, their insides too): at most the entries' limits and 64 more."""
    body = b"\x0a\x03mlp" + FILLERS[filler] + DAMAGE
    error = _refusal(small, method, body)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert "fields; the limit is" in error.details()
    _serves(small)


def test_a_tensor_of_absurd_rank_is_refused_cheaply() -> None:
    """The fast reader stops building a shape at 65 dimensions, and leaves the message to
    protobuf's parser; the count before it refuses the shape (500,000 int64 parsed from
    as many bytes: red team 6's M1)."""
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1] * 500_000, data=bytes(4))
    data = pb.PredictRequest(model="mlp", inputs={"x": tensor}).SerializeToString()
    assert wire.read_predict_request(data, 4, 2) is None  # left to protobuf
    with pytest.raises(InvalidArgument, match=r"inputs\.value\.shape has more than 64 entries"):
        request_limits.predict_parser(4, 2)(data)


def test_within_the_limits_damage_is_still_invalid_argument(small: Server) -> None:
    for method, body in (
        (INFER, b"\x0a\x03mlp" + _inputs(4) + DAMAGE),
        (PREDICT, UNKNOWN + b"\x0a\x03mlp" + _predict_inputs(4) + DAMAGE),
    ):
        error = _refusal(small, method, body)
        assert error.code() == Code.INVALID_ARGUMENT, (method, error.details())
        assert "not a valid" in error.details()


# Typed OIP contents: counted before they are converted.


def _typed(datatype: str, shape: list[int], **contents: Any) -> Infer:
    tensor = Infer.InferInputTensor(
        name="input",
        datatype=datatype,
        shape=shape,
        contents=oip.InferTensorContents(**contents),
    )
    return Infer(model_name="mlp", inputs=[tensor])


def test_typed_contents_over_the_element_limit_are_not_converted() -> None:
    """Values out of range for INT8 would fail the conversion: the element count is
    refused first. Two inputs count together, as Host.predict counts them."""
    request = _typed("INT8", [1, 1001], int_contents=[300] * 1001)
    with pytest.raises(LimitExceeded) as caught:
        oip_tensors.decode_inputs(request, max_elements=1000)
    assert str(caught.value) == (
        "the request has 1001 tensor elements; the limit is 1000 (max_tensor_elements)"
    )
    second = Infer.InferInputTensor(
        name="other",
        datatype="INT8",
        shape=[1],
        contents=oip.InferTensorContents(int_contents=[300]),
    )
    request = _typed("INT8", [1, 1000], int_contents=[1] * 1000)
    request.inputs.append(second)
    with pytest.raises(LimitExceeded, match="1001 tensor elements"):
        oip_tensors.decode_inputs(request, max_elements=1000)
    with pytest.raises(InvalidInput, match="out of range for INT8"):
        oip_tensors.decode_inputs(request, max_elements=1001)
    # A shape the values do not fill is refused as before, however large it says it is.
    with pytest.raises(InvalidInput, match="needs 1000000000000 elements"):
        oip_tensors.decode_inputs(_typed("FP32", [10**12], fp32_contents=[1]), max_elements=10)


TYPED_VALUES: dict[str, tuple[str, list[Any], list[Any]]] = {
    # datatype: (field, values in range, a value out of range or [])
    "BOOL": ("bool_contents", [True, False, True], []),
    "UINT8": ("uint_contents", [0, 1, 255], [256]),
    "INT8": ("int_contents", [-128, 0, 127], [128, -129]),
    "INT16": ("int_contents", [-(2**15), 7, 2**15 - 1], [2**15, -(2**15) - 1]),
    "INT32": ("int_contents", [-(2**31), 7, 2**31 - 1], []),
    "INT64": ("int64_contents", [-(2**63), 7, 2**63 - 1], []),
    "FP32": ("fp32_contents", [-1.5, float("inf"), 3.4e38], []),
    "FP64": ("fp64_contents", [-1.5, float("-inf"), 1e308], []),
}


@pytest.mark.parametrize("datatype", TYPED_VALUES)
def test_typed_contents_convert_as_before(datatype: str) -> None:
    """The bytes are what converting through a Python list made, and narrowing ints out
    of range are refused."""
    field, values, out_of_range = TYPED_VALUES[datatype]
    element = {"BOOL": "bool", "UINT8": "<u1", "INT8": "<i1", "INT16": "<i2"}.get(
        datatype, {"INT32": "<i4", "INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}.get(datatype)
    )
    request = _typed(datatype, [1, len(values)], **{field: values})
    tensor = oip_tensors.decode_inputs(request, max_elements=3)["input"]
    expected = np.asarray(list(getattr(request.inputs[0].contents, field))).astype(element)
    assert bytes(tensor.data) == expected.tobytes()
    assert (tensor.dtype, tensor.shape) == (oip_tensors.DATATYPES[datatype], [1, len(values)])
    for value in out_of_range:
        bad = _typed(datatype, [2], **{field: [0, value]})
        with pytest.raises(InvalidInput, match=f"values out of range for {datatype}"):
            oip_tensors.decode_inputs(bad)
    empty = oip_tensors.decode_inputs(_typed(datatype, [0, 4]))["input"]
    assert bytes(empty.data) == b""


def test_typed_contents_over_the_element_limit_end_to_end(small: Server) -> None:
    """Over max_tensor_elements: RESOURCE_EXHAUSTED before the values are converted
    (their range is never checked); within it, typed contents are served as before."""
    error = _refusal(
        small, INFER, _typed("INT8", [1, 1001], int_contents=[300] * 1001).SerializeToString()
    )
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    assert "1001 tensor elements; the limit is 1000 (max_tensor_elements)" in error.details()
    error = _refusal(
        small, INFER, _typed("INT8", [1, 3], int_contents=[1, 2, 300]).SerializeToString()
    )
    assert error.code() == Code.INVALID_ARGUMENT
    assert "out of range for INT8" in error.details()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    typed = _infer(small, _typed("FP32", [2, 4], fp32_contents=x.ravel().tolist()))
    tensor = Infer.InferInputTensor(name="input", datatype="FP32", shape=[2, 4])
    raw = _infer(small, Infer(model_name="mlp", inputs=[tensor], raw_input_contents=[x.tobytes()]))
    assert typed.raw_output_contents == raw.raw_output_contents
