"""Assembling and running the server: gRPC, health, reflection, signals.

- `create_server(settings)` returns a `Server` to `await start()` / `await stop()`.
- `serve(settings)` runs one until SIGTERM/SIGINT (what `modelhost serve` does).
- `running(settings)` runs one on a background thread, for tests, benchmarks and
  scripts that are not asyncio programs.

Health and reflection take no slot and need no token; their streams (Watch, reflection)
are bounded in number and size (`OpenStreams`), and Check is never refused. With a probe
port of its own (`health_port`), they answer there so (with small requests, few streams
per connection, few connections, and connections that end: `probe_options`), while on the
main port they need a token and pass the gate like every other method (a slot, and the
request read within `request_read_timeout`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from modelhost.server import malloc, messages, oip, service
from modelhost.server.auth import LiveTokens, Tokens
from modelhost.server.gate import Gate
from modelhost.server.host import Host
from modelhost.server.settings import Settings, unknown_variables

log = logging.getLogger(__name__)


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
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open} health Watch and reflection streams are open, the most this "
                "server keeps: use health Check, or retry later",
            )
        if self._by_address[address] >= MAX_OPEN_STREAMS_PER_ADDRESS:
            await context.abort(
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
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a reflection request of {request.ByteSize()} bytes; at most "
                        f"{MAX_REFLECTION_REQUEST_BYTES}",
                    )
                yield request

        async with self.streams.held(context):
            async for response in super().ServerReflectionInfo(small(), context):
                yield response


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class Server:
    """A modelhost server: the ModelHost service, health and reflection on one port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.host: Host | None = None
        self.streams = OpenStreams(OpenStreams.most_for(settings))
        self.health = HealthServicer(self.streams)
        self._grpc: grpc.aio.Server | None = None
        self._probes: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        """Where clients reach it, e.g. "127.0.0.1:50051"."""
        return _address(self.settings.host, self.port)

    async def start(self) -> None:
        """Opens the store, restores hosted models, then binds the port and serves.

        The port opens only once restored models are loaded, so a replica that
        restarts takes no call it would answer NOT_FOUND: clients balancing over
        several replicas keep using the others until then. Health: every service is
        SERVING from then on; NOT_SERVING once draining or after a device failure.
        """
        settings = self.settings
        tokens = LiveTokens(settings)  # token files are read again when they change
        credentials = server_credentials(settings)
        check_exposure(settings, tokens.current, bool(settings.tls_client_ca_file))
        self.host = Host(settings, messages.RECORDS)
        try:
            await self._open(credentials, tokens)
        except BaseException:
            await self.host.close()
            self.host.metrics.close()
            raise
        log.info(
            "modelhost serving on %s (%s, store %s, device %s%s%s)",
            self.target,
            "TLS" if credentials else "plaintext",
            settings.store,
            self.host.default_device,
            f", metrics on {_address(settings.metrics_host, self.metrics_port)}"
            if self.metrics_port
            else "",
            f", probes on {_address(settings.host, self.health_port)}" if self.health_port else "",
        )
        log.info("modelhost ready")

    async def _open(self, credentials: grpc.ServerCredentials | None, tokens: LiveTokens) -> None:
        """Metrics, restore, then the gRPC port (see `start`)."""
        settings = self.settings
        assert self.host is not None
        if settings.metrics_port:
            self.metrics_port = self.host.metrics.serve(
                settings.metrics_host, settings.metrics_port
            )
        if settings.restore:
            await self.host.models.restore()
        gate = Gate(
            tokens,
            max_concurrent=settings.max_concurrent_rpcs,
            read_timeout=settings.request_read_timeout,
        )
        server = grpc.aio.server(
            interceptors=[gate],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        services = (
            service.add_to_server(self.host, server),
            oip.add_to_server(self.host, server),
        )
        reflected = [
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        self._add_probes(server, reflected)
        if settings.health_port:
            self._probes = grpc.aio.server(options=probe_options())
            self._add_probes(self._probes, reflected)
            probes_at = _address(settings.host, settings.health_port)
            self.health_port = self._probes.add_insecure_port(probes_at)
            if self.health_port == 0:
                raise OSError(f"cannot bind {probes_at}")
        address = _address(settings.host, settings.port)
        if credentials is not None:
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")

        async def not_serving() -> None:  # a failed device: let the orchestrator restart us
            for name in ("", *services):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        self.host.on_device_failure = not_serving
        for name in ("", *services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._probes is not None:
            await self._probes.start()
        await server.start()
        self._grpc = server

    def _add_probes(self, server: grpc.aio.Server, reflected: list[str]) -> None:
        """Health and reflection (one health servicer: every port reports the same)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(reflected, self.streams), server
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drains: reports NOT_SERVING, sends GOAWAY (clients take new calls elsewhere;
        a call racing it gets UNAVAILABLE, which clients retry), lets calls in flight
        finish within `grace` seconds (default: the setting), then unloads every model."""
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._probes is not None:
            await self._probes.stop(0)
        if self.host is not None:
            await self.host.close()
            self.host.metrics.close()
        log.info("modelhost stopped")

    async def wait(self) -> None:
        """Returns when the server has stopped."""
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; mutual TLS with a client CA."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def check_exposure(settings: Settings, tokens: Tokens, mutual_tls: bool) -> None:
    """Refuses to serve beyond this machine without authentication (tokens or mutual
    TLS), unless told to. Server-side TLS alone encrypts but authenticates nobody. With a
    management token alone, warns that every other RPC is open (checkpoint downloads too);
    with tokens and no TLS, that the tokens travel in clear text."""
    if settings.is_loopback() or mutual_tls:
        return
    if tokens.management and not tokens.inference:
        log.warning(
            "serving on %s with a management token only: Predict, ListCheckpoints and "
            "DownloadCheckpoint (the bytes of every stored checkpoint) are open to anyone "
            "who can reach this port; set token_file to guard them",
            settings.host,
        )
    if tokens.enabled:
        if not settings.tls_cert_file:
            log.warning(
                "serving on %s with tokens but without TLS: bearer tokens travel in clear "
                "text, readable by anyone who can observe the traffic. Set tls_cert_file and "
                "tls_key_file, or keep this port behind a service mesh with mutual TLS",
                settings.host,
            )
        return
    if not settings.insecure:
        raise ValueError(
            f"refusing to serve on {settings.host} without a token or mutual TLS: anyone "
            "who can reach it could load and run models (TLS without a client CA "
            "encrypts but authenticates nobody). Configure token_file/management_token_file "
            "or tls_client_ca_file, or set insecure to accept the risk."
        )
    log.warning(
        "INSECURE: serving on %s with neither tokens nor mutual TLS; anyone who can reach "
        "this port can upload checkpoints and load models",
        settings.host,
    )


def create_server(settings: Settings | None = None) -> Server:
    """A server for `settings` (default: from the environment); call `start()` next."""
    return Server(settings or Settings.from_env())


def serve(settings: Settings) -> int:
    """Runs a server until SIGTERM or SIGINT, then shuts down gracefully; returns 0."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    malloc.keep_large_buffers()
    for warning in unknown_variables():
        log.warning("%s", warning)

    async def main() -> None:
        server = create_server(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stop_soon(signum: int, frame: object) -> None:
            # Not loop.add_signal_handler: the loop restores the default action when it
            # closes, and a second SIGTERM while the process exits would then kill it.
            if not loop.is_closed():
                loop.call_soon_threadsafe(stop.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_soon)
        await server.start()
        try:
            await stop.wait()
            log.info("signal received: draining for up to %.1fs", settings.grace_seconds)
        finally:
            await server.stop()

    asyncio.run(main())
    # Stopped: a further signal must not kill the process while Python exits (exiting
    # Python restores the default actions of the handlers it set, but not SIG_IGN).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    left = [t.name for t in threading.enumerate() if _keeps_process(t)]
    if left:  # a load still compiling, a builder that hangs: Python would wait for them
        log.warning("exiting without threads still at work: %s", ", ".join(left))
        logging.shutdown()
        os._exit(0)
    return 0


def _keeps_process(thread: threading.Thread) -> bool:
    """Whether Python waits for `thread` before the process exits."""
    return thread.is_alive() and not thread.daemon and thread is not threading.main_thread()


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[Server]:
    """Runs a server on a background thread with its own event loop; stops it on exit."""
    loop = asyncio.new_event_loop()
    server = create_server(settings)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as error:
            failure.append(error)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="modelhost-server", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        loop.close()
        raise failure[0]
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
