"""A model's outputs are known once LoadModel returns, before any request ran."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import torchvision

from conftest import detector, expect, resnet18
from modelhost.client import ModelHostClient
from modelhost.server.architectures import ArchitectureCatalog
from modelhost.server.errors import InvalidInput
from modelhost.server.inference import InputSpec, top_classes
from modelhost.server.loading import LoadSpec, probe_skeleton


def _spec(architecture: str, **args: object) -> LoadSpec:
    return LoadSpec("m", architecture, dict(args), "w", torch.device("cpu"), None)


IMAGE = [InputSpec("input", torch.float32, (-1, 3, -1, -1))]


def test_outputs_found_on_the_meta_device() -> None:
    catalog = ArchitectureCatalog([])
    spec = _spec("resnet18", num_classes=7)
    (logits,) = probe_skeleton(catalog, spec, IMAGE, torch.bfloat16).outputs
    assert (logits.name, logits.dtype, logits.shape) == ("output", torch.bfloat16, (-1, 7))
    # Segmentation: the spatial sizes follow the input's, so they are -1 too.
    found = probe_skeleton(
        catalog, _spec("lraspp_mobilenet_v3_large", num_classes=3), IMAGE, torch.float32
    ).outputs
    assert [(o.name, o.shape) for o in found] == [("out", (-1, 3, -1, -1))]
    # Detection has data-dependent steps without meta kernels: not known until it runs.
    detection = _spec("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert probe_skeleton(catalog, detection, IMAGE, torch.float32).outputs == ()


def test_model_info_lists_outputs_at_load(client: ModelHostClient) -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    client.save_checkpoint("seg", model.state_dict())
    info = client.load_model(
        "seg",
        architecture="lraspp_mobilenet_v3_large",
        checkpoint="seg",
        architecture_args={"num_classes": 3},
    )
    assert [(o.name, o.dtype, o.shape) for o in info.outputs] == [
        ("out", "float32", (-1, 3, -1, -1))
    ]
    x = np.random.default_rng(0).random((2, 3, 64, 48), dtype=np.float32)
    out = client.predict("seg", x)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))["out"].numpy()
    assert set(out) == {"out"} and out["out"].shape == (2, 3, 64, 48)
    np.testing.assert_allclose(out["out"], expected, rtol=1e-4, atol=1e-5)


def test_detection_outputs_come_from_a_real_run_at_load(client: ModelHostClient) -> None:
    """No meta kernels for detection's data-dependent steps: LoadModel runs it once."""
    model = detector()
    client.save_checkpoint("det", model.state_dict())
    info = client.load_model(
        "det",
        architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
        checkpoint="det",
        architecture_args={"num_classes": 3},
    )
    assert sorted(o.name for o in info.outputs) == ["0.boxes", "0.labels", "0.scores"]
    assert {o.name: o.dtype for o in info.outputs}["0.labels"] == "int64"


def test_outputs_come_back_in_a_stable_order() -> None:
    """A wire map keeps no order: the client sorts output names, positions as numbers."""
    from modelhost.client.predict import _order

    names = ["10", "2", "0.b", "1.0", "0.a", "1.10", "1.9", "aux", "out"]
    assert sorted(names, key=_order) == [
        "0.a",
        "0.b",
        "1.0",
        "1.9",
        "1.10",
        "2",
        "10",
        "aux",
        "out",
    ]


def test_top_k_refusal_lists_outputs_in_the_models_order() -> None:
    outputs = {f"parts.{i}": torch.zeros(1, 3) for i in range(12)}
    with pytest.raises(InvalidInput) as refused:
        top_classes(outputs, 1, [])
    assert str(refused.value) == (
        "top_k needs a model with one output; this one has 12: parts.0, parts.1, parts.2, "
        "parts.3, parts.4, parts.5, parts.6, parts.7, parts.8, parts.9 (and 2 more)"
    )


def test_a_warmup_shape_the_model_cannot_take_is_refused_by_name(
    client: ModelHostClient,
) -> None:
    """UX review 16, F6: a warmup_shape of the wrong rank failed with the model's own
    error, about a shape the caller never sent ([1, 1, 3, 224]); it names the setting and
    the model's input now."""
    client.save_checkpoint("r18", resnet18().state_dict())
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.load_model(
            "r",
            architecture="resnet18",
            checkpoint="r18",
            architecture_args={"num_classes": 10},
            warmup_shape=(8, 3, 224),
        ),
        "warmup_shape [8, 3, 224] does not fit the model's input",
        "[-1, 3, -1, -1]",
    )


def test_a_dtype_error_says_which_dtypes_the_model_takes(client: ModelHostClient) -> None:
    """UX review 16, F7: "expects bfloat16" sent users after bfloat16 files numpy cannot
    write, though any float is taken; the message names them."""
    client.save_checkpoint("r18b", resnet18().state_dict())
    client.load_model(
        "rb",
        architecture="resnet18",
        checkpoint="r18b",
        architecture_args={"num_classes": 10},
        dtype="bfloat16",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.predict("rb", np.zeros((1, 3, 32, 32), np.int64)),
        "dtype int64 does not fit the model, which takes floating-point input",
        "float32",
        "it runs in bfloat16",
    )
    assert client.predict("rb", np.zeros((1, 3, 32, 32), np.float64)).shape == (1, 10)
