"""Image inputs: uint8 tensors and JPEG/PNG bytes, preprocessed like torchvision, top-k answers."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import decode_image, encode_jpeg, encode_png

from conftest import resnet18, serve
from modelhost.client import ModelHostClient, ModelHostError

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def picture(seed: int, height: int = 180, width: int = 240) -> torch.Tensor:
    """A smooth random RGB picture (JPEG-friendly), uint8 [3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, height // 20, width // 20, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bilinear")
    return (smooth[0] * 255).to(torch.uint8)


@pytest.fixture
def pretrained(
    client: ModelHostClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> torch.nn.Module:
    """resnet18 served with "IMAGENET1K_V1" weights (random ones, placed in the cache)."""
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    model = resnet18(num_classes=1000, seed=7)
    torch.save(model.state_dict(), cache / WEIGHTS.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    info = client.load_model("cls", architecture="resnet18", weights="IMAGENET1K_V1")
    assert info.label_count == 1000
    return model


def in_process_top(model: torch.nn.Module, image: torch.Tensor, k: int) -> tuple[Any, Any]:
    with torch.inference_mode():
        probs = model(WEIGHTS.transforms()(image)[None]).softmax(-1)[0]
    scores, indices = probs.topk(k)
    return indices.tolist(), scores.numpy()


def test_jpeg_and_png_give_the_in_process_top_k(
    client: ModelHostClient, pretrained: torch.nn.Module, tmp_path: Path
) -> None:
    pictures = [picture(1), picture(2, 300, 200)]
    jpeg = encode_jpeg(pictures[0], quality=95).numpy().tobytes()
    png_path = tmp_path / "two.png"
    png_path.write_bytes(encode_png(pictures[1]).numpy().tobytes())
    answer = client.predict("cls", images=[jpeg, png_path], top_k=5)
    assert len(answer) == 2
    decoded = [decode_image(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)), pictures[1]]
    for image, top in zip(decoded, answer, strict=True):
        indices, scores = in_process_top(pretrained, image, 5)
        assert [c.index for c in top] == indices
        np.testing.assert_allclose([c.score for c in top], scores, rtol=1e-4, atol=1e-6)
        assert [c.label for c in top] == [WEIGHTS.meta["categories"][i] for i in indices]


def test_uint8_tensors_are_preprocessed_on_the_server(
    client: ModelHostClient, pretrained: torch.nn.Module
) -> None:
    batch = torch.stack([picture(3), picture(4)])
    logits = client.predict("cls", batch.numpy())
    assert logits.dtype == np.float32 and logits.shape == (2, 1000)
    with torch.inference_mode():
        expected = pretrained(WEIGHTS.transforms()(batch))
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)
    float_input = WEIGHTS.transforms()(batch).numpy()  # preprocessed already: passes through
    np.testing.assert_allclose(
        client.predict("cls", float_input), expected.numpy(), rtol=1e-4, atol=1e-5
    )


def test_concurrent_uint8_requests_are_preprocessed_as_one_batch(
    client: ModelHostClient,
) -> None:
    """uint8 images are preprocessed after batching, a batch at a time on the model's
    device: every caller still gets its own rows, resized and cropped as its own."""
    from test_batching import concurrently

    from conftest import serve

    steps = {"resize": 40, "crop": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}
    model = serve(
        client,
        "small",
        preprocessing=steps,
        batching={"max_batch_size": 16, "max_queue_delay_us": 50_000},
    )
    pictures = [picture(seed, 48, 64) for seed in range(12)]
    outs = concurrently([partial(client.predict, "small", p[None].numpy()) for p in pictures])
    from torchvision import transforms

    reference_steps = transforms.Compose(
        [
            transforms.Resize(40, antialias=True),
            transforms.CenterCrop(32),
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize(steps["mean"], steps["std"]),
        ]
    )
    for image, out in zip(pictures, outs, strict=True):
        assert not isinstance(out, Exception), out
        with torch.inference_mode():
            expected = model(reference_steps(image[None]))
        np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_explicit_preprocessing_and_labels_for_a_checkpoint(client: ModelHostClient) -> None:
    from torchvision import transforms

    model = resnet18(num_classes=3)
    client.save_checkpoint("w", model.state_dict())
    labels = ["cat", "dog", "fish"]
    steps = {"resize": 64, "crop": 56, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    info = client.load_model(
        "pets",
        architecture="resnet18",
        checkpoint="w",
        architecture_args={"num_classes": 3},
        preprocessing=steps,
        labels=labels,
    )
    assert info.label_count == 3 and info.preprocessing is not None
    assert info.preprocessing["crop"] == 56
    image = picture(5)
    top = client.predict("pets", images=[encode_png(image).numpy().tobytes()], top_k=2)[0]
    transform = transforms.Compose(
        [
            transforms.Resize(64, antialias=True),
            transforms.CenterCrop(56),
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    with torch.inference_mode():
        probs = model(transform(image)[None]).softmax(-1)[0]
    scores, indices = probs.topk(2)
    assert [c.index for c in top] == indices.tolist()
    assert [c.label for c in top] == [labels[i] for i in indices.tolist()]
    np.testing.assert_allclose([c.score for c in top], scores.numpy(), rtol=1e-5)


def test_preprocessing_that_cannot_work_is_refused_at_load_or_predict(
    client: ModelHostClient,
) -> None:
    """Mean and std of the wrong length or not finite are refused at load (they were taken,
    and every encoded image then failed INTERNAL, or answered NaN); a resize without a crop
    of images of different aspect ratios is INVALID_ARGUMENT, not INTERNAL."""
    client.save_checkpoint("w", resnet18(num_classes=3).state_dict())
    load = partial(
        client.load_model,
        architecture="resnet18",
        checkpoint="w",
        architecture_args={"num_classes": 3},
    )
    for steps in (
        {"mean": [0.5] * 4, "std": [0.25] * 4},
        {"mean": [0.5] * 3, "std": [float("nan")] * 3},
        {"mean": [float("inf")] * 3, "std": [0.25] * 3},
    ):
        with pytest.raises(ModelHostError) as refused:
            load("bad", preprocessing=steps)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "one finite value per channel" in refused.value.message
    load("uncropped", preprocessing={"resize": 32})
    wide, tall = picture(1, 60, 90), picture(2, 90, 60)
    pictures = [encode_png(p).numpy().tobytes() for p in (wide, tall)]
    with pytest.raises(ModelHostError) as refused:
        client.predict("uncropped", images=pictures)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "differ in shape once preprocessed" in refused.value.message
    assert client.predict("uncropped", images=pictures[:1]).shape == (1, 3)


def test_preprocessing_from_weights_for_a_fine_tuned_checkpoint(client: ModelHostClient) -> None:
    model = resnet18(num_classes=1000, seed=9)
    client.save_checkpoint("tuned", model.state_dict())
    info = client.load_model(
        "tuned",
        architecture="resnet18",
        checkpoint="tuned",
        preprocessing={"weights": "IMAGENET1K_V1"},
    )
    assert info.preprocessing is not None and info.preprocessing["resize"] == 256
    batch = torch.stack([picture(6)])
    with torch.inference_mode():
        expected = model(WEIGHTS.transforms()(batch))
    np.testing.assert_allclose(
        client.predict("tuned", batch.numpy()), expected.numpy(), rtol=1e-4, atol=1e-5
    )


def test_image_errors(client: ModelHostClient, pretrained: torch.nn.Module) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    for call, words in [
        (lambda: client.predict("cls", images=[b"not an image"]), "image 0"),
        (lambda: client.predict("cls", images=[b"\xff\xd8\xff" + b"\0" * 50]), "image"),
        (lambda: client.predict("cls", np.zeros((1, 1000), np.float32), top_k=3), "shape"),
        (
            lambda: client.predict(
                "cls", images=[encode_png(picture(1)).numpy().tobytes()], top_k=-1
            ),
            "top_k",
        ),
    ]:
        with pytest.raises(ModelHostError) as caught:
            call()
        assert caught.value.code == IA, caught.value
        assert words in caught.value.message, caught.value.message
    serve(client, "plain")
    with pytest.raises(ModelHostError) as caught:
        client.predict("plain", images=[encode_png(picture(1)).numpy().tobytes()])
    assert caught.value.code == IA and "preprocessing" in caught.value.message
    top = client.predict("cls", images=[encode_png(picture(1)).numpy().tobytes()], top_k=1)
    assert len(top) == 1 and len(top[0]) == 1  # still serving
