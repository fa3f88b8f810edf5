"""The gate every call passes before its servicer sees it.

For each call, in this order:

1. Health checks and reflection pass straight through: they need no token and take
   no slot, so probes answer however busy the server is.
2. The bearer token is checked against the method's tier (`auth.Tokens`) from the
   call's headers alone: a refused caller's body is never read, let alone parsed.
3. The call takes one of `max_concurrent_rpcs` slots or is refused with
   RESOURCE_EXHAUSTED; the slot is freed when the call ends, however it ends.
4. Its request is read within `request_read_timeout` seconds (each message of a
   stream within that time of the previous one): a caller that goes quiet gets
   DEADLINE_EXCEEDED and gives its slot back. A request larger than `OFFLOAD_BYTES`
   is parsed on a thread, not on the event loop; one that does not parse is
   INVALID_ARGUMENT, or the status of the domain error its parser raised.

The gate serves every method as a client-streaming one, so it decides when (and
whether) a request is read; the wire format of unary calls is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from modelhost.server import errors as e
from modelhost.server import rpc
from modelhost.server.auth import OPEN_PREFIXES, Tokens, bearer

OFFLOAD_BYTES = 1 << 20
"""Requests larger than this are parsed on a thread."""


Parse = Callable[[bytes], Any]


class Gate(grpc.aio.ServerInterceptor):
    """Authentication, concurrency slots and bounded request reading, for every call."""

    def __init__(self, tokens: Tokens, *, max_concurrent: int, read_timeout: float) -> None:
        self.tokens = tokens
        self.max_concurrent = max_concurrent
        self.read_timeout = read_timeout
        self.active = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        verdict = self.tokens.verdict(method, bearer(details.invocation_metadata))
        if verdict is not None:
            return _refusal(handler, *verdict)
        return self._guarded(handler, method.rsplit("/", 1)[-1])

    @contextlib.asynccontextmanager
    async def _slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.max_concurrent and self.active >= self.max_concurrent:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is serving {self.active} calls, its limit (max_concurrent_rpcs); "
                "retry later",
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def _read(
        self,
        messages: AsyncIterator[bytes],
        parse: Parse | None,
        what: str,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """The next message (StopAsyncIteration at the end), parsed; aborts the call when
        it does not arrive in time or does not parse."""
        try:
            async with asyncio.timeout(self.read_timeout):
                data = await anext(messages)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {what} message arrived within {self.read_timeout:g}s (request_read_timeout)",
            )
        if parse is None:
            return data
        try:
            if len(data) > OFFLOAD_BYTES:
                return await asyncio.to_thread(parse, data)
            return parse(data)
        except e.ModelHostFailure as error:
            await context.abort(*rpc.failure(error))
        except Exception as error:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {what} message ({type(error).__name__}: "
                f"{error!s:.200})",
            )

    async def _stream(
        self,
        messages: AsyncIterator[bytes],
        parse: Parse | None,
        what: str,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        while True:
            try:
                message = await self._read(messages, parse, what, context)
            except StopAsyncIteration:
                return
            yield message

    def _guarded(self, handler: grpc.RpcMethodHandler, what: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        gate = self

        async def first(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await gate._read(aiter(messages), parse, what, context)
            except StopAsyncIteration:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the call ended before its {what} message"
                )

        if handler.request_streaming and handler.response_streaming:

            async def stream_stream(
                messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> Any:
                async with gate._slot(context):
                    requests = gate._stream(aiter(messages), parse, what, context)
                    async for reply in handler.stream_stream(requests, context):
                        yield reply

            return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)

        if handler.request_streaming:

            async def stream_unary(
                messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> Any:
                async with gate._slot(context):
                    requests = gate._stream(aiter(messages), parse, what, context)
                    return await handler.stream_unary(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

        if handler.response_streaming:

            async def unary_stream(
                messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> Any:
                async with gate._slot(context):
                    request = await first(messages, context)
                    async for reply in handler.unary_stream(request, context):
                        yield reply

            return grpc.stream_stream_rpc_method_handler(unary_stream, None, serialize)

        async def unary_unary(
            messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> Any:
            async with gate._slot(context):
                request = await first(messages, context)
                return await handler.unary_unary(request, context)

        return grpc.stream_unary_rpc_method_handler(unary_unary, None, serialize)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    """A handler that ends the call with `code` at once, without reading its request."""
    serialize = handler.response_serializer

    async def refuse(messages: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_stream(messages: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, None, serialize)
    return grpc.stream_unary_rpc_method_handler(refuse, None, serialize)
