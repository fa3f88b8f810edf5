"""How clients reach the server: target, TLS, token and channel options, in one place."""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

# Calls that change nothing (`RETRIED`: Predict, Get*, List*, DownloadCheckpoint,
# health) are retried by gRPC itself, with backoff, on UNAVAILABLE (a replica
# stopping or unreachable) and CANCELLED (what gRPC answers for calls that reached a
# server as it began to shut down, before any handler saw them); the retry goes to the
# next address. Calls the caller cancels are not retried.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
# A call is retried only while its request is buffered: up to this size per call.
RETRY_BUFFER_BYTES = 64 << 20
# The calls without side effects (statistics aside); every other call changes the store
# or what is served and is never retried.
RETRIED = (
    ("modelhost.v1.ModelHost", "Predict"),
    ("modelhost.v1.ModelHost", "GetModel"),
    ("modelhost.v1.ModelHost", "ListModels"),
    ("modelhost.v1.ModelHost", "GetCheckpoint"),
    ("modelhost.v1.ModelHost", "ListCheckpoints"),
    ("modelhost.v1.ModelHost", "ListArchitectures"),
    ("modelhost.v1.ModelHost", "DownloadCheckpoint"),
    ("grpc.health.v1.Health", "Check"),
)


def service_config(retries: bool = True) -> str:
    """The channel's gRPC service config: round-robin over every address the target
    resolves to, and (with `retries`) the retry policy of the calls without side effects."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries:
        names = [{"service": service, "method": method} for service, method in RETRIED]
        config["methodConfig"] = [{"name": names, "retryPolicy": RETRY_POLICY}]
    return json.dumps(config)


DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
"""The largest message either client sends or takes: the server's own default
(`--max-message-bytes`), so no reply of a default server is refused, and a larger one
fails with RESOURCE_EXHAUSTED instead of being buffered whole (-1: no limit)."""


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: bool = True
) -> list[tuple[str, Any]]:
    """gRPC channel options used by both clients."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.service_config", service_config(retries)),
        ("grpc.enable_retries", int(retries)),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        # A replica that went away is tried again within 2 s of coming back (gRPC's
        # default backoff grows to 2 minutes).
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def _local_address(address: str) -> bool:
    """Whether `address` (host, host:port, [v6]:port) is a loopback address or name."""
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    elif address.count(":") == 1:
        host = address.partition(":")[0]
    else:  # a name or IPv4 address alone, or an IPv6 address without a port
        host = address
    host = host.partition("%")[0].lower().rstrip(".")  # no IPv6 zone, no final dot
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_target(target: str) -> bool:
    """Whether every address of a gRPC `target` is on this machine: a Unix socket, or a
    loopback address or name (`127.0.0.1:50051`, `localhost:50051`, `[::1]:50051`,
    `dns:///localhost:50051`, `ipv4:127.0.0.1:1,127.0.0.1:2`). Anything else (other
    names, which may resolve anywhere, and what does not parse) is not."""
    scheme, colon, rest = target.partition(":")
    scheme = scheme.lower()
    if colon and scheme in ("unix", "unix-abstract"):
        return True
    if colon and scheme == "dns":
        addresses = [rest[2:].partition("/")[2] if rest.startswith("//") else rest]
    elif colon and scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    else:
        addresses = [target]
    return all(_local_address(address.strip()) for address in addresses)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ChannelConfig:
    """Connection settings shared by `ModelHostClient` and `AsyncModelHostClient`.

    - `token`: sent as `authorization: Bearer <token>` on every call. On a channel
      without TLS to an address beyond this machine, a warning is logged (once per
      channel): the token travels in clear text.
    - `tls`: use TLS; `ca_file` verifies the server (system roots when unset);
      `cert_file` + `key_file` present a client certificate (mutual TLS).
    - `server_name`: overrides the name checked against the server's certificate.
    - Targets may be `host:port`, `dns:///host:port` or `ipv4:host:port,host:port`;
      calls are balanced round-robin over every address the target resolves to.
    - `max_message_bytes`: the largest request or reply (a Predict, a list), 256 MiB
      like the server's default; set it to the server's `--max-message-bytes` if that
      is larger (-1: no limit).
    - `retries`: gRPC retries the calls without side effects (Predict, Get*, List*,
      DownloadCheckpoint, health) on UNAVAILABLE or CANCELLED, up to 5 attempts with
      backoff (`RETRY_POLICY`), while the request is under 64 MiB. `retries=False`
      turns it off.
    - `max_reply_entries`, `max_reply_fields`: the most entries of a listing or of a
      Predict's outputs, and fields of a reply (twice that for Predict), the client
      parses (`calls.MAX_REPLY_ENTRIES`, `calls.MAX_REPLY_FIELDS` when None); a reply
      with more is refused unparsed (`ProtocolError`). Raise them for a registry of more
      than 100,000 checkpoints or a Predict of millions of top-k rows.
    """

    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    retries: bool = True
    max_reply_entries: int | None = None
    max_reply_fields: int | None = None
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def options(self) -> list[tuple[str, Any]]:
        options = channel_options(self.max_message_bytes, self.retries) + list(self.extra_options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca_file or self.cert_file):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def channel(self, target: str) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            self._warn_plaintext_token(target)
            return grpc.insecure_channel(target, options=self.options())
        return grpc.secure_channel(target, creds, options=self.options())

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            self._warn_plaintext_token(target)
            return grpc.aio.insecure_channel(target, options=self.options())
        return grpc.aio.secure_channel(target, creds, options=self.options())

    def _warn_plaintext_token(self, target: str) -> None:
        """Warns (once per channel: channels are made here) that the token will travel
        in clear text, when the plaintext channel leaves this machine. Not refused: plain
        gRPC inside a cluster whose service mesh encrypts the traffic is a deployment."""
        if self.token and not is_local_target(target):
            log.warning(
                "sending a bearer token over a plaintext channel to %s: anyone who can "
                "observe the traffic can read it. Use TLS (ChannelConfig(tls=True, "
                "ca_file=...), modelhost --tls) unless a service mesh encrypts it",
                target,
            )

    def call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """Keyword arguments for every stub call: deadline and auth metadata."""
        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.token:
            kwargs["metadata"] = (("authorization", f"Bearer {self.token}"),)
        return kwargs
