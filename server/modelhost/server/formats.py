"""Checkpoint formats: recognising a file, validating it, and reading its weights safely.

Recognised by content, never by name:
- safetensors: an 8-byte little-endian header length, then a JSON header.
- torch.save zip archives: a state_dict, a general checkpoint
  (`model_state_dict` + optimizer state, epoch, loss), or (refused unless allowed)
  a pickled whole model; or a torch.export archive (`archive_format` entry).

`torch.load` is called with `weights_only=True`: its unpickler refuses every global
outside torch's allow-list, so a file cannot run code. The one exception is
`load_pickled_model`, reached only when the operator set `allow_pickled_models`.

torch inflates a compressed zip entry whole in memory, so every zip archive is checked
from its central directory alone (`check_archive`) before torch opens it: the directory
must be where its end record says and not too big, entries stored (torch.save and
torch.export.save never compress) and not larger than the file, and its pickle at most
MAX_PICKLE_BYTES (`modelhost.client.archives`, which the client uses too).
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from modelhost.client import archives
from modelhost.server.errors import InvalidCheckpoint, Refused
from modelhost.server.store import Contents

STATE_DICT = "state_dict"
GENERAL_CHECKPOINT = "general_checkpoint"
SAFETENSORS = "safetensors"
EXPORTED_PROGRAM = "exported_program"
PICKLED_MODEL = "pickled_model"

# Keys that hold the model's weights inside a general (training) checkpoint.
MODEL_KEYS = ("model_state_dict", "state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_SAFETENSORS_HEADER = 100 << 20
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")

PICKLE_ADVICE = (
    "Send the weights instead: torch.save(model.state_dict(), path) or a safetensors "
    "file, and name the architecture in LoadModel."
)


UNSAFE_ADVICE = (
    "An operator who trusts every uploader can allow them with --allow-pickled-models "
    "(MODELHOST_ALLOW_PICKLED_MODELS=true)."
)


class PickledObjects(InvalidCheckpoint):
    """The file holds pickled Python objects that weights_only loading refuses."""


def inspect(path: Path, *, allow_pickled: bool = False) -> Contents:
    """Validates a stored file and says what it holds; InvalidCheckpoint if unusable.

    Never runs code from the file: whole pickled models and exported programs are
    only recognised here (and Refused unless `allow_pickled`: FAILED_PRECONDITION, as the
    server's setting decides), not loaded.
    """
    kind = sniff(path)
    if kind == SAFETENSORS:
        return Contents(SAFETENSORS, len(_safetensors_keys(path)))
    if kind == EXPORTED_PROGRAM:
        if not allow_pickled:
            raise Refused(
                "refused: an exported program (torch.export) can only be loaded with "
                "torch.export.load, which unpickles parts of the archive (weights, "
                f"constants, sample inputs) and so can run code from the file. {PICKLE_ADVICE} "
                f"{UNSAFE_ADVICE}"
            )
        _check_nested_archives(path)  # sniff checked the archive itself
        return Contents(EXPORTED_PROGRAM, _archive_count(path, "/data/weights/weight_"))
    try:
        return _describe(_torch_load(path))  # sniff checked the archive
    except PickledObjects as error:
        if not allow_pickled:
            raise Refused(f"{error} {UNSAFE_ADVICE}") from None
        _check_pickle_structure(path)
        return Contents(PICKLED_MODEL, _archive_count(path, "/data/"))


def _archive_count(path: Path, marker: str) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(
            1 for name in archive.namelist() if marker in name and not name.endswith(".json")
        )


def _check_pickle_structure(path: Path) -> None:
    """Parses the pickle opcodes without executing any (a corrupt file fails here)."""
    try:
        if not zipfile.is_zipfile(path):
            raise InvalidCheckpoint("a pickled model must be a torch.save zip archive")
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            for _ in pickletools.genops(archive.read(name)):
                pass
    except (StopIteration, *archives.BROKEN) as error:
        raise InvalidCheckpoint(f"not a readable pickled model: {error}") from None


def sniff(path: Path) -> str:
    """The container kind: safetensors, exported_program or torch (zip or legacy)."""
    with path.open("rb") as file:
        head = file.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            return SAFETENSORS
    if head[:4] == archives.MAGIC:
        names = check_archive(path)
        if any(name.endswith("/archive_format") for name in names):
            return EXPORTED_PROGRAM
        return "torch"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy (non-zip) format
        return "torch"
    raise InvalidCheckpoint(
        "not a checkpoint: expected a torch.save file, a safetensors file or a torch.export archive"
    )


def check_archive(path: Path) -> list[str]:
    """The entry names of a zip archive, read from its central directory alone (nothing is
    inflated); InvalidCheckpoint for a broken archive or a zip bomb (`_directory`)."""
    try:
        with path.open("rb") as file:
            entries = _directory(file, path.stat().st_size, "the archive")
    except archives.BROKEN as error:
        raise InvalidCheckpoint(f"not a checkpoint: broken zip archive ({error})") from None
    return [entry.filename for entry in entries]


def _directory(file: IO[bytes], size: int, what: str) -> list[zipfile.ZipInfo]:
    """The entries of the zip archive in `file`, checked before anything is inflated
    (`archives.entries`: where its directory is, its size, the entries' sizes)."""
    try:
        return archives.entries(file, size, what)
    except archives.UnsafeArchive as error:
        raise InvalidCheckpoint(str(error)) from None


def _check_nested_archives(path: Path) -> None:
    """The check of `check_archive` for every entry of a checked archive that is a zip
    archive itself (torch.export.load calls torch.load on some entries: pickled weights,
    sample inputs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                with archive.open(entry) as member:  # stored: a seekable view, no inflating
                    if member.read(len(archives.MAGIC)) == archives.MAGIC:
                        member.seek(0)
                        _directory(member, entry.file_size, f"the archive in {entry.filename}")
    except archives.BROKEN as error:
        raise InvalidCheckpoint(f"not a checkpoint: broken zip archive ({error})") from None


def _is_zip(path: Path) -> bool:
    """Whether torch.load reads `path` as a zip archive (else as a legacy pickle)."""
    with path.open("rb") as file:
        return file.read(len(archives.MAGIC)) == archives.MAGIC


def load_torch(path: Path) -> Any:
    """`torch.load(weights_only=True)`, memory-mapped when the file allows it; a zip
    archive is checked first (`check_archive`)."""
    if _is_zip(path):
        check_archive(path)
    return _torch_load(path)


def _torch_load(path: Path) -> Any:
    """`load_torch` of a file whose archive is checked already."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSAFE_GLOBAL.search(str(error))
        what = f" ({found.group(1)})" if found else ""
        raise PickledObjects(
            f"refused: the file holds pickled Python objects{what}, and loading those runs "
            f"code from the file (a whole model saved with torch.save(model)?). {PICKLE_ADVICE}"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # a corrupt pickle fails in many ways (IndexError, struct.error)
        raise InvalidCheckpoint(f"not a readable torch.save file: {error}") from None


def _describe(obj: Any) -> Contents:
    if _is_state_dict(obj):
        return Contents(STATE_DICT, len(obj))
    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            if _is_state_dict(obj.get(key)):
                return Contents(
                    GENERAL_CHECKPOINT,
                    len(obj[key]),
                    epoch=_epoch(obj.get("epoch")),
                    loss=_loss(obj.get("loss")),
                )
        keys = ", ".join(sorted(map(str, obj))[:10])
        raise InvalidCheckpoint(
            f"no model weights found: expected a state_dict, or a dict with one of "
            f"{', '.join(MODEL_KEYS)}; top-level keys are: {keys}"
        )
    raise InvalidCheckpoint(f"no model weights found: the file holds a {type(obj).__name__}")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return None if isinstance(value, bool) else value


def _epoch(value: Any) -> int | None:
    """A training checkpoint's epoch, when it is an integer that fits an int64."""
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and -(2**63) <= value < 2**63 else None


def _loss(value: Any) -> float | None:
    """A training checkpoint's loss, when it is a number a double can hold (nan included)."""
    value = _scalar(value)
    try:
        return float(value) if isinstance(value, (int, float)) else None
    except OverflowError:
        return None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return list(file.keys())
    except Exception as error:  # safetensors raises its own error types
        raise InvalidCheckpoint(f"corrupt safetensors file: {error}") from None


def read_weights(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The model weights of a stored checkpoint, memory-mapped (no copy yet)."""
    if fmt == SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:
            raise InvalidCheckpoint(f"corrupt safetensors file: {error}") from None
    if fmt not in (STATE_DICT, GENERAL_CHECKPOINT):
        raise InvalidCheckpoint(f"a {fmt} checkpoint holds no state_dict to load")
    obj = load_torch(path)
    if fmt == GENERAL_CHECKPOINT:
        obj = next(obj[key] for key in MODEL_KEYS if _is_state_dict(obj.get(key)))
    if not _is_state_dict(obj):
        raise InvalidCheckpoint(f"the checkpoint holds no state_dict (a {type(obj).__name__})")
    return obj  # keeps the state_dict's _metadata


def strip_wrapper_prefixes(
    state: dict[str, torch.Tensor], expected: Collection[str]
) -> dict[str, torch.Tensor]:
    """Removes `module.` / `_orig_mod.` prefixes when every key has one and the model's don't."""
    expected = set(expected)
    metadata = getattr(state, "_metadata", None)
    changed = True
    while changed and state and not (state.keys() & expected):
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                if metadata is not None:
                    metadata = {
                        k.removeprefix(prefix.rstrip(".")).lstrip("."): v
                        for k, v in metadata.items()
                    }
                changed = True
    if metadata is not None and not hasattr(state, "_metadata"):
        state = collections.OrderedDict(state)
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


def load_pickled_model(path: Path) -> torch.nn.Module:
    """UNSAFE, opt-in only: unpickles a whole model (runs code from the file)."""
    check_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise InvalidCheckpoint(
            f"the pickled model needs a class the server cannot import: {error}"
        ) from None
    except Exception as error:
        raise InvalidCheckpoint(f"the pickled model failed to load: {error}") from None
    if not isinstance(obj, torch.nn.Module):
        raise InvalidCheckpoint(f"the pickle holds a {type(obj).__name__}, not an nn.Module")
    return obj


def load_exported_program(path: Path) -> torch.export.ExportedProgram:
    """UNSAFE, opt-in only: torch.export.load unpickles parts of the archive."""
    check_archive(path)
    _check_nested_archives(path)
    try:
        with path.open("rb") as file:  # a file object: the blob's name has no .pt2 suffix
            return torch.export.load(file)
    except Exception as error:
        raise InvalidCheckpoint(f"the exported program failed to load: {error}") from None
