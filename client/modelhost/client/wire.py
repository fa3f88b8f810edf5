"""Protobuf wire format of the large messages, written and read with one copy at most.

Building `PredictRequest(inputs={"x": Tensor(data=array.tobytes())})` and serializing
it copies an input four times (tobytes, the Tensor, the map entry, the serialized
message), and the server's parse and each read of `.data` copy it again; a
checkpoint chunk is copied three times on the way out and twice on the way in
(parsing, then reading `.chunk`). These functions write the same bytes (protobuf's
encoding of `modelhost.v1` messages) straight from the caller's buffer, and read
chunks and input tensors as views into the received message. Anything they do not
expect (unknown fields, unusual encodings, damaged bytes) is left to protobuf's own
parser, so they accept and reject exactly what protobuf does. Tests check them
against protobuf's encoder and parser. `count_entries` counts a message's entries
(and `check_fields` all its fields) before protobuf parses it, so that a message over a
limit is refused unparsed.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from modelhost.client.codec import MAX_RANK, DataType
from modelhost.v1 import modelhost_pb2 as pb

M = TypeVar("M")

Buffer = bytes | bytearray | memoryview
Part = bytes | bytearray | memoryview

_VARINT, _LENGTH = 0, 2


def varint(value: int) -> bytes:
    """Base-128 varint; negative values as 64-bit two's complement (as int32/int64 are)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _size(parts: Iterable[Part]) -> int:
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)


def _nested(number: int, parts: list[Part]) -> list[Part]:
    return [_tag(number, _LENGTH), varint(_size(parts)), *parts]


def _scalar(number: int, value: int) -> list[Part]:
    return [_tag(number, _VARINT), varint(value)] if value else []


def _text(number: int, value: str | bytes) -> list[Part]:
    data = value.encode() if isinstance(value, str) else value
    return _nested(number, [data]) if data else []


CHUNK_FIELD = 2
"""`chunk` of SaveCheckpointRequest and of DownloadCheckpointResponse."""
_CHUNK_TAG = _tag(CHUNK_FIELD, _LENGTH)


def chunk_message(data: Buffer) -> bytes:
    """`SaveCheckpointRequest(chunk=data)` or `DownloadCheckpointResponse(chunk=data)`."""
    return b"".join(_nested(CHUNK_FIELD, [data]))


