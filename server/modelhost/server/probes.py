"""Health and reflection, bounded: their streams (Watch, reflection) by number, in all and
per client address (`OpenStreams`), reflection requests by size; and the probe port's
gRPC options (`probe_options`: small requests, few streams per connection, few
connections, connections that end), for a port that needs no token.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from modelhost.server import rpc
from modelhost.server.settings import Settings

MAX_OPEN_STREAMS = 1000
"""Health Watch and reflection streams open at once, all callers together, on every port.
Where they need no token they take no slot (probes answer however busy the server is), and
each holds about 20 KB for as long as its caller keeps it open. Health Check is never
refused there."""
MAX_OPEN_STREAMS_PER_ADDRESS = 100
"""Of those, the most one client address may hold: one caller cannot take them all."""
PROBE_MESSAGE_BYTES = 64 << 10
"""Largest request the probe port (`health_port`) receives: gRPC buffers a whole message
before any check can run, so on a port that needs no token the limit is what bounds a
caller that sends most of a huge message and stops."""
MAX_REFLECTION_REQUEST_BYTES = 4096
"""Largest reflection request (a symbol or file name); a stream keeps its last one."""
PROBE_MAX_STREAMS = 4
"""Streams one connection to the probe port may have open at once (HTTP/2
SETTINGS_MAX_CONCURRENT_STREAMS). A probe (the kubelet's, `modelhost health`,
grpc_health_probe) opens a connection, makes one Check and closes it; 4 leaves room for a
Watch and a reflection listing beside it. gRPC buffers each stream's partial request (up to
PROBE_MESSAGE_BYTES) before any handler runs: this is what bounds one connection to about
4 x 64 KiB, where a caller used to open thousands of half-sent Checks on it. A gRPC client
waits for a free stream; a stream opened past the cap anyway is refused at once
(RST_STREAM REFUSED_STREAM; ENHANCE_YOUR_CALM before the client acknowledged the cap)."""
PROBE_MAX_CONNECTIONS = 64
"""Connections the probe port keeps at once; past that, a new one is closed as soon as it
is accepted. With PROBE_MAX_STREAMS this bounds what the port can be made to hold to
64 x 4 x 64 KiB = 16 MiB of requests (the server grew 24 MB with every place taken).
Probes use a few short connections; a caller that holds all 64 can make probes fail for as
long as it keeps them (renewed every PROBE_CONNECTION_AGE_S), which is what the
NetworkPolicy (deploy/kubernetes/networkpolicy.yaml) is for: only the node may reach the
port. gRPC has no bound per client address. Nor is there a `maximum_concurrent_rpcs`:
streams and connections already bound the calls to 256, and a lower limit would only
refuse the kubelet's Check sooner."""
PROBE_CONNECTION_AGE_S = 30.0
"""A probe-port connection gets GOAWAY after about this long (gRPC adds up to 10% either
way), then PROBE_CONNECTION_GRACE_S for its streams to end before it is closed: nothing
half-sent stays longer than about 38 s, and a caller that holds connections must keep
making new ones."""
PROBE_CONNECTION_GRACE_S = 5.0
"""See PROBE_CONNECTION_AGE_S."""
PROBE_CONNECTION_IDLE_S = 10.0
"""A probe-port connection with no stream open for this long is closed (GOAWAY)."""
PROBE_HANDSHAKE_S = 5.0
"""A probe-port connection must finish its handshake within this (gRPC's default: 120 s)."""


def probe_port_bytes() -> int:
    """What the probe port's calls may hold of requests at once: as many messages as its
    connections and streams allow (its gate bounds nothing more: it reads them within
    request_read_timeout and answers one that does not parse)."""
    return PROBE_MAX_CONNECTIONS * PROBE_MAX_STREAMS * PROBE_MESSAGE_BYTES


