"""grpc.health.v1 checks, for the clients and the CLI."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc


def status_name(status: int) -> str:
    """A HealthCheckResponse status as its name, e.g. "SERVING"."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def check_health(channel: Any, service: str, **kwargs: Any) -> str:
    """Asks the server's health service about `service` ("" is the server)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), **kwargs)
    return status_name(reply.status)


async def check_health_async(channel: Any, service: str, **kwargs: Any) -> str:
    """`check_health` on a grpc.aio channel."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), **kwargs)
    return status_name(reply.status)
