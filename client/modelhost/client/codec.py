"""Tensor codec: numpy arrays and torch tensors to and from `modelhost.v1.Tensor`.

A `Tensor` is a dtype, a shape and the raw little-endian bytes in C order. Decoding
checks that the byte length matches the shape before anything is allocated.
torch is imported only by the torch functions, so numpy-only callers never need it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from modelhost.v1 import modelhost_pb2 as pb

if TYPE_CHECKING:
    import torch

DataType: TypeAlias = pb.DataType.ValueType
"""A `modelhost.v1.DataType` enum value."""

ITEMSIZE: dict[DataType, int] = {
    pb.DATA_TYPE_FLOAT32: 4,
    pb.DATA_TYPE_FLOAT16: 2,
    pb.DATA_TYPE_BFLOAT16: 2,
    pb.DATA_TYPE_FLOAT64: 8,
    pb.DATA_TYPE_UINT8: 1,
    pb.DATA_TYPE_INT8: 1,
    pb.DATA_TYPE_INT16: 2,
    pb.DATA_TYPE_INT32: 4,
    pb.DATA_TYPE_INT64: 8,
    pb.DATA_TYPE_BOOL: 1,
}

_NAMES: dict[DataType, str] = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_BFLOAT16: "bfloat16",
    pb.DATA_TYPE_FLOAT64: "float64",
    pb.DATA_TYPE_UINT8: "uint8",
    pb.DATA_TYPE_INT8: "int8",
    pb.DATA_TYPE_INT16: "int16",
    pb.DATA_TYPE_INT32: "int32",
    pb.DATA_TYPE_INT64: "int64",
    pb.DATA_TYPE_BOOL: "bool",
}
_BY_NAME: dict[str, DataType] = {name: code for code, name in _NAMES.items()}
_BY_NAME.update(
    {
        "fp32": pb.DATA_TYPE_FLOAT32,
        "fp16": pb.DATA_TYPE_FLOAT16,
        "half": pb.DATA_TYPE_FLOAT16,
        "bf16": pb.DATA_TYPE_BFLOAT16,
        "float": pb.DATA_TYPE_FLOAT32,
        "double": pb.DATA_TYPE_FLOAT64,
    }
)

# numpy has no bfloat16; arrays of ml_dtypes.bfloat16 are recognised by name.
_NUMPY: dict[DataType, np.dtype[Any]] = {
    code: np.dtype(name).newbyteorder("<")
    for code, name in _NAMES.items()
    if code != pb.DATA_TYPE_BFLOAT16
}
_FROM_NUMPY: dict[str, DataType] = {dt.name: code for code, dt in _NUMPY.items()}
_FROM_NUMPY["bfloat16"] = pb.DATA_TYPE_BFLOAT16

SUPPORTED = ", ".join(_NAMES.values())
"""The dtypes a tensor may have, for error messages."""

FLOATING = frozenset(
    {pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16, pb.DATA_TYPE_FLOAT64}
)


class TensorFields(Protocol):
    """What decoding reads of a tensor: a `pb.Tensor`, or a view the server parsed
    from the received bytes without copying them (`wire.TensorView`)."""

    @property
    def dtype(self) -> DataType: ...

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def data(self) -> bytes | memoryview: ...


MAX_ELEMENTS = 2**62
MAX_RANK = 64  # dimensions: more is no tensor a model takes, only work for the server
"""No tensor has more elements than this (torch's strides must fit an int64)."""


class TensorError(ValueError):
    """A tensor message that cannot be decoded (bad dtype, shape or byte length)."""


def dtype_name(code: DataType) -> str:
    """`DATA_TYPE_FLOAT32` -> "float32"; "unspecified" for 0."""
    return _NAMES.get(code, "unspecified")


def parse_dtype(name: str) -> DataType:
    """ "float32", "fp16", "bf16", ... -> a `DataType` value; raises ValueError if unknown.
    A torch or numpy dtype is taken by its name (torch.float16, np.float16), without
    importing torch; TypeError for anything else that is not a str."""
    if not isinstance(name, str):
        name = _dtype_name(name)
    try:
        return _BY_NAME[name.strip().lower().removeprefix("torch.")]
    except KeyError:
        known = ", ".join(sorted(_NAMES.values()))
        raise ValueError(f"unknown dtype {name!r}; expected one of {known}") from None


def _dtype_name(dtype: object) -> str:
    """The name of a torch dtype (`str(torch.float16)` is "torch.float16"), a numpy dtype
    or numpy scalar type; TypeError for any other object."""
    if type(dtype).__module__ == "torch":  # torch.dtype, named without importing torch
        return str(dtype)
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    raise TypeError(
        f"a dtype is a name such as 'float16' (or torch.float16), not {type(dtype).__name__} "
        f"{dtype!r:.40}"
    )


def element_count(tensor: TensorFields, *, what: str = "tensor") -> int:
    """Validates dtype and shape (not the bytes); returns the element count."""
    if tensor.dtype not in ITEMSIZE:
        raise TensorError(f"{what}: dtype {tensor.dtype} is not a supported DataType")
    if len(tensor.shape) > MAX_RANK:
        raise TensorError(f"{what}: {len(tensor.shape)} dimensions; at most {MAX_RANK}")
    if any(dim < 0 for dim in tensor.shape):
        raise TensorError(f"{what}: shape {list(tensor.shape)} has a negative dimension")
    if math.prod(dim for dim in tensor.shape if dim) > MAX_ELEMENTS:
        raise TensorError(f"{what}: shape {list(tensor.shape)} is too large to lay out")
    return math.prod(tensor.shape)


def check(
    tensor: TensorFields, *, what: str = "tensor", data: bytes | memoryview | None = None
) -> int:
    """Validates dtype, shape and byte length; returns the element count.

    Pass `data` when you already hold `tensor.data`: each read of the field copies it.
    """
    count = element_count(tensor, what=what)
    if data is None:
        data = tensor.data
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    expected = count * ITEMSIZE[tensor.dtype]
    if size != expected:
        raise TensorError(
            f"{what}: {dtype_name(tensor.dtype)} shape {list(tensor.shape)} needs "
            f"{expected} bytes, got {size}"
        )
    return count


Raw = tuple[DataType, tuple[int, ...], memoryview | bytes]
"""A tensor as (dtype, shape, its little-endian bytes in C order)."""


def from_numpy(array: np.ndarray[Any, Any]) -> pb.Tensor:
    """Encodes a numpy array (any byte order or layout)."""
    return _message(numpy_raw(array))


def numpy_supported(dtype: np.dtype[Any]) -> bool:
    """Whether arrays of `dtype` can be sent (`SUPPORTED`: bfloat16 by ml_dtypes' name)."""
    return dtype.name in _FROM_NUMPY


def numpy_raw(array: np.ndarray[Any, Any]) -> Raw:
    """The array's `Raw` form: a view of its memory unless its layout or byte order differ."""
    code = _FROM_NUMPY.get(array.dtype.name)
    if code is None:
        raise TypeError(f"numpy dtype {array.dtype} is not supported (supported: {SUPPORTED})")
    if code != pb.DATA_TYPE_BFLOAT16:
        array = array.astype(_NUMPY[code], copy=False)
    flat = np.ascontiguousarray(array).reshape(-1)
    return code, tuple(array.shape), flat.view(np.uint8).data


def to_numpy(tensor: TensorFields) -> np.ndarray[Any, Any]:
    """Decodes into a writable numpy array; bfloat16 becomes float32 (exactly)."""
    data = tensor.data
    check(tensor, data=data)
    shape = tuple(tensor.shape)
    if tensor.dtype == pb.DATA_TYPE_BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2").astype("<u4") << 16
        return bits.view("<f4").astype(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=_NUMPY[tensor.dtype]).reshape(shape).copy()


@functools.cache
def _torch_dtypes() -> dict[DataType, torch.dtype]:
    import torch

    return {
        pb.DATA_TYPE_FLOAT32: torch.float32,
        pb.DATA_TYPE_FLOAT16: torch.float16,
        pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
        pb.DATA_TYPE_FLOAT64: torch.float64,
        pb.DATA_TYPE_UINT8: torch.uint8,
        pb.DATA_TYPE_INT8: torch.int8,
        pb.DATA_TYPE_INT16: torch.int16,
        pb.DATA_TYPE_INT32: torch.int32,
        pb.DATA_TYPE_INT64: torch.int64,
        pb.DATA_TYPE_BOOL: torch.bool,
    }


def torch_dtype(code: DataType) -> torch.dtype:
    """A `DataType` value -> the torch dtype."""
    return _torch_dtypes()[code]


def sendable(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` have a `DataType` (can travel in a `Tensor`)."""
    return any(candidate == dtype for candidate in _torch_dtypes().values())


def data_type(dtype: torch.dtype) -> DataType:
    """A torch dtype -> its `DataType` value; raises TypeError if unsupported."""
    for code, candidate in _torch_dtypes().items():
        if candidate == dtype:
            return code
    raise TypeError(f"torch dtype {dtype} is not supported (supported: {SUPPORTED})")


def from_torch(tensor: torch.Tensor) -> pb.Tensor:
    """Encodes a torch tensor (any device or layout) without a round trip through float."""
    return _message(torch_raw(tensor))


def torch_raw(tensor: torch.Tensor) -> Raw:
    """The tensor's `Raw` form (copied to the CPU first, and made contiguous if it is not)."""
    import torch

    code = data_type(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    array = flat.numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return code, tuple(tensor.shape), array.reshape(-1).view(np.uint8).data


def to_torch(tensor: TensorFields, *, what: str = "tensor") -> torch.Tensor:
    """Decodes without copying: the result shares memory with the message's bytes.

    Treat it as read-only (copy it before writing in place).
    """
    import torch

    data = tensor.data
    count = check(tensor, what=what, data=data)
    dtype = torch_dtype(tensor.dtype)
    if count == 0:
        return torch.empty(tuple(tensor.shape), dtype=dtype)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write
        flat = torch.frombuffer(data, dtype=dtype, count=count)
    return flat.view(tuple(tensor.shape))


def encode(value: Any) -> pb.Tensor:
    """Encodes a numpy array, a torch tensor, or anything `np.asarray` accepts."""
    return value if isinstance(value, pb.Tensor) else _message(raw(value))


def raw(value: Any) -> Raw:
    """`encode`'s dtype, shape and bytes without building a message (no copy when the
    value is already C-ordered and little-endian)."""
    if isinstance(value, pb.Tensor):
        return value.dtype, tuple(value.shape), value.data
    if type(value).__module__.startswith("torch"):
        return torch_raw(value)
    return numpy_raw(np.asarray(value))


def _message(tensor: Raw) -> pb.Tensor:
    code, shape, data = tensor
    return pb.Tensor(dtype=code, shape=shape, data=bytes(data))


def is_torch(value: Any) -> bool:
    """Whether `value` is a torch tensor (without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")
