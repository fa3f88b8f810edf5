"""A call's request is freed when the call ends, however it ends: large requests that fail
(in the model, in the servicer, or in the gate's parser) or succeed leave nothing behind
that only the cycle collector would free (it seldom runs a full collection in a process
holding torch, so every such request used to stay in memory)."""

from __future__ import annotations

import contextlib
import gc
import time
import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from conftest import serve
from modelhost.client import ModelHostClient
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.server import Server, Settings, running
from modelhost.v1 import modelhost_pb2 as pb

Code = grpc.StatusCode
PREDICT = "/modelhost.v1.ModelHost/Predict"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MB = 1 << 20
BODY = 24 * MB  # each request's size
CALLS = 4  # of each kind
HELD = BODY // 2  # what may stay allocated after them: any call left behind holds more


@pytest.fixture
def mlp(settings: Settings) -> Iterator[Server]:
    """A server hosting "mlp" (tiny_mlp: 4 features in, 3 out)."""
    with running(settings) as server:
        with ModelHostClient(server.target, timeout=60) as client:
            serve(client, "mlp", architecture="tiny_mlp")
        yield server


def _rows(features: int) -> np.ndarray:
    return np.zeros((BODY // (4 * features), features), np.float32)


def _predict(features: int) -> bytes:
    x = _rows(features)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes())
    return pb.PredictRequest(model="mlp", inputs={"input": tensor}).SerializeToString()


def _infer(features: int, model: str = "mlp") -> bytes:
    x = _rows(features)
    request = oip.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    return request.SerializeToString()


@contextlib.contextmanager
def _held_by_python() -> Iterator[Callable[[], int]]:
    """Bytes Python allocated since entering and still holds once the server is done
    (within 5 s), with the cycle collector off: what reference counting does not free."""
    gc.collect()
    gc.disable()
    tracemalloc.start()

    def held() -> int:
        deadline = time.monotonic() + 5
        while tracemalloc.get_traced_memory()[0] >= HELD and time.monotonic() < deadline:
            time.sleep(0.05)
        return tracemalloc.get_traced_memory()[0]

    try:
        yield held
    finally:
        tracemalloc.stop()
        gc.enable()


def test_large_requests_are_freed_when_their_calls_end(mlp: Server) -> None:
    calls = {  # what each sends, and how it ends
        "Predict, rejected by the model": (PREDICT, _predict(16), Code.INVALID_ARGUMENT),
        "ModelInfer, rejected by the model": (INFER, _infer(16), Code.INVALID_ARGUMENT),
        "ModelInfer, refused by the servicer": (INFER, _infer(4, "other"), Code.NOT_FOUND),
        "ModelInfer, not a message": (INFER, b"\xff" * BODY, Code.INVALID_ARGUMENT),
        "Predict, served": (PREDICT, _predict(4), Code.OK),
    }
    held = {}
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with (
        grpc.insecure_channel(mlp.target, options=options) as channel,
        ModelHostClient(mlp.target, timeout=60) as client,
    ):
        for what, (method, body, expected) in calls.items():
            call = channel.unary_unary(method)
            with _held_by_python() as held_now:
                for _ in range(CALLS):
                    try:
                        call(body, timeout=60)
                        code = Code.OK
                    except grpc.RpcError as error:
                        code = error.code()
                    assert code == expected, (what, code)
                # The model's lane holds its last batch until its next one: move it on.
                client.predict("mlp", np.zeros((1, 4), np.float32))
                held[what] = held_now() / MB
    assert all(mb < HELD / MB for mb in held.values()), f"MiB held after {CALLS} calls: {held}"
