"""A tensor with a zero-size dimension holds nothing, but its other sizes still decide what
a model or a compile allocates (Swin's attention masks, a compile's zeros): it counts
against max_tensor_elements as if each zero-size dimension were one (red team 5's H1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import expect, serve
from modelhost.client import ModelHostClient
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.server import Server, Settings, running

LIMIT = 100_000


@pytest.fixture
def small(settings: Settings) -> Iterator[Server]:
    """A server hosting "mlp" (tiny_mlp: float32 [N, 4] -> [N, 3]) and "conv" (a resnet18:
    any image size), with at most 100,000 tensor elements per request."""
    with running(dataclasses.replace(settings, max_tensor_elements=LIMIT)) as server:
        with ModelHostClient(server.target, timeout=120) as client:
            serve(client, "mlp", architecture="tiny_mlp")
            serve(client, "conv", checkpoint="conv-weights")
        yield server


def test_a_predict_without_rows_counts_its_other_sizes(small: Server) -> None:
    """[0, 3, 200, 200] holds nothing, and counts 120,000 elements: refused like one row of
    it, before any model runs; an empty batch of a small shape still answers."""
    with ModelHostClient(small.target, timeout=120) as client:
        for shape, counted in [
            ((0, 3, 200, 200), 120_000),
            ((1, 3, 200, 200), 120_000),
            ((1, 0, 400, 400), 160_000),
        ]:
            expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                lambda: client.predict("conv", np.zeros(shape, np.float32)),  # noqa: B023
                f"{counted} tensor elements",
                "max_tensor_elements",
            )
        assert client.predict("conv", np.zeros((0, 3, 100, 100), np.float32)).shape == (0, 10)
        assert client.predict("mlp", np.zeros((0, 4), np.float32)).shape == (0, 3)
        assert client.predict("mlp", np.ones((2, 4), np.float32)).shape == (2, 3)


def test_a_model_infer_without_rows_counts_its_other_sizes(small: Server) -> None:
    """OIP's raw inputs are counted by their shape too, zero rows included."""
    with grpc.insecure_channel(small.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def infer(shape: list[int]) -> oip.ModelInferResponse:
            tensor = oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=shape
            )
            request = oip.ModelInferRequest(
                model_name="conv", inputs=[tensor], raw_input_contents=[b""]
            )
            reply: oip.ModelInferResponse = stub.ModelInfer(request, timeout=120)
            return reply

        with pytest.raises(grpc.RpcError) as caught:
            infer([0, 3, 200, 200])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "120000 tensor elements" in str(caught.value.details())
        assert list(infer([0, 3, 100, 100]).outputs[0].shape) == [0, 10]
