"""RepositoryModelLoad parameters to a `LoadRequest`.

Every LoadModelRequest field is a parameter of the same name (`KEYS`, read from the
descriptor, its `batching` fields flattened): strings as `string_param`, integers as
`int64_param` or decimal strings, booleans as `bool_param` or "true"/"false", dtypes by
name, `architecture_args` and `preprocessing` as JSON objects, `labels` and
`warmup_shape` as JSON lists. Or "config", a Triton model configuration as JSON, whose
"parameters" entries carry the same keys and whose "max_batch_size",
"dynamic_batching.max_queue_delay_microseconds" and "dynamic_batching.preferred_batch_size"
(its smallest entry) set batching. Direct parameters win over "config". Loading a name
that is already hosted adds a version, as LoadModel does.

Every value must have its JSON type (integers: int64, as numbers or decimal strings,
ASCII digits only); JSON nested deeper than `architectures.MAX_JSON_DEPTH` is refused.
`parse_version` is the one parser of OIP version strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from modelhost.client import codec
from modelhost.client.load_options import enum_value
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server import messages
from modelhost.server.architectures import load_json
from modelhost.server.errors import InvalidArgument
from modelhost.server.loading import LoadRequest
from modelhost.server.registry import MAX_VERSION
from modelhost.v1 import modelhost_pb2 as pb

_FIELDS = {
    f.name: f for f in pb.LoadModelRequest.DESCRIPTOR.fields if f.name not in ("name", "batching")
}
_BATCHING = tuple(f.name for f in pb.BatchingConfig.DESCRIPTOR.fields)
KEYS = (*_FIELDS, *_BATCHING)
"""Every LoadModelRequest field (batching's flattened) is a parameter of the same name."""
_INT64 = range(-(2**63), 2**63)
# ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣" (which it reads).
_DECIMAL = re.compile(r"-?[0-9]{1,19}")


def parse_version(text: str) -> int:
    """An OIP version string as a modelhost version: "" -> 0 (newest), "3" -> 3."""
    if text == "":
        return 0
    number = int(text) if _DECIMAL.fullmatch(text) else 0
    if not 0 < number <= MAX_VERSION:
        raise InvalidArgument(f"version {text!r:.40} is not an integer in 1..{MAX_VERSION}")
    return number


def load_request(name: str, parameters: Mapping[str, oip.ModelRepositoryParameter]) -> LoadRequest:
    """What to load as `name`, from RepositoryModelLoad's parameters."""
    if not parameters:
        raise InvalidArgument(
            f"nothing to load for {name!r}: modelhost has no model repository to load from; "
            "pass the parameters 'architecture' and 'checkpoint' (or a 'config' naming them)"
        )
    given = {key: _value(key, param) for key, param in parameters.items()}
    merged = _from_config(name, given.pop("config")) if "config" in given else {}
    merged.update(given)
    message = pb.LoadModelRequest(name=name)
    for key, value in merged.items():
        if key in _BATCHING:
            _set_int(message.batching, key, value)
        else:
            _set(message, _FIELDS[key], value)
    return messages.load_request(message)  # the one conversion LoadModel uses too


def _set(message: pb.LoadModelRequest, field: FieldDescriptor, value: Any) -> None:
    """Sets one LoadModelRequest field from a parameter's value, by the field's type."""
    key = field.name
    if key == "architecture_args":
        message.architecture_args.update(_args(value))
    elif key in ("dtype", "autocast"):
        setattr(message, key, _dtype(_text(value, key), key))
    elif field.enum_type is not None:  # residency: a value's name, e.g. "pinned"
        try:
            setattr(message, key, enum_value(field, _text(value, key)))
        except ValueError as error:
            raise InvalidArgument(f"parameter {error}") from None
    elif field.message_type is not None:  # preprocessing: a JSON object
        found = _object(load_json(value, f"'{key}'") if isinstance(value, str) else value, key)
        try:
            json_format.ParseDict(found, getattr(message, key))
        except json_format.ParseError as error:
            raise InvalidArgument(f"parameter {key!r}: {error!s:.200}") from None
    elif field.is_repeated:  # labels, warmup_shape: JSON lists
        items = load_json(value, f"'{key}'") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise InvalidArgument(f"parameter {key!r} must be a JSON list, got {value!r:.80}")
        item = _text if field.type == FieldDescriptor.TYPE_STRING else _int
        getattr(message, key).extend(item(v, key) for v in items)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        setattr(message, key, _bool(value, key))
    elif field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
        _set_int(message, key, value)
    else:
        setattr(message, key, _text(value, key))


def _value(key: str, param: oip.ModelRepositoryParameter) -> Any:
    if key.startswith("file:"):
        raise InvalidArgument(
            f"parameter {key!r:.80}: files cannot be loaded directly; upload the checkpoint "
            "with modelhost.v1.ModelHost.SaveCheckpoint and name it in 'checkpoint'"
        )
    if key not in (*KEYS, "config"):
        raise InvalidArgument(f"unknown parameter {key!r:.80} (known: config, {', '.join(KEYS)})")
    choice = param.WhichOneof("parameter_choice")
    if choice == "string_param":
        return param.string_param
    if choice in ("int64_param", "bool_param") and key != "config":
        return getattr(param, choice)
    raise InvalidArgument(f"parameter {key!r} must be a string_param")


def _from_config(name: str, text: str) -> dict[str, Any]:
    """The load settings in a Triton model configuration (JSON)."""
    config = _object(load_json(text, "parameter 'config'"), "parameter 'config'")
    if config.get("name", name) != name:
        raise InvalidArgument(f"config names model {config['name']!r:.80}, not {name!r}")
    settings: dict[str, Any] = {}
    for key, value in _object(config.get("parameters"), "config 'parameters'").items():
        if key not in KEYS:
            raise InvalidArgument(
                f"unknown config parameter {key!r:.80} (known: {', '.join(KEYS)})"
            )
        is_triton_style = isinstance(value, dict) and "string_value" in value
        settings[key] = value["string_value"] if is_triton_style else value
    if config.get("max_batch_size") is not None:
        settings["max_batch_size"] = config["max_batch_size"]
    batching = _object(config.get("dynamic_batching"), "config 'dynamic_batching'")
    if batching.get("max_queue_delay_microseconds") is not None:
        settings["max_queue_delay_us"] = batching["max_queue_delay_microseconds"]
    preferred = batching.get("preferred_batch_size")
    if preferred is not None and not isinstance(preferred, list):
        raise InvalidArgument(
            "config 'dynamic_batching.preferred_batch_size' must be a list of integers, "
            f"got {preferred!r:.80}"
        )
    if preferred:
        settings["preferred_batch_size"] = min(
            _int(size, "preferred_batch_size") for size in preferred
        )
    return settings


def _object(value: Any, what: str) -> dict[str, Any]:
    """A JSON object of a config (null or absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {value!r:.80}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"parameter {key!r} must be a string, got {value!r:.80}")
    return value


def _set_int(message: Any, key: str, value: Any) -> None:
    """Sets an integer field, refusing a value outside its type's range (an int32's)."""
    number = _int(value, key)
    try:
        setattr(message, key, number)
    except ValueError:
        raise InvalidArgument(f"parameter {key!r} is out of range, got {number}") from None


def _int(value: Any, key: str) -> int:
    """An int64: a JSON integer, or a decimal string (how protobuf's JSON writes int64)."""
    number = int(value) if isinstance(value, str) and _DECIMAL.fullmatch(value) else value
    if isinstance(number, bool) or not isinstance(number, int) or number not in _INT64:
        raise InvalidArgument(f"parameter {key!r} must be an integer (int64), got {value!r:.80}")
    return number


def _args(value: Any) -> dict[str, str]:
    """Builder arguments as JSON literals, from a JSON object (or its text)."""
    if isinstance(value, str):
        value = load_json(value, "'architecture_args'")
    if not isinstance(value, dict):
        raise InvalidArgument(f"'architecture_args' must be a JSON object, got {value!r:.80}")
    return {key: json.dumps(item) for key, item in value.items()}


def _dtype(value: str, key: str) -> codec.DataType:
    try:
        return codec.parse_dtype(value) if value else pb.DATA_TYPE_UNSPECIFIED
    except (TypeError, ValueError) as error:  # TypeError: not a string (a JSON number)
        raise InvalidArgument(f"parameter {key!r}: {error}") from None


def _bool(value: Any, key: str) -> bool:
    """A JSON boolean, or "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidArgument(f"parameter {key!r} must be true or false, got {value!r:.80}")
