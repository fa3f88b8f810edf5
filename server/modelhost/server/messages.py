"""Domain objects to protobuf messages, and the (de)serializers of large messages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from modelhost.client import codec, wire
from modelhost.server.architectures import Builder
from modelhost.server.errors import LimitExceeded
from modelhost.server.images import Preprocessing
from modelhost.server.registry import HostedModel
from modelhost.server.store import CheckpointRecord
from modelhost.v1 import modelhost_pb2 as pb

_FORMATS = {
    "state_dict": pb.CHECKPOINT_FORMAT_STATE_DICT,
    "general_checkpoint": pb.CHECKPOINT_FORMAT_GENERAL_CHECKPOINT,
    "safetensors": pb.CHECKPOINT_FORMAT_SAFETENSORS,
    "exported_program": pb.CHECKPOINT_FORMAT_EXPORTED_PROGRAM,
    "pickled_model": pb.CHECKPOINT_FORMAT_PICKLED_MODEL,
}


parse_save_request = wire.chunk_parser(pb.SaveCheckpointRequest.FromString)
"""SaveCheckpoint's deserializer: chunks come as views of the received bytes."""

serialize_download_response = wire.serialize_chunks(pb.DownloadCheckpointResponse.SerializeToString)
"""DownloadCheckpoint's serializer: chunks go out as `wire.chunk_message` bytes."""

PredictRequest = pb.PredictRequest | wire.PredictRequestView


def predict_parser(max_inputs: int, max_images: int) -> Callable[[bytes], PredictRequest]:
    """Predict's deserializer: input tensors come as views of the received bytes; a
    request with more inputs or images than the limits is refused as soon as it shows."""

    def parse_predict_request(data: bytes) -> PredictRequest:
        try:
            request = wire.read_predict_request(data, max_inputs, max_images)
        except wire.TooManyEntries as error:
            raise LimitExceeded(
                f"the request has {error}; the limit is {error.limit} (max_request_{error.what})"
            ) from None
        return request or pb.PredictRequest.FromString(data)

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
        format=_FORMATS.get(record.format, pb.CHECKPOINT_FORMAT_UNSPECIFIED),
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
        device_bytes=loaded.device_bytes,
        load_seconds=loaded.seconds,
        loaded_at=_timestamp(hosted.loaded_at),
        batching=pb.BatchingConfig(
            max_batch_size=policy.max_batch_size,
            max_queue_delay_us=policy.max_queue_delay_us,
            max_queue_size=policy.max_queue_size,
            preferred_batch_size=policy.batch_rows,
        ),
        inputs=[
            pb.TensorSpec(name=spec.name, dtype=codec.data_type(spec.dtype), shape=spec.shape)
            for spec in hosted.runner.inputs
        ],
        missing_keys=loaded.missing_keys,
        unexpected_keys=loaded.unexpected_keys,
        weights=hosted.spec.weights,
        channels_last=hosted.spec.channels_last,
        format=_FORMATS.get(loaded.format, pb.CHECKPOINT_FORMAT_UNSPECIFIED),
        preprocessing=_preprocessing_message(hosted.runner.preprocessing),
        label_count=len(hosted.labels),
        compile=hosted.request.compile,
        autocast=codec.data_type(hosted.runner.autocast)
        if hosted.runner.autocast
        else pb.DATA_TYPE_UNSPECIFIED,
    )


def failed_model_info(entry: Mapping[str, Any], reason: str) -> pb.ModelInfo:
    """A recorded version that is not serving (a restore record entry), and why."""
    args = entry.get("architecture_args")
    return pb.ModelInfo(
        name=str(entry.get("name", "")),
        version=int(entry.get("version") or 0),
        state=pb.MODEL_STATE_FAILED,
        architecture=str(entry.get("architecture", "")),
        architecture_args={str(k): str(v) for k, v in args.items()}
        if isinstance(args, dict)
        else {},
        checkpoint=str(entry.get("checkpoint", "")),
        status_message=reason,
    )


def _preprocessing_message(steps: Preprocessing | None) -> pb.ImagePreprocessing | None:
    if steps is None:
        return None
    return pb.ImagePreprocessing(
        resize=steps.resize, crop=steps.crop, mean=steps.mean, std=steps.std, weights=steps.weights
    )


def preprocessing(request: pb.LoadModelRequest) -> Preprocessing:
    """LoadModelRequest.preprocessing as the server's Preprocessing."""
    steps = request.preprocessing
    return Preprocessing(
        resize=steps.resize,
        crop=steps.crop,
        mean=tuple(steps.mean),
        std=tuple(steps.std),
        weights=steps.weights,
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
