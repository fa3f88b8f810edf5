"""The gate every call passes before its servicer sees it.

For each call, in this order:

1. Health checks and reflection ("open" methods) need no token and take no slot, so
   probes answer however busy the server is. Unless probes have a port of their own
   (`health_port`): then they need an inference token here and are served like every
   other method. Open methods are still read as in step 4, from budgets of their own
   (`OPEN_RECEIVING` messages for health, as many for reflection; an open method's
   request counts until it is parsed): a caller without a token can make the server
   hold no more than that, and cannot take the budget of the calls that need one.
2. The bearer token is checked against the method's tier (`auth.LiveTokens`) from the
   call's headers alone: a refused caller's body is never read, let alone parsed.
3. The call takes one of `max_concurrent_rpcs` slots or is refused with
   RESOURCE_EXHAUSTED; the slot is freed when the call ends, however it ends.
4. Its request is read within `request_read_timeout` seconds (each message of a
   stream within that time of the previous one): a caller that goes quiet gets
   DEADLINE_EXCEEDED and gives its slot back. Requests count against a byte budget
   (`ByteBudget`, `--max-receiving-bytes`): a message being received counts as the
   largest it may be (gRPC holds what has arrived), one received as its size until its
   call is done with it (a unary request until the call ends, a streamed one's message
   until the next is read, or, kept by its handler, until the handler is done with it:
   `RequestStream.keep_last`, an upload's chunks until they are written). A message
   that does not fit waits its turn, with HTTP/2's small window (its bytes wait at the
   caller), and gets RESOURCE_EXHAUSTED if no room comes within `request_read_timeout`.
   A request larger than `OFFLOAD_BYTES` is parsed on a thread, not on the event loop;
   one that does not parse is INVALID_ARGUMENT, or the status of the domain error its
   parser raised.
5. Each message of a streamed reply is sent within `request_read_timeout` seconds
   (gRPC's flow control holds a write while the caller reads nothing): a caller that
   stops reading has its reply stream closed and its slot freed, then gets
   DEADLINE_EXCEEDED when it reads on.

The gate serves every method as a client-streaming one, so it decides when (and
whether) a request is read; the wire format of unary calls is the same.

When a call ends, nothing of it may stay in a reference cycle: the cycle collector
seldom runs a full collection in a process holding torch (it waits for a quarter as
many new long-lived objects as it holds already), so every call left in a cycle kept
its request's memory (see `_serving`, `_forgetting_aborts`, and `rpc` for errors).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import grpc
import grpc.aio

from modelhost.server import errors as e
from modelhost.server import rpc
from modelhost.server.auth import LiveTokens, bearer

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 1 << 20
"""Requests larger than this are parsed on a thread."""
OPEN_RECEIVING = 2
"""Messages of health calls received at once where they share the main port (no token),
and as many of reflection calls: each may hold up to --max-message-bytes while it
arrives."""


Parse = Callable[[bytes], Any]


class ByteBudget:
    """Bytes of requests the gate holds, shared by the calls it serves. `take` waits, first
    come first served, until its bytes fit; `give` returns them."""

    def __init__(self, total: int, setting: str) -> None:
        self.total = total
        self.setting = setting  # what sets `total`, for the refusal's message
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, nbytes: int) -> None:
        if not self._waiting and self.held + nbytes <= self.total:
            self.held += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((nbytes, granted))
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give(nbytes)  # granted as its waiter left
            else:
                self._grant()  # it may have held up the waiters behind it
            raise

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
        self._grant()

    def _grant(self) -> None:
        waiting = self._waiting
        while waiting:
            nbytes, granted = waiting[0]
            if granted.done():  # its waiter left
                waiting.popleft()
            elif self.held + nbytes <= self.total:
                waiting.popleft()
                self.held += nbytes
                granted.set_result(None)
            else:
                return


class _Receipt:
    """What one call's request holds of a budget, until the call is done with it (or,
    not `kept`, until it is parsed)."""

    def __init__(self, budget: ByteBudget, *, kept: bool = True) -> None:
        self.budget = budget
        self.kept = kept
        self.nbytes = 0

    def release(self) -> None:
        if self.nbytes:
            self.budget.give(self.nbytes)
            self.nbytes = 0


class RequestStream:
    """A call's request messages, parsed as they arrive (`read`). Each holds its size of
    the receiving budget until the next is read, unless its handler keeps it (`keep_last`)."""

    def __init__(self, read: Callable[[], Awaitable[Any]], receipt: _Receipt) -> None:
        self._read = read
        self._receipt = receipt

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        return await self._read()

    def keep_last(self) -> Callable[[], None]:
        """The message read last stays counted after the next is read, until the handler
        calls the function returned (once)."""
        receipt = self._receipt
        if not receipt.kept or not receipt.nbytes:
            return _nothing
        nbytes, receipt.nbytes = receipt.nbytes, 0
        return functools.partial(receipt.budget.give, nbytes)


class Gate(grpc.aio.ServerInterceptor):
    """Authentication, concurrency slots and bounded request reading, for every call."""

    def __init__(
        self,
        tokens: LiveTokens | None,
        *,
        max_concurrent: int,
        read_timeout: float,
        message_bytes: int,
        receiving: ByteBudget,
        open_receiving: ByteBudget,
        reflection_receiving: ByteBudget,
    ) -> None:
        self.tokens = tokens  # None: every method is open (the probe port)
        self.max_concurrent = max_concurrent
        self.read_timeout = read_timeout
        self.message_bytes = message_bytes  # the largest message gRPC receives
        self.receiving = receiving
        # Open methods: health, and reflection apart (its streams wait for their next
        # request with a read posted: idle ones must not keep health checks waiting).
        self.open_receiving = open_receiving
        self.reflection_receiving = reflection_receiving
        self.active = 0
        # method -> its handler as served; handlers never change.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._refused = _RefusalLog().refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        served = self._handlers.get(method)
        if served is None:
            handler = await continuation(details)
            if handler is None:
                return None
            # Open methods need no token and take no slot; with a probe port they are not
            # open here (`Tokens.open_prefixes`).
            is_open = self.tokens is None or method.startswith(self.tokens.open_prefixes)
            budget = self.receiving
            if is_open:
                reflection = method.startswith("/grpc.reflection.")
                budget = self.reflection_receiving if reflection else self.open_receiving
            served = self._guarded(
                handler, method.rsplit("/", 1)[-1], is_open=is_open, budget=budget
            )
            self._handlers[method] = served
        if self.tokens is not None and self.tokens.enabled:  # open methods pass
            verdict = await self.tokens.judge(method, bearer(details.invocation_metadata))
            if verdict is not None:
                return _refusal(served, *verdict, logged=functools.partial(self._refused, method))
        return served

    async def _take_slot(self, context: grpc.aio.ServicerContext) -> None:
        """Takes a slot (give it back with `self.active -= 1`), or ends the call."""
        if self.max_concurrent and self.active >= self.max_concurrent:
            await rpc.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is serving {self.active} calls, its limit "
                "(--max-concurrent-rpcs); "
                "retry later",
            )
        self.active += 1

    @contextlib.asynccontextmanager
    async def _serving(
        self,
        messages: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        is_open: bool,
        budget: ByteBudget,
    ) -> AsyncIterator[tuple[AsyncIterator[bytes], _Receipt]]:
        """A slot for the call (or the call ends; open methods take none), its request
        messages and what they hold of `budget`, until the call ends (an open method's
        request: until it is parsed, for a health Watch or a reflection stream lasts as
        long as its caller wants). gRPC's request iterator is then closed: it holds the
        message it yielded last in a reference cycle (with the object that made it),
        which the cycle collector would free only in one of its rare full collections."""
        if not is_open:
            await self._take_slot(context)
        requests = cast(AsyncGenerator[bytes, None], aiter(messages))  # as gRPC makes it
        receipt = _Receipt(budget, kept=not is_open)
        try:
            yield requests, receipt
        finally:
            receipt.release()
            if not is_open:
                self.active -= 1
            await requests.aclose()

    async def _send(
        self, stream: AsyncGenerator[Any, None], context: grpc.aio.ServicerContext
    ) -> bool:
        """Sends a reply stream, then closes it (and its files); False when a message could
        not be sent within `read_timeout`: gRPC's flow control holds a write while the
        caller reads nothing, and a caller that never reads would hold it forever."""
        async with contextlib.aclosing(stream):
            async for message in stream:
                try:
                    async with asyncio.timeout(self.read_timeout):
                        await context.write(message)
                except TimeoutError:
                    context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)  # for the metrics
                    return False
        return True

    async def _end_stalled(self, context: grpc.aio.ServicerContext) -> None:
        """Ends a call whose caller stopped reading its reply. The status waits behind the
        message gRPC still holds, until the caller reads on or goes away."""
        await rpc.abort(  # quietly cancelled if the caller went away first
            context,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the caller did not take the next reply message within {self.read_timeout:g}s "
            "(request_read_timeout)",
        )

    async def _receive(
        self,
        messages: AsyncIterator[bytes],
        what: str,
        context: grpc.aio.ServicerContext,
        receipt: _Receipt,
    ) -> bytes:
        """The next message (StopAsyncIteration at the end), once the budget has room for
        the largest it may be (RESOURCE_EXHAUSTED if none comes within `read_timeout`:
        while gRPC receives it, it may hold that much); it holds its own size from then on
        (`receipt`). DEADLINE_EXCEEDED if it does not arrive within `read_timeout`."""
        receipt.release()  # a stream's previous message: its call is done with it
        budget = receipt.budget
        most = min(self.message_bytes, budget.total)  # at least one message fits
        try:
            async with asyncio.timeout(self.read_timeout):
                await budget.take(most)
        except TimeoutError:
            await rpc.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {budget.held:,} bytes of requests, its limit "
                f"({budget.setting}), and no room came within {self.read_timeout:g}s; "
                "retry later",
            )
        data = b""
        try:
            async with asyncio.timeout(self.read_timeout):
                data = await anext(messages)
        except TimeoutError:
            await rpc.abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {what} message arrived within {self.read_timeout:g}s (request_read_timeout)",
            )
        finally:
            receipt.nbytes = min(len(data), most)
            budget.give(most - receipt.nbytes)
        return data

    async def _read(
        self,
        messages: AsyncIterator[bytes],
        parse: Parse | None,
        what: str,
        context: grpc.aio.ServicerContext,
        receipt: _Receipt,
    ) -> Any:
        """The next message (StopAsyncIteration at the end), parsed; aborts the call when
        it does not arrive in time or does not parse."""
        data = await self._receive(messages, what, context, receipt)
        if not receipt.kept:
            receipt.release()
        if parse is None:
            return data
        try:
            if len(data) > OFFLOAD_BYTES:
                return await asyncio.to_thread(parse, data)
            return parse(data)
        except e.ModelHostFailure as error:
            await rpc.abort(context, *rpc.failure(error))
        except Exception as error:
            await rpc.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {what} message ({type(error).__name__}: "
                f"{error!s:.200})",
            )

    def _request_stream(
        self,
        messages: AsyncIterator[bytes],
        parse: Parse | None,
        what: str,
        context: grpc.aio.ServicerContext,
        receipt: _Receipt,
    ) -> RequestStream:
        read = functools.partial(self._read, messages, parse, what, context, receipt)
        return RequestStream(read, receipt)

    def _guarded(
        self, handler: grpc.RpcMethodHandler, what: str, *, is_open: bool, budget: ByteBudget
    ) -> grpc.RpcMethodHandler:
        """`handler` served as a client-streaming method behind a slot (open methods take
        none) and the reader."""
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        gate = self

        async def first(
            messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext, receipt: _Receipt
        ) -> Any:
            try:
                return await gate._read(messages, parse, what, context, receipt)
            except StopAsyncIteration:
                await rpc.abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the call ended before its {what} message",
                )

        if handler.response_streaming:

            async def replies(
                messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> None:
                with _forgetting_aborts():
                    async with gate._serving(messages, context, is_open, budget) as (
                        requests,
                        receipt,
                    ):
                        if handler.request_streaming:
                            stream = handler.stream_stream(
                                gate._request_stream(requests, parse, what, context, receipt),
                                context,
                            )
                        else:
                            request = await first(requests, context, receipt)
                            stream = handler.unary_stream(request, context)
                        if inspect.iscoroutine(stream):  # writes its replies (health Watch)
                            await stream
                            sent = True
                        else:
                            sent = await gate._send(stream, context)
                    if not sent:  # once its slot and its stream are let go of
                        await gate._end_stalled(context)

            return grpc.stream_stream_rpc_method_handler(replies, None, serialize)

        async def reply(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            with _forgetting_aborts():
                async with gate._serving(messages, context, is_open, budget) as (requests, receipt):
                    if handler.request_streaming:
                        stream = gate._request_stream(requests, parse, what, context, receipt)
                        return await handler.stream_unary(stream, context)
                    request = await first(requests, context, receipt)
                    return await handler.unary_unary(request, context)

        return grpc.stream_unary_rpc_method_handler(reply, None, serialize)


def _nothing() -> None:
    pass


@contextlib.contextmanager
def _forgetting_aborts() -> Iterator[None]:
    """Lets an abort end the call (gRPC raises it again) without the frames it came
    through: gRPC keeps it with the call's state, which the frames' context holds (a
    cycle that would keep each failed call's request and what was made of it)."""
    try:
        yield
    except grpc.aio.AbortError as aborted:
        aborted.__traceback__ = aborted.__context__ = aborted.__cause__ = None


REFUSALS_LOGGED_EVERY = 10.0
"""Seconds between log lines about calls refused for their token (a client retrying
with a bad token must not flood the log): each line counts the refusals since the last."""


class _RefusalLog:
    """Logs calls refused for their token: the first at once, then at most one line every
    REFUSALS_LOGGED_EVERY seconds, with the count of those in between."""

    def __init__(self) -> None:
        self._next = 0.0
        self._unlogged = 0

    def refused(self, method: str, peer: str, code: grpc.StatusCode) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now < self._next:
            return
        log.warning(
            "refused %d call(s) for their token; the last: %s from %s (%s)",
            self._unlogged,
            method,
            peer,
            code.name,
        )
        self._unlogged, self._next = 0, now + REFUSALS_LOGGED_EVERY


def _refusal(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    *,
    logged: Callable[[str, grpc.StatusCode], None],
) -> Any:
    """A handler that ends the call with `code` at once, without reading its request
    (`logged` with the caller's address)."""
    serialize = handler.response_serializer

    async def refuse(messages: Any, context: grpc.aio.ServicerContext) -> None:
        logged(context.peer(), code)
        with _forgetting_aborts():
            await rpc.abort(context, code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, None, serialize)
    return grpc.stream_unary_rpc_method_handler(refuse, None, serialize)
