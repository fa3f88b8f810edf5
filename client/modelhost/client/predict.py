"""Predict for both clients: inputs (arrays, tensors, images) to the request, the reply
back to the caller's kind of tensor or to top classes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelhost.client import codec, wire
from modelhost.client.errors import decoding
from modelhost.client.types import TopClass
from modelhost.v1 import modelhost_pb2 as pb

SINGLE_INPUT = "input"
SINGLE_OUTPUT = "output"
CACHE_TRAILER = "modelhost-cache"
"""Trailing metadata of every Predict: "hit" (its version was resident) or "miss" (the
request waited for a page-in: the model cache)."""

ImageSource = str | os.PathLike[str] | bytes
"""A JPEG/PNG image for `predict(images=...)`: a file path or the encoded bytes."""


class PredictCall:
    """Encodes Predict inputs and decodes the outputs into the caller's kind of tensor."""

    def __init__(
        self,
        model: str,
        inputs: Any,
        version: int | None,
        *,
        images: Sequence[ImageSource] | None = None,
        top_k: int = 0,
    ) -> None:
        self.single = not isinstance(inputs, Mapping)
        named = {} if inputs is None else {SINGLE_INPUT: inputs} if self.single else dict(inputs)
        if isinstance(images, (str, bytes, os.PathLike)):
            raise TypeError(
                f"images must be a list of image paths or bytes, not a single "
                f"{type(images).__name__}: images=[{images!r:.60}]"
            )
        if not named and not images:
            raise ValueError("predict needs inputs or images")
        if named and images:
            raise ValueError("predict takes inputs or images, not both")
        self.as_torch = bool(named) and codec.is_torch(next(iter(named.values())))
        self.top_k = top_k
        self.payload = wire.predict_request(
            model,
            version or 0,
            {key: _raw(key, value, self.single) for key, value in named.items()},
            [_image_bytes(index, image) for index, image in enumerate(images or ())],
            top_k,
        )

    @property
    def request(self) -> pb.PredictRequest:
        """The request as a message (the call itself sends `payload`, its serialized form)."""
        return pb.PredictRequest.FromString(self.payload)

    @decoding("PredictResponse")
    def result(self, response: pb.PredictResponse) -> Any:
        """With top_k, the top classes per row; else one array for one input and one
        output, or a dict of them by output name."""
        if self.top_k:
            return [_top_classes(row) for row in response.top_k]
        outputs = {  # sorted: "0", "1", ..., "10" (a tuple's order); "0.a" before "0.b"
            key: codec.to_torch(tensor).clone() if self.as_torch else codec.to_numpy(tensor)
            for key, tensor in sorted(response.outputs.items(), key=lambda item: _order(item[0]))
        }
        if self.single and set(outputs) == {SINGLE_OUTPUT}:
            return outputs[SINGLE_OUTPUT]
        return outputs


def _order(name: str) -> list[tuple[int, int | str]]:
    """A stable order of output names (a wire map keeps none): they join tuple positions
    and dict keys with ".", and positions compare as numbers, so tuples keep their order."""
    return [(0, int(part)) if part.isdecimal() else (1, part) for part in name.split(".")]


def _top_classes(row: pb.TopClasses) -> list[TopClass]:
    labels = list(row.labels) or [""] * len(row.indices)
    if not len(row.indices) == len(row.scores) == len(labels):
        raise ValueError(
            f"a top_k row of {len(row.indices)} indices, {len(row.scores)} scores "
            f"and {len(row.labels)} labels"
        )
    return [TopClass(i, s, n) for i, s, n in zip(row.indices, row.scores, labels, strict=True)]


def _raw(name: str, value: Any, single: bool) -> codec.Raw:
    """An input's `codec.Raw`; TypeError names the input, and a path given for an array."""
    what = "inputs" if single else f"input {name!r:.40}"
    if not isinstance(name, str):
        raise TypeError(f"input names must be str, not {type(name).__name__} {name!r:.40}")
    if isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{what} must be an array (numpy or torch), not {type(value).__name__} "
            f"{value!r:.60}: load a .npy file first (np.load), and send images as "
            "images=[path, ...]"
        )
    try:
        return codec.raw(value)
    except TypeError as error:
        raise TypeError(f"{what}: {error}") from None


def _image_bytes(index: int, image: ImageSource) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"images[{index}] must be a path or the encoded bytes of a JPEG/PNG image, not "
            f"{type(image).__name__} (to send an array, pass it as inputs)"
        )
    return Path(image).read_bytes()
