"""Open Inference Protocol tensors to and from `modelhost.v1.Tensor`.

OIP names data types with strings ("FP32", "INT64", ...) and carries elements
either as raw little-endian bytes (`raw_input_contents`, one entry per input) or
as typed repeated fields (`InferInputTensor.contents`). Both become a
`modelhost.v1.Tensor`; raw bytes are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from modelhost.client import codec, wire
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import model_config_pb2 as mc
from modelhost.server.errors import InvalidArgument, InvalidInput
from modelhost.server.inference import InputSpec
from modelhost.server.request_limits import check_element_count, check_reply_bytes
from modelhost.v1 import modelhost_pb2 as pb

C = TypeVar("C", mc.ModelInput, mc.ModelOutput)

DATATYPES: dict[str, codec.DataType] = {
    "BOOL": pb.DATA_TYPE_BOOL,
    "UINT8": pb.DATA_TYPE_UINT8,
    "INT8": pb.DATA_TYPE_INT8,
    "INT16": pb.DATA_TYPE_INT16,
    "INT32": pb.DATA_TYPE_INT32,
    "INT64": pb.DATA_TYPE_INT64,
    "FP16": pb.DATA_TYPE_FLOAT16,
    "BF16": pb.DATA_TYPE_BFLOAT16,
    "FP32": pb.DATA_TYPE_FLOAT32,
    "FP64": pb.DATA_TYPE_FLOAT64,
}
NAMES: dict[codec.DataType, str] = {code: name for name, code in DATATYPES.items()}
CONFIG_TYPES: dict[str, mc.DataType.ValueType] = {
    name: mc.DataType.Value(f"TYPE_{name}") for name in DATATYPES
}
# The typed `contents` field of each data type, and the element type it holds.
# FP16 and BF16 have none: they travel as raw bytes only.
_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "UINT8": ("uint_contents", "<u1"),
    "INT8": ("int_contents", "<i1"),
    "INT16": ("int_contents", "<i2"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
}
# The element type of each typed `contents` field as protobuf holds it.
_FIELD_TYPES: dict[str, str] = {
    "bool_contents": "bool",
    "int_contents": "<i4",
    "int64_contents": "<i8",
    "uint_contents": "<u4",
    "fp32_contents": "<f4",
    "fp64_contents": "<f8",
}


def datatype_name(dtype: torch.dtype) -> str:
    """A torch dtype's OIP name, or "" when OIP cannot carry it."""
    try:
        return NAMES.get(codec.data_type(dtype), "")
    except TypeError:
        return ""


SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
"""Parameters of an input or output in Triton's shared-memory extension, which modelhost
does not implement (its SystemSharedMemory calls answer UNIMPLEMENTED)."""
SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")
MAX_TIMEOUT_US = 2**53  # a `timeout` parameter this large is no limit


def request_timeout(request: oip.ModelInferRequest) -> float | None:
    """Checks the parameters Triton gives a meaning that modelhost does not serve, which a
    client relies on: a stateful sequence, a priority, shared memory (the data would be
    somewhere else than the client reads it). Returns Triton's `timeout` parameter
    (microseconds) in seconds: the request's deadline, when sooner than the call's."""
    given = request.parameters
    sequence = [name for name in SEQUENCE if name in given]
    if sequence:
        raise InvalidArgument(
            f"sequence batching ({', '.join(sequence)}) is not supported: modelhost's models "
            "are stateless"
        )
    if "priority" in given and _number(given["priority"], "priority") != 0:
        raise InvalidArgument("request priorities are not supported (leave priority 0)")
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            if any(name in tensor.parameters for name in SHARED_MEMORY):
                raise InvalidArgument(
                    f"{kind} {tensor.name!r:.100}: the shared-memory extension is not "
                    "supported: send and receive tensors in the request and reply"
                )
    if "timeout" not in given:
        return None
    timeout = _number(given["timeout"], "timeout")
    if timeout < 0:
        raise InvalidArgument(f"timeout {timeout} is negative (microseconds)")
    return None if timeout == 0 or timeout > MAX_TIMEOUT_US else timeout / 1e6


def _number(parameter: oip.InferParameter, name: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name} must be an integer, not {kind or 'empty'}")
    return int(getattr(parameter, kind))