def probe_options() -> list[tuple[str, int]]:
    """The probe port's gRPC options (read when a server starts: tests shorten them)."""
    return [
        ("grpc.max_receive_message_length", PROBE_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", PROBE_MAX_STREAMS),
        ("grpc.max_allowed_incoming_connections", PROBE_MAX_CONNECTIONS),
        ("grpc.max_connection_age_ms", int(PROBE_CONNECTION_AGE_S * 1000)),
        ("grpc.max_connection_age_grace_ms", int(PROBE_CONNECTION_GRACE_S * 1000)),
        ("grpc.max_connection_idle_ms", int(PROBE_CONNECTION_IDLE_S * 1000)),
        ("grpc.server_handshake_timeout_ms", int(PROBE_HANDSHAKE_S * 1000)),
        # No bandwidth probing: it grows a connection's receive window and buffers for a
        # caller that sends fast (24 connections of refused streams: +105 MB with it, +13
        # MB without); probes send a few bytes.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.so_reuseport", 0),
    ]


class OpenStreams:
    """Counts the open health Watch and reflection streams against `most`: one more gets
    RESOURCE_EXHAUSTED at once; its place comes back when a stream ends."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.open = 0
        self._by_address: collections.Counter[str] = collections.Counter()

    @staticmethod
    def most_for(settings: Settings) -> int:
        """MAX_OPEN_STREAMS; with a probe port, the main port's streams take a slot each
        (they pass the gate), so they may take at most a quarter of max_concurrent_rpcs:
        open Watches cannot refuse every other call (red team 6, L1)."""
        if settings.health_port and settings.max_concurrent_rpcs:
            return max(1, min(MAX_OPEN_STREAMS, settings.max_concurrent_rpcs // 4))
        return MAX_OPEN_STREAMS

    @contextlib.asynccontextmanager
    async def held(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        address = str(context.peer()).rsplit(":", 1)[0]  # "ipv4:10.0.0.5:43210": no port
        if self.open >= self.most:
            await rpc.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open} health Watch and reflection streams are open, the most this "
                "server keeps: use health Check, or retry later",
            )
        if self._by_address[address] >= MAX_OPEN_STREAMS_PER_ADDRESS:
            await rpc.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._by_address[address]} health Watch and reflection streams are open "
                "from your address, the most one address may keep: use health Check",
            )
        self.open += 1
        self._by_address[address] += 1
        try:
            yield
        finally:
            self.open -= 1
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]


class HealthServicer(health.aio.HealthServicer):
    """gRPC's health service, with Watch streams bounded: by `OpenStreams`, and to the
    services this server has. Those are all set before the port opens and never change, so
    Watch answers an unknown one NOT_FOUND at once, as Check does, rather than keep its name
    (up to max_message_bytes) until the caller goes away."""

    def __init__(self, streams: OpenStreams) -> None:
        super().__init__()
        self.streams = streams

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        """The service's status; NOT_FOUND naming the services this server reports on."""
        status = self._server_status.get(request.service)
        if status is None:
            known = ", ".join(repr(name) for name in sorted(self._server_status))
            await rpc.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {request.service[:100]!r}: this server "
                f"reports on {known} ('' is the whole server)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        await self.Check(request, context)  # NOT_FOUND for a service this server lacks
        async with self.streams.held(context):
            await super().Watch(request, context)


class ReflectionServicer(reflection.aio.ReflectionServicer):
    """gRPC's reflection service, with streams bounded by `OpenStreams` and requests by
    MAX_REFLECTION_REQUEST_BYTES (INVALID_ARGUMENT)."""

    def __init__(self, names: list[str], streams: OpenStreams) -> None:
        super().__init__(names)
        self.streams = streams

    async def ServerReflectionInfo(
        self, requests: AsyncIterable[Any], context: Any
    ) -> AsyncIterator[Any]:
        async def small() -> AsyncIterator[Any]:
            async for request in requests:
                if request.ByteSize() > MAX_REFLECTION_REQUEST_BYTES:
                    await rpc.abort(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a reflection request of {request.ByteSize()} bytes; at most "
                        f"{MAX_REFLECTION_REQUEST_BYTES}",
                    )
                yield request

        async with self.streams.held(context):
            async for response in super().ServerReflectionInfo(small(), context):
                yield response
