"""Claims on room held by busy versions (cache.py, `RoomClaim`) under red team 16's attacks,
against real servers on 127.0.0.1 with a byte budget on the CPU: a claim that is evicting
its versions does not lapse while it copies them to the host tier, a rollout fails no
request that found its version resident, a claim whose requests left bars its device
only briefly and is counted at once, an unload of a version a claim drains does not wait
for the claim, and a LoadModel whose caller left claims nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_cache import counter
from test_cache_races import BRIEF, SMALL, WIDE, S, W, host, kept_busy, wait_until

from conftest import build, expect, reference
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError, codec
from modelhost.server import Server, Settings, cache, running
from modelhost.server.host_tier import HostCopy
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

LARGE = {"features": 4, "hidden": 64, "classes": 3}  # 2,060 bytes
MID = {"features": 4, "hidden": 24, "classes": 3}  # 780 bytes
X = np.ones((1, 4), np.float32)
HALF = {"features": 4, "hidden": 468, "classes": 3}  # 14,988 bytes


@contextlib.contextmanager
def serving(
    settings: Settings, budget: int, **more: Any
) -> Iterator[tuple[Server, ModelHostClient]]:
    settings = dataclasses.replace(settings, device_memory_budget=budget, **more)
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        yield server, client


def claims(server: Server, outcome: str) -> float:
    return counter(server, "modelhost_room_claims_total", outcome=outcome)


def test_a_claim_does_not_lapse_while_it_copies_its_versions_to_the_host_tier(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 16, F1: a claim evicts its versions one at a time, and a copy to the host
    tier releases the cache's lock; the claim's clock ran on meanwhile. With copies as
    slow as a large GPU model's, it lapsed after evicting one: the others took requests
    again, the evicted one had gone for nothing, and the large version never got in. Once
    its versions are idle together it no longer lapses."""
    monkeypatch.setattr(cache, "HOST_TIER_DEVICES", frozenset({"cuda", "cpu"}))
    copy = cache.ModelCache._copy_to_host

    def slow_copy(hosted: Any, module: torch.nn.Module, pin: bool) -> HostCopy | None:
        time.sleep(0.7)  # two of them pass CLAIM_SECONDS
        return copy(hosted, module, pin)

    monkeypatch.setattr(cache.ModelCache, "_copy_to_host", staticmethod(slow_copy))
    with serving(settings, 2100, host_memory_budget=100_000) as (server, client):
        twins = {"big": host(client, "big", LARGE, 1)}
        twins |= {
            name: host(client, name, MID, seed, delay=BRIEF) for seed, name in ((2, "a"), (3, "b"))
        }
        client.predict("a", X)
        client.predict("b", X)
        with kept_busy(server.target, "a", X, 2) as a, kept_busy(server.target, "b", X, 2) as b:
            time.sleep(0.3)
            answer = client.predict("big", X, timeout=20)
            np.testing.assert_allclose(answer, reference(twins["big"], X), rtol=1e-5)
        assert not a and not b, (a + b)[:3]
        assert claims(server, "got_room") == 1 and claims(server, "lapsed") == 0
        for name in ("a", "b"):
            assert client.get_model(name).page_ins == 1, "evicted more than once"
            np.testing.assert_allclose(
                client.predict(name, X), reference(twins[name], X), rtol=1e-5
            )


