"""The status table: every domain error maps to the status README documents for it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor

from modelhost.server import errors, rpc

Code = grpc.StatusCode

# README's "Status codes" table, as the contract callers program against.
DOCUMENTED = {
    "InvalidArgument": Code.INVALID_ARGUMENT,
    "InvalidName": Code.INVALID_ARGUMENT,
    "InvalidInput": Code.INVALID_ARGUMENT,
    "InvalidCheckpoint": Code.INVALID_ARGUMENT,
    "UnknownArchitecture": Code.INVALID_ARGUMENT,
    "NotFound": Code.NOT_FOUND,
    "ModelNotFound": Code.NOT_FOUND,
    "CheckpointNotFound": Code.NOT_FOUND,
    "AlreadyExists": Code.ALREADY_EXISTS,
    "OutOfMemory": Code.RESOURCE_EXHAUSTED,
    "LimitExceeded": Code.RESOURCE_EXHAUSTED,
    "StoreFull": Code.RESOURCE_EXHAUSTED,
    "Refused": Code.FAILED_PRECONDITION,
    "DataLoss": Code.DATA_LOSS,
    "ChecksumMismatch": Code.DATA_LOSS,
    "MissingBytes": Code.DATA_LOSS,
    "DeadlineExpired": Code.DEADLINE_EXCEEDED,
    "ShuttingDown": Code.UNAVAILABLE,
    "VersionUnloaded": Code.UNAVAILABLE,
    "StoreBusy": Code.UNAVAILABLE,
    "DeviceFailed": Code.INTERNAL,
}


def _domain_errors() -> dict[str, type[errors.ModelHostFailure]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ModelHostFailure) and cls is not errors.ModelHostFailure
    }


def test_every_domain_error_has_its_documented_status() -> None:
    found = _domain_errors()
    assert set(found) == set(DOCUMENTED), "a domain error without a documented status"
    for name, cls in found.items():
        code, message = rpc.failure(cls("the reason"))
        assert code == DOCUMENTED[name], name
        assert message == "the reason"


def test_readme_documents_every_status_the_table_gives() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Status codes", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| ([A-Z_]+)", section, flags=re.MULTILINE))
    assert {code.name for code in DOCUMENTED.values()} <= rows


def test_anything_else_is_internal_with_a_request_id() -> None:
    code, message = rpc.failure(KeyError("boom"))
    assert code == Code.INTERNAL
    assert re.fullmatch(r"internal error \(request id [0-9a-f]{12}\)", message)


NAMES_NO_MODEL = {
    "SaveCheckpoint",  # checkpoints: their names are not models
    "DownloadCheckpoint",
    "ListCheckpoints",
    "GetCheckpoint",
    "DeleteCheckpoint",
    "ListModels",
    "ListArchitectures",
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "RepositoryIndex",
}


def test_every_method_says_which_field_names_its_model() -> None:
    """A call's metrics carry the model its request names, read from the field
    `rpc.MODEL_FIELDS` gives for its method (once guessed from the request's class name:
    a new `...ModelRequest` whose `name` was not a model would have been labelled by it).
    Every method of both services is in the table, with a field its request has, or
    deliberately names no model."""
    from modelhost.oip import grpc_service_pb2 as oip
    from modelhost.v1 import modelhost_pb2 as pb

    methods = {
        method.name: method.input_type
        for module in (pb, oip)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(rpc.MODEL_FIELDS) | NAMES_NO_MODEL == set(methods)
    assert not set(rpc.MODEL_FIELDS) & NAMES_NO_MODEL
    for method, field in rpc.MODEL_FIELDS.items():
        assert methods[method].fields_by_name[field].type == FieldDescriptor.TYPE_STRING, method
