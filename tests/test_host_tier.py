"""The host tier's one-buffer layout: a module's weights as aligned views of one buffer,
bit for bit, with their dtypes, strides and ties (pinned memory and the GPU copies run in
tests/test_cache_memory.py on a GPU; here the same code runs with unpinned CPU memory)."""

from __future__ import annotations

import torch
from torch import nn

from modelhost.server.host_tier import ALIGN, held_bytes, hostable, layout, to_device, to_host


class Mixed(nn.Module):
    """Parameters and buffers of the kinds hosted models have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.norm = nn.BatchNorm2d(8)  # float buffers and an int64 counter
        self.head = nn.Linear(8, 5).to(torch.bfloat16)
        self.tied = nn.Linear(5, 5, bias=False).to(torch.bfloat16)
        self.tied_too = nn.Linear(5, 5, bias=False).to(torch.bfloat16)
        self.tied_too.weight = self.tied.weight
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("empty", torch.zeros(0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)).mean((2, 3)).to(torch.bfloat16)
        mask = self.get_buffer("mask")
        return self.tied_too(self.tied(self.head(y))).float() + mask.sum()


def trained() -> Mixed:
    torch.manual_seed(0)
    module = Mixed()
    module.norm.train()(module.conv(torch.randn(4, 3, 8, 8)))  # running stats, counter 1
    return module.eval()


def test_weights_become_aligned_views_of_one_buffer_and_answer_the_same() -> None:
    module = trained()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
    parameters = dict(module.named_parameters())
    strides = {name: t.stride() for name, t in module.state_dict().items()}

    copy = to_host(module, pin=False)

    start = copy.buffer.data_ptr()
    for tensor, offset in copy.places:
        assert offset % ALIGN == 0
        assert tensor.data_ptr() == start + offset or tensor.numel() == 0
        end = offset + tensor.numel() * tensor.element_size()
        assert end <= copy.nbytes
    assert {name: t.stride() for name, t in module.state_dict().items()} == strides
    assert module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.head.weight.dtype == torch.bfloat16 and module.mask.dtype == torch.bool
    assert module.tied_too.weight is module.tied.weight  # tied, and placed once
    assert len(copy.places) == len({t.data_ptr() for t, _ in copy.places if t.numel()}) + 1
    assert dict(module.named_parameters()) == parameters  # the same parameter objects
    assert module.norm.num_batches_tracked is not None
    assert int(module.norm.num_batches_tracked) == 1
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_a_page_in_makes_every_tensor_a_view_of_one_new_buffer() -> None:
    module = trained()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
    strides = {name: t.stride() for name, t in module.state_dict().items()}
    copy = to_host(module, pin=False)
    host = range(copy.buffer.data_ptr(), copy.buffer.data_ptr() + copy.nbytes)

    back = to_device(copy, torch.device("cpu"))  # on a GPU: one host-to-device copy

    assert back is module
    placed = [(t.data_ptr(), offset) for t, offset in copy.places if t.numel()]
    start = placed[0][0] - placed[0][1]
    assert all(ptr == start + offset and ptr not in host for ptr, offset in placed)
    assert {name: t.stride() for name, t in module.state_dict().items()} == strides
    assert module.tied_too.weight is module.tied.weight
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_the_buffer_holds_each_tensor_once_rounded_to_the_alignment() -> None:
    module = trained()
    _, size = layout(module)
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    exact = sum(t.numel() * t.element_size() for t in unique)
    assert exact <= size < exact + ALIGN * len(unique)


def test_only_dense_strided_tensors_can_be_hosted() -> None:
    module = trained()
    assert hostable(module)
    module.register_buffer("sparse", torch.eye(3).to_sparse())
    assert not hostable(module)


def test_pinned_buffers_are_counted_as_the_allocator_rounds_them() -> None:
    assert held_bytes(45 << 20) == 64 << 20 and held_bytes(64 << 20) == 64 << 20
    assert held_bytes(45 << 20, pinned=False) == 45 << 20
    copy = to_host(trained(), pin=False)
    assert copy.nbytes == copy.buffer.numel()  # unpinned: exactly its size