def test_a_rollout_fails_no_request_whose_version_a_claim_evicted(settings: Settings) -> None:
    """Red team 16, F2: a LoadModel of version 2 claims the room of version 1, in constant
    use; requests that found version 1 resident wait for the claim, version 1 is evicted
    under them, and the rollout's UnloadModel of version 1 told them it was unloaded while
    it waited to be paged in (UNAVAILABLE). A request for the newest version now goes to
    the newest one left: no request fails, without the client's retries, and each counts
    one cache request (review 18: those that went on counted two)."""
    with serving(settings, 400) as (server, client):  # room for one of them
        host(client, "m", SMALL, 1, delay=BRIEF)
        failures: list[Exception] = []
        answered: list[None] = []
        stop = threading.Event()

        def call() -> None:
            with ModelHostClient(
                server.target, timeout=60, config=ChannelConfig(retries=False)
            ) as once:
                while not stop.is_set():
                    try:
                        once.predict("m", X)
                        answered.append(None)
                    except ModelHostError as error:
                        failures.append(error)

        with ThreadPoolExecutor(3) as callers:
            for _ in range(3):
                callers.submit(call)
            time.sleep(0.5)
            new = host(client, "m", SMALL, 2, delay=BRIEF)  # claims version 1's room
            assert server.host is not None
            # Version 2 stays: version 1's waiting requests cannot page it back in before
            # the unload (review 18, 7: else the test could pass without the fix).
            with server.host.models.registry.lease("m", 2):
                client.unload_model("m", 1)
            time.sleep(0.5)
            stop.set()
        assert not failures, failures[:3]
        assert claims(server, "got_room") >= 1
        counted = sum(
            counter(server, "modelhost_cache_requests_total", result=result)
            for result in ("hit", "miss")
        )
        assert counted == len(answered)
        np.testing.assert_allclose(client.predict("m", X), reference(new, X), rtol=1e-5)
        assert [m.version for m in client.list_models()] == [2]


