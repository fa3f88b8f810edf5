"""Protobuf messages to domain objects and back, and the (de)serializers of large messages.

The one place below the servicers' own modules that knows protobuf: everything
under it (host, checkpoints, models, hosted, ...) takes and returns domain types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import torch
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from modelhost.client import codec, wire
from modelhost.server.architectures import Builder
from modelhost.server.checkpoints import Snapshot, Upload
from modelhost.server.errors import InvalidArgument, LimitExceeded
from modelhost.server.hosted import HOST, RESIDENT, STORE, HostedModel
from modelhost.server.images import Preprocessing
from modelhost.server.inference import InputSpec
from modelhost.server.loading import ON_DEMAND, PINNED, LoadRequest
from modelhost.server.store import CheckpointRecord
from modelhost.v1 import modelhost_pb2 as pb

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

serialize_download_response = wire.serialize_chunks(pb.DownloadCheckpointResponse.SerializeToString)
"""DownloadCheckpoint's serializer: chunks go out as `wire.chunk_message` bytes."""

PredictRequest = pb.PredictRequest | wire.PredictRequestView

M = TypeVar("M")


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


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def checkpoint_info(record: CheckpointRecord) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        name=record.name,
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        format=_format(record.format),
        metadata=record.metadata,
        created=_timestamp(record.created),
        tensor_count=record.tensor_count,
        epoch=record.epoch,
        loss=record.loss,
    )


def model_info(hosted: HostedModel, versions: list[int]) -> pb.ModelInfo:
    loaded = hosted.loaded
    policy = hosted.batcher.policy
    return pb.ModelInfo(
        name=hosted.name,
        version=hosted.version,
        versions=versions,
        state=pb.MODEL_STATE_UNLOADING if hosted.retiring else pb.MODEL_STATE_READY,
        architecture=hosted.spec.architecture,
        architecture_args=hosted.request.architecture_args,
        checkpoint=hosted.spec.checkpoint,
        checkpoint_sha256=loaded.record.sha256 if loaded.record else "",
        device=str(loaded.device),
        dtype=codec.data_type(loaded.dtype),
        parameter_count=loaded.parameter_count,
        device_bytes=hosted.device_bytes,
        load_seconds=hosted.load_seconds,
        loaded_at=_timestamp(hosted.loaded_at),
        batching=pb.BatchingConfig(
            max_batch_size=policy.max_batch_size,
            max_queue_delay_us=policy.max_queue_delay_us,
            max_queue_size=policy.max_queue_size,
            preferred_batch_size=policy.batch_rows,
        ),
        inputs=_specs(hosted.runner.inputs),
        outputs=_specs(hosted.runner.outputs),
        missing_keys=loaded.missing_keys,
        unexpected_keys=loaded.unexpected_keys,
        weights=hosted.spec.weights,
        channels_last=hosted.spec.channels_last,
        format=_format(loaded.format),
        preprocessing=_preprocessing_message(hosted.runner.preprocessing),
        label_count=len(hosted.labels),
        compile=hosted.request.compile,
        autocast=codec.data_type(hosted.runner.autocast)
        if hosted.runner.autocast
        else pb.DATA_TYPE_UNSPECIFIED,
        residency=_RESIDENCY[hosted.request.residency],
        tier=_TIERS[hosted.tier],
        last_used=_timestamp(hosted.last_used) if hosted.last_used else None,
        page_ins=hosted.page_ins,
    )


def failed_model_info(request: LoadRequest, reason: str) -> pb.ModelInfo:
    """A recorded version that is not serving (a restore record entry), and why."""
    return pb.ModelInfo(
        name=request.name,
        version=request.version,
        state=pb.MODEL_STATE_FAILED,
        architecture=request.architecture,
        architecture_args=request.architecture_args,
        checkpoint=request.checkpoint,
        weights=request.weights,
        status_message=reason,
    )


def _specs(specs: Iterable[InputSpec]) -> list[pb.TensorSpec]:
    return [
        pb.TensorSpec(name=spec.name, dtype=codec.data_type(spec.dtype), shape=spec.shape)
        for spec in specs
    ]


def _preprocessing_message(steps: Preprocessing | None) -> pb.ImagePreprocessing | None:
    if steps is None:
        return None
    return pb.ImagePreprocessing(
        resize=steps.resize, crop=steps.crop, mean=steps.mean, std=steps.std, weights=steps.weights
    )


def architecture(builder: Builder) -> pb.Architecture:
    return pb.Architecture(
        name=builder.name,
        source=builder.source,
        task=builder.task,
        parameters=[
            pb.ArchitectureParameter(
                name=p.name, default=p.default, required=p.required, annotation=p.annotation
            )
            for p in builder.parameters()
        ],
    )


def _format(name: str) -> pb.CheckpointFormat.ValueType:
    """A checkpoint format's name ("state_dict") as its proto value: the enum is the table."""
    try:
        return pb.CheckpointFormat.Value(f"CHECKPOINT_FORMAT_{name.upper()}")
    except ValueError:
        return pb.CHECKPOINT_FORMAT_UNSPECIFIED


# SaveCheckpoint


