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
        # method -> (its handler as served, whether it is open); handlers never change.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, bool]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        known = self._handlers.get(method)
        if known is None:
            handler = await continuation(details)
            if handler is None:
                return None
            is_open = method.startswith(OPEN_PREFIXES)
            served = handler if is_open else self._guarded(handler, method.rsplit("/", 1)[-1])
            known = self._handlers[method] = (served, is_open)
        served, is_open = known
        if not is_open and self.tokens.enabled:
            verdict = self.tokens.verdict(method, bearer(details.invocation_metadata))
            if verdict is not None:
                return _refusal(served, *verdict)
        return served

    async def _take_slot(self, context: grpc.aio.ServicerContext) -> None:
        """Takes a slot (give it back with `self.active -= 1`), or ends the call."""
        if self.max_concurrent and self.active >= self.max_concurrent:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is serving {self.active} calls, its limit (max_concurrent_rpcs); "
                "retry later",
            )
        self.active += 1

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
        """`handler` served as a client-streaming method behind a slot and the reader."""
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

        if handler.response_streaming:

            async def replies(
                messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> Any:
                await gate._take_slot(context)
                try:
                    if handler.request_streaming:
                        requests = gate._stream(aiter(messages), parse, what, context)
                        stream = handler.stream_stream(requests, context)
                    else:
                        stream = handler.unary_stream(await first(messages, context), context)
                    async for reply in stream:
                        yield reply
                finally:
                    gate.active -= 1

            return grpc.stream_stream_rpc_method_handler(replies, None, serialize)

        async def reply(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            await gate._take_slot(context)
            try:
                if handler.request_streaming:
                    requests = gate._stream(aiter(messages), parse, what, context)
                    return await handler.stream_unary(requests, context)
                return await handler.unary_unary(await first(messages, context), context)
            finally:
                gate.active -= 1

        return grpc.stream_unary_rpc_method_handler(reply, None, serialize)


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
