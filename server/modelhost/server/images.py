"""Image inputs: decoding JPEG/PNG and torchvision-style preprocessing on the model's device.

The steps are those of torchvision's `ImageClassification` transforms, in the same
order and with the same functions, so a served model sees exactly the tensor the
in-process `weights.transforms()(image)` would give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from modelhost.server.errors import InvalidArgument, InvalidInput

_JPEG = b"\xff\xd8\xff"


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
        if len(self.mean) != len(self.std) or any(s == 0 for s in self.std):
            raise InvalidArgument("preprocessing mean and std need one non-zero value per channel")

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
        return torch.cat([self._batch(image.unsqueeze(0), dtype) for image in images])

    def _batch(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mode = InterpolationMode(self.interpolation)
        if self.resize:
            images = F.resize(images, [self.resize], interpolation=mode, antialias=True)
        if self.crop:
            images = F.center_crop(images, [self.crop])
        images = F.convert_image_dtype(images, torch.float32)
        if self.mean:
            images = F.normalize(images, mean=list(self.mean), std=list(self.std))
        return images.to(dtype)


def decode_images(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG/PNG bytes -> RGB uint8 [3, H, W] tensors; JPEGs decode on the GPU when there is one."""
    if not blobs:
        raise InvalidInput("no images given")
    datas = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    if device.type == "cuda" and all(blob.startswith(_JPEG) for blob in blobs):
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as error:
            raise InvalidInput(f"an image is not a decodable JPEG: {error}") from None
    decoded = []
    for index, data in enumerate(datas):
        try:
            decoded.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
        except RuntimeError as error:
            raise InvalidInput(
                f"image {index} is not a decodable JPEG or PNG: {str(error).splitlines()[0]}"
            ) from None
    return decoded
