"""How clients reach the server: target, TLS, token and channel options, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio


def channel_options(max_message_bytes: int = -1) -> list[tuple[str, Any]]:
    """gRPC channel options used by both clients: the server enforces the limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ChannelConfig:
    """Connection settings shared by `ModelHostClient` and `AsyncModelHostClient`.

    - `token`: sent as `authorization: Bearer <token>` on every call.
    - `tls`: use TLS; `ca_file` verifies the server (system roots when unset);
      `cert_file` + `key_file` present a client certificate (mutual TLS).
    - `server_name`: overrides the name checked against the server's certificate.
    - Targets may be `host:port` or `dns:///host:port`; several addresses behind
      one DNS name are balanced round-robin per call.
    """

    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    max_message_bytes: int = -1
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def options(self) -> list[tuple[str, Any]]:
        options = channel_options(self.max_message_bytes) + list(self.extra_options)
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
            return grpc.insecure_channel(target, options=self.options())
        return grpc.secure_channel(target, creds, options=self.options())

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=self.options())
        return grpc.aio.secure_channel(target, creds, options=self.options())

    def call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """Keyword arguments for every stub call: deadline and auth metadata."""
        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.token:
            kwargs["metadata"] = (("authorization", f"Bearer {self.token}"),)
        return kwargs
