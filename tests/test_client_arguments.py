"""The client library's answers to a caller's mistakes (UX review 16, F3): an argument of
the wrong type raises `TypeError`, and a call on a closed client `ValueError`, before
anything is sent, with a message that names the argument (the failures of calls made
raise `ModelHostError`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from helpers.models import tiny_mlp
from helpers.processes import free_port
from modelhost.client import AsyncModelHostClient, ModelHostClient
from modelhost.client.load_options import load_request
from modelhost.server import Server
from modelhost.v1 import modelhost_pb2 as pb

SUPPORTED = (
    "(supported: float32, float16, bfloat16, float64, uint8, int8, int16, int32, int64, bool)"
)
X = np.zeros((1, 3, 32, 32), np.float32)


@pytest.fixture
def nowhere() -> Iterator[ModelHostClient]:
    """A client of a port nothing listens on: a call that reached the channel would
    fail with UNAVAILABLE."""
    with ModelHostClient(f"127.0.0.1:{free_port()}", timeout=5) as client:
        yield client


MISTAKES: list[tuple[str, Callable[[ModelHostClient], Any], str]] = [
    (
        "images-str",
        lambda c: c.predict("m", images="cat.jpg"),
        "images must be a list of image paths or bytes, not a single str: images=['cat.jpg']",
    ),
    (
        "images-array",
        lambda c: c.predict("m", images=[X]),  # type: ignore[list-item]
        "images[0] must be a path or the encoded bytes of a JPEG/PNG image, not ndarray",
    ),
    (
        "inputs-path",
        lambda c: c.predict("m", "batch.npy"),
        "inputs must be an array (numpy or torch), not str 'batch.npy': load a .npy file "
        "first (np.load)",
    ),
    (
        "uint16",
        lambda c: c.predict("m", {"x": X.astype(np.uint16)}),
        f"input 'x': numpy dtype uint16 is not supported {SUPPORTED}",
    ),
    (
        "complex64",
        lambda c: c.predict("m", X.astype(np.complex64)),
        f"inputs: numpy dtype complex64 is not supported {SUPPORTED}",
    ),
    (
        "torch-complex",
        lambda c: c.predict("m", torch.zeros(2, dtype=torch.complex64)),
        f"inputs: torch dtype torch.complex64 is not supported {SUPPORTED}",
    ),
    (
        "metadata-int",
        lambda c: c.save_checkpoint("w", b"x", metadata={"epoch": 3}),  # type: ignore[dict-item]
        "metadata values must be str (got int for 'epoch'): pass str(value), e.g. {'epoch': '3'}",
    ),
    (
        "metadata-list",
        lambda c: c.save_checkpoint("w", b"x", metadata=["epoch=3"]),  # type: ignore[arg-type]
        "metadata must be a dict of strings, not a list",
    ),
    (
        "architecture_args-json",
        lambda c: c.load_model("m", architecture_args='{"num_classes": 10}'),  # type: ignore[arg-type]
        "architecture_args must be a dict of the builder's keyword arguments, e.g. "
        "{'num_classes': 10}, not a str (json.loads it first)",
    ),
    (
        "architecture_args-set",
        lambda c: c.load_model("m", architecture_args={"layers": {1, 2}}),
        "architecture_args['layers']: Object of type set is not JSON serializable",
    ),
    (
        "labels-str",
        lambda c: c.load_model("m", labels="cat"),
        "labels must be a list, e.g. labels=['cat', 'dog'], not a str",
    ),
    (
        "warmup_shape-str",
        lambda c: c.load_model("m", warmup_shape="8,3,224,224"),  # type: ignore[arg-type]
        "warmup_shape must be a list, e.g. warmup_shape=(8, 3, 224, 224), not a str",
    ),
    (
        "preprocessing-str",
        lambda c: c.load_model("m", preprocessing='{"resize": 256}'),  # type: ignore[arg-type]
        "preprocessing must be a dict (its keys: resize, crop, mean, std, weights), not a str",
    ),
    (
        "dtype-int",
        lambda c: c.load_model("m", dtype=16),  # type: ignore[arg-type]
        "dtype: a dtype is a name such as 'float16' (or torch.float16), not int 16",
    ),
    (
        "compile-bool",
        lambda c: c.load_model("m", compile=True),  # type: ignore[arg-type]
        "compile must be a str, not a bool (True)",
    ),
]


@pytest.mark.parametrize(
    ("call", "message"),
    [pytest.param(call, message, id=name) for name, call, message in MISTAKES],
)
def test_a_wrong_argument_is_a_type_error_that_names_it(
    nowhere: ModelHostClient, call: Callable[[ModelHostClient], Any], message: str
) -> None:
    with pytest.raises(TypeError) as raised:
        call(nowhere)
    assert str(raised.value).startswith(message), raised.value


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"version": 2**64 + 1}, "version 18446744073709551617 is out of range for an int64"),
        ({"version": -(2**64) + 1}, "version -18446744073709551615 is out of range for an int64"),
        ({"top_k": 2**32 + 2}, "top_k 4294967298 is out of range for an int32"),
        ({"top_k": 2**31}, "top_k 2147483648 is out of range for an int32"),
    ],
    ids=["version-wraps-to-1", "version-negative", "top_k-wraps-to-2", "top_k-int32"],
)
def test_an_integer_out_of_range_is_a_value_error_not_another_number(
    nowhere: ModelHostClient, arguments: dict[str, int], message: str
) -> None:
    """Red team 15, F5: predict wrote version and top_k as 64-bit varints, wrapped: version
    2**64 + 1 was answered by version 1, top_k 2**32 + 2 gave the top 2 classes."""
    with pytest.raises(ValueError, match="out of range") as raised:
        nowhere.predict("m", X, **arguments)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_a_numpy_integer_version_is_taken_as_protobuf_takes_it(server: Server) -> None:
    with ModelHostClient(server.target, timeout=30) as client:
        client.save_checkpoint("w", tiny_mlp().state_dict())
        client.load_model("m", architecture="tiny_mlp", checkpoint="w")
        x = np.ones((1, 4), np.float32)
        assert client.predict("m", x, version=np.int64(1)).shape == (1, 3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="version must be an int, not float"):
            client.predict("m", x, version=1.0)  # type: ignore[arg-type]


def test_a_torch_dtype_or_device_is_taken_by_its_name(server: Server) -> None:
    """torch users pass torch.float16 (as they do for a builder's input_dtype) and
    torch.device("cuda", 1); numpy dtypes are taken too."""
    dtypes: list[Any] = [torch.float16, np.float16, np.dtype("float16"), "float16", "torch.float16"]
    for dtype in dtypes:
        request = load_request("m", "", "", {"dtype": dtype, "autocast": torch.bfloat16})
        assert (request.dtype, request.autocast) == (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16)
    with ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("w", tiny_mlp().state_dict())
        info = client.load_model(
            "m",
            architecture="tiny_mlp",
            checkpoint="w",
            dtype=torch.float16,
            device=torch.device("cpu"),
        )
    assert (info.dtype, info.device) == ("float16", "cpu")
    assert load_request("m", "", "", {"device": torch.device("cuda", 1)}).device == "cuda:1"


def test_a_closed_client_says_so(server: Server) -> None:
    """Not gRPC's "Cannot invoke RPC on closed channel!" / `grpc.aio.UsageError`."""
    client = ModelHostClient(server.target, timeout=60)
    assert client.health() == "SERVING"
    client.close()
    with pytest.raises(ValueError, match=r"^this ModelHostClient is closed \(close\(\)"):
        client.predict("m", X)
    with pytest.raises(ValueError, match="this ModelHostClient is closed"):
        client.save_checkpoint("w", {"w": torch.zeros(1)})
    client.close()  # twice is fine

    async def use_after_close() -> None:
        async with AsyncModelHostClient(server.target, timeout=60) as aclient:
            assert await aclient.health() == "SERVING"
        with pytest.raises(ValueError, match=r"^this AsyncModelHostClient is closed"):
            await aclient.list_models()

    asyncio.run(use_after_close())