def chunk_parser(parse: Callable[[bytes], M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer that returns a message holding only a chunk as a view of its bytes,
    and parses anything else (headers, unusual encodings) with `parse`."""

    def parse_chunk(data: bytes) -> M | memoryview:
        if data[:1] == _CHUNK_TAG:
            view = memoryview(data)
            try:
                size, offset = _read_varint(view, 1)
            except (_Unusual, IndexError):
                return parse(data)
            if size == len(data) - offset:
                return view[offset:]
        return parse(data)

    return parse_chunk


def serialize_chunks(serialize: Callable[[M], bytes]) -> Callable[[M | bytes], bytes]:
    """A serializer that passes messages already serialized (`chunk_message`) through."""

    def serialize_chunk(message: M | bytes) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serialize_chunk


def tensor(dtype: int, shape: Sequence[int], data: Buffer) -> list[Part]:
    """The fields of a `Tensor` (dtype = 1, packed shape = 2, data = 3)."""
    dims = b"".join(varint(dim) for dim in shape)
    data_parts = _nested(3, [data]) if _size([data]) else []
    return [*_scalar(1, dtype), *(_nested(2, [dims]) if dims else []), *data_parts]


def signed(value: int, bits: int, what: str) -> int:
    """`value`, checked as protobuf checks an int32 or int64 field (varint would wrap it
    silently: version 2**64 + 1 would ask for version 1)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        value = operator.index(value)  # a numpy integer too, as protobuf takes it
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f"{what} {value} is out of range for an int{bits}")
    return value


def predict_request(
    model: str,
    version: int,
    inputs: Mapping[str, tuple[int, Sequence[int], Buffer]],
    images: Sequence[bytes] = (),
    top_k: int = 0,
) -> bytes:
    """A serialized `PredictRequest`; `inputs` maps names to (dtype, shape, raw bytes)."""
    version, top_k = signed(version, 64, "version"), signed(top_k, 32, "top_k")
    parts: list[Part] = [*_text(1, model), *_scalar(2, version)]
    for name, (dtype, shape, data) in inputs.items():
        entry = [*_nested(1, [name.encode()]), *_nested(2, tensor(dtype, shape, data))]
        parts += _nested(3, entry)  # a map entry: key = 1 (always written), value = 2
    for image in images:
        parts += _nested(4, [image])
    parts += _scalar(5, top_k)
    return b"".join(parts)


# Reading


class _Unusual(Exception):
    """An encoding the fast reader leaves to protobuf's parser."""


def _read_varint(data: Buffer, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]  # IndexError when truncated
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >> 64:
                raise _Unusual
            return value, offset
        shift += 7
        if shift > 63:
            raise _Unusual


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field: an int (varint), or a view of the bytes."""
    offset, end = 0, len(data)
    while offset < end:
        key, offset = _read_varint(data, offset)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, offset = _read_varint(data, offset)
            yield number, value
        elif kind == _LENGTH:
            size, offset = _read_varint(data, offset)
            if offset + size > end:
                raise _Unusual
            yield number, data[offset : offset + size]
            offset += size
        else:
            raise _Unusual


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _int(value: int | memoryview) -> int:
    if not isinstance(value, int):
        raise _Unusual  # a length-delimited field where a varint belongs
    return value


def _view(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise _Unusual
    return value


@dataclass
class TensorView:
    """A `Tensor` whose `data` is a view of the received message (see codec.TensorFields)."""

    dtype: DataType = pb.DATA_TYPE_UNSPECIFIED
    shape: list[int] = field(default_factory=list)
    data: bytes | memoryview = b""


@dataclass
class PredictRequestView:
    """A `PredictRequest` read by `read_predict_request`: the fields the server uses."""

    model: str = ""
    version: int = 0
    inputs: dict[str, TensorView] = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)
    top_k: int = 0


class TooManyEntries(ValueError):
    """A request with more `what` ("inputs" or "images") than `limit`."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"more than {limit} {what}")
        self.what = what
        self.limit = limit


def read_predict_request(
    data: bytes, max_inputs: int | None = None, max_images: int | None = None
) -> PredictRequestView | None:
    """Reads a serialized `PredictRequest` with its input tensors' bytes as views of
    `data` (no copy); None when protobuf's parser should read it instead.

    With limits, it stops at the first input or image over them (TooManyEntries), so
    the work a request can cause is bounded by the limits, not by its size.
    """
    request = PredictRequestView()
    inputs = images = fields = 0
    most = (max_inputs or 0) + (max_images or 0) + FIELD_SLACK  # filler is protobuf's
    try:
        for number, value in _fields(memoryview(data)):
            fields += 1
            if fields > most and max_inputs is not None:
                raise _Unusual
            if number == 1:
                request.model = str(_view(value), "utf-8")
            elif number == 2:
                request.version = _signed(_int(value), 64)
            elif number == 3:
                inputs += 1
                if max_inputs is not None and inputs > max_inputs:
                    raise TooManyEntries("inputs", max_inputs)
                name, tensor = _map_entry(_view(value))
                request.inputs[name] = tensor
            elif number == 4:
                images += 1
                if max_images is not None and images > max_images:
                    raise TooManyEntries("images", max_images)
                request.images.append(bytes(_view(value)))
            elif number == 5:
                request.top_k = _signed(_int(value), 32)
            else:
                raise _Unusual
    except (_Unusual, IndexError, UnicodeDecodeError):
        return None
    return request


def _map_entry(data: memoryview) -> tuple[str, TensorView]:
    name, tensor, seen = "", TensorView(), False
    for number, value in _fields(data):
        if number == 1:
            name = str(_view(value), "utf-8")
        elif number == 2 and not seen:  # a repeated value would merge: protobuf's job
            tensor, seen = _tensor(_view(value)), True
        else:
            raise _Unusual
    return name, tensor


def _tensor(data: memoryview) -> TensorView:
    tensor = TensorView()
    for number, value in _fields(data):
        if number == 1:
            tensor.dtype = cast(DataType, _signed(_int(value), 32))
        elif number == 2 and isinstance(value, memoryview):  # packed
            packed, offset = value, 0
            while offset < len(packed):
                dim, offset = _read_varint(packed, offset)
                tensor.shape.append(_signed(dim, 64))
                if len(tensor.shape) > MAX_RANK:
                    raise _Unusual
        elif number == 2:
            tensor.shape.append(_signed(_int(value), 64))
            if len(tensor.shape) > MAX_RANK:
                raise _Unusual
        elif number == 3:
            tensor.data = _view(value)
        else:
            raise _Unusual
    return tensor


# Counting entries before a parse

_FIXED64, _START_GROUP, _END_GROUP, _FIXED32 = 1, 3, 4, 5
_MAX_DEPTH = 100  # protobuf's recursion limit
ALL_FIELDS = 0
"""`count_entries`' key for every top-level field (no field has number 0)."""
FIELD_SLACK = 64
"""Top-level fields a request may have beyond its repeated entries' limits."""


def count_entries(data: Buffer, limits: Mapping[int, int]) -> dict[int, int]:
    """How many times each field of `limits` (field number -> most allowed) occurs at the
    top level of a serialized message, read from tags and lengths alone: nothing is
    decoded or copied.

    Counts length-delimited occurrences only: they are the entries protobuf's parser
    would make of a repeated message, bytes or map field (a wrong wire type makes an
    unknown field instead). It stops at the first count over its limit (that count is
    the limit plus one), so what follows is never read; and where the bytes stop making
    sense (cut short, an invalid wire type, an unmatched group end, a varint of more
    than ten bytes), since protobuf's parser refuses the message there or before.
    Unknown fields, groups and overlong encodings are skipped as protobuf skips them.
    Each top-level field read costs one step of a Python loop (about 0.2 us); a limit for
    ALL_FIELDS bounds those steps (every field read counts, top-level or inside a group:
    filler such as repeated scalars, unknown fields and groups).
    """
    counts = dict.fromkeys(limits, 0)
    groups: list[int] = []  # field numbers of the groups being skipped, innermost last
    offset, end = 0, len(data)
    try:
        while offset < end:
            key = data[offset]
            if key > 0x7F:
                key, offset = _read_varint(data, offset)
            else:
                offset += 1
            kind = key & 7
            if ALL_FIELDS in counts:  # every field read, inside groups too: all filler
                counts[ALL_FIELDS] += 1
                if counts[ALL_FIELDS] > limits[ALL_FIELDS]:
                    break
            if kind == _LENGTH:
                size = data[offset]
                if size > 0x7F:
                    size, offset = _read_varint(data, offset)
                else:
                    offset += 1
                offset += size
                if offset > end:
                    break
                number = key >> 3
                if number in counts and not groups:
                    count = counts[number] = counts[number] + 1
                    if count > limits[number]:
                        break
            elif kind == _VARINT:
                last = offset + 9  # ten bytes at most
                while data[offset] > 0x7F:
                    if offset == last:
                        raise _Unusual
                    offset += 1
                offset += 1
            elif kind == _FIXED64:
                offset += 8
            elif kind == _FIXED32:
                offset += 4
            elif kind == _START_GROUP:
                groups.append(key >> 3)
                if len(groups) > _MAX_DEPTH:
                    break  # protobuf refuses a message nested deeper
            elif kind == _END_GROUP and groups and groups[-1] == key >> 3:
                groups.pop()
            else:
                break  # wire type 6 or 7, or a group end that matches no start
    except (_Unusual, IndexError):
        pass  # cut short, or a varint of more than ten bytes
    return counts


# Counting every field a parse would read

_UNPACKED_VALUE = {
    _VARINT: rb"[\x80-\xff]{0,9}+[\x00-\x7f]",
    _FIXED64: rb".{8}",
    _FIXED32: rb".{4}",
}
_SCALAR_WIRE_TYPES = {
    **dict.fromkeys(
        (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64),
        _FIXED64,
    ),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32),
        _FIXED32,
    ),
}


