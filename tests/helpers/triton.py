"""Triton's own client (`tritonclient.grpc`, unmodified) in a child process.

tritonclient's generated protos and modelhost's OIP protos both define the
protobuf package `inference`, and protobuf refuses to load both into one process:
whichever comes second fails with "TypeError: Couldn't build proto file into
descriptor pool: duplicate symbol 'inference.DataType'" (protobuf 7.36, checked
by tests/test_oip.py::test_oip_protos_and_tritonclient_cannot_share_a_process).
The test process runs modelhost servers, which import modelhost.oip, so
tritonclient lives in a spawned child: `Triton` sends it calls and gets plain
values back (dicts, numpy arrays, `TritonError`). This module imports neither
tritonclient nor modelhost at the top, so both processes can import it.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

Outputs = dict[str, tuple[str, np.ndarray[Any, Any]]]
"""Output name -> (OIP datatype, values)."""


class TritonError(Exception):
    """A call that failed: the gRPC status name (e.g. "NOT_FOUND") and the message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


class Triton:
    """Calls tritonclient.grpc.InferenceServerClient(url) in a child process."""

    def __init__(self, child: ProcessPoolExecutor, url: str) -> None:
        self.child = child
        self.url = url

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`client.method(*args, **kwargs)`; protobuf replies come back as dicts."""
        return self.child.submit(_call, self.url, method, args, kwargs).result()

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray[Any, Any]],
        *,
        datatypes: dict[str, str] | None = None,
        outputs: list[str] | None = None,
        version: str = "",
    ) -> tuple[str, Outputs]:
        """`client.infer` with numpy inputs; returns (model_version, outputs)."""
        job = self.child.submit(
            _infer, self.url, model, inputs, datatypes=datatypes, outputs=outputs, version=version
        )
        return job.result()

    def raw_infer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sends a ModelInferRequest given as a dict (bytes as bytes) through the raw stub."""
        return self.child.submit(_raw_infer, self.url, request).result()

    def compare_protos(self, descriptor_set: bytes) -> list[str]:
        """How the protos in `descriptor_set` differ from tritonclient's (empty: no difference)."""
        return self.child.submit(_compare_protos, descriptor_set).result()

    def modules(self) -> list[str]:
        """The modules loaded in the child."""
        return self.child.submit(_modules).result()


def start_child() -> ProcessPoolExecutor:
    """A fresh interpreter (spawned, not forked) for tritonclient."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


# Everything below runs in the child.

_clients: dict[str, Any] = {}


def _client(url: str) -> Any:
    from tritonclient.grpc import InferenceServerClient

    if url not in _clients:
        _clients[url] = InferenceServerClient(url)
    return _clients[url]


def _failure(error: Exception) -> TritonError:
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        return TritonError(str(error.status()).removeprefix("StatusCode."), error.message())
    return TritonError("CLIENT", f"{type(error).__name__}: {error}")


def _plain(value: Any) -> Any:
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import Message

    if isinstance(value, Message):
        return MessageToDict(value, preserving_proto_field_name=True)
    return value


def _call(url: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return _plain(getattr(_client(url), method)(*args, **kwargs))
    except Exception as error:
        raise _failure(error) from None


def _infer(
    url: str,
    model: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    *,
    datatypes: dict[str, str] | None,
    outputs: list[str] | None,
    version: str,
) -> tuple[str, Outputs]:
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.utils import np_to_triton_dtype

    try:
        request = []
        for name, array in inputs.items():
            datatype = (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype)
            tensor = InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = [InferRequestedOutput(name) for name in outputs] if outputs else None
        result = _client(url).infer(model, request, model_version=version, outputs=wanted)
    except Exception as error:
        raise _failure(error) from None
    response = result.get_response()
    return response.model_version, {
        out.name: (out.datatype, result.as_numpy(out.name)) for out in response.outputs
    }


def _raw_infer(url: str, request: dict[str, Any]) -> dict[str, Any]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(service_pb2.ModelInferRequest(**request), timeout=60)
        except grpc.RpcError as error:
            raise TritonError(error.code().name, error.details() or "") from None
    return {
        "model_version": response.model_version,
        "outputs": [_plain(out) for out in response.outputs],
        "raw_output_contents": list(response.raw_output_contents),
    }


def _compare_protos(descriptor_set: bytes) -> list[str]:
    """Checks each message, enum and service in the set against tritonclient's."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from tritonclient.grpc import service_pb2  # loads tritonclient's `inference` files

    ours = descriptor_pool.DescriptorPool()  # a pool of our own: no clash
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    for file in files.file:
        ours.Add(file)
    theirs = service_pb2.DESCRIPTOR.pool
    problems: list[str] = []
    for file in files.file:
        if file.package != "inference":
            continue
        found = ours.FindFileByName(file.name)
        for message in found.message_types_by_name.values():
            _compare_message(message, theirs, problems)
        for enum in found.enum_types_by_name.values():
            _compare_enum(enum, theirs, problems)
        for service in found.services_by_name.values():
            their_service = theirs.FindServiceByName(service.full_name)
            for method in service.methods:
                their = their_service.methods_by_name.get(method.name)
                ours_sig = (method.input_type.full_name, method.output_type.full_name)
                if (
                    their is None
                    or (their.input_type.full_name, their.output_type.full_name) != ours_sig
                ):
                    problems.append(f"rpc {service.full_name}.{method.name}")
    return problems


def _compare_message(message: Any, theirs: Any, problems: list[str]) -> None:
    try:
        their = theirs.FindMessageTypeByName(message.full_name)
    except KeyError:
        problems.append(f"message {message.full_name} is not in tritonclient")
        return
    for field in message.fields:
        other = their.fields_by_number.get(field.number)
        if other is None or _field_signature(field) != _field_signature(other):
            problems.append(f"field {message.full_name}.{field.name} = {field.number}")
    for nested in message.nested_types:
        _compare_message(nested, theirs, problems)
    for enum in message.enum_types:
        _compare_enum(enum, theirs, problems)


def _field_signature(field: Any) -> tuple[Any, ...]:
    kind = field.message_type or field.enum_type
    return (field.name, field.type, field.is_repeated, kind.full_name if kind else "")


def _compare_enum(enum: Any, theirs: Any, problems: list[str]) -> None:
    try:
        their = theirs.FindEnumTypeByName(enum.full_name)
    except KeyError:
        problems.append(f"enum {enum.full_name} is not in tritonclient")
        return
    for value in enum.values:
        other = their.values_by_name.get(value.name)
        if other is None or other.number != value.number:
            problems.append(f"enum value {enum.full_name}.{value.name} = {value.number}")


def _modules() -> list[str]:
    return sorted(sys.modules)