def test_a_claim_whose_requests_left_is_counted_at_once_and_bars_its_device_briefly(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 16, F4 and F7: a claim whose only request left moments after it was made
    kept its device from claiming for 4 s (CLAIM_BACKOFF, meant for a claim that drained
    its versions for a whole second in vain), and it stayed registered, counted nowhere,
    until the device's next look. Its device is barred in proportion to how long it
    drained them, and it is counted as given up at once, or by the device's page-in thread
    once the cache's lock is free if it was busy as the request left."""
    monkeypatch.setattr(cache, "CLAIM_SECONDS", 2.0)
    monkeypatch.setattr(cache, "CLAIM_BACKOFF", 10.0)  # 5 s per second drained
    with serving(settings, 2100) as (server, client):
        twins = {"big": host(client, "big", LARGE, 1), "big2": host(client, "big2", LARGE, 2)}
        twins["a"] = host(client, "a", MID, 3, delay=BRIEF)
        client.predict("a", X)
        assert server.host is not None
        a = server.host.models.registry.get("a")
        request = pb.PredictRequest(model="big2", inputs={"input": codec.from_numpy(X)})
        # Ten callers of one request at a time: `a` takes 0.5 s to drain.
        with (
            kept_busy(server.target, "a", X, 10) as busy,
            grpc.insecure_channel(server.target) as channel,
        ):
            time.sleep(0.3)
            call = pb_grpc.ModelHostStub(channel).Predict.future(request)  # no deadline
            wait_until(lambda: a.claim is not None, 10)  # claimed after CLAIM_AFTER (1 s)
            big2 = server.host.models.registry.get("big2")
            # The cache's lock busy as the request leaves (as in a CI run once): the page-in
            # thread drops the claim once the lock is free, not the device's next look.
            with server.host.models.cache._cond:
                call.cancel()
                wait_until(lambda: big2.paging_waiters == 0, 5)
                assert claims(server, "given_up") == 0
            wait_until(lambda: claims(server, "given_up") == 1, 2)
            started = time.monotonic()
            answer = client.predict("big", X, timeout=20)  # claims after 1 s, gets in
            took = time.monotonic() - started
        np.testing.assert_allclose(answer, reference(twins["big"], X), rtol=1e-5)
        assert took < 5.0, f"{took:.2f} s: the claim that was given up barred the device"
        assert claims(server, "got_room") == 1
        assert not busy, busy[:3]


def test_an_unload_of_a_version_a_claim_drains_does_not_wait_for_the_claim(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 16, F5: the requests a claim holds back hold their version's lease, so an
    UnloadModel of it waited for them, and they waited for the claim, which could not evict
    a version being unloaded: the unload took until the claim lapsed. They go on as their
    version starts to leave (the unload waits for them, as for any request)."""
    monkeypatch.setattr(cache, "CLAIM_SECONDS", 8.0)
    with serving(settings, 2100) as (server, client):
        twins = {"big": host(client, "big", LARGE, 1), "a": host(client, "a", MID, 2, delay=BRIEF)}
        twins["held"] = host(client, "held", MID, 3)
        client.predict("a", X)
        client.predict("held", X)
        assert server.host is not None
        registry = server.host.models.registry
        a = registry.get("a")
        with (
            ThreadPoolExecutor(1) as waiter,
            kept_busy(server.target, "a", X, 2),
            # `held` stays busy, as with a long request (on a lane of its own: all CPU
            # versions share one, where a long request would hold up `a` too).
            registry.lease("held"),
        ):
            time.sleep(0.3)
            big = waiter.submit(client.predict, "big", X, timeout=30)
            wait_until(lambda: a.claim is not None, 10)  # it needs the room of both
            wait_until(lambda: a.idle, 5)  # drained: its callers' requests wait
            started = time.monotonic()
            client.unload_model("a")
            assert time.monotonic() - started < 4.0, "the unload waited for the claim"
        # `held` is idle: the claim evicts it and `big` gets in.
        np.testing.assert_allclose(big.result(), reference(twins["big"], X), rtol=1e-5)


def test_a_load_whose_caller_left_claims_nothing(settings: Settings) -> None:
    """Red team 16, F6: a LoadModel whose caller's deadline passed went on waiting for room
    and, after CLAIM_AFTER, claimed the room of a version in constant use, evicted it,
    built, and was thrown away. It stops waiting once its caller has left."""
    with serving(settings, 2100) as (server, client):
        host(client, "a", MID, 1, delay=BRIEF)
        big = build("tiny_mlp", LARGE, seed=2)
        client.save_checkpoint("big", big.state_dict())
        client.predict("a", X)
        with kept_busy(server.target, "a", X, 2) as busy:
            time.sleep(0.3)
            for _ in range(2):
                expect(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    lambda: client.load_model(
                        "big",
                        architecture="tiny_mlp",
                        checkpoint="big",
                        architecture_args=LARGE,
                        timeout=0.5,
                    ),
                )
            time.sleep(2.0)  # past CLAIM_AFTER
        assert not busy, busy[:3]
        assert claims(server, "got_room") == 0
        assert client.get_model("a").page_ins == 0, "evicted for a load nobody waited for"
        assert [m.name for m in client.list_models()] == ["a"]


def test_a_claim_that_found_room_elsewhere_bars_its_device_as_one_that_evicted_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 16, F3: a claim got its room by evicting another version that turned idle,
    not its victims, and as one that got its room it let its device claim again at once:
    versions taking turns drained the same busy version back to back, past the bound of
    claims that evict nothing. Such a claim bars its device in proportion to how long it
    drained its victims (here CLAIM_BACKOFF per CLAIM_SECONDS: 3 s for 1.5 s)."""
    monkeypatch.setattr(cache, "CLAIM_SECONDS", 5.0)
    monkeypatch.setattr(cache, "CLAIM_BACKOFF", 10.0)
    budget = 2060 + 780  # `big` or `big2`, and one of the two others
    with serving(settings, budget) as (server, client):
        twins = {"big": host(client, "big", LARGE, 1), "big2": host(client, "big2", LARGE, 2)}
        twins |= {"v": host(client, "v", MID, 3), "h": host(client, "h", MID, 4)}
        client.predict("v", X)  # the least recently used: the claims' victim
        client.predict("h", X)
        assert server.host is not None
        registry = server.host.models.registry
        v = registry.get("v")
        with ThreadPoolExecutor(2) as waiters, registry.lease("v"):  # `v` cannot drain
            with registry.lease("h"):
                big = waiters.submit(client.predict, "big", X, timeout=60)
                wait_until(lambda: v.claim is not None, 10)
                time.sleep(1.5)
            # `h` is idle: `big` evicts it, not its victim, and gets in.
            np.testing.assert_allclose(big.result(), reference(twins["big"], X), rtol=1e-5)
            assert claims(server, "got_room") == 1 and v.claim is None
            ended = time.monotonic()
            with registry.lease("big"):
                big2 = waiters.submit(client.predict, "big2", X, timeout=60)
                wait_until(lambda: v.claim is not None, 20)
                assert time.monotonic() - ended >= 2.5, "claimed again at once"
        np.testing.assert_allclose(big2.result(), reference(twins["big2"], X), rtol=1e-5)


def test_room_made_by_other_versions_does_not_keep_a_claims_victims_waiting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 18, 1: a claim whose room came from a version other than its victims, idle
    at last, counted as evicting them: their requests waited past CLAIM_SECONDS for as
    long as that version was copied to the host tier. Only victims idle together keep
    a claim from lapsing."""
    monkeypatch.setattr(cache, "HOST_TIER_DEVICES", frozenset({"cuda", "cpu"}))
    copy = cache.ModelCache._copy_to_host
    slow = threading.Event()

    def slow_copy(hosted: Any, module: torch.nn.Module, pin: bool) -> HostCopy | None:
        if slow.is_set() and hosted.name == "h":
            time.sleep(4.0)
        return copy(hosted, module, pin)

    monkeypatch.setattr(cache.ModelCache, "_copy_to_host", staticmethod(slow_copy))
    budget = 2060 + 780  # `big` and one of the two others
    with serving(settings, budget, host_memory_budget=100_000) as (server, client):
        twins = {"big": host(client, "big", LARGE, 1), "v": host(client, "v", MID, 2)}
        twins["h"] = host(client, "h", MID, 3)
        client.predict("v", X)  # the least recently used: the claim's only victim
        client.predict("h", X)
        assert server.host is not None
        registry = server.host.models.registry
        v = registry.get("v")
        with ThreadPoolExecutor(2) as waiters, registry.lease("v"):  # `v` cannot drain
            with registry.lease("h"):
                big = waiters.submit(client.predict, "big", X, timeout=60)
                wait_until(lambda: v.claim is not None, 10)
                claimed = time.monotonic()
                slow.set()
                asked = waiters.submit(client.predict, "v", X, timeout=60)  # waits
                time.sleep(0.2)
            # `h` is idle: `big` evicts it, not its victim, copying it for 4 s.
            np.testing.assert_allclose(asked.result(), reference(twins["v"], X), rtol=1e-5)
            assert time.monotonic() - claimed < 3.0, "held back while another was copied"
            np.testing.assert_allclose(big.result(), reference(twins["big"], X), rtol=1e-5)


def test_a_restored_version_claims_its_weights_and_workspace_at_once(
    settings: Settings,
) -> None:
    """Red team 16, F8: a version registered at restart knew its weights, not its
    workspace, until its first page-in built it. Behind versions in constant use it
    claimed room for its weights (evicting one of them), found no room for its workspace
    as it was built, and claimed again (evicting the other). The record now says what it
    held: it claims once, for both."""
    first = dataclasses.replace(settings, restore=True)
    with running(first) as server, ModelHostClient(server.target, timeout=60) as client:
        big = build("tiny_mlp", WIDE, seed=1)
        client.save_checkpoint("big", big.state_dict())
        client.load_model(
            "big",
            architecture="tiny_mlp",
            checkpoint="big",
            architecture_args=WIDE,
            warmup_shape=(8, 16),  # a CPU workspace: the estimate for 8 rows
        )
        twins = {
            name: host(client, name, HALF, seed, delay=BRIEF) for seed, name in ((2, "a"), (3, "b"))
        }
        sizes = {m.name: m.device_bytes for m in client.list_models()}
    assert sizes == {"big": W + S, "a": 14_988, "b": 14_988}
    budget = W + S + 100
    # `a` and `b` fit together, `big`'s weights fit beside one of them, `big` in full
    # only without both.
    assert sizes["a"] + sizes["b"] <= budget and W + sizes["a"] <= budget < W + S + sizes["a"]
    with serving(first, budget) as (server, client):
        assert client.get_model("big").device_bytes == W + S  # before its first request
        client.predict("a", X)
        client.predict("b", X)
        with kept_busy(server.target, "a", X, 2) as a, kept_busy(server.target, "b", X, 2) as b:
            time.sleep(0.3)
            x = np.ones((1, 16), np.float32)
            answer = client.predict("big", x, timeout=20)
            np.testing.assert_allclose(answer, reference(big, x), rtol=1e-5)
        assert not a and not b, (a + b)[:3]
        outcomes = {o: claims(server, o) for o in ("got_room", "lapsed", "given_up")}
        assert outcomes == {"got_room": 1, "lapsed": 0, "given_up": 0}
        info = client.get_model("big")  # evicted since, for `a` and `b`'s waiting requests
        assert (info.device_bytes, info.page_ins) == (W + S, 1)
        for name in ("a", "b"):
            np.testing.assert_allclose(
                client.predict(name, X), reference(twins[name], X), rtol=1e-5
            )