RUN_LIMITS = {"shape": MAX_RANK, "warmup_shape": MAX_RANK}
"""Repeated numbers a field of this name may hold in one message, all its runs together
(a shape has at most MAX_RANK dimensions): a packed run is one field, but its elements
are parsed too."""
IN_ONE_FIELD = "numbers in one field"
"""TooManyFields' `what` when a field's runs hold more than RUN_LIMITS allows."""


class TooManyFields(ValueError):
    """A message with more fields than `limit`, nested ones included (or, when `what` is
    "numbers", more repeated numbers in varint runs than allowed); `path` names the field
    read when the count went past it ("inputs.contents.bytes_contents")."""

    def __init__(self, path: str, limit: int, what: str = "fields") -> None:
        super().__init__(f"more than {limit} {what} (nested ones included) at {path}")
        self.path = path
        self.limit = limit
        self.what = what


class Unreadable(ValueError):
    """A message `check_fields` cannot follow to its end (nested more than 100 deep, an
    overlong varint, cut short, an invalid wire type): refused rather than handed to a
    parser that might accept it uncounted."""


@dataclass(frozen=True)
class _Field:
    name: str
    message: Descriptor | None  # a message (or map entry) field: walked into
    run: re.Pattern[bytes] | None  # a repeated scalar's unpacked elements, skipped at once
    varint: bool  # a repeated scalar encoded as varints (each may take 8 bytes parsed)
    most: int | None  # numbers one run of it may hold (RUN_LIMITS)


