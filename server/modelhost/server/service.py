"""The gRPC servicer: converts messages, calls `Host`, and maps errors to statuses
(through `rpc.STATUS`, the one table).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from modelhost.client import wire
from modelhost.client.predict import CACHE_TRAILER
from modelhost.server import errors as e
from modelhost.server import messages
from modelhost.server.checkpoints import Snapshot
from modelhost.server.gate import RequestStream
from modelhost.server.host import Host
from modelhost.server.request_limits import (
    PredictRequest,
    check_reply_bytes,
    parse_save_request,
    predict_parser,
)
from modelhost.server.rpc import generated_handlers, register, streaming, unary
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelHost"].full_name

SaveRequest = pb.SaveCheckpointRequest | memoryview
"""What SaveCheckpoint receives: chunks as views (`parse_save_request`), or messages."""


async def _chunks(stream: AsyncIterator[SaveRequest]) -> AsyncIterator[bytes | memoryview]:
    async for message in stream:
        if isinstance(message, memoryview):
            yield message
        elif message.HasField("chunk"):
            yield message.chunk
        else:
            raise e.InvalidArgument("only the first SaveCheckpoint message may be a header")


class ModelHostService(pb_grpc.ModelHostServicer):
    """modelhost.v1.ModelHost over a `Host`."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @unary
    async def SaveCheckpoint(
        self, request_iterator: AsyncIterator[SaveRequest], context: Any
    ) -> pb.CheckpointInfo:
        first = await anext(aiter(request_iterator), None)
        if not isinstance(first, pb.SaveCheckpointRequest) or not first.HasField("header"):
            raise e.InvalidArgument("the first SaveCheckpoint message must be a header")
        header = messages.save_header(first.header)
        checkpoints = self.host.checkpoints
        if isinstance(header, Snapshot):
            record = await checkpoints.snapshot(header)
        else:
            # Chunks waiting to be written stay counted in the receiving budget.
            stream = request_iterator
            keep = stream.keep_last if isinstance(stream, RequestStream) else None
            record = await checkpoints.upload(header, _chunks(stream), keep)
        return messages.checkpoint_info(record)

    @streaming
    async def DownloadCheckpoint(  # type: ignore[override]
        self, request: pb.DownloadCheckpointRequest, context: Any
    ) -> AsyncIterator[pb.DownloadCheckpointResponse | bytes]:
        async for item in self.host.checkpoints.download(request.name):
            if isinstance(item, bytes):
                yield wire.chunk_message(item)  # serialized already: one copy
            else:
                yield pb.DownloadCheckpointResponse(info=messages.checkpoint_info(item))

    @unary
    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Any
    ) -> pb.ListCheckpointsResponse:
        records = await self.host.checkpoints.list()
        return pb.ListCheckpointsResponse(checkpoints=map(messages.checkpoint_info, records))

    @unary
    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: Any
    ) -> pb.CheckpointInfo:
        return messages.checkpoint_info(self.host.checkpoints.get(request.name))

    @unary
    async def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: Any
    ) -> pb.DeleteCheckpointResponse:
        await self.host.checkpoints.delete(request.name)
        return pb.DeleteCheckpointResponse()

    @unary
    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> pb.ModelInfo:
        hosted = await self.host.models.load(messages.load_request(request))
        return messages.model_info(hosted, self.host.versions(hosted.name))

    @unary
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Any
    ) -> pb.UnloadModelResponse:
        versions = await self.host.models.unload(request.name, request.version)
        return pb.UnloadModelResponse(versions=versions)

    @unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        host = self.host
        hosted = [messages.model_info(h, host.versions(h.name)) for h in host.hosted()]
        failed = [messages.failed_model_info(u.request, u.reason) for u in host.unrestored()]
        models = sorted([*hosted, *failed], key=lambda info: (info.name, info.version))
        return pb.ListModelsResponse(models=models)

    @unary
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        hosted = self.host.models.get(request.name, request.version)
        return messages.model_info(hosted, self.host.versions(hosted.name))

    @unary
    async def ListArchitectures(
        self, request: pb.ListArchitecturesRequest, context: Any
    ) -> pb.ListArchitecturesResponse:
        builders = self.host.architectures()
        return pb.ListArchitecturesResponse(architectures=map(messages.architecture, builders))

    @unary
    async def Predict(self, request: PredictRequest, context: Any) -> pb.PredictResponse:
        hosted, answer = await self.host.predict(
            request.model,
            request.version,
            request.inputs,
            context.time_remaining(),
            images=request.images,
            top_k=request.top_k,
        )
        limit = self.host.settings.max_message_bytes
        check_reply_bytes(answer.outputs.items(), limit, messages=answer.top_k)
        context.set_trailing_metadata(((CACHE_TRAILER, "miss" if answer.paged_in else "hit"),))
        return pb.PredictResponse(
            model=hosted.name, version=hosted.version, outputs=answer.outputs, top_k=answer.top_k
        )


def add_to_server(host: Host, server: grpc.aio.Server) -> str:
    """Registers the service as the generated code does, with the (de)serializers of
    the large messages swapped in (see `wire`); returns the service's full name."""
    handlers = generated_handlers(pb_grpc.add_ModelHostServicer_to_server, ModelHostService(host))
    handlers["SaveCheckpoint"] = handlers["SaveCheckpoint"]._replace(
        request_deserializer=parse_save_request
    )
    handlers["DownloadCheckpoint"] = handlers["DownloadCheckpoint"]._replace(
        response_serializer=messages.serialize_download_response
    )
    settings = host.settings
    handlers["Predict"] = handlers["Predict"]._replace(
        request_deserializer=predict_parser(
            settings.max_request_inputs, settings.max_request_images
        )
    )
    register(server, SERVICE_NAME, handlers)
    return SERVICE_NAME
