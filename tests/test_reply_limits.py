"""A reply is bounded before it is built (red team round 9, M1): an OIP ModelInfer could
name one output 256 times, and each name copied the output into the reply (a 110 KB
request got a 198 MB reply, +600 MB on the server); a reply over `max_message_bytes`
was refused by gRPC only once built."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect
from modelhost.client import ModelHostClient
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.server import Settings, running

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
