"""RepositoryModelLoad parameters to a `LoadRequest`.

The convention (also documented on RepositoryModelLoadRequest in grpc_service.proto):
string parameters "architecture", "checkpoint", "architecture_args" (a JSON
object), "device", "dtype", and "version" (int64 or decimal string); or "config",
a Triton model configuration as JSON, whose "parameters" entries carry the same
keys and whose "max_batch_size", "dynamic_batching.max_queue_delay_microseconds"
and "dynamic_batching.preferred_batch_size" (its smallest entry) set batching.
Direct parameters win over "config". Loading a name that is already hosted adds a
version, as LoadModel does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelhost.client import codec
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server.errors import InvalidArgument
from modelhost.server.loading import LoadRequest
from modelhost.v1 import modelhost_pb2 as pb

KEYS = ("architecture", "checkpoint", "architecture_args", "device", "dtype", "version")


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
    return LoadRequest(
        name=name,
        architecture=_text(merged, "architecture"),
        architecture_args=_args(merged.get("architecture_args", {})),
        checkpoint=_text(merged, "checkpoint"),
        version=_int(merged.get("version", 0), "version"),
        device=_text(merged, "device"),
        dtype=_dtype(_text(merged, "dtype")),
        max_batch_size=_int(merged.get("max_batch_size", 0), "max_batch_size"),
        max_queue_delay_us=_int(merged.get("max_queue_delay_us", 0), "max_queue_delay_us"),
        preferred_batch_size=_int(merged.get("preferred_batch_size", 0), "preferred_batch_size"),
    )


def _value(key: str, param: oip.ModelRepositoryParameter) -> Any:
    if key.startswith("file:"):
        raise InvalidArgument(
            f"parameter {key!r}: files cannot be loaded directly; upload the checkpoint "
            "with modelhost.v1.ModelHost.SaveCheckpoint and name it in 'checkpoint'"
        )
    if key not in (*KEYS, "config"):
        raise InvalidArgument(f"unknown parameter {key!r} (known: config, {', '.join(KEYS)})")
    choice = param.WhichOneof("parameter_choice")
    if choice == "string_param":
        return param.string_param
    if choice == "int64_param" and key == "version":
        return param.int64_param
    raise InvalidArgument(f"parameter {key!r} must be a string_param")


def _from_config(name: str, text: str) -> dict[str, Any]:
    """The load settings in a Triton model configuration (JSON)."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"parameter 'config' is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("parameter 'config' must be a JSON object")
    if config.get("name", name) != name:
        raise InvalidArgument(f"config names model {config['name']!r}, not {name!r}")
    settings: dict[str, Any] = {}
    parameters = config.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument("config 'parameters' must be an object")
    for key, value in parameters.items():
        if key not in KEYS:
            raise InvalidArgument(f"unknown config parameter {key!r} (known: {', '.join(KEYS)})")
        is_triton_style = isinstance(value, dict) and "string_value" in value
        settings[key] = value["string_value"] if is_triton_style else value
    if "max_batch_size" in config:
        settings["max_batch_size"] = config["max_batch_size"]
    batching = config.get("dynamic_batching", {})
    if isinstance(batching, dict) and "max_queue_delay_microseconds" in batching:
        settings["max_queue_delay_us"] = batching["max_queue_delay_microseconds"]
    if isinstance(batching, dict) and batching.get("preferred_batch_size"):
        settings["preferred_batch_size"] = min(batching["preferred_batch_size"])
    return settings


def _text(settings: Mapping[str, Any], key: str) -> str:
    value = settings.get(key, "")
    if not isinstance(value, str):
        raise InvalidArgument(f"parameter {key!r} must be a string, got {value!r}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"parameter {key!r} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"parameter {key!r} must be an integer, got {value!r}") from None


def _args(value: Any) -> dict[str, str]:
    """Builder arguments as JSON literals, from a JSON object (or its text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"'architecture_args' is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("'architecture_args' must be a JSON object")
    return {key: json.dumps(item) for key, item in value.items()}


def _dtype(value: str) -> codec.DataType:
    try:
        return codec.parse_dtype(value) if value else pb.DATA_TYPE_UNSPECIFIED
    except ValueError as error:
        raise InvalidArgument(f"parameter 'dtype': {error}") from None