@functools.cache
def _plan(message: Descriptor) -> dict[int, _Field]:
    """The fields of a message type by number, as `check_fields` walks them."""
    plan = {}
    for f in message.fields:
        sub = f.message_type if f.type == FieldDescriptor.TYPE_MESSAGE else None
        run, kind = None, None
        if f.is_repeated and sub is None and f.cpp_type != FieldDescriptor.CPPTYPE_STRING:
            kind = _SCALAR_WIRE_TYPES.get(f.type, _VARINT)
            value = _UNPACKED_VALUE[kind]
            run = re.compile(b"(?:" + re.escape(_tag(f.number, kind)) + value + b")++", re.DOTALL)
        most = RUN_LIMITS.get(f.name) if run is not None else None
        plan[f.number] = _Field(f.name, sub, run, kind == _VARINT, most)
    return plan


def check_fields(data: Buffer, message: Descriptor, limit: int, numbers: int | None = None) -> None:
    """Raises TooManyFields if protobuf's parser would read more than `limit` fields
    from a serialized `message`, nested messages and map entries included, or more than
    `numbers` (default: `limit`) repeated numbers encoded as varints; counted from tags
    and lengths alone, and stopped as soon as a count passes its limit, so the cost of a
    check is bounded by the limits, not by the message. Raises Unreadable for a message
    it cannot follow to its end (protobuf refuses most of those, and the rest, such as an
    overlong varint or 100 levels of groups, no real encoder writes).

    Each field read counts one: a message, a map entry, a string or bytes entry, an
    unknown field, a packed run of scalars (a length-delimited payload is skipped by its
    length, never read). A run of unpacked elements of a repeated scalar counts one too,
    skipped by a regular expression: like a packed run, it makes one array. The numbers
    in runs of varints are counted as well (a byte each can become 8 parsed): exactly for
    a packed run, at most one per 2 bytes for an unpacked one; fixed-width runs parse to
    their own size. A field in RUN_LIMITS (a shape) may hold at most that many, runs together.
    Every field has a tag byte of its own, so the count also stops once the bytes left
    are fewer than the fields and numbers the limits still allow (a message of `limit`
    bytes or less is not read at all).
    """
    walk = _Walk(data, limit, limit if numbers is None else numbers)
    try:
        walk.message(0, len(data), message, "")
    except _Fits:
        pass
    except (_Unusual, IndexError):
        raise Unreadable(
            "the message cannot be read to its end (cut short, nested more than 100 deep, "
            "an overlong varint or an invalid wire type)"
        ) from None


class _Fits(Exception):
    """The bytes left hold fewer fields than the limit still allows."""


_HIGH_BIT = 0x80


_COUNT_STEP = 1 << 20  # bytes compared at a time: the comparison's array stays small


def _varints_in(data: Buffer, offset: int, size: int) -> int:
    """How many varints a packed run of `size` bytes at `offset` holds (bytes that end one)."""
    payload = np.frombuffer(data, np.uint8, size, offset)
    return sum(
        int(np.count_nonzero(payload[at : at + _COUNT_STEP] < _HIGH_BIT))
        for at in range(0, size, _COUNT_STEP)
    )