def save_header(header: pb.SaveCheckpointHeader) -> Upload | Snapshot:
    """The first SaveCheckpoint message's header as what to save."""
    if header.HasField("snapshot"):
        return Snapshot(
            name=header.name,
            model=header.snapshot.model,
            version=header.snapshot.version,
            metadata=dict(header.metadata),
            overwrite=header.overwrite,
        )
    if header.HasField("upload"):
        return Upload(
            name=header.name,
            metadata=dict(header.metadata),
            overwrite=header.overwrite,
            size_bytes=header.upload.size_bytes,
            sha256=header.upload.sha256,
        )
    raise InvalidArgument("the header must set upload or snapshot")


# LoadModel: the message's fields, by name, to the server's LoadRequest and back.

_BATCHING = {field.name for field in pb.BatchingConfig.DESCRIPTOR.fields}


def _weights_dtype(code: int, field: str) -> torch.dtype | None:
    if not code:
        return None
    try:
        return codec.torch_dtype(cast(codec.DataType, code))
    except KeyError:
        raise InvalidArgument(f"{field} {code} is not a DataType") from None


def _steps(message: pb.LoadModelRequest) -> Preprocessing | None:
    if not message.HasField("preprocessing"):
        return None
    steps = message.preprocessing
    return Preprocessing(
        resize=steps.resize,
        crop=steps.crop,
        mean=tuple(steps.mean),
        std=tuple(steps.std),
        weights=steps.weights,
    )


# Fields that need more than a copy; every other field is copied as it is.
_FROM_MESSAGE: dict[str, Callable[[pb.LoadModelRequest], Any]] = {
    "architecture_args": lambda m: dict(m.architecture_args),
    "dtype": lambda m: _weights_dtype(m.dtype, "dtype"),
    "autocast": lambda m: _weights_dtype(m.autocast, "autocast"),
    "strict": lambda m: m.strict if m.HasField("strict") else True,
    "preprocessing": _steps,
    "labels": lambda m: tuple(m.labels),
    "warmup_shape": lambda m: tuple(m.warmup_shape),
    "residency": lambda m: _residency(m.residency),
}


def _residency(code: int) -> str:
    if code in (pb.RESIDENCY_UNSPECIFIED, pb.RESIDENCY_ON_DEMAND):
        return ON_DEMAND
    if code == pb.RESIDENCY_PINNED:
        return PINNED
    raise InvalidArgument(f"residency {code} is not a Residency (on demand: 1, pinned: 2)")


def load_request(message: pb.LoadModelRequest) -> LoadRequest:
    """LoadModelRequest -> LoadRequest, field by field (tests check none is missed)."""
    values = {}
    for field in dataclasses.fields(LoadRequest):
        if field.name in _FROM_MESSAGE:
            values[field.name] = _FROM_MESSAGE[field.name](message)
        elif field.name in _BATCHING:
            values[field.name] = getattr(message.batching, field.name)
        else:
            values[field.name] = getattr(message, field.name)
    return LoadRequest(**values)


def _data_type(dtype: torch.dtype | None) -> int:
    return codec.data_type(dtype) if dtype else pb.DATA_TYPE_UNSPECIFIED


_RESIDENCY = {ON_DEMAND: pb.RESIDENCY_ON_DEMAND, PINNED: pb.RESIDENCY_PINNED}
_TIERS = {RESIDENT: pb.TIER_RESIDENT, HOST: pb.TIER_HOST, STORE: pb.TIER_STORE}

# `_FROM_MESSAGE` undone: fields that need more than a copy on the way back.
_TO_MESSAGE: dict[str, Callable[[LoadRequest], Any]] = {
    "dtype": lambda r: _data_type(r.dtype),
    "autocast": lambda r: _data_type(r.autocast),
    "preprocessing": lambda r: _preprocessing_message(r.preprocessing),
    "residency": lambda r: _RESIDENCY[r.residency],
}


def load_message(request: LoadRequest) -> pb.LoadModelRequest:
    """LoadRequest -> LoadModelRequest, field by field: `load_request` undone (restore
    records)."""
    fields: dict[str, Any] = {}
    batching: dict[str, int] = {}
    for field in dataclasses.fields(LoadRequest):
        convert = _TO_MESSAGE.get(field.name)
        value = convert(request) if convert else getattr(request, field.name)
        (batching if field.name in _BATCHING else fields)[field.name] = value
    return pb.LoadModelRequest(**fields, batching=pb.BatchingConfig(**batching))


class _Records:
    """Restore record entries as LoadModelRequest JSON (restore.RecordFormat)."""

    def dump(self, request: LoadRequest) -> dict[str, Any]:
        return json_format.MessageToDict(load_message(request), preserving_proto_field_name=True)

    def load(self, entry: dict[str, Any]) -> LoadRequest:
        if "max_batch_size" in entry:  # the flat format of before
            entry = _legacy_entry(entry)
        return load_request(json_format.ParseDict(entry, pb.LoadModelRequest()))


RECORDS = _Records()


def _legacy_entry(fields: dict[str, Any]) -> dict[str, Any]:
    """A record entry written before the record held LoadModelRequests (a flat
    dataclasses.asdict of the LoadRequest of then) as LoadModelRequest JSON."""
    known = {field.name for field in pb.LoadModelRequest.DESCRIPTOR.fields}
    entry = {key: value for key, value in fields.items() if key in known and value is not None}
    entry["batching"] = {key: fields[key] for key in _BATCHING if fields.get(key)}
    steps = entry.get("preprocessing")
    if isinstance(steps, dict):
        entry["preprocessing"] = {k: v for k, v in steps.items() if k != "interpolation"}
    return entry
