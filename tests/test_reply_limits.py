"""A reply is bounded before it is built (red team round 9, M1): an OIP ModelInfer could
name one output 256 times, and each name copied the output into the reply (a 110 KB
request got a 198 MB reply, +600 MB on the server); a reply over `max_message_bytes`
was refused by gRPC only once built. What is counted is the encoded reply, its framing
included (red team round 10, L2: data within the limit, a message a few bytes over it,
got gRPC's own "Sent message larger than max")."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect, serve
from modelhost.client import ModelHostClient
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.server import Settings, oip_tensors, request_limits, running
from modelhost.server.errors import LimitExceeded
from modelhost.v1 import modelhost_pb2 as pb

SEGMENTER = "lraspp_mobilenet_v3_large"  # 21 classes per pixel: 7 times its input's bytes
ARGS = {"num_classes": 21}
LIMIT = 1 << 20


@pytest.fixture
def small_replies(
    settings: Settings,
) -> Iterator[tuple[ModelHostClient, oip_grpc.GRPCInferenceServiceStub, torch.nn.Module]]:
    """A server whose messages are at most 1 MiB, serving the segmenter as "seg"; a
    client, an OIP stub, and the in-process model."""
    model = build(SEGMENTER, {**ARGS, "weights_backbone": None})
    with running(settings) as server, ModelHostClient(server.target) as client:
        client.save_checkpoint("seg", model.state_dict())  # in chunks of 2 MiB
    limited = dataclasses.replace(settings, max_message_bytes=LIMIT)
    with (
        running(limited) as server,
        ModelHostClient(server.target, timeout=120) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        for name in ("seg", "seg2"):
            client.load_model(
                name, architecture=SEGMENTER, checkpoint="seg", architecture_args=ARGS
            )
        yield client, oip_grpc.GRPCInferenceServiceStub(channel), model


def infer(side: int, outputs: list[str]) -> oip.ModelInferRequest:
    x = np.zeros((1, 3, side, side), dtype=np.float32)
    return oip.ModelInferRequest(
        model_name="seg",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
        ],
        raw_input_contents=[x.tobytes()],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )


def test_an_output_named_twice_is_refused(
    small_replies: tuple[ModelHostClient, oip_grpc.GRPCInferenceServiceStub, torch.nn.Module],
) -> None:
    """Triton refuses a repeated output too; naming it once answers it once."""
    _, stub, model = small_replies
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer(32, ["out"] * 256))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'out' is requested more than once" in (error.details() or "")
    reply = stub.ModelInfer(infer(32, ["out"]))
    assert [o.name for o in reply.outputs] == ["out"] and len(reply.raw_output_contents) == 1
    with torch.inference_mode():
        expected = model(torch.zeros(1, 3, 32, 32))["out"].numpy()
    got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_reply_over_the_message_limit_is_refused_before_it_is_built(
    small_replies: tuple[ModelHostClient, oip_grpc.GRPCInferenceServiceStub, torch.nn.Module],
) -> None:
    """A 196 KB image whose 21 class maps take 1.4 MB: RESOURCE_EXHAUSTED from the server's
    own check (naming the bytes and the setting), not gRPC's "Sent message larger than
    max" after the reply was built; through Predict and ModelInfer alike. 96 x 96 fits,
    and the server serves on."""
    client, stub, model = small_replies
    big = np.zeros((1, 3, 128, 128), dtype=np.float32)
    words = ("reply would hold 1376256 bytes of outputs", f"limit is {LIMIT}")
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.predict("seg", big), *words)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer(128, []))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(word in (error.details() or "") for word in words), error.details()
    x = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))["out"].numpy()
    np.testing.assert_allclose(client.predict("seg2", x)["out"], expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def echoes(
    settings: Settings,
) -> Iterator[tuple[ModelHostClient, oip_grpc.GRPCInferenceServiceStub]]:
    """A server whose messages are at most 1 MiB, serving the echo model (its reply is
    its input) as "echo"; a client and an OIP stub."""
    limited = dataclasses.replace(settings, max_message_bytes=LIMIT)
    with (
        running(limited) as server,
        ModelHostClient(server.target, timeout=120) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        serve(client, "echo", architecture="echo")
        yield client, oip_grpc.GRPCInferenceServiceStub(channel)


def echo_infer(x: np.ndarray) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name="echo",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
    )


def echo_replies(x: np.ndarray) -> tuple[pb.PredictResponse, oip.ModelInferResponse]:
    """The replies the echo model's answer to `x` takes, through Predict and ModelInfer."""
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes())
    described = oip.ModelInferResponse.InferOutputTensor(
        name="output", datatype="FP32", shape=x.shape
    )
    return (
        pb.PredictResponse(model="echo", version=1, outputs={"output": tensor}),
        oip.ModelInferResponse(
            model_name="echo",
            model_version="1",
            outputs=[described],
            raw_output_contents=[tensor.data],
        ),
    )


