"""The RPC plumbing both servicers share: the one table from domain errors to gRPC
status codes, the decorators that map a method's errors and record its metrics, and the
registration of a servicer's generated handlers with every request counted before it is
parsed (`generated_handlers`, `register`).

Anything not in `STATUS` is a bug: it is logged with its traceback and a request id,
and the caller gets INTERNAL with that id.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from modelhost.server import errors as e
from modelhost.server.request_limits import fields_limited

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
    e.StoreBusy: grpc.StatusCode.UNAVAILABLE,
    e.DeviceFailed: grpc.StatusCode.INTERNAL,
}


def status_of(error: e.ModelHostFailure) -> grpc.StatusCode:
    """The status for a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


MAX_ERROR_MESSAGE_BYTES = 1024
"""Longer messages (in UTF-8) are cut: they travel in a header, percent-encoded (up to
three bytes per byte), and gRPC refuses big headers (by default from 8 KiB)."""


def message_of(error: e.ModelHostFailure) -> str:
    """The error's message, cut to MAX_ERROR_MESSAGE_BYTES on a character boundary (it
    may echo client input)."""
    data = str(error).encode(errors="replace")
    if len(data) <= MAX_ERROR_MESSAGE_BYTES:
        return data.decode()
    return data[: MAX_ERROR_MESSAGE_BYTES - len("…".encode())].decode(errors="ignore") + "…"


def failure(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call ends with; bugs are logged with a request id."""
    if isinstance(error, e.ModelHostFailure):
        return status_of(error), message_of(error)
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error [request %s]", request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"


class Front(Protocol):
    """What the decorators need of a servicer's `host`."""

    @property
    def metrics(self) -> Any: ...

    def is_hosted(self, name: str) -> bool: ...


MODEL_FIELDS: dict[str, str] = {
    "LoadModel": "name",
    "UnloadModel": "name",
    "GetModel": "name",
    "Predict": "model",
    "ModelReady": "name",
    "ModelMetadata": "name",
    "ModelConfig": "name",
    "ModelInfer": "model_name",
    "ModelStatistics": "name",
    "RepositoryModelLoad": "model_name",
    "RepositoryModelUnload": "model_name",
}
"""The request field that names a model, by method (of both services), for the `model`
label of a call's metrics; methods not here name none (tests/test_rpc.py checks every
method of both services is here or deliberately not)."""


class _Call:
    """Times one RPC, and records its outcome in the metrics and the debug log."""

    def __init__(self, servicer: Any, method: str, request: Any) -> None:
        self.host: Front = servicer.host
        self.method = method
        self.request = request
        self.started = time.perf_counter()

    def model(self) -> str:
        """The hosted model the request names, or "" (the metric label)."""
        field = MODEL_FIELDS.get(self.method)
        name = getattr(self.request, field, "") if field else ""
        # Only hosted names become label values: callers cannot grow the label set.
        return name if isinstance(name, str) and self.host.is_hosted(name) else ""

    async def fail(self, error: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Records a failed call and ends it with the error's status (raises for Exceptions;
        cancellations and aborts are only recorded)."""
        if isinstance(error, asyncio.CancelledError):  # the caller left, or its deadline passed
            passed = context.time_remaining() == 0
            self.done(grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED)
        elif isinstance(error, GeneratorExit):  # a reply stream closed before its end
            self.done(context.code() or grpc.StatusCode.CANCELLED)
        elif isinstance(error, grpc.aio.AbortError):
            self.done(context.code() or grpc.StatusCode.UNKNOWN)
        elif isinstance(error, Exception):
            code, message = failure(error)
            self.done(code)
            _drop_tracebacks(error)
            await abort(context, code, message)

    def done(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self.started
        model = self.model()
        metrics = self.host.metrics
        metrics.requests.labels(self.method, model, code.name).inc()
        metrics.latency.labels(self.method, model).observe(elapsed)
        log.debug(
            "rpc=%s model=%s code=%s ms=%.2f", self.method, model or "-", code.name, elapsed * 1000
        )


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the call with `code` and `message` (`context.abort`). A call gRPC has ended
    meanwhile (its deadline passed as the answer was on its way) has nothing more to send:
    it ends as cancelled, quietly, where gRPC would log the failed send as an ERROR with
    its traceback (red team 13, F4)."""
    try:
        await context.abort(code, message)
    except (grpc.aio.AbortError, grpc.aio.UsageError):  # UsageError: a bug (aborted twice)
        raise
    except Exception:
        raise asyncio.CancelledError from None
    raise AssertionError("context.abort returned")  # pragma: no cover


def _drop_tracebacks(error: BaseException) -> None:
    """Drops the tracebacks of an error (and of those it chains) once its status is known.

    They hold every frame the error came through, and those frames' locals: the request
    and what was made of it. An error delivered through a future is held by that future,
    which those frames hold too, a reference cycle that only a full collection of the
    cycle collector frees (and a process holding torch seldom runs one).
    """
    chained: BaseException | None = error
    while chained is not None and chained.__traceback__ is not None:
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


def _still_wanted(context: grpc.aio.ServicerContext) -> None:
    """Raises CancelledError once the caller's deadline has passed: gRPC has ended the
    call, and sending the reply would fail. gRPC logs that failed send as an ERROR with
    its traceback when it has not yet seen the call end (red team 13, F4: a reply ready
    as the deadline passes); a cancellation it logs at DEBUG."""
    if context.time_remaining() == 0:  # None: no deadline
        raise asyncio.CancelledError


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def unary(method: Handler[R]) -> Handler[R]:
    """Maps the errors of a method that returns one reply; records it in the metrics."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        call = _Call(self, method.__name__, request)
        try:
            reply = await method(self, request, context)
            _still_wanted(context)
        except BaseException as error:
            await call.fail(error, context)
            raise
        call.done(grpc.StatusCode.OK)
        return reply

    return wrapper


def streaming(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]]:
    """Maps the errors of a method that streams its replies; records it in the metrics."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[R]:
        call = _Call(self, method.__name__, request)
        try:
            async for reply in method(self, request, context):
                _still_wanted(context)
                yield reply
        except BaseException as error:
            await call.fail(error, context)
            raise
        call.done(grpc.StatusCode.OK)

    return wrapper


class _Collect:
    """Stands in for a server to receive the handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def generated_handlers(
    add: Callable[[Any, Any], None], servicer: object
) -> dict[str, grpc.RpcMethodHandler]:
    """The handlers the generated `add_..._to_server` function `add` registers for
    `servicer`, by method name, each request's fields counted before it is parsed
    (`request_limits.fields_limited`): swap (de)serializers in, then `register` them."""
    collect = _Collect()
    add(servicer, collect)
    handlers = collect.handlers
    for name, handler in handlers.items():
        parse = handler.request_deserializer
        message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        if parse is not None and message is not None:  # the generated Message.FromString
            limited = fields_limited(parse, message)
            handlers[name] = handler._replace(request_deserializer=limited)
    return handlers


def register(
    server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    """Registers `handlers` as the generated code would (see `generated_handlers`)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
