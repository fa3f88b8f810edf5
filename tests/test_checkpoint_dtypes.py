"""Checkpoints whose tensors are not in the skeleton's dtypes (red team 12, F2, F3, F5).

In-process, `load_state_dict` copies a checkpoint into the model's own tensors, casting
as it goes. The server adopts the checkpoint's tensors (`assign=True`), so it casts them
itself where the in-process model would differ: several floating dtypes in one
checkpoint (float16 layers with a float32 head and BatchNorm, as mixed-precision tools
save them) or float64 serve in the skeleton's float32; one shared half dtype serves as
stored. A float parameter from integers, or an expanded tensor whose elements share a few
stored bytes, is refused at LoadModel naming the keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect, images, reference
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running

IA = grpc.StatusCode.INVALID_ARGUMENT
FP = grpc.StatusCode.FAILED_PRECONDITION
X = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)


def in_process(architecture: str, state: dict[str, torch.Tensor], **args: Any) -> torch.nn.Module:
    """The model built in-process and loaded from `state` the usual way (a copy)."""
    model = build(architecture, args)
    model.load_state_dict(state)
    return model.eval()


def mixed(state: dict[str, torch.Tensor], half: Any) -> dict[str, torch.Tensor]:
    """`state` with the tensors whose key `half` accepts in float16."""
    return {k: v.half() if half(k) and v.is_floating_point() else v for k, v in state.items()}


def test_a_float16_body_with_a_float32_head_serves_as_the_in_process_model(
    client: ModelHostClient,
) -> None:
    state = mixed(build("tiny_mlp", seed=1).state_dict(), lambda key: key.startswith("0."))
    client.save_checkpoint("mixed", state)
    info = client.load_model("m", architecture="tiny_mlp", checkpoint="mixed")
    assert info.dtype == "float32"
    expected = reference(in_process("tiny_mlp", state), X)
    np.testing.assert_allclose(client.predict("m", X), expected, rtol=1e-6, atol=1e-6)


def test_a_mixed_precision_resnet_serves_as_the_in_process_model(
    client: ModelHostClient,
) -> None:
    """float16 convolutions, float32 BatchNorm and head (apex's O2 layout)."""
    model = build("resnet18", {"num_classes": 10}, seed=2)
    state = mixed(model.state_dict(), lambda key: "conv" in key or "downsample.0" in key)
    assert {v.dtype for v in state.values()} == {torch.float16, torch.float32, torch.int64}
    client.save_checkpoint("apex", state)
    client.load_model(
        "r", architecture="resnet18", checkpoint="apex", architecture_args={"num_classes": 10}
    )
    x = images(2)
    expected = reference(in_process("resnet18", state, num_classes=10), x)
    np.testing.assert_allclose(client.predict("r", x), expected, rtol=1e-4, atol=1e-5)


def test_float64_weights_serve_in_float32_and_one_half_dtype_as_stored(
    client: ModelHostClient,
) -> None:
    model = build("tiny_mlp", seed=3)
    wide = {k: v.double() for k, v in model.state_dict().items()}
    client.save_checkpoint("wide", wide)
    assert client.load_model("w", architecture="tiny_mlp", checkpoint="wide").dtype == "float32"
    expected = reference(in_process("tiny_mlp", wide), X)
    np.testing.assert_allclose(client.predict("w", X), expected, rtol=1e-6, atol=1e-6)
    half = {k: v.half() for k, v in model.state_dict().items()}
    client.save_checkpoint("half", half)
    assert client.load_model("h", architecture="tiny_mlp", checkpoint="half").dtype == "float16"
    expected = reference(in_process("tiny_mlp", half).half(), X.astype(np.float16))
    np.testing.assert_allclose(
        client.predict("h", X.astype(np.float16)), expected, rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_float_parameter_from_other_numbers_is_invalid_argument(
    client: ModelHostClient, dtype: torch.dtype
) -> None:
    state = build("tiny_mlp", seed=4).state_dict()
    state["2.bias"] = state["2.bias"].to(dtype)
    client.save_checkpoint("ints", state)
    expect(
        IA,
        lambda: client.load_model("i", architecture="tiny_mlp", checkpoint="ints"),
        f"dtype mismatch: 2.bias (checkpoint {dtype}, model torch.float32)",
    )
    assert client.list_models() == []


def test_an_expanded_tensor_is_invalid_argument(client: ModelHostClient) -> None:
    """A few stored bytes that would take the tensor's full size at every Predict."""
    state = build("tiny_mlp", {"hidden": 4096}, seed=5).state_dict()
    state["0.weight"] = torch.zeros(1).expand(4096, 4)
    client.save_checkpoint("expanded", state)
    expect(
        IA,
        lambda: client.load_model(
            "e", architecture="tiny_mlp", checkpoint="expanded", architecture_args={"hidden": 4096}
        ),
        "elements share memory",
        "0.weight",
    )


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_tensor_is_invalid_argument(client: ModelHostClient, layout: str) -> None:
    state = build("tiny_mlp", seed=6).state_dict()
    weight = state["0.weight"]
    state["0.weight"] = weight.to_sparse() if layout == "coo" else weight.to_sparse_csr()
    client.save_checkpoint("sparse", state)
    expect(
        IA,
        lambda: client.load_model("s", architecture="tiny_mlp", checkpoint="sparse"),
        "sparse tensors (save them with .to_dense()): 0.weight",
    )


def test_outputs_no_reply_can_carry_are_failed_precondition_and_the_record_stays_writable(
    settings: Settings,
) -> None:
    """A model returning complex numbers: its Predict says why (not INTERNAL), a warm-up
    refuses its load, and with --restore the other loads and unloads go on (the record
    keeps what it can of what the version serves as)."""
    restoring = dataclasses.replace(settings, restore=True)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("c", build("complex_out").state_dict())
        client.load_model("c", architecture="complex_out", checkpoint="c")
        x = np.ones((2, 3), np.float32)
        expect(FP, lambda: client.predict("c", x), "cannot send: output (torch.complex64)")
        expect(
            FP,
            lambda: client.load_model(
                "w", architecture="complex_out", checkpoint="c", warmup_shape=(2, 3)
            ),
            "cannot send",
        )
        client.save_checkpoint("m", build("tiny_mlp", seed=7).state_dict())
        client.load_model("m", architecture="tiny_mlp", checkpoint="m")
        assert client.unload_model("c") == [1]
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [m.name for m in client.list_models()] == ["m"]
