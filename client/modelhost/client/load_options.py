"""`load_model`'s options, declared once: `LoadOptions` names them, `load_request` turns
them into a `LoadModelRequest` by field name, and the CLI's `load` flags set them.

Each option but `timeout` is the `LoadModelRequest` field of the same name, so a new
field needs only its entry in `LoadOptions` (and a `modelhost load` flag); a test
checks both against the proto's descriptor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from modelhost.client import codec
from modelhost.v1 import modelhost_pb2 as pb

if TYPE_CHECKING:
    import torch


class LoadOptions(TypedDict, total=False):
    """Optional arguments of `load_model`, shared by both clients.

    - version: version to register (default: next). device: "cpu", "cuda", "cuda:N" (or a
      torch.device).
    - dtype: "float32" | "float16" | "bfloat16" for the weights (or torch.float16, ...).
    - architecture_args: builder keyword arguments, e.g. {"num_classes": 10}.
    - strict: require exact key match (default True).
    - weights: torchvision pretrained weights (e.g. "IMAGENET1K_V1") instead of a checkpoint.
    - batching: {"max_batch_size", "max_queue_delay_us", "max_queue_size",
      "preferred_batch_size"}.
    - channels_last, autocast ("float16" | "bfloat16", or the torch dtype), compile
      ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
      warmup_shape (e.g. (8, 3, 224, 224)).
    - preprocessing: {"resize", "crop", "mean", "std"} or {"weights": "IMAGENET1K_V1"}, for
      uint8 and JPEG/PNG inputs. labels: class names for top_k answers.
    - residency: "on_demand" (default: may leave the device for others under the server's
      memory budget, and comes back on its next request) or "pinned" (never leaves).
    - timeout: deadline of this call in seconds.

    An option left out, or None, leaves its field unset: the server's default.
    """

    version: int | None
    device: str | torch.device | None
    dtype: str | torch.dtype | None
    architecture_args: Mapping[str, Any] | None
    strict: bool
    weights: str | None
    batching: Mapping[str, int] | None
    channels_last: bool
    autocast: str | torch.dtype | None
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
        return _json_args(value)
    if field.enum_type is not None and field.enum_type.full_name == "modelhost.v1.DataType":
        # a dtype name, e.g. "bfloat16", or a torch / numpy dtype (taken by its name)
        if isinstance(value, str) and not value:
            return None
        try:
            return codec.parse_dtype(value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from None
    if field.enum_type is not None:
        return enum_value(field, _text(name, value))
    if field.message_type is not None and not isinstance(value, Mapping):
        names = ", ".join(field.message_type.fields_by_name)
        raise TypeError(f"{name} must be a dict (its keys: {names}), not {_a(value)}")
    if field.message_type is not None:  # a sub-message as a dict; empty leaves it unset
        keys = list(field.message_type.fields_by_name)
        unknown = [key for key in value if key not in keys]
        if unknown:
            known = ", ".join(keys)
            raise ValueError(f"{name}: unknown key {unknown[0]!r:.40} (its keys: {known})")
        return dict(value) or None
    if field.is_repeated:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            example = "['cat', 'dog']" if name == "labels" else "(8, 3, 224, 224)"
            raise TypeError(f"{name} must be a list, e.g. {name}={example}, not {_a(value)}")
        return list(value)
    if name == "device" and type(value).__module__ == "torch":  # torch.device("cuda:1")
        return str(value)
    if field.type == field.TYPE_STRING:
        return _text(name, value)
    return value


def _a(value: object) -> str:
    """`value`'s type with its article, for messages: "a str", "an int"."""
    kind = type(value).__name__
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _text(name: str, value: Any) -> str:
    """A string option's value; TypeError names the option otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {_a(value)} ({value!r:.40})")
    return value


def _json_args(args: Any) -> dict[str, str]:
    """`architecture_args` as the request carries them: each value as its JSON text."""
    if not isinstance(args, Mapping):
        decoded = " (json.loads it first)" if isinstance(args, str) else ""
        raise TypeError(
            f"architecture_args must be a dict of the builder's keyword arguments, e.g. "
            f"{{'num_classes': 10}}, not {_a(args)}{decoded}"
        )
    fields = {}
    for key, arg in args.items():
        if not isinstance(key, str):
            raise TypeError(f"architecture_args keys must be str, not {_a(key)}")
        try:
            fields[key] = json.dumps(arg)
        except (TypeError, ValueError) as error:  # a set, a tensor, nan is fine, ...
            raise TypeError(
                f"architecture_args[{key!r:.40}]: {error}; builder arguments travel as JSON "
                "(numbers, strings, booleans, None, lists and dicts of them)"
            ) from None
    return fields


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
