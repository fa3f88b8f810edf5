"""Every client method as data, for both clients: what it sends and how its reply becomes
the result.

Each method of `ModelHostClient` and `AsyncModelHostClient` is one statement: it builds a
`Call` with the function of its name here and performs it, blocking (`sync`) or on
asyncio (`aio`). Everything but the waiting lives here, so the two clients cannot
drift apart: a change to a method is a change to its function.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2

from modelhost.client import wire
from modelhost.client.channel import ChannelConfig
from modelhost.client.errors import ProtocolError, decoding
from modelhost.client.load_options import LoadOptions, load_request
from modelhost.client.predict import ImageSource, PredictCall
from modelhost.client.transfers import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_DOWNLOAD_BYTES,
    DEFAULT_STALL_SECONDS,
    Download,
    Prefetch,
    Progress,
    Source,
    Upload,
)
from modelhost.client.types import Architecture, CheckpointInfo, ModelInfo
from modelhost.v1 import modelhost_pb2 as pb

T = TypeVar("T")


def _nothing() -> None:
    return None


@dataclass
class Call(Generic[T]):
    """One RPC as a client method makes it.

    - `rpc`: the method's name in `Stub`, e.g. "GetModel".
    - `request`: a message or its serialized bytes; for a request stream, an iterator
      of them (the asyncio client pulls it on a worker thread).
    - `result`: turns the reply into the method's result. With `feed`, the reply is a
      stream: each message goes to `feed`, then `result(None)` gives the result.
    - `timeout`: this call's deadline in seconds; None: the client's default.
    - `close`: runs when the call ends, however it ends.
    """

    rpc: str
    request: Any
    result: Callable[[Any], T]
    timeout: float | None = None
    feed: Callable[[Any], None] | None = None
    close: Callable[[], None] = _nothing

    def __post_init__(self) -> None:
        self.result = _unless_refused(self.result)
        if self.feed is not None:
            self.feed = _unless_refused(self.feed)


class Refused:
    """A reply the `Stub` refused to parse: what the call gets in its place, and raises
    (a deserializer's exception would reach the caller only as gRPC's INTERNAL
    "Exception deserializing response!")."""

    def __init__(self, error: ProtocolError) -> None:
        self.error = error


def _unless_refused(use: Callable[[Any], T]) -> Callable[[Any], T]:
    def use_parsed(reply: Any) -> T:
        if isinstance(reply, Refused):
            raise reply.error
        return use(reply)

    return use_parsed


# Checkpoints


def save_checkpoint(
    name: str,
    source: Source,
    *,
    metadata: Mapping[str, str] | None,
    overwrite: bool,
    chunk_bytes: int,
    progress: Progress | None,
    timeout: float | None,
) -> Call[CheckpointInfo]:
    """Streams the header, then the chunks (read, hashed and framed on a thread of their
    own); the reply must carry the sha256 of what was sent."""
    upload = Upload(
        name,
        source,
        metadata=metadata,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
    frames = Prefetch(iter(upload))
    return Call("SaveCheckpoint", frames, upload.verify, timeout, close=frames.close)


def snapshot(
    model: str, checkpoint: str, version: int | None, overwrite: bool
) -> Call[CheckpointInfo]:
    """SaveCheckpoint with a one-message stream: a header that names the model."""
    header = pb.SaveCheckpointHeader(
        name=checkpoint,
        overwrite=overwrite,
        snapshot=pb.Snapshot(model=model, version=version or 0),
    )
    return Call(
        "SaveCheckpoint", iter([pb.SaveCheckpointRequest(header=header)]), CheckpointInfo.from_proto
    )


def download_checkpoint(
    name: str,
    dest: str | os.PathLike[str] | None,
    progress: Progress | None,
    max_bytes: int | None = None,
) -> Call[Path | Any]:
    """Receives the stream into `dest` (via a partial file created at the header,
    `transfers.create_partial`) or memory; checks the sha256.
    A checkpoint announced larger than `max_bytes` is refused before any byte is kept."""
    download = Download(dest, progress, max_bytes)
    return Call(
        "DownloadCheckpoint",
        pb.DownloadCheckpointRequest(name=name),
        lambda _: download.finish(),
        feed=download.feed,
        close=download.close,
    )


def list_checkpoints() -> Call[list[CheckpointInfo]]:
    return Call(
        "ListCheckpoints",
        pb.ListCheckpointsRequest(),
        lambda reply: [CheckpointInfo.from_proto(c) for c in reply.checkpoints],
    )


def get_checkpoint(name: str) -> Call[CheckpointInfo]:
    return Call("GetCheckpoint", pb.GetCheckpointRequest(name=name), CheckpointInfo.from_proto)


def delete_checkpoint(name: str) -> Call[None]:
    return Call("DeleteCheckpoint", pb.DeleteCheckpointRequest(name=name), lambda _: None)


# Models


def load_model(
    name: str, architecture: str, checkpoint: str, options: LoadOptions
) -> Call[ModelInfo]:
    request = load_request(name, architecture, checkpoint, options)
    return Call("LoadModel", request, ModelInfo.from_proto, options.get("timeout"))


def unload_model(name: str, version: int | None) -> Call[list[int]]:
    return Call(
        "UnloadModel",
        pb.UnloadModelRequest(name=name, version=version or 0),
        lambda reply: list(reply.versions),
    )


def list_models() -> Call[list[ModelInfo]]:
    return Call(
        "ListModels",
        pb.ListModelsRequest(),
        lambda reply: [ModelInfo.from_proto(m) for m in reply.models],
    )


def get_model(name: str, version: int | None) -> Call[ModelInfo]:
    return Call(
        "GetModel", pb.GetModelRequest(name=name, version=version or 0), ModelInfo.from_proto
    )


def list_architectures() -> Call[list[Architecture]]:
    return Call(
        "ListArchitectures",
        pb.ListArchitecturesRequest(),
        lambda reply: [Architecture.from_proto(a) for a in reply.architectures],
    )


# Inference and health


def predict(
    model: str,
    inputs: Any,
    *,
    images: Sequence[ImageSource] | None,
    top_k: int,
    version: int | None,
    timeout: float | None,
) -> Call[Any]:
    """Sends the request `wire` writes straight from the inputs' buffers."""
    call = PredictCall(model, inputs, version, images=images, top_k=top_k)
    return Call("Predict", call.payload, call.result, timeout)


