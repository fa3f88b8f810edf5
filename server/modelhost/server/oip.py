"""The Open Inference Protocol servicer: `inference.GRPCInferenceService` over a `Host`.

It serves on the same port as modelhost.v1.ModelHost and shares its registry and
batchers: a ModelInfer request joins the same batches as Predict requests. Errors
map to statuses through the same table (`rpc.unary`).

Versions are strings in OIP: "" is the newest, "3" is version 3 (ASCII digits only,
at most 2**63-1: `oip_load.parse_version`). Model metadata lists the inputs the
architecture implies (none when it implies nothing) and the outputs seen on the
model's first successful run (none before it).
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc.aio

from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.oip import model_config_pb2 as mc
from modelhost.server import oip_tensors as tensors
from modelhost.server import request_limits
from modelhost.server.errors import InvalidArgument, NotFound
from modelhost.server.host import Host
from modelhost.server.hosted import HostedModel
from modelhost.server.inference import fixed_batch
from modelhost.server.names import check_name
from modelhost.server.oip_load import load_request, parse_version
from modelhost.server.rpc import generated_handlers, register, unary
from modelhost.server.statistics import Duration

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "pytorch_libtorch"  # Triton's name for PyTorch models
BACKEND = "pytorch"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")


def _server_version() -> str:
    try:
        return version("modelhost")
    except PackageNotFoundError:
        return "unknown"


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a `Host`."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def _get(self, name: str, version: str) -> HostedModel:
        return self.host.models.get(name, parse_version(version))

    @unary
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Any
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Any
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    @unary
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Any
    ) -> oip.ModelReadyResponse:
        try:
            hosted = self._get(request.name, request.version)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=not hosted.retiring)

    @unary
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="modelhost", version=_server_version(), extensions=EXTENSIONS
        )

    @unary
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Any
    ) -> oip.ModelMetadataResponse:
        hosted = self._get(request.name, request.version)
        return oip.ModelMetadataResponse(
            name=hosted.name,
            versions=[str(v) for v in self.host.versions(hosted.name)],
            platform=PLATFORM,
            inputs=tensors.metadata(hosted.runner.inputs),
            outputs=tensors.metadata(hosted.runner.outputs),
        )

    @unary
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Any
    ) -> oip.ModelConfigResponse:
        return oip.ModelConfigResponse(
            config=model_config(self._get(request.name, request.version))
        )

    @unary
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Any
    ) -> oip.ModelInferResponse:
        self.host.check_request_size(len(request.inputs), 0)  # before any per-input work
        timeout = tensors.request_timeout(request)
        until = None if timeout is None else time.monotonic() + timeout
        if request.raw_input_contents:  # views of the received bytes: cheap
            inputs = tensors.decode_inputs(request)
        else:  # typed contents are counted, then copied into arrays: not on the event loop
            max_elements = self.host.settings.max_tensor_elements
            inputs = await asyncio.to_thread(tensors.decode_inputs, request, max_elements)
        hosted, answer = await self.host.predict(
            request.model_name,
            parse_version(request.model_version),
            inputs,
            _sooner(context.time_remaining(), until),
        )
        described, raw = tensors.encode_outputs(
            answer.outputs, request.outputs, self.host.settings.max_message_bytes, request.id
        )
        return oip.ModelInferResponse(
            model_name=hosted.name,
            model_version=str(hosted.version),
            id=request.id,
            outputs=described,
            raw_output_contents=raw,
        )

    @unary
    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Any
    ) -> oip.RepositoryIndexResponse:
        Index = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(
            models=[
                Index(
                    name=hosted.name,
                    version=str(hosted.version),
                    state="UNLOADING" if hosted.retiring else "READY",
                )
                for hosted in self.host.hosted()
                if not (request.ready and hosted.retiring)
            ]
        )

    @unary
    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: Any
    ) -> oip.RepositoryModelLoadResponse:
        name = check_name(request.model_name, "model")
        # Its JSON parameters are parsed off the event loop (up to MAX_JSON_BYTES each).
        wanted = await asyncio.to_thread(load_request, name, request.parameters)
        await self.host.models.load(wanted)
        return oip.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: Any
    ) -> oip.RepositoryModelUnloadResponse:
        number = _unload_version(request.parameters.get("version"))
        await self.host.models.unload(request.model_name, number)
        return oip.RepositoryModelUnloadResponse()

    @unary
    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: Any
    ) -> oip.ModelStatisticsResponse:
        if request.version:
            hosted = [self._get(request.name, request.version)]
        elif request.name:
            self._get(request.name, "")  # NOT_FOUND for a model not hosted
            hosted = self.host.hosted(request.name)
        else:
            hosted = self.host.hosted()
        return oip.ModelStatisticsResponse(model_stats=map(model_statistics, hosted))


def _unload_version(param: oip.ModelRepositoryParameter | None) -> int:
    """RepositoryModelUnload's "version" parameter; absent or "": 0 (every version)."""
    if param is None:
        return 0
    choice = param.WhichOneof("parameter_choice")
    if choice == "string_param":
        return parse_version(param.string_param)
    if choice == "int64_param" and param.int64_param > 0:
        return param.int64_param
    got = f"int64_param {param.int64_param}" if choice == "int64_param" else choice or "no value"
    raise InvalidArgument(
        f"parameter 'version' must be a positive int64_param or a decimal string_param, got {got}"
    )


