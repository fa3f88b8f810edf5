"""LoadModel's work: build the architecture, load the weights, move to the device.

The fast path allocates nothing twice: the module is built on the meta device,
the checkpoint is memory-mapped, `load_state_dict(assign=True)` adopts the mapped
tensors as parameters, and `.to(device, dtype)` makes the only copy. Modules that
cannot take that path (non-persistent buffers, missing keys with strict=False, a
builder that needs real tensors) are built on the CPU and loaded by copy.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelhost.server import formats
from modelhost.server.architectures import ArchitectureCatalog, Builder
from modelhost.server.devices import is_oom, module_bytes, release_memory
from modelhost.server.errors import InvalidCheckpoint, OutOfMemory
from modelhost.server.store import CheckpointRecord, CheckpointStore

log = logging.getLogger(__name__)

_MAX_LISTED_KEYS = 10


@dataclass(frozen=True)
class LoadSpec:
    """What to load: validated request fields."""

    name: str
    architecture: str
    args: dict[str, Any]
    checkpoint: str
    device: torch.device
    dtype: torch.dtype | None
    strict: bool = True


@dataclass
class LoadedModule:
    """An eval-mode module on its device, and what loading it found."""

    module: nn.Module
    record: CheckpointRecord
    builder: Builder
    device: torch.device
    dtype: torch.dtype
    parameter_count: int
    device_bytes: int
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0


def load_module(
    spec: LoadSpec, store: CheckpointStore, catalog: ArchitectureCatalog
) -> LoadedModule:
    """Builds and loads `spec`; raises InvalidCheckpoint naming keys that do not fit."""
    started = time.perf_counter()
    builder = catalog.get(spec.architecture)
    record = store.get(spec.checkpoint)
    module: nn.Module | None = None
    try:
        state = formats.read_weights(store.blob_path(record), record.format)
        module = builder.build(spec.args, "meta")
        expected = module.state_dict()
        state = formats.strip_wrapper_prefixes(state, expected.keys())
        missing, unexpected = _check_keys(spec, state, expected)
        if _on_meta(module):
            module.load_state_dict(state, strict=spec.strict, assign=True)
        if _on_meta(module):  # something the checkpoint does not hold: build for real
            module = builder.build(spec.args, "cpu")
            module.load_state_dict(state, strict=spec.strict)
        del state
        module.to(device=spec.device, dtype=spec.dtype)
        module.eval().requires_grad_(False)
        if spec.device.type == "cuda":
            torch.cuda.synchronize(spec.device)
    except Exception as error:
        module = None
        if is_oom(error):
            release_memory(spec.device)
            raise OutOfMemory(
                f"out of memory loading {spec.architecture!r} from {spec.checkpoint!r} "
                f"onto {spec.device}: {str(error).splitlines()[0]}"
            ) from None
        raise
    return LoadedModule(
        module=module,
        record=record,
        builder=builder,
        device=spec.device,
        dtype=_float_dtype(module),
        parameter_count=sum(p.numel() for p in module.parameters()),
        device_bytes=module_bytes(module),
        missing_keys=missing,
        unexpected_keys=unexpected,
        seconds=time.perf_counter() - started,
    )


def _check_keys(
    spec: LoadSpec, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} (checkpoint {list(state[key].shape)}, model {list(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + _listing(mismatched))
    if spec.strict and missing:
        problems.append("missing keys: " + _listing(missing))
    if spec.strict and unexpected:
        problems.append("unexpected keys: " + _listing(unexpected))
    if problems:
        raise InvalidCheckpoint(
            f"checkpoint {spec.checkpoint!r} does not fit architecture {spec.architecture!r} "
            f"with arguments {spec.args}: " + "; ".join(problems)
        )
    return missing, unexpected


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown} (and {more} more)" if more > 0 else shown


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _float_dtype(module: nn.Module) -> torch.dtype:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