def health(service: str) -> Call[str]:
    """grpc.health.v1 Check of `service` ("" is the whole server)."""
    return Call(
        "Check",
        health_pb2.HealthCheckRequest(service=service),
        lambda reply: status_name(reply.status),
    )


@decoding("HealthCheckResponse")
def status_name(status: int) -> str:
    """A HealthCheckResponse status as its name, e.g. "SERVING"."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


QUICK = frozenset(
    {"GetCheckpoint", "ListCheckpoints", "GetModel", "ListModels", "ListArchitectures", "Check"}
)
"""The calls that only read what the server holds: they answer at once."""
QUICK_TIMEOUT = 60.0
"""The deadline of a `QUICK` call when neither it nor the client sets one: a server that
takes longer has hung. Every other call (a load may compile for minutes) has none."""


# The stub

_SERVICES = (
    pb.DESCRIPTOR.services_by_name["ModelHost"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
)
_KINDS = {
    (False, False): "unary_unary",
    (True, False): "stream_unary",
    (False, True): "unary_stream",
    (True, True): "stream_stream",
}
_CHUNKED_REPLIES = {"DownloadCheckpoint"}
"""Replies whose chunks are read as views of the received bytes (`wire.chunk_parser`)."""

MAX_REPLY_FIELDS = 1 << 22
"""The most fields (nested ones included) the client parses of one reply; a reply with
more is refused unparsed (`ProtocolError`). A field parsed and converted costs up to
about 120 bytes, so this bounds a hostile reply to about 500 MB; a real one stays far
below: a listing of 10,000 models of 400 fields each (names, shapes, missing keys) is
under it, and a Predict's outputs are a few fields each, however large."""
MAX_PREDICT_REPLY_FIELDS = 1 << 23
"""MAX_REPLY_FIELDS of Predict: top_k gives a row 3 + k fields (with labels), so a batch
of a million rows with their top 5 classes and labels (8M fields) still comes back."""
MAX_REPLY_ENTRIES = 100_000
"""The most entries of a listing (models, checkpoints, architectures) or outputs of a
Predict: an entry costs more than its fields once converted (an empty ModelInfo becomes
about 2 KB of Python objects, an output 1.7 KB, an empty CheckpointInfo 400 B)."""
_ENTRIES = {
    "ListModels": "models",
    "ListCheckpoints": "checkpoints",
    "ListArchitectures": "architectures",
    "Predict": "outputs",
}