def model_statistics(hosted: HostedModel) -> oip.ModelStatistics:
    """The OIP statistics of a hosted version (see statistics.py)."""
    stats = hosted.batcher.statistics.snapshot()
    device = hosted.loaded.device

    def duration(d: Duration) -> oip.StatisticDuration:
        return oip.StatisticDuration(count=d.count, ns=d.ns)

    return oip.ModelStatistics(
        name=hosted.name,
        version=str(hosted.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=oip.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=duration(stats.compute.input),
            compute_infer=duration(stats.compute.infer),
            compute_output=duration(stats.compute.output),
        ),
        batch_stats=[
            oip.InferBatchStatistics(
                batch_size=rows,
                compute_input=duration(phases.input),
                compute_infer=duration(phases.infer),
                compute_output=duration(phases.output),
            )
            for rows, phases in sorted(stats.batches.items())
        ],
        memory_usage=[
            oip.MemoryUsage(
                type="GPU" if device.type == "cuda" else "CPU",
                id=device.index or 0,
                byte_size=hosted.device_bytes,  # weights, buffers, workspace (as ModelInfo)
            )
        ],
    )


def model_config(hosted: HostedModel) -> mc.ModelConfig:
    """A Triton model configuration describing a hosted version.

    Its "parameters" are the RepositoryModelLoad keys it was loaded with, so the
    configuration (as JSON) can be sent back as a load's "config".
    """
    policy = hosted.batcher.policy
    device = hosted.loaded.device
    group = mc.ModelInstanceGroup(name=hosted.name, count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    if device.type == "cuda":
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.append(device.index or 0)
    spec = hosted.spec
    # Triton's rule: max_batch_size 0 for a model whose batch is fixed, its dims the full
    # shape; otherwise dims leave out the batch (1 to max_batch_size rows).
    batched = not fixed_batch(hosted.runner.inputs)
    config = mc.ModelConfig(
        name=hosted.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=policy.max_batch_size if batched else 0,
        input=tensors.config_tensors(mc.ModelInput, hosted.runner.inputs, batched=batched),
        output=tensors.config_tensors(mc.ModelOutput, hosted.runner.outputs, batched=batched),
        instance_group=[group],
        parameters={
            "architecture": mc.ModelParameter(string_value=spec.architecture),
            "architecture_args": mc.ModelParameter(string_value=json.dumps(spec.args, default=str)),
            "checkpoint": mc.ModelParameter(string_value=spec.checkpoint),
            "device": mc.ModelParameter(string_value=str(device)),
            "dtype": mc.ModelParameter(
                string_value=str(hosted.loaded.dtype).removeprefix("torch.")
            ),
        },
    )
    if batched and policy.max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
        if policy.preferred_batch_size:
            config.dynamic_batching.preferred_batch_size.append(policy.preferred_batch_size)
    return config


def add_to_server(host: Host, server: grpc.aio.Server) -> str:
    """Adds the service to `server`, with ModelInfer's requests counted before they are
    parsed (`request_limits.infer_parser`); returns its full name (for health and reflection)."""
    handlers = generated_handlers(
        oip_grpc.add_GRPCInferenceServiceServicer_to_server, InferenceService(host)
    )
    handlers["ModelInfer"] = handlers["ModelInfer"]._replace(
        request_deserializer=request_limits.infer_parser(
            host.settings.max_request_inputs, host.settings.max_tensor_elements
        )
    )
    register(server, SERVICE_NAME, handlers)
    return SERVICE_NAME


def _sooner(remaining: float | None, until: float | None) -> float | None:
    """The call's time left, or less until `until` (a request's `timeout` parameter)."""
    if until is None:
        return remaining
    left = until - time.monotonic()
    return left if remaining is None else min(remaining, left)
