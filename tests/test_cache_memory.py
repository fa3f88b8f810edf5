"""Memory really comes back: load / evict / page-in / unload cycles return what they took.

On a GPU (bench/gpu_check.sh): `torch.cuda.memory_allocated()` and the pinned host memory
torch holds return to where they were before the version was loaded, over 50 cycles, and a
host-tier page-in answers bit for bit what the version answered before its eviction. On
the CPU: the process does not keep growing over the same cycles."""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from conftest import build
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running

ARGS = {"features": 64, "hidden": 2048, "classes": 16}
MODEL_BYTES = 4 * (64 * 2048 + 2048 + 2048 * 16 + 16)
X = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def cycle(client: ModelHostClient, device: str) -> None:
    """Loads a and b where only one fits (b evicts a), pages a back in, unloads both."""
    for name in "ab":
        client.load_model(
            name, architecture="tiny_mlp", checkpoint="w", architecture_args=ARGS, device=device
        )
    client.predict("a", X)  # pages a in, evicting b
    client.unload_model("a")
    client.unload_model("b")


@pytest.fixture
def one_fits(settings: Settings) -> Iterator[tuple[Server, ModelHostClient]]:
    budget = MODEL_BYTES + MODEL_BYTES // 2
    limited = dataclasses.replace(settings, device_memory_budget=budget)
    with running(limited) as server, ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("w", build("tiny_mlp", ARGS).state_dict())
        yield server, client


def test_cpu_memory_does_not_grow_over_load_evict_unload_cycles(
    one_fits: tuple[Server, ModelHostClient],
) -> None:
    server, client = one_fits
    for _ in range(5):  # allocator pools and caches settle
        cycle(client, "cpu")
    settled = rss_bytes()
    for _ in range(50):
        cycle(client, "cpu")
    grown = rss_bytes() - settled
    # 50 cycles load 150 copies of the weights (about 40 MB in all): a leak of even one
    # copy per cycle would add 27 MB. Allocator noise stays under 8 MB.
    assert grown < 8 << 20, f"resident memory grew {grown / 2**20:.1f} MiB over 50 cycles"
    assert client.list_models() == []
    assert server.host is not None
    assert server.host.models.cache.usage()["cpu"][0] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_comes_back_over_50_cycles(
    one_fits: tuple[Server, ModelHostClient],
) -> None:
    _, client = one_fits
    cycle(client, "cuda")  # CUDA context, kernels, allocator pools
    torch.cuda.synchronize()
    before, pinned_before = torch.cuda.memory_allocated(), pinned_host_bytes()
    for _ in range(50):
        cycle(client, "cuda")
    torch.cuda.synchronize()
    after, pinned_after = torch.cuda.memory_allocated(), pinned_host_bytes()
    assert after - before <= 2 << 20, f"{(after - before) / 2**20:.1f} MiB still allocated"
    # Page-locked host memory too (the host tier's buffers, 1 MiB blocks here: torch's
    # host allocator rounds up to a power of two and keeps freed blocks cached): every
    # cycle moves a and b to the host tier, so a buffer kept per cycle would add 50 MiB.
    grown = pinned_after - pinned_before
    assert grown <= 2 << 20, f"pinned host memory grew {grown / 2**20:.1f} MiB over 50 cycles"


def pinned_host_bytes() -> int:
    """Pinned host memory torch's host allocator holds, in use and cached."""
    return int(torch.cuda.host_memory_stats()["allocated_bytes.current"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_host_tier_page_in_is_bit_identical(
    one_fits: tuple[Server, ModelHostClient],
) -> None:
    _, client = one_fits
    for name in "ab":
        client.load_model(
            name, architecture="tiny_mlp", checkpoint="w", architecture_args=ARGS, device="cuda"
        )
        if name == "a":
            before = client.predict("a", X)
    assert client.get_model("a").tier == "host"  # b made a leave for host memory
    after = client.predict("a", X)
    np.testing.assert_array_equal(after, before)
    info = client.get_model("a")
    assert info.page_ins == 1 and info.tier == "resident"
    assert client.get_model("b").tier == "host"
