"""A detection model's Predict is bounded by its estimated memory (red team round 4, M1).

torchvision's detection models resize every image inside their forward and run heads per
proposal and detection: Mask R-CNN took about 2.6 MB per detection, 2.6 GB for one 48 KB
Predict with 1,000 detections. The server estimates a batch's memory from the model's
settings and refuses what exceeds `max_detection_bytes` before it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torchvision

from conftest import assert_same_detections, detector, expect, serve
from modelhost.client import ModelHostClient
from modelhost.server import running
from modelhost.server.architectures import DetectionCost, detection_cost
from modelhost.server.errors import LimitExceeded
from modelhost.server.inference import Runner
from modelhost.server.settings import Settings

LIMIT = Settings.max_detection_bytes
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
GB = 1e9


def _cost(architecture: str, **args: Any) -> DetectionCost:
    """The cost model of a torchvision detection model built on the meta device."""
    with torch.device("meta"):
        model = torchvision.models.get_model(
            architecture, weights=None, weights_backbone=None, **args
        )
    cost = detection_cost(model.eval())
    assert cost is not None
    return cost


@pytest.mark.parametrize(
    ("architecture", "args"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 3}),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 3, "size_divisible": 64}),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 3, "fixed_size": [96, 64]}),
    ],
)
def test_the_estimate_resizes_images_as_the_model_does(
    architecture: str, args: dict[str, Any]
) -> None:
    """The image size the estimate counts is the one the model's own transform makes."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, weights=None, weights_backbone=None, **args)
    cost = detection_cost(model.eval())
    assert cost is not None
    for height, width in ((64, 64), (37, 200), (300, 41), (480, 640), (1000, 999)):
        with torch.inference_mode():
            batched, _ = model.transform([torch.zeros(3, height, width)])
        assert cost.resized(height, width) == tuple(batched.tensors.shape[-2:]), (height, width)


def test_the_estimate_covers_the_measured_peaks() -> None:
    """Peak RSS of one CPU forward (random weights, every detection kept), measured with
    torchvision 0.29 for M1: the estimate is at least that, and not wildly more."""
    everything = {"box_score_thresh": 0.0, "box_nms_thresh": 1.0, "rpn_nms_thresh": 1.0}

    def counts(n: int) -> dict[str, Any]:
        return {
            "min_size": 320,
            "max_size": 320,
            "box_detections_per_img": n,
            "rpn_pre_nms_top_n_test": n,
            "rpn_post_nms_top_n_test": n,
            **everything,
        }

    for architecture, args, shape, measured in (
        ("maskrcnn_resnet50_fpn", counts(1000), (1, 3, 64, 64), 2.62),
        ("maskrcnn_resnet50_fpn", counts(1000), (1, 3, 320, 320), 2.62),
        ("maskrcnn_resnet50_fpn", counts(100), (1, 3, 1280, 1280), 1.32),  # pasted masks
        ("maskrcnn_resnet50_fpn", {}, (1, 3, 48, 80), 0.62),
        ("fasterrcnn_resnet50_fpn", {}, (2, 3, 48, 80), 1.12),
        ("keypointrcnn_resnet50_fpn", counts(300), (1, 3, 64, 64), 0.44),
        ("retinanet_resnet50_fpn", {"num_classes": 1000, "min_size": 640}, (1, 3, 64, 64), 2.02),
        ("ssd300_vgg16", {}, (8, 3, 64, 64), 0.55),
    ):
        estimate = _cost(architecture, **args).estimate(shape) / GB
        assert measured <= estimate <= 4 * measured, (architecture, shape, estimate)


def test_torchvision_defaults_fit_a_few_images() -> None:
    """At torchvision's defaults (800 x 1333, 100 detections), the default limit takes a
    few COCO-sized images per Predict."""
    for architecture, images in (
        ("maskrcnn_resnet50_fpn", 3),
        ("fasterrcnn_resnet50_fpn", 5),
        ("keypointrcnn_resnet50_fpn", 4),
        ("retinanet_resnet50_fpn", 4),
        ("fcos_resnet50_fpn", 4),
    ):
        assert _cost(architecture).estimate((images, 3, 480, 640)) <= LIMIT, architecture


