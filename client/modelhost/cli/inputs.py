"""`modelhost predict`'s input files: .npy arrays and JPEG/PNG images, told apart by
their first bytes. Any other file (a .npz, a checkpoint, a WebP image, text) is refused
before the call, naming the file, what it is and what predict takes; .npy files are
read without pickles (`allow_pickle=False`), and their dtype is checked here."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelhost.client import codec
from modelhost.client.predict import SINGLE_INPUT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NPY_MAGIC = b"\x93NUMPY"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAKES = "predict takes .npy arrays (as np.save writes them) and JPEG or PNG images"
UPLOAD = "a checkpoint is uploaded with `modelhost upload NAME FILE`"
OTHER_IMAGES = (
    (lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP", "a WebP image"),
    (lambda head: head[:6] in (b"GIF87a", b"GIF89a"), "a GIF image"),
    (lambda head: head[:4] in (b"II*\x00", b"MM\x00*"), "a TIFF image"),
    (
        lambda head: head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1"),
        "a HEIC image",
    ),
    (lambda head: head[4:8] == b"ftyp" and head[8:12] == b"avif", "an AVIF image"),
    (lambda head: head[:2] == b"BM" and len(head) >= 26, "a BMP image"),
)


class InputError(ValueError):
    """An input file predict cannot send; its message names the file."""


def read_inputs(items: Sequence[str]) -> tuple[dict[str, np.ndarray[Any, Any]], list[str]]:
    """The arrays (by input name) and the image paths that `items` name: `FILE` or
    `NAME=FILE`, each a .npy array or a JPEG/PNG image by its content (an image is
    also what is named .jpg, .jpeg or .png, and refused if it is none)."""
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    sources: dict[str, str] = {}
    images: list[str] = []
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or Path(item).is_file():  # a file whose name holds "=" is a file
            name, path = "", item
        head = _head(path)
        if _is_image(head):
            if name:
                raise InputError(
                    f"{path} is an image: images take no NAME= (the model's preprocessing "
                    f"makes its input of them): give {path} alone"
                )
            images.append(path)
            continue
        if path.lower().endswith(IMAGE_SUFFIXES):
            raise InputError(f"{path} is {_what(path, head)}, not a JPEG or PNG image")
        if not head.startswith(NPY_MAGIC):
            raise InputError(_not_an_input(path, head))
        name = name or SINGLE_INPUT
        if name in inputs:
            raise InputError(
                f"input {name!r} is given twice ({sources[name]} and {path}): name each "
                "input of a model that takes several, NAME=FILE.npy"
            )
        inputs[name], sources[name] = read_npy(path), path
    return inputs, images


def read_npy(path: str) -> np.ndarray[Any, Any]:
    """A .npy array, never unpickled, of a dtype predict can send."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InputError(
                f"{path} holds Python objects (an array of dtype object), which predict "
                f"cannot send: save a numeric array (dtypes: {codec.SUPPORTED})"
            ) from None
        raise InputError(f"{path} is not a readable .npy file: {error}") from None
    if not codec.numpy_supported(array.dtype):
        raise InputError(
            f"{path}: dtype {array.dtype} is not supported (supported: {codec.SUPPORTED})"
        )
    return array


def _head(path: str) -> bytes:
    """The first bytes of `path`: enough to tell the formats apart."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    with open(path, "rb") as file:
        return file.read(512)


def _is_image(head: bytes) -> bool:
    return head.startswith((JPEG_MAGIC, PNG_MAGIC))


def _not_an_input(path: str, head: bytes) -> str:
    what = _what(path, head)
    if what.endswith(" image"):
        return f"{path} is {what}: images must be JPEG or PNG"
    if what.startswith("an .npz"):
        return f"{path} is {what}: predict takes one .npy file per input, NAME=FILE.npy"
    if "torch.save" in what or "safetensors" in what:
        return f"{path} is {what}, not a .npy array: {TAKES} ({UPLOAD})"
    return f"{path} is {what}: {TAKES}"


def _what(path: str, head: bytes) -> str:
    """What a file is, in a few words, from its first bytes: "a text file"."""
    if not head:
        return "an empty file"
    if head.startswith(NPY_MAGIC):
        return "a .npy array"
    for test, what in OTHER_IMAGES:
        if test(head):
            return what
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_what(path)
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file (torch.save's legacy format?)"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # a character cut at the end of the head is text
        text = head[: error.start].decode("utf-8") if error.start > len(head) - 4 else ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "a text file"
    return "a file of another format"


def _zip_what(path: str) -> str:
    """An .npz archive, a torch.save file or another zip archive, by the names it holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a zip archive"
    if names and all(name.endswith(".npy") for name in names):
        return f"an .npz archive of {len(names)} array{'s' if len(names) > 1 else ''} (np.savez)"
    if any(name.endswith("data.pkl") for name in names):
        return "a torch.save file"
    return "a zip archive"
