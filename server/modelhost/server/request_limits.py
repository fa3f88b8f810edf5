"""Requests counted and bounded before (and as) they are parsed: the deserializers that
count fields, entries and numbers from the wire (`wire.check_fields`,
`wire.count_entries`) before protobuf makes an object of each, and the element counts
Predict and ModelInfer are held to. Both servicers take their parsers from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from modelhost.client import codec, wire
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server.errors import InvalidArgument, InvalidInput, LimitExceeded
from modelhost.server.names import MAX_NAME_LENGTH
from modelhost.server.settings import Settings
from modelhost.v1 import modelhost_pb2 as pb

M = TypeVar("M")

MAX_REQUEST_FIELDS = 1 << 18
"""Fields (nested ones included) a request of any method may hold, counted from the wire
before protobuf parses it (`fields_limited`): each becomes an object, so a small request
of empty entries (labels, metadata, JSON values) could otherwise take about 20 times its
size. A LoadModel's 100,000 labels (MAX_LABELS) fit."""


def fields_limited(
    parse: Callable[[bytes], M],
    message: Descriptor,
    limit: int = MAX_REQUEST_FIELDS,
    why: str = "",
    numbers: int | None = None,
) -> Callable[[bytes], M]:
    """A deserializer that refuses (LimitExceeded) a request with more than `limit`
    fields, nested ones included, or more than `numbers` (default: `limit`) repeated
    numbers in varint runs (`wire.check_fields`: counted from tags and lengths, stopped
    at the limit), before `parse` reads it; `why` says where the field limit comes from.
    A request the count cannot follow to its end raises `wire.Unreadable` (a ValueError:
    the gate answers INVALID_ARGUMENT, "not a valid message", as for what protobuf
    refuses)."""

    def parse_limited(data: bytes) -> M:
        try:
            wire.check_fields(data, message, limit, numbers)
        except wire.TooManyFields as error:
            if error.what == wire.IN_ONE_FIELD:  # a shape of more than MAX_RANK dimensions
                raise InvalidArgument(
                    f"the request's {error.path} has more than {error.limit} entries"
                ) from None
            if error.what != "fields":
                raise LimitExceeded(
                    f"the request has more than {error.limit} {error.what} (the last one "
                    f"read: {error.path})"
                ) from None
            raise LimitExceeded(
                f"the request has more than {limit} fields, nested ones included (the last "
                f"one read: {error.path}); the limit is {limit}{why}"
            ) from None
        return parse(data)  # wire.Unreadable: "not a valid message" (INVALID_ARGUMENT)

    return parse_limited


parse_save_request = wire.chunk_parser(
    fields_limited(pb.SaveCheckpointRequest.FromString, pb.SaveCheckpointRequest.DESCRIPTOR)
)
"""SaveCheckpoint's deserializer: chunks come as views of the received bytes; a header is
parsed once its fields are counted."""


PredictRequest = pb.PredictRequest | wire.PredictRequestView


@dataclasses.dataclass(frozen=True)
class EntryLimit:
    """At most `limit` entries of a repeated (or map) field in one request: `what` they
    are, as refusals name them, and the `setting` that sets the limit."""

    what: str
    limit: int
    setting: str


FIELDS_PER_ENTRY = 64
"""Fields a request may hold in all (nested ones included: names, shapes, parameters,
contents), on average, per top-level entry its limits allow."""


def entry_limited(
    parse: Callable[[bytes], M],
    limits: Mapping[int, EntryLimit],
    message: Descriptor | None = None,
    numbers: int | None = None,
) -> Callable[[bytes], M]:
    """A deserializer that counts the top-level entries of the fields in `limits` (by
    field number) from the wire (`wire.count_entries`) before `parse` reads anything,
    and refuses a request with more than a limit allows (LimitExceeded) as soon as the
    count passes it: a million entries cost a limit's worth of loop steps, not a million
    parsed messages. With the `message` type, it then counts every field the parse
    would read, nested ones included (`wire.check_fields`), against FIELDS_PER_ENTRY
    per entry the limits allow: each becomes an object (a message, a map entry, a
    string), so an entry's nested fields are bounded too, and at most `numbers` repeated
    numbers in varint runs (default: as many as fields). Within the limits, `parse`
    reads (or refuses) the message as it would alone.
    """
    counted = {number: entry.limit for number, entry in limits.items()}
    most = sum(counted.values()) + wire.FIELD_SLACK
    counted[wire.ALL_FIELDS] = most
    every = EntryLimit("fields", most, "the entries' limits, and 64 more")
    limits = {**limits, wire.ALL_FIELDS: every}
    settings = ", ".join(sorted({entry.setting for entry in limits.values()} - {every.setting}))
    if message is not None:
        why = f" ({FIELDS_PER_ENTRY} for each entry {settings} allows)"
        parse = fields_limited(parse, message, most * FIELDS_PER_ENTRY, why, numbers)

    def parse_limited(data: bytes) -> M:
        for number, count in wire.count_entries(data, counted).items():
            entry = limits[number]
            if count > entry.limit:
                raise LimitExceeded(
                    f"the request has at least {count} {entry.what}; the limit is "
                    f"{entry.limit} ({entry.setting})"
                )
        return parse(data)

    return parse_limited


def field_number(message: type[Message], name: str) -> int:
    """The number of field `name` of a message type, as it is on the wire."""
    return message.DESCRIPTOR.fields_by_name[name].number


