"""The raw ceiling: a grpc.aio server that echoes bytes, with no protobuf, store or model.

`/bench.Echo/Unary` returns the request's bytes; `/bench.Echo/Sink` consumes a stream of
chunks and returns their total length as 8 bytes. Prints its target, then serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def sink(chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
    return total.to_bytes(8, "little")


async def main() -> None:
    limit = 1 << 30
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
