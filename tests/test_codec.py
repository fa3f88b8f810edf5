"""The tensor codec: every dtype round-trips exactly; malformed tensors are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelhost.client import codec
from modelhost.v1 import modelhost_pb2 as pb

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_round_trip(dtype: torch.dtype) -> None:
    source = (torch.randn(2, 3, 4) * 50).to(dtype)
    message = codec.from_torch(source)
    assert list(message.shape) == [2, 3, 4]
    assert torch.equal(codec.to_torch(message), source)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool"]
)
def test_numpy_round_trip(dtype: str) -> None:
    source = (np.random.default_rng(0).standard_normal((3, 5)) * 50).astype(dtype)
    back = codec.to_numpy(codec.from_numpy(source))
    assert back.dtype == source.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, source)


def test_layouts_and_byte_orders_are_normalised() -> None:
    source = np.arange(12, dtype=">i4").reshape(3, 4).T  # big-endian, not contiguous
    message = codec.from_numpy(source)
    assert message.data == np.ascontiguousarray(source.astype("<i4")).tobytes()
    np.testing.assert_array_equal(codec.to_numpy(message), source)
    transposed = torch.arange(6.0).reshape(2, 3).T
    assert torch.equal(codec.to_torch(codec.from_torch(transposed)), transposed)


def test_bfloat16_decodes_to_float32_exactly_without_torch() -> None:
    source = torch.randn(7).to(torch.bfloat16)
    back = codec.to_numpy(codec.from_torch(source))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, source.float().numpy())


def test_scalars_and_empty_tensors() -> None:
    # A numpy scalar, not an ndarray: from_numpy takes it as a 0-d array.
    assert codec.to_numpy(codec.from_numpy(np.float32(3.5))) == np.float32(3.5)  # type: ignore[arg-type]
    empty = codec.from_torch(torch.empty(0, 3))
    assert codec.to_torch(empty).shape == (0, 3)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (pb.Tensor(shape=[1], data=b"\0" * 4), "dtype"),
        (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2], data=b"\0" * 4), "needs 8 bytes"),
        (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-2], data=b""), "negative"),
        (pb.Tensor(dtype=pb.DataType.ValueType(99), shape=[1], data=b"\0"), "dtype"),
    ],
)
def test_malformed_tensors(message: pb.Tensor, words: str) -> None:
    with pytest.raises(codec.TensorError, match=words):
        codec.to_numpy(message)


def test_dtype_names() -> None:
    assert codec.parse_dtype("bf16") == pb.DATA_TYPE_BFLOAT16
    assert codec.parse_dtype("torch.float16") == pb.DATA_TYPE_FLOAT16
    assert codec.dtype_name(pb.DATA_TYPE_INT64) == "int64"
    with pytest.raises(ValueError, match="unknown dtype"):
        codec.parse_dtype("complex64")


def test_client_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, modelhost.client, modelhost.cli; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