def test_a_reply_whose_framing_passes_the_limit_is_refused_by_the_server(
    echoes: tuple[ModelHostClient, oip_grpc.GRPCInferenceServiceStub],
) -> None:
    """1 MiB - 32 bytes of outputs fit the limit; with the reply's framing (names, shape,
    tags, lengths) neither protocol's reply does. The server refuses it with its own
    message, naming the setting, not gRPC's "Sent message larger than max"; a reply
    384 bytes of data under the limit is answered, through both."""
    client, stub = echoes
    over = np.zeros((1, LIMIT // 4 - 8), np.float32)
    assert over.nbytes <= LIMIT
    assert all(reply.ByteSize() > LIMIT for reply in echo_replies(over))
    assert echo_infer(over).ByteSize() <= LIMIT  # the request itself fits
    words = (f"reply would hold {over.nbytes} bytes of outputs", f"limit is {LIMIT}")
    setting = "(max_message_bytes)"
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: client.predict("echo", {"x": over}),
        *words,
        setting,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(echo_infer(over))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(word in (error.details() or "") for word in (*words, setting)), error.details()
    under = np.random.default_rng(0).random((1, LIMIT // 4 - 96), dtype=np.float32)
    assert all(LIMIT - 400 < reply.ByteSize() <= LIMIT for reply in echo_replies(under))
    np.testing.assert_array_equal(client.predict("echo", {"x": under})["output"], under)
    reply = stub.ModelInfer(echo_infer(under))
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("output", "FP32", list(under.shape))
    ]
    assert reply.raw_output_contents[0] == under.tobytes()


def test_the_count_bounds_the_encoded_reply() -> None:
    """What `check_reply_bytes` counts is never less than the encoded reply, in Predict's
    form and OIP's: at the longest model name and version, with outputs of non-ASCII
    names and of 64 dimensions of the largest size, top_k rows with labels, and a long
    OIP request id (each of these more than the bound's slack)."""
    name, version = "m" * 128, 2**63 - 1
    outputs = {
        f"{index}.ausgänge" * (index * 16): pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT64, shape=[2**63 - 1] * (index * 21), data=bytes(index * 7)
        )
        for index in range(4)
    }
    labels = ["chat", "Hund" * 40]
    rows = [pb.TopClasses(indices=[2**60, 3], scores=[0.5, 0.25], labels=labels)] * 3
    for top_k in ([], rows):
        predict = pb.PredictResponse(model=name, version=version, outputs=outputs, top_k=top_k)
        size = predict.ByteSize()
        with pytest.raises(LimitExceeded, match="max_message_bytes"):
            request_limits.check_reply_bytes(outputs.items(), size - 1, messages=top_k)
        request_limits.check_reply_bytes(outputs.items(), size + 1024, messages=top_k)
    request_id = "ein Aufruf " * 100
    tensors, raw = oip_tensors.encode_outputs(outputs, [], 1 << 20, request_id)
    infer = oip.ModelInferResponse(
        model_name=name, model_version=str(version), id=request_id, outputs=tensors
    )
    infer.raw_output_contents.extend(raw)
    with pytest.raises(LimitExceeded, match="max_message_bytes"):
        oip_tensors.encode_outputs(outputs, [], infer.ByteSize() - 1, request_id)
    oip_tensors.encode_outputs(outputs, [], infer.ByteSize() + 1024, request_id)