def test_a_costly_batch_is_refused_before_the_model_runs() -> None:
    """The check runs on every batch (a request, a merged group, the load's probe) before
    the forward: the model is never called."""
    model = detector()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    runner = Runner(model, torch.device("cpu"), torch.float32, max_detection_bytes=10**9)
    with pytest.raises(LimitExceeded, match=r"64 images of 8x8 .*320x320.*max_detection_bytes"):
        runner.run({"input": torch.zeros(64, 3, 8, 8)})
    assert calls == []
    runner.run({"input": torch.zeros(1, 3, 8, 8)})
    assert calls == [1]


def test_a_costly_detection_predict_is_refused_and_the_server_serves_on(
    client: ModelHostClient,
) -> None:
    """Many tiny images (each resized to 320 x 320 inside the model) are refused at once
    with the estimate; a normal Predict answers as the model does in-process, and other
    models still serve."""
    model = serve(
        client,
        "det",
        detector(box_score_thresh=0.0),
        architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
        architecture_args={"num_classes": 3, "box_score_thresh": 0.0},
    )
    tiny = np.zeros((64, 3, 8, 8), dtype=np.float32)  # 48 KB
    expect(
        EXHAUSTED,
        lambda: client.predict("det", tiny),
        "64 images of 8x8",
        "resized to 320x320",
        "150 proposals",
        "max_detection_bytes",
    )
    x = np.random.default_rng(0).random((2, 3, 64, 96), dtype=np.float32)
    assert_same_detections(model, x, client.predict("det", x))
    other = serve(client, "mlp", architecture="tiny_mlp", architecture_args=None)
    y = np.ones((2, 4), dtype=np.float32)  # tiny_mlp: 4 features
    with torch.inference_mode():
        np.testing.assert_allclose(
            client.predict("mlp", y), other(torch.from_numpy(y)).numpy(), rtol=1e-5
        )


def test_a_costly_warmup_shape_is_refused_at_load(client: ModelHostClient) -> None:
    """The load's warm-up is a batch like any other: too costly a warmup_shape is an
    invalid argument, refused before it runs."""
    client.save_checkpoint("w", detector().state_dict())
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.load_model(
            "det",
            architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
            checkpoint="w",
            architecture_args={"num_classes": 3},
            warmup_shape=(64, 3, 8, 8),
        ),
        "warmup_shape: 64 images of 8x8",
        "max_detection_bytes",
    )
    assert client.list_models() == []


def test_mask_rcnn_detections_are_bounded_by_their_cost(client: ModelHostClient) -> None:
    """The red team's Mask R-CNN: 1,500 detections per image allowed 3.9 GB for one 64 x 64
    image; refused now (the load's probe too, at no cost). With torchvision's 100 it
    answers as in-process (images scaled down to 320 for a 2-core CI)."""
    torch.manual_seed(0)
    small = {"num_classes": 2, "min_size": 320, "max_size": 320}
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **small
    ).eval()
    client.save_checkpoint("mask", model.state_dict())
    many = {"box_detections_per_img": 1500, "rpn_post_nms_top_n_test": 1500}
    arch = "maskrcnn_resnet50_fpn"
    expect(  # every Predict would be refused: so is the load, before its probe runs
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.load_model(
            "costly", architecture=arch, checkpoint="mask", architecture_args=small | many
        ),
        "architecture_args: 1 image of 224x224",
        "up to 1500 masks",
        "max_detection_bytes",
    )
    assert client.list_models() == []
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    client.load_model("mask", architecture=arch, checkpoint="mask", architecture_args=small)
    out = client.predict("mask", x)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))[0]
    assert out["0.masks"].shape == (len(expected["boxes"]), 1, 64, 64)
    for key in ("boxes", "labels", "scores", "masks"):
        np.testing.assert_allclose(out[f"0.{key}"], expected[key].numpy(), rtol=1e-4, atol=1e-4)


def test_the_limit_is_the_servers_setting(settings: Settings) -> None:
    """`max_detection_bytes` set by the operator is the bound: with room for two images
    of the model's size, two answer and three are refused."""
    cost = _cost("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    two = cost.estimate((2, 3, 32, 32))
    lower = dataclasses.replace(settings, max_detection_bytes=two)
    with running(lower) as server, ModelHostClient(server.target, timeout=120) as client:
        serve(
            client,
            "det",
            detector(),
            architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
            architecture_args={"num_classes": 3},
        )
        x = np.zeros((3, 3, 32, 32), dtype=np.float32)
        assert "0.boxes" in client.predict("det", x[:2])
        expect(EXHAUSTED, lambda: client.predict("det", x), "3 images", f"limit is {two} bytes")
