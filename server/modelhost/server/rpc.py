"""The one table from domain errors to gRPC status codes, and what a failed call answers.

Anything not in `STATUS` is a bug: it is logged with its traceback and a request id,
and the caller gets INTERNAL with that id.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from modelhost.server import errors as e

log = logging.getLogger(__name__)

STATUS: dict[type[e.ModelHostFailure], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.Refused: grpc.StatusCode.FAILED_PRECONDITION,
    e.DataLoss: grpc.StatusCode.DATA_LOSS,
    e.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: e.ModelHostFailure) -> grpc.StatusCode:
    """The status for a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


MAX_MESSAGE_CHARS = 2000
"""Longer messages are cut: they travel in a header, and gRPC refuses big ones."""


def message_of(error: e.ModelHostFailure) -> str:
    """The error's message, cut to MAX_MESSAGE_CHARS (a message may echo client input)."""
    text = str(error)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def failure(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call ends with; bugs are logged with a request id."""
    if isinstance(error, e.ModelHostFailure):
        return status_of(error), message_of(error)
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error [request %s]", request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