def decode_inputs(
    request: oip.ModelInferRequest, max_elements: int | None = None
) -> dict[str, wire.TensorView]:
    """The request's inputs as modelhost tensors (each input's bytes read once);
    InvalidInput when malformed.

    Typed contents are counted before any is converted: with `max_elements`, a request
    with more elements than that is refused (`check_element_count`, as `Host.predict` does)
    before its values are copied.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors: dict[str, wire.TensorView] = {}
    typed: list[tuple[oip.ModelInferRequest.InferInputTensor, Sequence[Any]]] = []
    elements = 0
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(
                f"input {name!r}: datatype {tensor.datatype!r} is not supported "
                f"(use one of {', '.join(DATATYPES)})"
            )
        if len(tensor.shape) > codec.MAX_RANK:
            raise InvalidInput(
                f"input {name!r}: {len(tensor.shape)} dimensions; at most {codec.MAX_RANK}"
            )
        if any(dim < 0 for dim in tensor.shape):
            raise InvalidInput(f"input {name!r}: shape {list(tensor.shape)} has a negative size")
        data: bytes | memoryview = b""
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} sets contents while raw_input_contents is used")
            data = raw[index]
        else:
            values = _typed_values(tensor)
            typed.append((tensor, values))
            elements += len(values)
        tensors[name] = wire.TensorView(dtype, list(tensor.shape), data)
    if max_elements is not None:
        check_element_count(elements, max_elements)
    for tensor, values in typed:
        tensors[tensor.name].data = _converted(tensor, values)
    return tensors


def _typed_values(
    tensor: oip.ModelInferRequest.InferInputTensor,
) -> Sequence[Any]:
    """The typed contents of an input, checked against its shape (not converted)."""
    name, datatype = tensor.name, tensor.datatype
    if datatype not in _CONTENTS:
        raise InvalidInput(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    field = _CONTENTS[datatype][0]
    values: Sequence[Any] = getattr(tensor.contents, field)
    count = math.prod(tensor.shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(tensor.shape)} needs {count} elements, "
            f"contents.{field} has {len(values)}"
        )
    return values


def _converted(tensor: oip.ModelInferRequest.InferInputTensor, values: Sequence[Any]) -> memoryview:
    """Typed contents as the little-endian bytes of the input's datatype, with no Python
    object per value: protobuf hands its array to numpy in one copy, integers narrower
    than their field are range-checked, and the bytes are a view of the array."""
    field, element = _CONTENTS[tensor.datatype]
    given = np.asarray(values, dtype=_FIELD_TYPES[field])
    array = given.astype(element, copy=False)
    if array.dtype != given.dtype and array.dtype.kind in "iu" and given.size:
        info = np.iinfo(array.dtype)
        if given.min() < info.min or given.max() > info.max:
            raise InvalidInput(
                f"input {tensor.name!r}: contents.{field} has values out of range "
                f"for {tensor.datatype}"
            )
    return array.data.cast("B")


def encode_outputs(
    outputs: Mapping[str, pb.Tensor],
    requested: Iterable[oip.ModelInferRequest.InferRequestedOutputTensor],
    max_bytes: int,
    request_id: str = "",
) -> tuple[list[oip.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """The requested outputs (all when none are named), as tensors and raw contents;
    refused if an output is named twice or if the reply, with its framing and the
    `request_id` it echoes, could take more than `max_bytes` (`check_reply_bytes`)."""
    names: list[str] = []
    for output in requested:
        if output.name not in outputs:
            raise InvalidArgument(
                f"the model has no output {output.name!r} (it has {', '.join(outputs)})"
            )
        if output.name in names:
            raise InvalidArgument(f"output {output.name!r} is requested more than once")
        if "classification" in output.parameters:
            raise InvalidArgument("the classification extension is not supported")
        names.append(output.name)
    names = names or list(outputs)
    check_reply_bytes([(name, outputs[name]) for name in names], max_bytes, [request_id])
    tensors, raw = [], []
    for name in names:
        tensor = outputs[name]
        tensors.append(
            oip.ModelInferResponse.InferOutputTensor(
                name=name, datatype=NAMES[tensor.dtype], shape=tensor.shape
            )
        )
        raw.append(tensor.data)
    return tensors, raw


def metadata(specs: Iterable[InputSpec]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    """Tensor specs (-1: any size) as OIP tensor metadata."""
    return [
        oip.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=dtype, shape=spec.shape)
        for spec in specs
        if (dtype := datatype_name(spec.dtype))
    ]


def config_tensors(kind: type[C], specs: Iterable[InputSpec], *, batched: bool) -> list[C]:
    """Tensor specs as Triton config inputs or outputs (`kind`): dims without the batch
    dimension if `batched`, else the whole shape (a model whose batch is fixed)."""
    return [
        kind(
            name=spec.name,
            data_type=CONFIG_TYPES[dtype],
            dims=spec.shape[1:] if batched else spec.shape,
        )
        for spec in specs
        if (dtype := datatype_name(spec.dtype))
    ]
