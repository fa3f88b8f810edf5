"""The GPU data path (skipped without CUDA; bench/gpu_check.sh runs these on a GPU machine)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torchvision

from conftest import images, reference, resnet18, serve
from modelhost.client import ModelHostClient, ModelHostError
from modelhost.server import Settings, running

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def gpu_client(settings: Settings) -> Iterator[ModelHostClient]:
    with (
        running(dataclasses.replace(settings, device="cuda")) as server,
        ModelHostClient(server.target, timeout=120) as client,
    ):
        yield client


def test_float32_on_the_gpu_matches_the_cpu_model(gpu_client: ModelHostClient) -> None:
    model = resnet18()
    gpu_client.save_checkpoint("m-w", model.state_dict())
    info = gpu_client.load_model(
        "m", architecture="resnet18", checkpoint="m-w", architecture_args={"num_classes": 10}
    )
    assert info.device.startswith("cuda")
    x = images(4, size=64)
    np.testing.assert_allclose(
        gpu_client.predict("m", x), reference(model, x), rtol=1e-3, atol=1e-3
    )


def test_bfloat16_channels_last_autocast(gpu_client: ModelHostClient) -> None:
    model = resnet18()
    x = images(4, size=64)
    expected = reference(model, x)
    serve(gpu_client, "bf16", model, checkpoint="bf16-w", dtype="bfloat16", channels_last=True)
    serve(gpu_client, "amp", model, checkpoint="amp-w", autocast="float16", channels_last=True)
    for name in ("bf16", "amp"):
        out = gpu_client.predict(name, x)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=0.1, atol=0.1)


def test_concurrent_batched_requests_on_the_gpu(gpu_client: ModelHostClient) -> None:
    model = serve(
        gpu_client,
        "m",
        checkpoint="m-w",
        batching={"max_batch_size": 32, "max_queue_delay_us": 20000},
    )
    inputs = [images(rows, size=32, seed=rows) for rows in (1, 2, 3, 4, 5, 6, 7, 8)]
    outs: list[Any] = [None] * len(inputs)

    def call(i: int) -> None:
        outs[i] = gpu_client.predict("m", inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, out in zip(inputs, outs, strict=True):
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-3, atol=1e-3)


def test_jpeg_decoded_on_the_gpu_answers_as_the_cpu_decode(gpu_client: ModelHostClient) -> None:
    from test_images import picture
    from torchvision.io import decode_image, encode_jpeg

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = resnet18(num_classes=1000)
    serve(
        gpu_client,
        "cls",
        model,
        checkpoint="w",
        architecture_args=None,  # 1000 classes, as the preprocessing's weights have
        preprocessing={"weights": "IMAGENET1K_V1"},
    )
    jpeg = encode_jpeg(picture(3, 240, 320), quality=95).numpy().tobytes()
    served = gpu_client.predict("cls", images=[jpeg])[0]
    image = decode_image(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
    with torch.inference_mode():
        expected = model(weights.transforms()(image)[None])[0].numpy()
    # nvJPEG and libjpeg (and the GPU's resize) may differ by a pixel value here and there,
    # which a smooth picture keeps small; a wrong colour order, scale or crop would not be.
    assert np.abs(served - expected).max() < 0.1 * expected.std()
    assert int(served.argmax()) in np.argsort(expected)[-3:]
    top = gpu_client.predict("cls", images=[jpeg], top_k=5)[0]
    assert [c.index for c in top] == list(np.argsort(served)[::-1][:5])


@pytest.mark.parametrize("kind", ["CMYK", "progressive"])
def test_jpegs_nvjpeg_may_refuse_answer_as_their_cpu_decode(
    gpu_client: ModelHostClient, kind: str
) -> None:
    """A JPEG nvJPEG does not take (some CMYK or progressive ones) is decoded on the CPU
    instead, not refused: its answer is that of its CPU decode sent as a uint8 tensor."""
    import io

    from PIL import Image
    from test_images import picture
    from torchvision.io import ImageReadMode, decode_image

    serve(gpu_client, "cls", preprocessing={"resize": 64, "crop": 64})
    rgb = Image.fromarray(picture(4, 120, 160).permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    if kind == "CMYK":
        rgb.convert("CMYK").save(buffer, "JPEG", quality=95)
    else:
        rgb.save(buffer, "JPEG", quality=95, progressive=True)
    jpeg = buffer.getvalue()
    decoded = decode_image(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), ImageReadMode.RGB)
    served = gpu_client.predict("cls", images=[jpeg])[0]
    expected = gpu_client.predict("cls", decoded[None].numpy())[0]
    assert np.abs(served - expected).max() < 0.1 * np.abs(expected).std() + 1e-3


def test_gpu_out_of_memory_is_resource_exhausted_and_released(
    gpu_client: ModelHostClient,
) -> None:
    model = serve(gpu_client, "m", checkpoint="m-w")
    serve(gpu_client, "hog", architecture="memory_hog")
    before = torch.cuda.memory_allocated()
    total_gb = torch.cuda.get_device_properties(0).total_memory >> 30
    ask = np.full((1, 1), 4 * total_gb, dtype=np.float32)
    with pytest.raises(ModelHostError) as caught:
        gpu_client.predict("hog", ask)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert torch.cuda.memory_allocated() <= before + (64 << 20)
    x = images(2, size=32)
    np.testing.assert_allclose(
        gpu_client.predict("m", x), reference(model, x), rtol=1e-3, atol=1e-3
    )


def test_unload_frees_device_memory(gpu_client: ModelHostClient) -> None:
    baseline = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    state = torchvision.models.vgg11().state_dict()
    gpu_client.save_checkpoint("vgg", state)
    gpu_client.load_model("vgg", architecture="vgg11", checkpoint="vgg")
    weights = sum(t.numel() * t.element_size() for t in state.values())
    assert torch.cuda.memory_allocated() >= baseline + weights * 0.9
    gpu_client.unload_model("vgg")
    assert torch.cuda.memory_allocated() <= baseline + (16 << 20)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_version_answers_as_the_model_at_new_shapes_too(
    gpu_client: ModelHostClient, mode: str
) -> None:
    """torch.compile on the GPU ("reduce-overhead": CUDA graphs): the warm-up's shape, and
    a shape met later, answer as the in-process model, also while that shape compiles
    (in the background for "default": requests run uncompiled meanwhile, on the lane;
    torch 2.11's process-wide FX flag failed them) and from several callers at once."""
    name = f"c-{mode}"
    model = serve(gpu_client, name, compile=mode, warmup_shape=(4, 3, 64, 64))
    x = images(4, size=64)
    np.testing.assert_allclose(
        gpu_client.predict(name, x), reference(model, x), rtol=1e-2, atol=1e-2
    )
    later = [images(2, size=96, seed=seed) for seed in range(4)]
    expected = [reference(model, y) for y in later]

    def ask(index: int) -> np.ndarray[Any, Any]:
        return gpu_client.predict(name, later[index % 4])

    with ThreadPoolExecutor(4) as pool:  # 40 requests while the new shape compiles
        answers = list(pool.map(ask, range(40)))
    for index, answer in enumerate(answers):
        np.testing.assert_allclose(answer, expected[index % 4], rtol=1e-2, atol=1e-2)
