"""Assembling and running the server: gRPC, health, reflection, signals.

- `create_server(settings)` returns a `Server` to `await start()` / `await stop()`.
- `serve(settings)` runs one until SIGTERM/SIGINT (what `modelhost serve` does).
- `running(settings)` runs one on a background thread, for tests, benchmarks and
  scripts that are not asyncio programs.

Health and reflection take no slot and need no token; their streams (Watch, reflection)
are bounded in number and size (`probes`), and Check is never refused. With a probe
port of its own (`health_port`), they answer there so (with small requests, few streams
per connection, few connections, and connections that end: `probe_options`), while on the
main port they need a token and pass the gate like every other method (a slot, and the
request read within `request_read_timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from modelhost.server import malloc, messages, oip, probes, service
from modelhost.server.auth import LiveTokens, Tokens
from modelhost.server.devices import host_memory_bytes
from modelhost.server.gate import OPEN_RECEIVING, ByteBudget, Gate
from modelhost.server.host import Host
from modelhost.server.probes import HealthServicer, OpenStreams, ReflectionServicer, probe_options
from modelhost.server.settings import Settings, flag, unknown_variables

log = logging.getLogger(__name__)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def claimable(host: str, port: int, flag_name: str) -> None:
    """Raises OSError(EADDRINUSE) with a message that says what to do when another
    process listens on `port` at every address `host` names, before gRPC tries it (gRPC
    logs its own failure to bind as an ERROR line of its core's, before ours). Any other
    answer is left to the bind itself; a port taken between the two still fails there."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    return
                continue
            return  # one address is free: the server listens there
    raise OSError(
        errno.EADDRINUSE,
        f"port {port} on {host.strip('[]')} is in use: is another modelhost serve running? "
        f"(choose another port with {flag_name})",
    )


class Server:
    """A modelhost server: the ModelHost service, health and reflection on one port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.host: Host | None = None
        self.gate: Gate | None = None  # the main port's, once started
        self.loop: asyncio.AbstractEventLoop | None = None  # where it serves, once started
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
        self.loop = asyncio.get_running_loop()
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
            "modelhost serving on %s (%s, %s, store %s, device %s%s%s)",
            self.target,
            "mutual TLS" if settings.tls_client_ca_file else "TLS" if credentials else "plaintext",
            _token_summary(tokens.current),
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
            claimable(settings.metrics_host, settings.metrics_port, "--metrics-port")
            self.metrics_port = self.host.metrics.serve(
                settings.metrics_host, settings.metrics_port
            )
        if settings.restore:
            await self.host.models.restore()
        gate = self.gate = Gate(
            tokens,
            max_concurrent=settings.max_concurrent_rpcs,
            read_timeout=settings.request_read_timeout,
            message_bytes=settings.max_message_bytes,
            receiving=ByteBudget(receiving_bytes(settings), "--max-receiving-bytes"),
            open_receiving=ByteBudget(
                OPEN_RECEIVING * settings.max_message_bytes,
                f"{OPEN_RECEIVING} messages for health calls without a token, where probes "
                "share this port (--health-port gives them one of their own)",
            ),
            reflection_receiving=ByteBudget(
                OPEN_RECEIVING * settings.max_message_bytes,
                f"{OPEN_RECEIVING} messages for reflection calls without a token",
            ),
        )
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Without BDP probing, a stream whose request is not being received (it waits
            # for room in the gate's budget) is granted HTTP/2's 64 KiB window, not
            # tens of MiB: a half-sent request's bytes wait at the caller, not here.
            ("grpc.http2.bdp_probe", 0),
        ]
        if settings.max_streams_per_connection:
            options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
        server = grpc.aio.server(interceptors=[gate], options=options)
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
            # Every method is open there; the gate reads their requests within
            # request_read_timeout and answers one that does not parse (not gRPC's log).
            at_most = probes.PROBE_MESSAGE_BYTES
            budget = ByteBudget(probes.probe_port_bytes(), "the probe port's streams")
            probe_gate = Gate(
                None,
                max_concurrent=0,
                read_timeout=settings.request_read_timeout,
                message_bytes=at_most,
                receiving=budget,
                open_receiving=budget,
                reflection_receiving=budget,
            )
            self._probes = grpc.aio.server(interceptors=[probe_gate], options=probe_options())
            self._add_probes(self._probes, reflected)
            probes_at = _address(settings.host, settings.health_port)
            claimable(settings.host, settings.health_port, "--health-port")
            self.health_port = self._probes.add_insecure_port(probes_at)
            if self.health_port == 0:
                raise OSError(f"cannot bind {probes_at}")
        address = _address(settings.host, settings.port)
        claimable(settings.host, settings.port, "--port")
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


def _token_summary(tokens: Tokens) -> str:
    """Which calls need a token, for the start-up line."""
    if tokens.inference and tokens.management:
        return "every call needs a token, management calls the management token"
    if tokens.inference:
        return "every call needs a token"
    if tokens.management:
        return "management calls need a token, inference is open"
    return "no tokens"


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
            f"encrypts but authenticates nobody). Set {flag('token_file')} and "
            f"{flag('management_token_file')}, or {flag('tls_client_ca_file')}, or "
            f"{flag('insecure')} to accept the risk."
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
    # gRPC's own debug lines (a "Loaded running loop" per call) would bury the server's.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))
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


def receiving_bytes(settings: Settings) -> int:
    """What the requests the gate holds may take in all (`gate.ByteBudget`):
    `--max-receiving-bytes`, by default a quarter of the memory (or of the container's
    limit), and at least two of `--max-message-bytes`: one request received and held (a
    few bytes may be enough to keep a smaller budget from receiving another) and one
    being received."""
    budget = settings.max_receiving_bytes or host_memory_bytes() // 4
    return max(budget, 2 * settings.max_message_bytes)
