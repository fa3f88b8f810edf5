"""The client's one exception family: every failed call raises a `ModelHostError`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc


class ModelHostError(Exception):
    """A call to the server failed.

    `code` is the `grpc.StatusCode` the server (or the channel) reported and
    `message` its explanation. Subclasses exist per status for `except` clauses.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class NotFoundError(ModelHostError):
    """No such model, version or checkpoint."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgumentError(ModelHostError):
    """The request or the uploaded file is malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExistsError(ModelHostError):
    """The checkpoint name or model version is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ModelHostError):
    """Out of device memory, a full queue, or a size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ModelHostError):
    """The server's configuration refuses the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceededError(ModelHostError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(ModelHostError):
    """The server cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(ModelHostError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ModelHostError):
    """The credentials do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DataLossError(ModelHostError):
    """Bytes arrived corrupted (a checksum did not match)."""

    code = grpc.StatusCode.DATA_LOSS


class InternalError(ModelHostError):
    """The server hit a bug; its log has the traceback."""

    code = grpc.StatusCode.INTERNAL


class ProtocolError(InternalError):
    """The server's reply is malformed (a field out of range or inconsistent with
    another): found by the client, which trusts nothing it receives."""


_BY_CODE: dict[grpc.StatusCode, type[ModelHostError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        InvalidArgumentError,
        AlreadyExistsError,
        ResourceExhaustedError,
        FailedPreconditionError,
        DeadlineExceededError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        DataLossError,
        InternalError,
    )
}


def error_for(code: grpc.StatusCode, message: str) -> ModelHostError:
    """The most specific `ModelHostError` for a status code."""
    return _BY_CODE.get(code, ModelHostError)(message, code)


def from_rpc_error(error: grpc.RpcError) -> ModelHostError:
    """Converts a failed call (sync or aio) into a `ModelHostError`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code, details or code.name)


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """Re-raises what decoding a malformed reply raises (`ValueError`, `LookupError`,
    `ArithmeticError`, `RecursionError`) as a `ProtocolError` naming `what`; a context
    manager, or a decorator of the function that decodes it."""
    try:
        yield
    except (ValueError, LookupError, ArithmeticError, RecursionError) as error:
        raise ProtocolError(f"malformed {what} in the server's reply: {error}") from error


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raises any `grpc.RpcError` inside the block as a `ModelHostError`."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
