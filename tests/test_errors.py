"""Bad input gets a clear status and message, nothing is stored, and the server keeps serving."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import expect, images, reference, resnet18, serve
from modelhost.client import ModelHostClient
from modelhost.server import Server
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

BAD_NAMES = ["", "a/b", "../etc", "..", "x" * 129, "a b", ".hidden", "name\x00"]


@pytest.fixture
def still_serving(client: ModelHostClient, served_resnet: torch.nn.Module) -> Callable[[], None]:
    """Asserts the server answers a valid Predict correctly (call it after each bad input)."""
    x = images(1)
    expected = reference(served_resnet, x)

    def check() -> None:
        np.testing.assert_array_equal(client.predict("r18", x), expected)

    return check


def raw(client: ModelHostClient, method: str, request: Any) -> grpc.RpcError:
    """Calls the stub directly (bypassing client-side checks); returns the error it raises."""
    with grpc.insecure_channel(client.target) as channel, pytest.raises(grpc.RpcError) as caught:
        getattr(pb_grpc.ModelHostStub(channel), method)(request)
    return caught.value


def store_files(server: Server) -> list[str]:
    root = server.settings.store
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_unknown_names_are_not_found(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    NF = grpc.StatusCode.NOT_FOUND
    expect(NF, lambda: client.predict("nope", images(1)), "nope")
    expect(NF, lambda: client.predict("r18", images(1), version=9), "version 9")
    expect(NF, lambda: client.get_model("nope"))
    expect(NF, lambda: client.unload_model("nope"))
    expect(NF, lambda: client.snapshot("nope", "snap"))
    expect(NF, lambda: client.download_checkpoint("nope"), "nope")
    expect(NF, lambda: client.get_checkpoint("nope"))
    expect(NF, lambda: client.delete_checkpoint("nope"))
    expect(NF, lambda: client.load_model("m", architecture="resnet18", checkpoint="nope"), "nope")
    still_serving()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_names_are_invalid(
    client: ModelHostClient, server: Server, still_serving: Callable[[], None], name: str
) -> None:
    before = store_files(server)
    IA = grpc.StatusCode.INVALID_ARGUMENT
    expect(IA, lambda: client.save_checkpoint(name, b"\x00" * 10), "name")
    expect(IA, lambda: client.download_checkpoint(name), "name")
    expect(IA, lambda: client.load_model(name, architecture="resnet18", checkpoint="r18-weights"))
    expect(IA, lambda: client.load_model("ok", architecture="resnet18", checkpoint=name))
    expect(IA, lambda: client.predict(name, images(1)), "name")
    expect(IA, lambda: client.snapshot("r18", name), "name")
    assert store_files(server) == before
    still_serving()


def test_bad_tensors_are_invalid(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    x = images(1)
    expect(IA, lambda: client.predict("r18", x.astype(np.int64)), "dtype", "int64")
    expect(IA, lambda: client.predict("r18", x[0]), "shape")  # rank 3
    expect(IA, lambda: client.predict("r18", x[:, :2]), "shape")  # 2 channels
    short = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 3, 32, 32], data=x.tobytes()[:-4])
    expect(IA, lambda: client.predict("r18", {"input": short}), "bytes")
    no_type = pb.Tensor(shape=[1], data=b"\x00" * 4)
    expect(IA, lambda: client.predict("r18", {"input": no_type}), "dtype")
    negative = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 3], data=b"")
    expect(IA, lambda: client.predict("r18", {"input": negative}), "negative")
    huge = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1 << 40, 1 << 40], data=b"")
    expect(IA, lambda: client.predict("r18", {"input": huge}), "too large")
    with pytest.raises(ValueError):
        client.predict("r18", {})  # the client refuses; the server does too:
    err = raw(client, "Predict", pb.PredictRequest(model="r18"))
    assert err.code() == IA and "no inputs" in err.details()
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    serve(client, "mlp", mlp, architecture="tiny_mlp")
    expect(IA, lambda: client.predict("mlp", np.zeros((2, 5), np.float32)), "rejected", "shape")
    assert client.predict("mlp", np.zeros((2, 4), np.float32)).shape == (2, 3)
    still_serving()


def test_bad_architectures_and_arguments(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    load = client.load_model
    expect(IA, lambda: load("m", architecture="resnet9000", checkpoint="r18-weights"), "resnet9000")
    bad_json = pb.LoadModelRequest(
        name="m",
        architecture="resnet18",
        checkpoint="r18-weights",
        architecture_args={"num_classes": "{"},
    )
    err = raw(client, "LoadModel", bad_json)
    assert err.code() == IA and "JSON" in err.details()
    ten_classes = {"num_classes": 10}
    other_gpu = "cuda:7" if torch.cuda.is_available() else "cuda"
    refused: list[tuple[dict[str, Any], str]] = [  # LoadModel options of resnet18, the words
        ({"architecture_args": {"no_such_arg": 1}}, "no_such_arg"),
        ({"architecture_args": {"num_classes": "ten"}}, "resnet18"),
        ({"architecture_args": ten_classes, "device": "tpu"}, "device"),
        ({"architecture_args": ten_classes, "device": "cpu:1"}, "device"),
        ({"architecture_args": ten_classes, "device": other_gpu}, "device"),
        ({"architecture_args": {"weights": "DEFAULT"}}, "weights field"),
        (
            {"architecture_args": ten_classes, "batching": {"max_queue_delay_us": 1 << 40}},
            "max_queue_delay_us",
        ),
        ({"architecture_args": ten_classes, "dtype": "int8"}, "int8"),
        ({"architecture_args": ten_classes, "batching": {"max_batch_size": -1}}, "batching"),
    ]
    for options, words in refused:
        expect(
            IA,
            partial(load, "m", architecture="resnet18", checkpoint="r18-weights", **options),
            words,
        )
    assert [m.name for m in client.list_models()] == ["r18"]
    still_serving()


def test_checkpoint_that_does_not_fit_names_the_keys(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    load = client.load_model
    # 10-class weights into a 1000-class model: shape mismatch on fc.
    expect(
        IA,
        lambda: load("m", architecture="resnet18", checkpoint="r18-weights"),
        "fc.weight",
        "[10, 512]",
        "[1000, 512]",
    )
    state = resnet18().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    client.save_checkpoint("partial", state)
    expect(
        IA,
        lambda: load(
            "m",
            architecture="resnet18",
            checkpoint="partial",
            architecture_args={"num_classes": 10},
        ),
        "missing keys: fc.bias",
        "unexpected keys: extra.weight",
    )
    expect(IA, lambda: load("m", architecture="vgg11", checkpoint="r18-weights"), "missing keys")
    info = load(
        "loose",
        architecture="resnet18",
        checkpoint="partial",
        architecture_args={"num_classes": 10},
        strict=False,
    )
    assert info.missing_keys == ("fc.bias",) and info.unexpected_keys == ("extra.weight",)
    assert client.predict("loose", images(1)).shape == (1, 10)
    still_serving()


def test_existing_checkpoint_without_overwrite(
    client: ModelHostClient, server: Server, still_serving: Callable[[], None]
) -> None:
    before = client.get_checkpoint("r18-weights")
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: client.save_checkpoint("r18-weights", resnet18(seed=5).state_dict()),
        "r18-weights",
        "overwrite",
    )
    assert client.get_checkpoint("r18-weights") == before
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: client.load_model(
            "r18",
            architecture="resnet18",
            checkpoint="r18-weights",
            architecture_args={"num_classes": 10},
            version=1,
        ),
        "version 1",
    )
    still_serving()


def test_files_that_are_not_checkpoints(
    client: ModelHostClient, server: Server, still_serving: Callable[[], None]
) -> None:
    before = store_files(server)
    IA = grpc.StatusCode.INVALID_ARGUMENT
    expect(IA, lambda: client.save_checkpoint("junk", b"hello world" * 1000), "not a checkpoint")
    expect(IA, lambda: client.save_checkpoint("empty", b""), "not a checkpoint")
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    expect(IA, lambda: client.save_checkpoint("list", buffer.getvalue()), "no model weights")
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "notes": "no weights"}, buffer)
    expect(IA, lambda: client.save_checkpoint("nowts", buffer.getvalue()), "epoch")
    truncated = io.BytesIO()
    torch.save(resnet18().state_dict(), truncated)
    expect(IA, lambda: client.save_checkpoint("cut", truncated.getvalue()[:100_000]))
    bad_st = (50).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [2], "data_offsets'
    expect(IA, lambda: client.save_checkpoint("badst", bad_st + b" " * 64), "safetensors")
    assert store_files(server) == before
    assert [c.name for c in client.list_checkpoints()] == ["r18-weights"]
    still_serving()


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(
    client: ModelHostClient, server: Server, tmp_path: Path, still_serving: Callable[[], None]
) -> None:
    marker = tmp_path / "pwned"
    before = store_files(server)
    payloads = []
    buffer = io.BytesIO()
    torch.save({"weight": Exploit(marker)}, buffer)
    payloads.append(buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(Exploit(marker), buffer, _use_new_zipfile_serialization=False)
    payloads.append(buffer.getvalue())
    payloads.append(pickle.dumps(Exploit(marker), protocol=2))
    for payload in payloads:
        expect(
            grpc.StatusCode.FAILED_PRECONDITION, partial(client.save_checkpoint, "evil", payload)
        )
        assert not marker.exists()
    assert store_files(server) == before
    still_serving()


def test_out_of_memory_leaves_other_models_serving(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    RE = grpc.StatusCode.RESOURCE_EXHAUSTED
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    client.save_checkpoint("no-head", state)
    # 2**37 classes: the head alone would need 256 TiB.
    expect(
        RE,
        lambda: client.load_model(
            "huge",
            architecture="resnet18",
            checkpoint="no-head",
            architecture_args={"num_classes": 1 << 37},
            strict=False,
        ),
        "out of memory",
    )
    assert [m.name for m in client.list_models()] == ["r18"]
    serve(client, "hog", architecture="memory_hog")
    ask = np.full((1, 1), 1 << 20, dtype=np.float32)  # a petabyte
    expect(RE, lambda: client.predict("hog", ask), "out of memory")
    np.testing.assert_array_equal(client.predict("hog", np.zeros((1, 1), np.float32)), [[0.0]])
    still_serving()


def test_malformed_upload_streams(
    client: ModelHostClient, server: Server, still_serving: Callable[[], None]
) -> None:
    before = store_files(server)
    data = io.BytesIO()
    torch.save(resnet18().state_dict(), data)
    payload = data.getvalue()

    def call(messages: list[pb.SaveCheckpointRequest]) -> grpc.RpcError:
        return raw(client, "SaveCheckpoint", iter(messages))

    def header(**upload: Any) -> pb.SaveCheckpointRequest:
        return pb.SaveCheckpointRequest(
            header=pb.SaveCheckpointHeader(name="w", upload=pb.Upload(**upload))
        )

    chunk = pb.SaveCheckpointRequest(chunk=payload)
    err = call([chunk])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in err.details()
    err = call([])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = call([header(), header()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in err.details()
    err = call([header(size_bytes=len(payload) + 1), chunk])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "announced" in err.details()
    err = call([header(sha256="0" * 64), chunk])
    assert err.code() == grpc.StatusCode.DATA_LOSS and "sha256" in err.details()
    no_source = pb.SaveCheckpointRequest(header=pb.SaveCheckpointHeader(name="w"))
    err = call([no_source, chunk])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "upload or snapshot" in err.details()
    assert store_files(server) == before
    still_serving()


def test_hostile_load_model_fields_are_invalid_argument(
    client: ModelHostClient, still_serving: Callable[[], None]
) -> None:
    """JSON nested past the recursion limit, an integer of over 4300 digits (Python's
    int max str digits) and a warm-up shape of 2**40 rows answered INTERNAL (or tried
    to allocate it); each is INVALID_ARGUMENT, with a short message."""

    def load(**fields: Any) -> grpc.RpcError:
        request = pb.LoadModelRequest(name="m", architecture="tiny_mlp", checkpoint="r18-weights")
        request.MergeFrom(pb.LoadModelRequest(**fields))
        return raw(client, "LoadModel", request)

    for text in ["[" * 100_000 + "]" * 100_000, "[" * 33 + "]" * 33, "9" * 5000]:
        err = load(architecture_args={"features": text})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "architecture argument features=" in err.details()
        assert len(err.details()) < 500
    err = load(warmup_shape=[2**40, 12])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "warmup_shape [1099511627776, 12]" in err.details()
    assert "max_tensor_elements" in err.details()
    assert [m.name for m in client.list_models()] == ["r18"]
    still_serving()


def test_metadata_limit_counts_utf8_bytes(
    client: ModelHostClient, server: Server, still_serving: Callable[[], None]
) -> None:
    """4 KiB per entry is bytes: "é" * 3000 is 3000 characters but 6000 bytes (the limit
    counted characters: 64 such entries of 16 KiB each were stored)."""
    before = store_files(server)
    weights = {"w": torch.ones(2)}
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.save_checkpoint("meta", weights, metadata={"note": "é" * 3000}),
        "'note' is 6004 bytes",
    )
    many = {f"k{i}": "é" * 8000 for i in range(64)}
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.save_checkpoint("meta", weights, metadata=many),
    )
    assert store_files(server) == before
    fits = {"note": "é" * 2046}  # 4 + 4092 bytes: exactly the limit
    assert client.save_checkpoint("meta", weights, metadata=fits).metadata == fits
    still_serving()
