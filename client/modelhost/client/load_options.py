"""`load_model`'s options, declared once: `LoadOptions` names them, `load_request` turns
them into a `LoadModelRequest` by field name, and the CLI's `load` flags set them.

Each option but `timeout` is the `LoadModelRequest` field of the same name, so a new
field needs only its entry in `LoadOptions` (and a `modelhost load` flag); a test
checks both against the proto's descriptor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from modelhost.client import codec
from modelhost.v1 import modelhost_pb2 as pb


class LoadOptions(TypedDict, total=False):
    """Optional arguments of `load_model`, shared by both clients.

    - version: version to register (default: next). device: "cpu", "cuda", "cuda:N".
    - dtype: "float32" | "float16" | "bfloat16" for the weights.
    - architecture_args: builder keyword arguments, e.g. {"num_classes": 10}.
    - strict: require exact key match (default True).
    - weights: torchvision pretrained weights (e.g. "IMAGENET1K_V1") instead of a checkpoint.
    - batching: {"max_batch_size", "max_queue_delay_us", "max_queue_size",
      "preferred_batch_size"}.
    - channels_last, autocast ("float16" | "bfloat16"), compile ("default", "reduce-overhead",
      "max-autotune"), warmup_shape (e.g. (8, 3, 224, 224)).
    - preprocessing: {"resize", "crop", "mean", "std"} or {"weights": "IMAGENET1K_V1"}, for
      uint8 and JPEG/PNG inputs. labels: class names for top_k answers.
    - residency: "on_demand" (default: may leave the device for others under the server's
      memory budget, and comes back on its next request) or "pinned" (never leaves).
    - timeout: deadline of this call in seconds.

    An option left out, or None, leaves its field unset: the server's default.
    """

    version: int | None
    device: str | None
    dtype: str | None
    architecture_args: Mapping[str, Any] | None
    strict: bool
    weights: str | None
    batching: Mapping[str, int] | None
    channels_last: bool
    autocast: str | None
    compile: str
    warmup_shape: Sequence[int]
    preprocessing: Mapping[str, Any] | None
    labels: Sequence[str]
    residency: str | None
    timeout: float | None


CLIENT_OPTIONS = frozenset({"timeout"})
"""Options that are not `LoadModelRequest` fields: they shape the call itself."""

_FIELDS = pb.LoadModelRequest.DESCRIPTOR.fields_by_name


def load_request(
    name: str, architecture: str, checkpoint: str, options: LoadOptions
) -> pb.LoadModelRequest:
    """Builds a LoadModelRequest: every option sets the field of its name."""
    unknown = set(options) - set(LoadOptions.__annotations__)
    if unknown:
        raise TypeError(
            f"load_model got unexpected arguments {sorted(unknown)}: its options are "
            f"{', '.join(LoadOptions.__annotations__)}; the architecture's own arguments go "
            "in architecture_args, e.g. architecture_args={'num_classes': 10}"
        )
    fields = {key: _field_value(key, value) for key, value in options.items()}
    return pb.LoadModelRequest(
        name=name,
        architecture=architecture,
        checkpoint=checkpoint,
        **{key: value for key, value in fields.items() if value is not None},
    )


def _field_value(name: str, value: Any) -> Any:
    """An option's value as its field takes it; None leaves the field unset."""
    if value is None or name in CLIENT_OPTIONS:
        return None
    field = _FIELDS[name]
    if name == "architecture_args":  # map<string, string> of JSON literals
        return {key: json.dumps(arg) for key, arg in value.items()}
    if field.enum_type is not None and field.enum_type.full_name == "modelhost.v1.DataType":
        return codec.parse_dtype(value) if value else None  # a dtype name, e.g. "bfloat16"
    if field.enum_type is not None:
        return enum_value(field, value)
    if field.message_type is not None:  # a sub-message as a dict; empty leaves it unset
        keys = list(field.message_type.fields_by_name)
        unknown = [key for key in value if key not in keys]
        if unknown:
            known = ", ".join(keys)
            raise ValueError(f"{name}: unknown key {unknown[0]!r:.40} (its keys: {known})")
        return dict(value) or None
    if field.is_repeated:
        return list(value)
    return value


def enum_value(field: Any, name: str) -> int:
    """An enum field's number from a value's short name, e.g. "pinned" for
    RESIDENCY_PINNED (or its full name); ValueError names the choices."""
    enum = field.enum_type
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    choices = [v.name.removeprefix(prefix).lower() for v in enum.values if v.number]
    found = enum.values_by_name.get(prefix + name.upper()) or enum.values_by_name.get(name)
    if found is None or found.number == 0:
        raise ValueError(f"{field.name} {name!r:.40} is not one of {choices}")
    return int(found.number)
