"""Bearer tokens with a management tier (`gate.Gate` applies them to every call).

- Health checks and reflection are always open (Kubernetes probes, grpcurl).
- Management RPCs (`TIERS`: SaveCheckpoint, DeleteCheckpoint, LoadModel, UnloadModel
  and the Open Inference Protocol's repository load/unload) need a management token
  when any is configured; an inference token there gets PERMISSION_DENIED.
- Every other RPC needs an inference or a management token when inference tokens
  are configured.
- No token or a wrong one: UNAUTHENTICATED. Tokens are compared in constant time.
- Tokens lose their surrounding whitespace, given by value or in a file (one a line;
  a UTF-8 byte order mark is dropped).
- A token file that holds no token, or a token that is only whitespace, stops the
  server at start: the operator wants authentication, so it must not turn it off.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from modelhost.server.settings import Settings

INFERENCE, MANAGEMENT = "inference", "management"
TIERS: dict[str, str] = {
    # Management: what changes the stored checkpoints or the hosted models.
    "/modelhost.v1.ModelHost/SaveCheckpoint": MANAGEMENT,
    "/modelhost.v1.ModelHost/DeleteCheckpoint": MANAGEMENT,
    "/modelhost.v1.ModelHost/LoadModel": MANAGEMENT,
    "/modelhost.v1.ModelHost/UnloadModel": MANAGEMENT,
    "/inference.GRPCInferenceService/RepositoryModelLoad": MANAGEMENT,
    "/inference.GRPCInferenceService/RepositoryModelUnload": MANAGEMENT,
    # Inference: reading and predicting.
    "/modelhost.v1.ModelHost/DownloadCheckpoint": INFERENCE,
    "/modelhost.v1.ModelHost/ListCheckpoints": INFERENCE,
    "/modelhost.v1.ModelHost/GetCheckpoint": INFERENCE,
    "/modelhost.v1.ModelHost/ListModels": INFERENCE,
    "/modelhost.v1.ModelHost/GetModel": INFERENCE,
    "/modelhost.v1.ModelHost/ListArchitectures": INFERENCE,
    "/modelhost.v1.ModelHost/Predict": INFERENCE,
    "/inference.GRPCInferenceService/ServerLive": INFERENCE,
    "/inference.GRPCInferenceService/ServerReady": INFERENCE,
    "/inference.GRPCInferenceService/ModelReady": INFERENCE,
    "/inference.GRPCInferenceService/ServerMetadata": INFERENCE,
    "/inference.GRPCInferenceService/ModelMetadata": INFERENCE,
    "/inference.GRPCInferenceService/ModelInfer": INFERENCE,
    "/inference.GRPCInferenceService/ModelConfig": INFERENCE,
    "/inference.GRPCInferenceService/RepositoryIndex": INFERENCE,
    "/inference.GRPCInferenceService/ModelStatistics": INFERENCE,
}
"""The tier of every RPC (tests/test_security.py checks every RPC of both services is
here). A method missing from it needs the management token: the table fails closed."""
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read_tokens(setting: str, value: str, path: str) -> tuple[bytes, ...]:
    """The tokens given by value (`setting`) and in a file (`setting`_file), without
    surrounding whitespace: a secret put in the environment often ends with a newline."""
    tokens = []
    if value:
        if not value.strip():
            raise ValueError(
                f"{setting} is only whitespace: "
                "refusing to start without the authentication it asks for"
            )
        tokens.append(value.strip())
    if path:
        lines = (line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines())
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise ValueError(
                f"{setting}_file {path} holds no token (it is empty or only comments): "
                "refusing to start without the authentication it asks for"
            )
        tokens += found
    return tuple(token.encode() for token in tokens)


def _matches(presented: bytes, tokens: Iterable[bytes]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time does not depend on which one matches
        found |= hmac.compare_digest(presented, token)
    return found


@dataclass(frozen=True)
class Tokens:
    """The configured tokens."""

    inference: tuple[bytes, ...] = ()
    management: tuple[bytes, ...] = ()
    # Health and reflection need no token, unless probes have a port of their own: then
    # they need an inference token on the main port.
    open_prefixes: tuple[str, ...] = OPEN_PREFIXES

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        return cls(
            inference=_read_tokens("token", settings.token, settings.token_file),
            management=_read_tokens(
                "management_token", settings.management_token, settings.management_token_file
            ),
            open_prefixes=() if settings.health_port else OPEN_PREFIXES,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.management)

    def verdict(self, method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message that refuse it."""
        if method.startswith(self.open_prefixes):
            return None
        tier = INFERENCE if method.startswith(OPEN_PREFIXES) else TIERS.get(method, MANAGEMENT)
        if tier == MANAGEMENT and self.management:
            if presented is not None and _matches(presented, self.management):
                return None
            if presented is not None and _matches(presented, self.inference):
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs the management token; an inference token was given",
                )
            return _unauthenticated(method, presented)
        if not self.inference:
            return None
        if presented is not None and _matches(presented, self.inference + self.management):
            return None
        return _unauthenticated(method, presented)


def _unauthenticated(method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str]:
    what = "no bearer token" if presented is None else "an invalid bearer token"
    return (
        grpc.StatusCode.UNAUTHENTICATED,
        f"{method} was called with {what}; send 'authorization: Bearer <token>'",
    )


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of the `authorization: Bearer <token>` header, if there is exactly one
    such header (two are ambiguous: which one a proxy meant is not ours to guess)."""
    headers = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(headers) != 1:
        return None
    value = headers[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    scheme, _, token = text.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None
