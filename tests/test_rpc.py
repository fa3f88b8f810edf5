"""The status table: every domain error maps to the status README documents for it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import grpc

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
