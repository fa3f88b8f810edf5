"""Plain Python views of the service's descriptions (checkpoints, models, architectures)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelhost.client.codec import dtype_name
from modelhost.client.errors import decoding
from modelhost.v1 import modelhost_pb2 as pb

_STATES: dict[pb.ModelState.ValueType, str] = {
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_UNLOADING: "unloading",
    pb.MODEL_STATE_FAILED: "failed",
}


def format_name(code: pb.CheckpointFormat.ValueType) -> str:
    """`CHECKPOINT_FORMAT_SAFETENSORS` -> "safetensors": the proto enum is the table."""
    try:
        return pb.CheckpointFormat.Name(code).removeprefix("CHECKPOINT_FORMAT_").lower()
    except ValueError:
        return "unspecified"


def _time(stamp: Any, field: str) -> datetime | None:
    if not (stamp.seconds or stamp.nanos):
        return None
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except ValueError:  # protobuf's message does not name the field
        raise ValueError(f"{field} ({stamp.seconds} s, {stamp.nanos} ns) is out of range") from None


@dataclass(frozen=True)
class CheckpointInfo:
    """A stored checkpoint."""

    name: str
    size_bytes: int
    sha256: str
    format: str
    metadata: dict[str, str]
    created: datetime | None
    tensor_count: int
    epoch: int | None = None
    loss: float | None = None

    @classmethod
    @decoding("CheckpointInfo")
    def from_proto(cls, msg: pb.CheckpointInfo) -> CheckpointInfo:
        return cls(
            name=msg.name,
            size_bytes=msg.size_bytes,
            sha256=msg.sha256,
            format=format_name(msg.format),
            metadata=dict(msg.metadata),
            created=_time(msg.created, "created"),
            tensor_count=msg.tensor_count,
            epoch=msg.epoch if msg.HasField("epoch") else None,
            loss=msg.loss if msg.HasField("loss") else None,
        )


@dataclass(frozen=True)
class Batching:
    """Dynamic batching settings of a model version."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    preferred_batch_size: int


@dataclass(frozen=True)
class TensorSpec:
    """An expected input: name, dtype and shape (-1 = any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A hosted model version."""

    name: str
    version: int
    versions: tuple[int, ...]
    state: str
    architecture: str
    architecture_args: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str
    device: str
    dtype: str
    parameter_count: int
    device_bytes: int
    load_seconds: float
    loaded_at: datetime | None
    batching: Batching
    inputs: tuple[TensorSpec, ...] = ()
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    weights: str = ""
    channels_last: bool = False
    format: str = ""
    preprocessing: dict[str, Any] | None = None
    label_count: int = 0
    compile: str = ""
    autocast: str = ""
    status_message: str = ""  # why a "failed" version is not serving
    outputs: tuple[TensorSpec, ...] = ()  # names as Predict answers them; -1: any size
    residency: str = "on_demand"  # "pinned": never leaves its device
    tier: str = ""  # "resident", "host" or "store": where its weights are now
    last_used: datetime | None = None  # the last Predict
    page_ins: int = 0  # times paged back in after an eviction

    @classmethod
    @decoding("ModelInfo")
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name,
            version=msg.version,
            versions=tuple(msg.versions),
            state=_STATES.get(msg.state, "unspecified"),
            architecture=msg.architecture,
            architecture_args={k: json.loads(v) for k, v in msg.architecture_args.items()},
            checkpoint=msg.checkpoint,
            checkpoint_sha256=msg.checkpoint_sha256,
            device=msg.device,
            dtype=dtype_name(msg.dtype),
            parameter_count=msg.parameter_count,
            device_bytes=msg.device_bytes,
            load_seconds=msg.load_seconds,
            loaded_at=_time(msg.loaded_at, "loaded_at"),
            batching=Batching(
                msg.batching.max_batch_size,
                msg.batching.max_queue_delay_us,
                msg.batching.max_queue_size,
                msg.batching.preferred_batch_size,
            ),
            inputs=tuple(_spec(s) for s in msg.inputs),
            missing_keys=tuple(msg.missing_keys),
            unexpected_keys=tuple(msg.unexpected_keys),
            weights=msg.weights,
            channels_last=msg.channels_last,
            format=format_name(msg.format),
            preprocessing=_preprocessing(msg),
            label_count=msg.label_count,
            compile=msg.compile,
            autocast=dtype_name(msg.autocast) if msg.autocast else "",
            status_message=msg.status_message,
            outputs=tuple(_spec(s) for s in msg.outputs),
            residency="pinned" if msg.residency == pb.RESIDENCY_PINNED else "on_demand",
            tier=pb.Tier.Name(msg.tier).removeprefix("TIER_").lower() if msg.tier else "",
            last_used=_time(msg.last_used, "last_used") if msg.HasField("last_used") else None,
            page_ins=msg.page_ins,
        )


def _spec(msg: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(msg.name, dtype_name(msg.dtype), tuple(msg.shape))


@dataclass(frozen=True)
class TopClass:
    """One of the most likely classes of a row: index, softmax score, label ("" if none)."""

    index: int
    score: float
    label: str = ""


def _preprocessing(msg: pb.ModelInfo) -> dict[str, Any] | None:
    if not msg.HasField("preprocessing"):
        return None
    steps = msg.preprocessing
    return {
        "resize": steps.resize,
        "crop": steps.crop,
        "mean": list(steps.mean),
        "std": list(steps.std),
        "weights": steps.weights,
    }


@dataclass(frozen=True)
class Parameter:
    """A keyword parameter of an architecture's builder."""

    name: str
    required: bool
    default: Any = None
    annotation: str = ""


@dataclass(frozen=True)
class Architecture:
    """An architecture the server can build."""

    name: str
    source: str
    task: str
    parameters: tuple[Parameter, ...] = field(default_factory=tuple)

    @classmethod
    @decoding("Architecture")
    def from_proto(cls, msg: pb.Architecture) -> Architecture:
        return cls(
            name=msg.name,
            source=msg.source,
            task=msg.task,
            parameters=tuple(
                Parameter(
                    p.name, p.required, json.loads(p.default) if p.default else None, p.annotation
                )
                for p in msg.parameters
            ),
        )
