"""What a LoadRequest may ask for: `check_request` turns it into a checked spec (or
InvalidArgument saying what is wrong), `batch_policy` into its batching; and the checks
a load makes once its inputs and outputs are known."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from modelhost.client import codec
from modelhost.server.architectures import parse_args
from modelhost.server.batching import BatchPolicy
from modelhost.server.devices import resolve_device
from modelhost.server.errors import InvalidArgument
from modelhost.server.inference import InputSpec
from modelhost.server.loading import WEIGHT_DTYPES, LoadRequest, LoadSpec
from modelhost.server.names import check_name
from modelhost.server.settings import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, MAX_QUEUE_SIZE, Settings

MAX_LABELS = 100_000
MAX_LABEL_BYTES = 1024
MAX_LABELS_BYTES = 4 << 20
COMPILE_MODES = {"", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}


def check_request(request: LoadRequest, settings: Settings, device: torch.device) -> LoadSpec:
    """The checked, resolved spec of what to load; InvalidArgument says what is wrong."""
    if request.dtype is not None and request.dtype not in WEIGHT_DTYPES:
        raise InvalidArgument(
            f"dtype {str(request.dtype).removeprefix('torch.')} cannot hold weights: "
            "use float32, float16 or bfloat16"
        )
    if request.version < 0:
        raise InvalidArgument(f"version {request.version} is negative")
    if request.compile not in COMPILE_MODES:
        raise InvalidArgument(
            f"compile mode {request.compile!r:.80} is not one of {sorted(COMPILE_MODES - {''})} "
            "(or none)"
        )
    if request.autocast is not None and request.autocast not in WEIGHT_DTYPES:
        raise InvalidArgument(
            f"autocast {str(request.autocast).removeprefix('torch.')}: use float16 or bfloat16"
        )
    shape = f"warmup_shape {list(request.warmup_shape)!s:.100}"
    if len(request.warmup_shape) > codec.MAX_RANK:
        raise InvalidArgument(
            f"{shape} has {len(request.warmup_shape)} dimensions; at most {codec.MAX_RANK} "
            "(as any Predict input)"
        )
    if any(dim < 1 for dim in request.warmup_shape):
        raise InvalidArgument(f"{shape} must be positive")
    elements = functools.reduce(int.__mul__, request.warmup_shape, 1)
    if elements > settings.max_tensor_elements:
        raise InvalidArgument(
            f"{shape} has {elements} elements; the limit is "
            f"{settings.max_tensor_elements} (max_tensor_elements)"
        )
    if request.checkpoint and request.weights:
        raise InvalidArgument(
            "LoadModel takes a checkpoint or pretrained weights, not both: "
            f"checkpoint {request.checkpoint!r:.100}, weights {request.weights!r:.100}"
        )
    if not (request.checkpoint or request.weights):
        raise InvalidArgument("LoadModel needs a checkpoint or pretrained weights")
    _check_labels(request.labels)
    batch_policy(request, settings)  # checked now; each build makes its own
    return LoadSpec(
        name=check_name(request.name, "model"),
        architecture=request.architecture,
        args=parse_args(request.architecture_args),
        checkpoint=check_name(request.checkpoint, "checkpoint") if request.checkpoint else "",
        device=resolve_device(request.device, str(device)),
        dtype=request.dtype,
        strict=request.strict,
        weights=request.weights,
        channels_last=request.channels_last,
    )


def _check_labels(labels: Sequence[str]) -> None:
    """Labels are kept in the restore record too: their count and size are bounded."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
    total = 0
    for label in labels:
        size = len(label.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label {label:.40}... takes more than {MAX_LABEL_BYTES} bytes in UTF-8"
            )
        total += size
    if total > MAX_LABELS_BYTES:
        raise InvalidArgument(
            f"the labels take {total:,} bytes in UTF-8; at most {MAX_LABELS_BYTES:,} are allowed"
        )


def check_warmup_fits(warmup_shape: Sequence[int], inputs: Sequence[InputSpec]) -> None:
    """Refuses a warmup_shape the model's one known input cannot take, by that name: the
    model's own error would name a shape the caller never sent."""
    if not warmup_shape or len(inputs) != 1:
        return
    want = inputs[0].shape
    if len(want) != len(warmup_shape) or any(
        w not in (-1, got) for w, got in zip(want, warmup_shape, strict=False)
    ):
        raise InvalidArgument(
            f"warmup_shape {list(warmup_shape)} does not fit the model's input "
            f"{inputs[0].name!r}, which takes {list(want)} (-1: any size)"
        )


def check_label_count(labels: Sequence[str], outputs: Sequence[InputSpec]) -> None:
    """Refuses labels that are not one per class of a model whose single output is known
    to be [batch, classes] (top-k would mix labels and class numbers)."""
    if not labels or len(outputs) != 1 or len(outputs[0].shape) != 2:
        return
    classes = outputs[0].shape[1]
    if classes > 0 and classes != len(labels):
        raise InvalidArgument(
            f"{len(labels)} labels for a model with {classes} classes (its output "
            f"{outputs[0].name!r} is [batch, {classes}]): give one label per class"
        )


def batch_policy(request: LoadRequest, settings: Settings) -> BatchPolicy:
    """The request's batching, the server's defaults where it sets none, checked."""
    policy = BatchPolicy(
        max_batch_size=request.max_batch_size or settings.max_batch_size,
        max_queue_delay_us=request.max_queue_delay_us or settings.max_queue_delay_us,
        max_queue_size=request.max_queue_size or settings.max_queue_size,
        preferred_batch_size=request.preferred_batch_size,
    )
    for field, value, limit in (
        ("max_batch_size", policy.max_batch_size, MAX_BATCH_SIZE),
        ("max_queue_size", policy.max_queue_size, MAX_QUEUE_SIZE),
        ("max_queue_delay_us", policy.max_queue_delay_us + 1, MAX_QUEUE_DELAY_US + 1),
    ):
        if not 1 <= value <= limit:
            raise InvalidArgument(
                f"batching {field}={getattr(policy, field)} is outside its range (at most {limit})"
            )
    if not 0 <= policy.preferred_batch_size <= policy.max_batch_size:
        raise InvalidArgument(
            f"batching preferred_batch_size={policy.preferred_batch_size} must be between 0 "
            f"and max_batch_size ({policy.max_batch_size})"
        )
    return policy
