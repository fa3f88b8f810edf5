"""The model cache's host tier, run on the CPU.

On a GPU, an evicted version keeps its weights in pinned host memory (host_tier.py) while
`--host-memory-budget` has room, and a page-in is one copy. A CPU version would gain
nothing from it, so the server never does that on the CPU; these tests turn it on for the
CPU (`cache.HOST_TIER_DEVICES`) to run the tier's bookkeeping without a GPU: its budget,
page-ins from it, the copy made outside the cache's lock, and unloads meanwhile."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from test_cache import ARGS, BUDGET, MODEL_BYTES, X, counter, load, random_mix, same, tiers

from conftest import build, reference
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, cache, running
from modelhost.server.host_tier import layout

HOST_BYTES = layout(build("tiny_mlp", ARGS))[1]  # a tiny_mlp's weights, each place aligned


@pytest.fixture(autouse=True)
def host_tier_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "HOST_TIER_DEVICES", frozenset({"cuda", "cpu"}))


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    """Room for three versions on the device, and for two in the host tier."""
    budgets = dataclasses.replace(
        settings, device_memory_budget=BUDGET, host_memory_budget=2 * HOST_BYTES + 100
    )
    with running(budgets) as srv:
        yield srv


def host_bytes(server: Server) -> float:
    return counter(server, "modelhost_host_tier_bytes")


def test_evicted_versions_keep_their_weights_in_host_memory_within_its_budget(
    client: ModelHostClient, server: Server
) -> None:
    twins = {name: load(client, name, seed) for seed, name in enumerate("abc")}
    before = client.predict("a", X)
    for name in "bc":
        client.predict(name, X)  # oldest first: a, b, c
    for seed, name in enumerate("def", 3):
        twins[name] = load(client, name, seed)
    # a and b fill the host tier; c, evicted third, drops to the store.
    assert tiers(client) == {
        "a": "host",
        "b": "host",
        "c": "store",
        "d": "resident",
        "e": "resident",
        "f": "resident",
    }
    assert host_bytes(server) == 2 * HOST_BYTES
    assert counter(server, "modelhost_host_tier_budget_bytes") == 2 * HOST_BYTES + 100
    assert counter(server, "modelhost_evictions_total", model="a", version="1", tier="host") == 1
    assert counter(server, "modelhost_evictions_total", model="c", version="1", tier="store") == 1
    # A page-in from the host tier answers bit-identically to before the eviction. The
    # least recently used (d) leaves for it to the store: a's copy is in host memory until
    # its page-in is done, which makes room on the device first.
    np.testing.assert_array_equal(client.predict("a", X), before)
    assert counter(server, "modelhost_page_ins_total", model="a", version="1", tier="host") == 1
    assert tiers(client)["a"] == "resident" and tiers(client)["d"] == "store"
    assert host_bytes(server) == HOST_BYTES
    client.predict("d", X)  # e leaves, into the place a left in the host tier
    assert tiers(client)["e"] == "host" and host_bytes(server) == 2 * HOST_BYTES
    for name, twin in twins.items():
        same(client.predict(name, X), reference(twin, X))
    # Unloading a version in the host tier gives its host memory back.
    in_host = [name for name, tier in tiers(client).items() if tier == "host"]
    client.unload_model(in_host[0])
    assert host_bytes(server) == (len(in_host) - 1) * HOST_BYTES


class SlowCopies:
    """Holds the next copy to the host tier until `go` is set (the real copy then runs);
    later copies run at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        real = cache.to_host

        def held(module: torch.nn.Module, **options: Any) -> Any:
            if not self.started.is_set():
                self.started.set()
                assert self.go.wait(60)
            return real(module, **options)

        monkeypatch.setattr(cache, "to_host", held)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def test_weights_are_copied_to_the_host_outside_the_cache_lock(
    client: ModelHostClient, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    twins = {name: load(client, name, seed) for seed, name in enumerate("abc")}
    before = client.predict("a", X)
    for name in "bc":
        client.predict(name, X)
    copies = SlowCopies(monkeypatch)
    loading, _ = in_thread(lambda: load(client, "d", 3))  # evicts a; its copy is held
    assert copies.started.wait(30)
    # The cache's lock is free meanwhile (a scrape takes it), and a's weights still count
    # on the device until their copy is done, and in the host tier already.
    scrape, usage = in_thread(
        lambda: (
            counter(server, "modelhost_device_resident_bytes", device="cpu"),
            host_bytes(server),
        )
    )
    scrape.join(10)
    if scrape.is_alive():
        copies.go.set()
        pytest.fail("a scrape waited for the copy to the host: the cache's lock was held")
    assert usage == [(3 * MODEL_BYTES, HOST_BYTES)]
    assert client.get_model("a").tier == "host"
    same(client.predict("c", X), reference(twins["c"], X))
    # A request for a waits for the copy, then pages it in from the host tier.
    paging, answer = in_thread(lambda: client.predict("a", X))
    paging.join(0.3)
    assert paging.is_alive()
    copies.go.set()
    for thread in (loading, paging):
        thread.join(60)
    np.testing.assert_array_equal(answer[0], before)
    assert counter(server, "modelhost_page_ins_total", model="a", version="1", tier="host") == 1
    assert tiers(client)["a"] == "resident"
    assert_host_tier_holds_what_it_lists(client, server)


def assert_host_tier_holds_what_it_lists(client: ModelHostClient, server: Server) -> None:
    """The host tier holds one copy for each version listed in it, and nothing else."""
    listed = sum(tier == "host" for tier in tiers(client).values())
    assert host_bytes(server) == listed * HOST_BYTES


def test_a_version_unloaded_while_its_weights_are_copied_to_the_host_keeps_nothing(
    client: ModelHostClient, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    twins = {name: load(client, name, seed) for seed, name in enumerate("abc")}
    copies = SlowCopies(monkeypatch)
    loading, _ = in_thread(lambda: load(client, "d", 3))  # evicts a; its copy is held
    assert copies.started.wait(30)
    client.unload_model("a")  # no request holds it: the unload does not wait for the copy
    copies.go.set()
    loading.join(60)
    assert "a" not in tiers(client)
    assert host_bytes(server) == 0
    # Review 17, 3: the eviction, done after the unload, recorded its count for "a",
    # whose series the unload had removed: they stayed for good.
    assert server.host is not None
    labelled = {
        sample.labels.get("model")
        for family in server.host.metrics.registry.collect()
        for sample in family.samples
    }
    assert "a" not in labelled
    same(client.predict("b", X), reference(twins["b"], X))


def test_random_mix_with_a_host_tier(client: ModelHostClient, server: Server) -> None:
    """Seven versions, room for three on the device and two in host memory: every answer
    right, none failed, the budgets never passed."""
    twins = {f"m{i}": load(client, f"m{i}", i) for i in range(7)}
    seen: list[tuple[float, float]] = []

    def look() -> None:
        resident = counter(server, "modelhost_device_resident_bytes", device="cpu")
        seen.append((resident, host_bytes(server)))

    failures = random_mix(server, twins, look)
    assert failures == [], failures[:5]
    assert max(device for device, _ in seen) <= BUDGET
    assert max(host for _, host in seen) <= 2 * HOST_BYTES
    page_ins = {
        tier: sum(
            counter(server, "modelhost_page_ins_total", model=name, version="1", tier=tier)
            for name in twins
        )
        for tier in ("host", "store")
    }
    assert page_ins["host"] > 0 and page_ins["store"] > 0
    assert_host_tier_holds_what_it_lists(client, server)