def reply_parser(
    method: MethodDescriptor, config: ChannelConfig | None = None
) -> Callable[[bytes], Any]:
    """The deserializer of a method's replies: counts the entries and fields of each
    (`wire.count_entries`, `wire.check_fields`) before protobuf parses it, and gives a
    reply over the limits above (or `config`'s) as `Refused`, unparsed, so that a small
    reply cannot make the client build objects worth thousands of times its size."""
    reply = method.output_type
    parse = message_factory.GetMessageClass(reply).FromString
    predict = method.name == "Predict"
    config = config or ChannelConfig()
    if config.max_reply_fields is not None:
        most_fields = config.max_reply_fields * (2 if predict else 1)
        limit_name = "ChannelConfig.max_reply_fields" + (", twice for Predict" if predict else "")
    else:
        most_fields = MAX_PREDICT_REPLY_FIELDS if predict else MAX_REPLY_FIELDS
        limit_name = "MAX_PREDICT_REPLY_FIELDS" if predict else "MAX_REPLY_FIELDS"
    listed = _ENTRIES.get(method.name, "")
    most_entries = MAX_REPLY_ENTRIES
    if config.max_reply_entries is not None:
        most_entries = config.max_reply_entries
    entries = {reply.fields_by_name[listed].number: most_entries} if listed else {}

    def parse_reply(data: bytes) -> Any:
        if (
            entries
            and len(data) > 2 * most_entries  # an entry takes 2 bytes at least
            and max(wire.count_entries(data, entries).values()) > most_entries
        ):
            return Refused(
                ProtocolError(
                    f"the server's {reply.name} has more than {most_entries} {listed}; "
                    f"the client takes at most {most_entries} (MAX_REPLY_ENTRIES, or "
                    "ChannelConfig.max_reply_entries)"
                )
            )
        try:
            wire.check_fields(data, reply, most_fields)
        except wire.TooManyFields as error:
            return Refused(
                ProtocolError(
                    f"the server's {reply.name} has more than {error.limit} {error.what}, "
                    f"nested ones included (the last one read: {error.path}); the client "
                    f"parses at most {error.limit} ({limit_name}; raise it with "
                    "ChannelConfig(max_reply_fields=...))"
                )
            )
        except wire.Unreadable as error:
            return Refused(ProtocolError(f"the server's {reply.name}: {error}"))
        return parse(data)

    return parse_reply


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class Stub:
    """Every RPC the clients make, by method name, on one blocking or asyncio channel:
    the ModelHost service's methods, and the health service's `Check` and `Watch`.

    Requests may be messages or bytes already serialized (`wire`'s Predict requests and
    upload chunks); DownloadCheckpoint chunks arrive as memoryviews.
    """

    def __init__(self, channel: Any, config: ChannelConfig | None = None) -> None:
        self._methods: dict[str, Any] = {}
        for service in _SERVICES:
            for method in service.methods:
                assert method.name not in self._methods, method.full_name
                parse = reply_parser(method, config)
                if method.name in _CHUNKED_REPLIES:
                    parse = wire.chunk_parser(parse)
                make = getattr(channel, _KINDS[method.client_streaming, method.server_streaming])
                self._methods[method.name] = make(
                    f"/{service.full_name}/{method.name}",
                    request_serializer=_serialize,
                    response_deserializer=parse,
                    _registered_method=True,
                )

    def __getitem__(self, rpc: str) -> Any:
        """The multicallable of `rpc`, e.g. `stub["Predict"](request, timeout=5)`."""
        return self._methods[rpc]


# What both clients hold


class ClientBase:
    """The state of either client: target, default deadline, upload chunk size, limits,
    channel settings, and the channel (blocking or asyncio, from `_connect`) with a
    `Stub` on it."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        config: ChannelConfig | None = None,
        max_download_bytes: int | None = DEFAULT_MAX_DOWNLOAD_BYTES,
        stall_timeout: float | None = DEFAULT_STALL_SECONDS,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.max_download_bytes = max_download_bytes
        self.stall_timeout = stall_timeout
        self._config = config or ChannelConfig()
        self._closed = False
        self._channel = self._connect(self._config, target)
        self._stub = Stub(self._channel, self._config)

    def _connect(self, config: ChannelConfig, target: str) -> Any:
        raise NotImplementedError

    def _check_open(self, call: Call[Any]) -> None:
        """Refuses a call on a closed client (gRPC's own words for it are "Cannot invoke
        RPC on closed channel!" or `grpc.aio.UsageError`): `ValueError`, as a closed file."""
        if self._closed:
            call.close()
            raise ValueError(
                f"this {type(self).__name__} is closed (close() or the end of its `with` "
                "block): make a new client to call the server again"
            )

    def _kw(self, call: Call[Any]) -> dict[str, Any]:
        """Keyword arguments of a stub call: its deadline (the call's, else the client's,
        else `QUICK_TIMEOUT` for a quick call) and auth."""
        timeout = call.timeout if call.timeout is not None else self.timeout
        if timeout is None and call.rpc in QUICK:
            timeout = QUICK_TIMEOUT
        return self._config.call_kwargs(timeout)
