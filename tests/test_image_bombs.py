"""Image bombs: sizes are read from JPEG/PNG headers and refused before any decoding."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import decode_image, encode_jpeg, encode_png

from conftest import expect, resnet18, serve
from helpers.memory import peak_growth_mib
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running
from modelhost.server import images as server_images
from modelhost.server.images import Preprocessing, image_size

IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
STEPS = {"resize": 64, "crop": 56, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
TRANSFORM = transforms.Compose(
    [
        transforms.Resize(64, antialias=True),
        transforms.CenterCrop(56),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize([0.5] * 3, [0.25] * 3),
    ]
)


def picture(seed: int, height: int = 180, width: int = 240) -> np.ndarray[Any, Any]:
    """A random RGB picture, uint8 [H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pil_jpeg(height: int = 23, width: int = 37, **options: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture(0, height, width)).save(out, "JPEG", **options)
    return out.getvalue()


def pil_png(mode: str = "RGB", height: int = 23, width: int = 37) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture(0, height, width)).convert(mode).save(out, "PNG")
    return out.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real few-hundred-byte baseline JPEG whose SOF0 is rewritten to `width`x`height`."""
    blob = bytearray(pil_jpeg(8, 8, quality=50))
    at = blob.index(b"\xff\xc0") + 5  # marker, length, precision
    blob[at : at + 4] = struct.pack(">HH", height, width)
    return bytes(blob)


def png_declaring(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR (CRC fixed up) declares `width`x`height`."""
    blob = bytearray(pil_png(height=8, width=8))
    blob[16:24] = struct.pack(">II", width, height)
    blob[29:33] = struct.pack(">I", zlib.crc32(blob[12:29]))
    return bytes(blob)


def serve_pets(client: ModelHostClient) -> torch.nn.Module:
    """resnet18 (3 classes) served as "pets" with explicit preprocessing; its in-process twin."""
    return serve(
        client,
        "pets",
        resnet18(num_classes=3),
        checkpoint="w",
        architecture_args={"num_classes": 3},
        preprocessing=STEPS,
    )


@pytest.fixture
def pets(client: ModelHostClient) -> torch.nn.Module:
    return serve_pets(client)


def check_still_serving(client: ModelHostClient, model: torch.nn.Module) -> None:
    """A valid Predict gives the in-process model's answer."""
    blob = encode_png(torch.from_numpy(picture(5)).permute(2, 0, 1)).numpy().tobytes()
    image = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    with torch.inference_mode():
        expected = model(TRANSFORM(image)[None]).numpy()
    np.testing.assert_allclose(
        client.predict("pets", images=[blob]), expected, rtol=1e-4, atol=1e-5
    )


