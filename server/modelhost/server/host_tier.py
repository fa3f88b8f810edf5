"""The host tier: a GPU version's weights kept in one pinned host buffer while it is off
its device, so that a page-in is one host-to-device copy of that buffer.

Each parameter and buffer of the module gets an aligned place in the buffer; while in host
memory the module's tensors are views of their places, and after a page-in they are views
of the same places in one device buffer (the module keeps its own parameter objects, so
nothing that refers to them goes stale). Tensors keep their dtype, shape and strides
(channels_last included); tied parameters stay tied (each tensor is placed once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 512
"""Bytes each place starts on (what CUDA's caching allocator gives each block)."""


@dataclass
class HostCopy:
    """A module whose weights are views of `buffer` (pinned host memory, for a GPU)."""

    module: nn.Module
    buffer: torch.Tensor  # uint8
    places: list[tuple[torch.Tensor, int]]  # each parameter or buffer, and its byte offset

    @property
    def nbytes(self) -> int:
        """Host memory it holds: PyTorch's pinned allocator rounds each block up to a power
        of two (and keeps freed blocks for reuse)."""
        return held_bytes(self.buffer.numel(), pinned=self.buffer.is_pinned())


def held_bytes(size: int, *, pinned: bool = True) -> int:
    """What a buffer of `size` bytes holds in host memory."""
    return 1 << (size - 1).bit_length() if pinned and size > 1 else size


def hostable(module: nn.Module) -> bool:
    """Whether its tensors can be placed in one buffer: dense, strided and not quantized
    (anything else leaves for the store tier)."""
    return all(
        t.layout == torch.strided and not t.is_quantized and not t.is_nested
        for t in _tensors(module)
    )


def layout(module: nn.Module) -> tuple[list[tuple[torch.Tensor, int]], int]:
    """Each tensor of `module` with its byte offset in a buffer, and the buffer's size."""
    places, size = [], 0
    for tensor in _tensors(module):
        places.append((tensor, size))
        size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return places, size


def place(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The view of `buffer` at `offset` with `like`'s dtype, shape and dense strides (its
    own when it is dense, such as channels_last; else contiguous ones)."""
    strides = torch.empty_like(like, device="meta").stride()
    nbytes = like.numel() * like.element_size()
    return buffer[offset : offset + nbytes].view(like.dtype).as_strided(like.shape, strides)


def to_host(module: nn.Module, *, pin: bool = True) -> HostCopy:
    """Copies the module's weights into one (pinned) host buffer and points the module at
    them there; its device memory is free once this returns."""
    places, size = layout(module)
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    sources = []
    with torch.no_grad():
        for tensor, offset in places:
            view = place(buffer, offset, tensor)
            view.copy_(tensor, non_blocking=pin)
            sources.append(tensor.data)
            tensor.data = view
        _wait(sources)  # the copies are done before their sources can be reused
    return HostCopy(module, buffer, places)


def to_device(copy: HostCopy, device: torch.device) -> nn.Module:
    """The module back on `device`: one copy of the buffer, its tensors views of it. If
    the copy cannot start (out of memory), the module stays as it was, in host memory."""
    on_device = torch.empty_like(copy.buffer, device=device)
    on_device.copy_(copy.buffer, non_blocking=copy.buffer.is_pinned())
    with torch.no_grad():
        for tensor, offset in copy.places:
            tensor.data = place(on_device, offset, tensor)
    _wait([on_device])
    return copy.module


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    unique = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _wait(tensors: list[torch.Tensor]) -> None:
    """Waits for this thread's stream on the GPU the tensors are on (its own copies, not
    the other models' batches)."""
    for tensor in tensors:
        if tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()
            return
