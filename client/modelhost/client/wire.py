"""Protobuf wire format of the large messages, written and read with one copy at most.

Building `PredictRequest(inputs={"x": Tensor(data=array.tobytes())})` and serializing
it copies an input four times (tobytes, the Tensor, the map entry, the serialized
message); a checkpoint chunk is copied three times on the way out and twice on the
way in (parsing, then reading `.chunk`). These functions write the same bytes
(protobuf's encoding of `modelhost.v1` messages) straight from the caller's buffer,
and read a chunk as a view into the received message. Tests check them against
protobuf's own encoder and parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

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


def chunk_message(data: Buffer) -> bytes:
    """`SaveCheckpointRequest(chunk=data)` or `DownloadCheckpointResponse(chunk=data)`."""
    return b"".join(_nested(CHUNK_FIELD, [data]))


def chunk_parser(parse: Callable[[bytes], M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer that returns a message holding only a chunk as a view of its bytes,
    and parses anything else (headers, unusual encodings) with `parse`."""

    def parse_chunk(data: bytes) -> M | memoryview:
        if data[:1] == _tag(CHUNK_FIELD, _LENGTH):
            size, shift, offset = 0, 0, 1
            while offset < len(data) and offset <= 10:
                byte = data[offset]
                offset += 1
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    if size == len(data) - offset:
                        return memoryview(data)[offset:]
                    break
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


def predict_request(
    model: str,
    version: int,
    inputs: Mapping[str, tuple[int, Sequence[int], Buffer]],
    images: Sequence[bytes] = (),
    top_k: int = 0,
) -> bytes:
    """A serialized `PredictRequest`; `inputs` maps names to (dtype, shape, raw bytes)."""
    parts: list[Part] = [*_text(1, model), *_scalar(2, version)]
    for name, (dtype, shape, data) in inputs.items():
        entry = [*_nested(1, [name.encode()]), *_nested(2, tensor(dtype, shape, data))]
        parts += _nested(3, entry)  # a map entry: key = 1 (always written), value = 2
    for image in images:
        parts += _nested(4, [image])
    parts += _scalar(5, top_k)
    return b"".join(parts)


def passthrough(message: bytes) -> bytes:
    """Request serializer for messages that are already serialized."""
    return message