# The header parser


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"progressive": True},
        {"optimize": True, "quality": 10},
        {"subsampling": 0, "quality": 95},
        {"exif": b"Exif\0\0MM\0*\0\0\0\x08\0\0", "icc_profile": b"\x01" * 70_000},
        {"progressive": True, "exif": b"Exif\0\0II*\0\x08\0\0\0\0\0", "comment": b"\xff" * 40},
    ],
)
def test_jpeg_sizes_come_from_the_frame_header(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL only reads the header here
    blob = pil_jpeg(**options)
    assert image_size(blob) == (37, 23)
    for width, height in [(16000, 16000), (65500, 3), (1, 65535)]:
        assert image_size(jpeg_declaring(width, height)) == (width, height)
        assert Image.open(io.BytesIO(jpeg_declaring(width, height))).size == (width, height)


def test_jpeg_marker_walk() -> None:
    tv = encode_jpeg(torch.zeros(3, 23, 37, dtype=torch.uint8)).numpy().tobytes()
    assert image_size(tv) == (37, 23)
    sof = b"\xff\xc2\x00\x11\x08\x00\x05\x00\x07\x03" + b"\x00" * 9
    # Fill bytes, TEM/RST, stuffed FF 00 and stray bytes between segments are skipped, and
    # DHT (C4), JPG (C8), DAC (CC) segments carry no size even where bytes look like one.
    for before in [
        b"\xff\xff\xff",
        b"\xff\x01\xff\xd3",
        b"\xff\x00junk",
        b"\xff\xc4\x00\x08\x08\x7f\xff\x7f\xff\x03",
        b"\xff\xc8\x00\x04\xff\xff\xff\xcc\x00\x06\xff\xc0\x00\x11",
        b"\xff\xe1\x00\x06\xff\xc0\x00\x11\xff\xfe\x00\x02",
    ]:
        assert image_size(b"\xff\xd8" + before + sof) == (7, 5), before
    for marker in range(0xC0, 0xD0):
        segment = bytes([0xFF, marker]) + b"\x00\x11\x08\x00\x05\x00\x07\x03" + b"\x00" * 9
        if marker in (0xC4, 0xC8, 0xCC):
            with pytest.raises(ValueError, match="ends before"):
                image_size(b"\xff\xd8" + segment)
        else:
            assert image_size(b"\xff\xd8" + segment) == (7, 5), hex(marker)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_png_sizes_come_from_ihdr(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL only reads the header here
    assert image_size(pil_png(mode)) == (37, 23)
    blob = png_declaring(65500, 70000)
    assert image_size(blob) == (65500, 70000)
    assert Image.open(io.BytesIO(blob)).size == (65500, 70000)  # a valid header (CRC)


UNREADABLE = {
    "empty": b"",
    "text": b"not an image",
    "gif": b"GIF89a\x10\x00\x10\x00",
    "no-marker": b"\xff\xd8\xff" + b"\0" * 50,
    "truncated-jpeg": pil_jpeg()[:20],
    "soi-eoi": b"\xff\xd8\xff\xd9",
    "sos-first": b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 6 + b"\xff\xc0\x00\x11\x08\x00\x05\x00\x07",
    "truncated-sof": b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x05",
    "short-length": b"\xff\xd8\xff\xe0\x00\x01",
    "endless-markers": b"\xff\xd8" + b"\xff\x01" * 5000,
    "endless-fill": b"\xff\xd8" + b"\xff" * 10_000_000,
    "zero-width-jpeg": jpeg_declaring(0, 100),
    "truncated-png": pil_png()[:20],
    "zero-height-png": png_declaring(100, 0),
}


@pytest.mark.parametrize("blob", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_unreadable_headers_raise(blob: bytes) -> None:
    with pytest.raises(ValueError):
        image_size(blob)


def test_preprocessing_counts_its_largest_step() -> None:
    steps = Preprocessing(resize=232, crop=224)
    assert steps.elements(640, 480) == 3 * 640 * 480
    assert steps.elements(100, 50) == 3 * 232 * 464  # upscaled
    assert steps.elements(1_000_000, 1) == 3 * 232 * 232_000_000  # a thin strip
    assert Preprocessing(crop=1000).elements(10, 10) == 3 * 1000 * 1000
    assert Preprocessing().elements(7, 5, channels=1) == 35
    assert steps.elements(0, 5) == 3 * 224 * 224


# Over a real server


def refuse(client: ModelHostClient, blobs: list[bytes], *words: str) -> None:
    """Predict with `blobs` answers INVALID_ARGUMENT naming every one of `words`."""
    expect(IA, lambda: client.predict("pets", images=blobs), *words)


def test_bombs_are_refused_from_their_headers(
    client: ModelHostClient, pets: torch.nn.Module
) -> None:
    check_still_serving(client, pets)  # allocations of a first predict are not counted
    good = encode_png(torch.from_numpy(picture(1)).permute(2, 0, 1)).numpy().tobytes()
    for width, height in [(16000, 16000), (65500, 65500), (40_001, 1000)]:
        for bomb in [jpeg_declaring(width, height), png_declaring(width, height)]:
            assert len(bomb) < 1000
            words = [f"{width}x{height}", "40000000", "max_image_pixels"]

            def refuse_both(bomb: bytes = bomb, words: list[str] = words) -> None:
                refuse(client, [bomb], "image 0", *words)
                refuse(client, [good, bomb], "image 1", *words)

            growth = peak_growth_mib(refuse_both)
            assert growth < 200, f"{width}x{height}: peak memory rose by {growth} MiB"
    check_still_serving(client, pets)


def test_unreadable_images_are_refused_before_decoding(
    client: ModelHostClient, pets: torch.nn.Module
) -> None:
    for blob in [
        b"not an image",
        b"GIF89a\x10\x00\x10\x00" + b"\0" * 40,
        pil_jpeg()[:20],
        pil_png()[:20],
    ]:
        refuse(client, [blob], "image 0", "header")
    check_still_serving(client, pets)


def test_images_within_the_pixel_limit_count_against_the_request_budget(
    client: ModelHostClient, pets: torch.nn.Module
) -> None:
    each = jpeg_declaring(6000, 6000)  # 36 MP: under the pixel limit
    expect(
        RE,
        lambda: client.predict("pets", images=[each] * 3),
        str(3 * 3 * 6000 * 6000),
        str(1 << 28),
        "max_tensor_elements",
    )
    strip = jpeg_declaring(40_000, 1)  # resized to 64x2560000: 491520000 elements
    expect(RE, lambda: client.predict("pets", images=[strip]), "491520000", "max_tensor_elements")
    thin = np.zeros((1, 3, 1, 40_000), np.uint8)  # the same strip as a uint8 tensor
    expect(RE, lambda: client.predict("pets", thin), "491520000", "max_tensor_elements")
    check_still_serving(client, pets)


def test_the_request_budget_is_max_tensor_elements(settings: Settings) -> None:
    one = 3 * 180 * 240  # a picture decodes to more elements than it takes after preprocessing
    limited = dataclasses.replace(settings, max_tensor_elements=2 * one, max_image_pixels=50_000)
    with running(limited) as server, ModelHostClient(server.target, timeout=60) as client:
        model = serve_pets(client)
        blob = encode_png(torch.from_numpy(picture(1)).permute(2, 0, 1)).numpy().tobytes()
        assert client.predict("pets", images=[blob, blob]).shape == (2, 3)
        expect(
            RE,
            lambda: client.predict("pets", images=[blob] * 3),
            str(3 * one),
            str(2 * one),
            "max_tensor_elements",
        )
        expect(IA, lambda: client.predict("pets", images=[png_declaring(250, 201)]), "50000")
        check_still_serving(client, model)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 bytes"),
        MemoryError(),
    ],
    ids=["cpu-allocator", "torch-oom", "memory-error"],
)
def test_allocation_failures_while_decoding_are_resource_exhausted(
    client: ModelHostClient,
    pets: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    blob = encode_png(torch.from_numpy(picture(1)).permute(2, 0, 1)).numpy().tobytes()

    def fail(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(server_images, "decode_image", fail)
        expect(RE, lambda: client.predict("pets", images=[blob]), "out of memory")
    with monkeypatch.context() as patch:
        patch.setattr(server_images.F, "resize", fail)  # in preprocessing
        expect(RE, lambda: client.predict("pets", images=[blob]), "out of memory")
        batch = np.zeros((1, 3, 32, 32), np.uint8)
        expect(RE, lambda: client.predict("pets", batch), "out of memory")
    check_still_serving(client, pets)
