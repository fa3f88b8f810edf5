"""Image inputs: decoding JPEG/PNG and torchvision-style preprocessing on the model's device.

The steps are those of torchvision's `ImageClassification` transforms, in the same
order and with the same functions, so a served model sees exactly the tensor the
in-process `weights.transforms()(image)` would give it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from modelhost.server.devices import is_device_failure, is_oom
from modelhost.server.errors import InvalidArgument, InvalidInput, LimitExceeded

log = logging.getLogger(__name__)

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_FILL = re.compile(b"\xff+")
_MAX_JPEG_MARKERS = 1000


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shorter side), center-crop, scale to [0, 1], normalize."""

    resize: int = 0
    crop: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    interpolation: str = "bilinear"
    weights: str = ""

    def __post_init__(self) -> None:
        if self.resize < 0 or self.crop < 0:
            raise InvalidArgument("preprocessing resize and crop must not be negative")
        if (
            len(self.mean) != len(self.std)
            or len(self.mean) not in (0, 1, 3)
            or not all(math.isfinite(v) for v in (*self.mean, *self.std))
            or any(s == 0 for s in self.std)
        ):
            raise InvalidArgument(
                "preprocessing mean and std need one finite value per channel (3, or 1 for "
                "all), std none of them zero"
            )

    @classmethod
    def from_weights(cls, member: Any, name: str) -> Preprocessing:
        """The parameters of a torchvision weights' `transforms()`."""
        transforms = member.transforms()
        needed = ("resize_size", "crop_size", "mean", "std")
        if not all(hasattr(transforms, key) for key in needed):
            raise InvalidArgument(f"weights {name} do not describe image preprocessing")
        resize = transforms.resize_size
        return cls(
            resize=int(resize[0]) if resize else 0,
            crop=int(transforms.crop_size[0]),
            mean=tuple(float(v) for v in transforms.mean),
            std=tuple(float(v) for v in transforms.std),
            interpolation=transforms.interpolation.value,
            weights=name,
        )

    def __call__(
        self, images: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """uint8 [N, 3, H, W] (or a list of [3, H, W] of any sizes) -> float [N, 3, crop, crop]."""
        if isinstance(images, torch.Tensor):
            return self._batch(images, dtype)
        prepared = [self._batch(image.unsqueeze(0), dtype) for image in images]
        shapes = {tuple(p.shape[1:]) for p in prepared}
        if len(shapes) > 1:
            raise InvalidInput(
                f"the images differ in shape once preprocessed ({sorted(shapes)}): a resize "
                "without a crop keeps each image's aspect ratio; send images of one aspect "
                "ratio, or load the model with a crop"
            )
        return torch.cat(prepared)

    def elements(self, width: int, height: int, channels: int = 3) -> int:
        """The most elements an image of this size takes: decoded, resized or cropped."""
        sizes = [(height, width)]
        short, long = sorted((height, width))
        if self.resize and short:  # the shorter side becomes `resize`, as in torchvision
            sizes.append((self.resize, int(self.resize * long / short)))
        if self.crop:
            sizes.append((self.crop, self.crop))
        return max(channels * h * w for h, w in sizes)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of uint8 images of `shape` [N, C, H, W] once preprocessed."""
        n, c, height, width = shape
        if self.resize and min(height, width):  # torchvision: the shorter side -> resize
            short, long = sorted((height, width))
            longer = int(self.resize * long / short)
            height, width = (self.resize, longer) if height <= width else (longer, self.resize)
        if self.crop:
            height = width = self.crop
        return (n, c, height, width)

    def _batch(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mode = InterpolationMode(self.interpolation)
        if self.resize:
            images = F.resize(images, [self.resize], interpolation=mode, antialias=True)
        if self.crop:
            images = F.center_crop(images, [self.crop])
        images = F.convert_image_dtype(images, torch.float32)
        if self.mean:  # F.normalize's arithmetic, with mean and std made once per device
            mean, std = _statistics(self.mean, self.std, str(images.device))
            if images.is_cuda:  # kept until this stream's work on them is done (see below)
                stream = torch.cuda.current_stream(images.device)
                mean.record_stream(stream)
                std.record_stream(stream)
            images = images.sub(mean).div(std)
        return images.to(dtype)


@functools.lru_cache(maxsize=64)
def _statistics(
    mean: tuple[float, ...], std: tuple[float, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [C, 1, 1] float32 tensors on `device`, made once: F.normalize makes
    them (a host-to-device copy each) and checks std for zeros (a device sync) per call;
    Preprocessing checks std once when it is made.

    On a GPU, preprocessing threads and lanes read them from many streams: each use
    records its stream (`record_stream`), so a pair this cache evicts (more than 64
    configurations) is not freed for reuse while a kernel queued on one of them may still
    read it."""

    def on_device(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)

    return on_device(mean), on_device(std)


def image_size(blob: bytes) -> tuple[int, int]:
    """(width, height) a JPEG or PNG declares in its header; ValueError if there is none.

    Reads only the header: milliseconds whatever the size of the image it announces.
    """
    if blob.startswith(_PNG):
        if len(blob) < 24 or blob[8:16] != b"\0\0\0\rIHDR":
            raise ValueError("the PNG does not start with a complete IHDR chunk")
        width, height = struct.unpack_from(">II", blob, 16)
    elif blob.startswith(_JPEG):
        width, height = _jpeg_size(blob)
    else:
        raise ValueError("it is neither a JPEG nor a PNG")
    if not width or not height:
        raise ValueError(f"it declares a size of {width}x{height}")
    return width, height


def _jpeg_size(blob: bytes) -> tuple[int, int]:
    """The size in the first SOF segment, found the way libjpeg reads markers.

    Like libjpeg's `next_marker`, bytes up to an 0xFF, fill 0xFFs and stuffed FF 00
    pairs between segments are skipped; the segments of other markers are skipped by
    their length. A file with thousands of markers before its frame is refused.
    """
    at = 2  # after SOI
    for _ in range(_MAX_JPEG_MARKERS):
        at = blob.find(b"\xff", at)
        fill = _FILL.match(blob, at) if at >= 0 else None
        if fill is None or fill.end() >= len(blob):
            break
        marker, at = blob[fill.end()], fill.end() + 1
        if marker == 0 or marker in _STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI, EOI, SOS
            raise ValueError(f"the JPEG has marker {marker:02X} before its frame header (SOF)")
        if at + 2 > len(blob):
            break
        length = int.from_bytes(blob[at : at + 2], "big")
        if length < 2:
            raise ValueError(f"the JPEG has a segment of length {length}")
        if marker in _SOF:
            if length < 8 or at + 7 > len(blob):
                break
            height, width = struct.unpack_from(">HH", blob, at + 3)
            return width, height
        at += length
    else:
        raise ValueError(f"the JPEG has over {_MAX_JPEG_MARKERS} markers before its frame header")
    raise ValueError("the JPEG ends before its frame header (SOF)")


def check_images(
    blobs: Sequence[bytes],
    max_pixels: int,
    max_elements: int,
    preprocessing: Preprocessing | None = None,
) -> None:
    """Refuses, from their headers alone, images too large to decode (and preprocess).

    InvalidInput for an unreadable header or an image over `max_pixels` (0: no limit);
    LimitExceeded when all the images together take more than `max_elements` elements
    at their largest step (see `Preprocessing.elements`; 3 x H x W without one).
    """
    total = 0
    for index, blob in enumerate(blobs):
        try:
            width, height = image_size(blob)
        except ValueError as error:
            raise InvalidInput(
                f"image {index} has no readable JPEG or PNG header: {error}"
            ) from None
        if max_pixels and width * height > max_pixels:
            raise InvalidInput(
                f"image {index} declares {width}x{height} pixels ({width * height}); the limit "
                f"is {max_pixels} pixels (max_image_pixels)"
            )
        total += preprocessing.elements(width, height) if preprocessing else 3 * width * height
    check_elements(total, max_elements)


def check_elements(total: int, max_elements: int) -> None:
    """LimitExceeded when a request's images take more than `max_elements` elements."""
    if total > max_elements:
        raise LimitExceeded(
            f"the request's images take {total} tensor elements once decoded and resized; "
            f"the limit is {max_elements} (max_tensor_elements)"
        )


def decode_images(
    blobs: Sequence[bytes],
    device: torch.device,
    *,
    max_pixels: int,
    max_elements: int,
    preprocessing: Preprocessing | None = None,
) -> list[torch.Tensor]:
    """JPEG/PNG bytes -> RGB uint8 [3, H, W] tensors; JPEGs decode on the GPU when there is one
    (on the CPU when nvJPEG refuses them: then moved to the GPU).

    The headers are checked first (`check_images`); a failed allocation or a failed device
    is re-raised as it is, for the caller to report as out of memory or a device failure.
    """
    if not blobs:
        raise InvalidInput("no images given")
    check_images(blobs, max_pixels, max_elements, preprocessing)
    datas = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    if device.type == "cuda" and all(blob.startswith(_JPEG) for blob in blobs):
        try:
            # nvJPEG writes its outputs on a stream of its own without waiting for this
            # thread's: memory freed here may still be read by kernels queued on it
            # (pytorch/vision#9606). Wait for them, this thread's own work only.
            torch.cuda.current_stream(device).synchronize()
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as error:
            if is_oom(error) or is_device_failure(error):
                raise
            # A JPEG nvJPEG does not take (some progressive or CMYK ones), or no nvJPEG in
            # this CUDA runtime: the CPU decodes them, and says which image is not a JPEG.
            log.debug("JPEGs not decoded on %s (%s): on the CPU", device, error)
    decoded = []
    for index, data in enumerate(datas):
        try:
            decoded.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
        except RuntimeError as error:
            if is_oom(error) or is_device_failure(error):
                raise
            raise InvalidInput(
                f"image {index} is not a decodable JPEG or PNG: {str(error).splitlines()[0]}"
            ) from None
    return decoded