def predict_parser(max_inputs: int, max_images: int) -> Callable[[bytes], PredictRequest]:
    """Predict's deserializer: input tensors come as views of the received bytes; a
    request with more inputs or images than the limits is refused as soon as it shows,
    also when protobuf's parser reads it (an encoding the fast reader leaves to it)."""
    parse_unusual = entry_limited(
        pb.PredictRequest.FromString,
        {
            field_number(pb.PredictRequest, "inputs"): EntryLimit(
                "input tensors", max_inputs, "max_request_inputs"
            ),
            field_number(pb.PredictRequest, "images"): EntryLimit(
                "images", max_images, "max_request_images"
            ),
        },
        pb.PredictRequest.DESCRIPTOR,
    )

    def parse_predict_request(data: bytes) -> PredictRequest:
        try:
            request = wire.read_predict_request(data, max_inputs, max_images)
        except wire.TooManyEntries as error:
            raise LimitExceeded(
                f"the request has {error}; the limit is {error.limit} (max_request_{error.what})"
            ) from None
        return request or parse_unusual(data)

    return parse_predict_request


def infer_parser(
    max_inputs: int, max_elements: int = Settings.max_tensor_elements
) -> Callable[[bytes], oip.ModelInferRequest]:
    """ModelInfer's deserializer: a request with more inputs (or raw_input_contents,
    requested outputs or parameters) than `max_inputs`, or more fields in all (nested
    ones included: an input's contents, shape and parameters) than
    `FIELDS_PER_ENTRY` per entry those allow, is refused from the wire, before
    protobuf's parser makes a message of each (`entry_limited`); so is one with
    more numbers in varint runs (typed int contents, shapes: 8 bytes each once parsed,
    from a byte each) than `max_elements` and a shape per input and output."""
    request = oip.ModelInferRequest

    def limit(what: str) -> EntryLimit:
        return EntryLimit(what, max_inputs, "max_request_inputs")

    return entry_limited(
        request.FromString,
        {
            field_number(request, "inputs"): limit("input tensors"),
            field_number(request, "raw_input_contents"): limit("raw_input_contents entries"),
            field_number(request, "outputs"): limit("requested outputs"),
            field_number(request, "parameters"): limit("parameters"),
        },
        request.DESCRIPTOR,
        numbers=max_elements + 2 * max_inputs * codec.MAX_RANK,
    )


def check_element_count(elements: int, limit: int) -> None:
    """Refuses a request with more tensor elements than `max_tensor_elements` allows."""
    if elements > limit:
        raise LimitExceeded(
            f"the request has {elements} tensor elements; the limit is {limit} "
            "(max_tensor_elements)"
        )


FIELD_FRAMING = 11
"""The most a field's tag and length prefix (or an int64's varint) take: one byte of tag
(every field number in a reply is under 16) and a varint of at most 10 bytes."""

OUTPUT_FRAMING = 6 * FIELD_FRAMING
"""The most one output takes besides its name, its shape's numbers and its data, in
either protocol: in Predict's `outputs` map, the entry, its key, its value (a Tensor),
the Tensor's dtype (an enum: a varint), shape and data, each a tag and a prefix (or a
varint); in an OIP reply, the InferOutputTensor, its name, datatype (with its text, at
most 5 bytes), shape and its entry in raw_output_contents, 60 bytes."""

REPLY_FRAMING = 3 * FIELD_FRAMING + MAX_NAME_LENGTH + 20
"""The most a reply takes besides its outputs and what is counted with them: the
model's name (at most MAX_NAME_LENGTH ASCII characters) and version (an int64, or its
decimal text in OIP: at most 20 bytes), each with its tag and prefix, and the tag and
prefix of OIP's request id (whose text the caller counts)."""


def check_reply_bytes(
    outputs: Iterable[tuple[str, codec.TensorFields]],
    limit: int,
    strings: Iterable[str] = (),
    messages: Iterable[Message] = (),
) -> None:
    """Refuses a reply of these (name, tensor) `outputs` that could take more than `limit`
    (`max_message_bytes`) once encoded, before it is built (gRPC would refuse it only once
    built: a copy of every byte, or of one output per time an OIP request names it, and
    with its own message, not naming the setting).

    What is counted is an upper bound of the encoded reply, in Predict's and OIP's
    form alike: each output's data, name (UTF-8) and shape (up to 10 bytes per
    dimension) and OUTPUT_FRAMING for its tags, length prefixes and dtype; the
    reply's other `strings` (OIP's request id); each of its other `messages` (Predict's
    top_k rows: their encoded size) with a tag and prefix; and REPLY_FRAMING for the
    model's name and version. The bound's slack is under 200 bytes and about 60 per
    output: a reply that close to the limit may be refused although it would fit; none
    that does not fit is built."""
    data, total = 0, REPLY_FRAMING
    for name, tensor in outputs:
        size = len(tensor.data)
        data += size
        total += size + len(name.encode()) + 10 * len(tensor.shape) + OUTPUT_FRAMING
    total += sum(len(text.encode()) for text in strings)
    total += sum(message.ByteSize() + FIELD_FRAMING for message in messages)
    if total > limit:
        raise LimitExceeded(
            f"the reply would hold {data} bytes of outputs, up to {total} bytes encoded; "
            f"the limit is {limit} (max_message_bytes)"
        )


def element_count(name: str, tensor: codec.TensorFields) -> int:
    """What an input counts against max_tensor_elements: its elements, each zero-size
    dimension counted as one. A tensor that holds nothing ([0, 3, 8192, 8192], a request
    of 60 bytes) must not bring sizes past the limit that models and compiles size their
    work by (Swin's attention masks, a compile's zeros; red team 5's H1)."""
    try:
        codec.element_count(tensor, what=f"input {name!r}")
    except codec.TensorError as error:
        raise InvalidInput(str(error)) from None
    return math.prod(dim or 1 for dim in tensor.shape)
