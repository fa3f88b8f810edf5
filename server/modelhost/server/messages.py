"""Protobuf messages to domain objects and back, and DownloadCheckpoint's serializer.
(The deserializers, which count requests before parsing them, are in `request_limits`.)

The one place below the servicers' own modules that knows protobuf: everything
under it (host, checkpoints, models, hosted, ...) takes and returns domain types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from modelhost.client import codec, wire
from modelhost.server.architectures import MAX_INPUT_RANK, Builder
from modelhost.server.checkpoints import Snapshot, Upload
from modelhost.server.errors import InvalidArgument
from modelhost.server.hosted import HOST, RESIDENT, STORE, HostedModel, Served
from modelhost.server.images import Preprocessing
from modelhost.server.inference import InputSpec
from modelhost.server.loading import ON_DEMAND, PINNED, LoadRequest
from modelhost.server.store import CheckpointRecord
from modelhost.v1 import modelhost_pb2 as pb

serialize_download_response = wire.serialize_chunks(pb.DownloadCheckpointResponse.SerializeToString)
"""DownloadCheckpoint's serializer: chunks go out as `wire.chunk_message` bytes."""


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
        autocast=_data_type(hosted.runner.autocast),
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


def _dtype_field(code: int, field: str) -> torch.dtype | None:
    """A DataType field (`dtype`, `autocast`) as a torch dtype (None: unset)."""
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
    "dtype": lambda m: _dtype_field(m.dtype, "dtype"),
    "autocast": lambda m: _dtype_field(m.autocast, "autocast"),
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


def _data_type(dtype: torch.dtype | None) -> codec.DataType:
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

    def dump_served(self, served: Served) -> dict[str, Any]:
        info = pb.ModelInfo(
            dtype=codec.data_type(served.dtype),
            inputs=_specs(served.inputs),
            outputs=_specs(served.outputs),
            device_bytes=served.device_bytes or 0,
            device=served.device,
        )
        return json_format.MessageToDict(info, preserving_proto_field_name=True)

    def load_served(self, entry: dict[str, Any]) -> Served:
        """ValueError unless it is ModelInfo JSON with a dtype, and inputs, outputs and
        device_bytes within bounds. Other fields are skipped, known or not: a newer
        server's record may say more (review 19, 3)."""
        if not isinstance(entry, dict):
            raise ValueError("not ModelInfo JSON")
        info = json_format.ParseDict(entry, pb.ModelInfo(), ignore_unknown_fields=True)
        if max(len(info.inputs), len(info.outputs)) > MAX_SERVED_SPECS:
            raise ValueError(f"more than {MAX_SERVED_SPECS} inputs or outputs")
        if info.device_bytes < 0:
            raise ValueError("negative device_bytes")
        return Served(
            codec.torch_dtype(info.dtype),
            tuple(_spec(given) for given in info.inputs),
            tuple(_spec(given) for given in info.outputs),
            info.device_bytes or None,
            info.device[:64],
        )


MAX_SERVED_SPECS = 4096
"""Most inputs or outputs a restore record entry may say its version had."""


def _spec(given: pb.TensorSpec) -> InputSpec:
    if len(given.shape) > MAX_INPUT_RANK or any(d < -1 for d in given.shape):
        raise ValueError(f"the shape of {given.name!r:.80} is not a tensor spec's")
    return InputSpec(given.name, codec.torch_dtype(given.dtype), tuple(given.shape))


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