class _Walk:
    def __init__(self, data: Buffer, limit: int, numbers: int) -> None:
        self.data, self.limit, self.count = data, limit, 0
        self.numbers, self.numbers_read = numbers, 0
        self.open: list[tuple[dict[int, int], dict[int, _Field]]] = []  # messages being read

    def message(
        self, offset: int, end: int, message: Descriptor | None, path: str, group: int = 0
    ) -> int:
        """Counts the fields from `offset` to `end` of a `message` (None: an unknown
        group's, to its end at `group`); returns the offset after them."""
        if path.count(".") >= _MAX_DEPTH:
            raise _Unusual  # protobuf refuses a message nested deeper (or barely accepts it)
        data, limit, count, total = self.data, self.limit, self.count, len(self.data)
        plan = _plan(message) if message is not None else {}
        runs: dict[int, int] = {}  # numbers read per capped field: its runs make one array
        self.open.append((runs, plan))
        while offset < end:
            left = total - offset
            if (
                count + left <= limit
                and self.numbers_read + left <= self.numbers
                and self._headroom() >= left
            ):
                raise _Fits
            start = offset
            key = data[offset]
            if key > 0x7F:
                key, offset = _read_varint(data, offset)
            else:
                offset += 1
            number, kind = key >> 3, key & 7
            field = plan.get(number)
            count += 1
            if count > limit:
                raise TooManyFields(_name(path, field, number)[1:], limit)
            if kind == _LENGTH:
                size = data[offset]
                if size > 0x7F:
                    size, offset = _read_varint(data, offset)
                else:
                    offset += 1
                if offset + size > end:
                    raise _Unusual
                if field is not None and field.message is not None:
                    self.count = count
                    self.message(offset, offset + size, field.message, _name(path, field, number))
                    count = self.count
                elif field is not None and field.varint:  # a packed run of varints
                    read = _varints_in(data, offset, size)
                    self._read_numbers(field, path, number, read, runs)
                offset += size
            elif field and field.run and (run := field.run.match(data, start, end)):
                offset = run.end()
                if field.varint:  # a tag byte and a value byte at least, each
                    self._read_numbers(field, path, number, (offset - start) // 2, runs)
            elif kind == _VARINT:
                _, offset = _read_varint(data, offset)
                if field is not None and field.varint:  # one element (its tag overlong)
                    self._read_numbers(field, path, number, 1, runs)
            elif kind == _FIXED64:
                offset += 8
            elif kind == _FIXED32:
                offset += 4
            elif kind == _START_GROUP:
                self.count = count
                offset = self.message(offset, end, None, _name(path, field, number), number)
                count = self.count
            elif kind == _END_GROUP and number == group:
                self.count = count
                self.open.pop()
                return offset
            else:
                raise _Unusual  # wire type 6 or 7, or a group end that matches no start
        if group or offset > end:
            raise _Unusual  # a group never ended, or a fixed value cut short
        self.count = count
        self.open.pop()
        return offset

    def _headroom(self) -> float:
        """The fewest numbers a capped field of a message being read may still take."""
        return (
            min(
                (plan[number].most or 0) - read
                for runs, plan in self.open
                for number, read in runs.items()
            )
            if any(runs for runs, _ in self.open)
            else float("inf")
        )

    def _read_numbers(
        self, field: _Field, path: str, number: int, read: int, runs: dict[int, int]
    ) -> None:
        """Counts `read` numbers of a repeated field; the runs of a field in RUN_LIMITS
        count together (protobuf joins them into one array per message)."""
        if field.most is not None:
            runs[number] = runs.get(number, 0) + read
            if runs[number] > field.most:
                raise TooManyFields(_name(path, field, number)[1:], field.most, IN_ONE_FIELD)
        self.numbers_read += read
        if self.numbers_read > self.numbers:
            raise TooManyFields(_name(path, field, number)[1:], self.numbers, "numbers")


def _name(path: str, field: _Field | None, number: int) -> str:
    """A field's path: ".inputs.contents.bytes_contents" (an unknown field by number)."""
    return f"{path}.{field.name if field else number}"
