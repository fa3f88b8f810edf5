"""Bearer-token authentication: a server interceptor with separate management tokens.

- Health checks and reflection are always open (Kubernetes probes, grpcurl).
- Management RPCs (SaveCheckpoint, DeleteCheckpoint, LoadModel, UnloadModel and the
  Open Inference Protocol's repository load/unload) need a management token when
  any is configured; an inference token there gets PERMISSION_DENIED.
- Every other RPC needs an inference or a management token when inference tokens
  are configured.
- No token or a wrong one: UNAUTHENTICATED. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from modelhost.server.settings import Settings

MANAGEMENT_METHODS = frozenset(
    {
        "/modelhost.v1.ModelHost/SaveCheckpoint",
        "/modelhost.v1.ModelHost/DeleteCheckpoint",
        "/modelhost.v1.ModelHost/LoadModel",
        "/modelhost.v1.ModelHost/UnloadModel",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read_tokens(value: str, path: str) -> tuple[bytes, ...]:
    tokens = [value] if value else []
    if path:
        lines = Path(path).read_text().splitlines()
        tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
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

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        return cls(
            inference=_read_tokens(settings.token, settings.token_file),
            management=_read_tokens(settings.management_token, settings.management_token_file),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.management)

    def verdict(self, method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message that refuse it."""
        if method.startswith(OPEN_PREFIXES):
            return None
        if method in MANAGEMENT_METHODS and self.management:
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
    """The token of an `authorization: Bearer <token>` header, if there is one."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose token does not allow their method."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        verdict = self.tokens.verdict(method, bearer(metadata))
        if handler is None or verdict is None:
            return handler
        return _refusal(handler, *verdict)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as `handler` that ends the call with `code`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = refuse_stream if handler.response_streaming else refuse
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
