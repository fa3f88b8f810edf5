"""The model cache: more registered versions than the device budget holds.

A byte budget on the CPU holds three of the small models below; the others wait in the
store tier and are paged in by the requests that need them (cache.py)."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import TEST_ARCHITECTURES, build, expect, images, reference
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError, codec
from modelhost.server import Server, Settings, running
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

ARGS = {"features": 16, "hidden": 256, "classes": 4}
MODEL_BYTES = 4 * (16 * 256 + 256 + 256 * 4 + 4)  # float32 weights and biases
BUDGET = 3 * MODEL_BYTES + 1000  # three of them fit, not four
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 16)).astype(np.float32)
DELAY = 0.8  # seconds per call of a slow version


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    with running(dataclasses.replace(settings, device_memory_budget=BUDGET)) as srv:
        yield srv


def load(
    client: ModelHostClient,
    name: str,
    seed: int,
    *,
    architecture: str = "tiny_mlp",
    args: dict[str, Any] | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Uploads a tiny_mlp of `seed` as checkpoint `name`, loads it as `architecture` (a
    tiny_mlp that also takes `args`); returns the twin."""
    model = build("tiny_mlp", ARGS, seed=seed)
    client.save_checkpoint(name, model.state_dict(), overwrite=True)
    client.load_model(
        name,
        architecture=architecture,
        checkpoint=name,
        architecture_args={**ARGS, **(args or {})},
        **options,
    )
    return model


def same(served: Any, expected: Any) -> None:
    """Served output equals the in-process twin's (up to float rounding of the threads)."""
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def cache_trailer(server: Server, name: str) -> str:
    """The "modelhost-cache" trailer of a Predict: "hit" or "miss"."""
    from modelhost.client import codec
    from modelhost.client.predict import CACHE_TRAILER
    from modelhost.v1 import modelhost_pb2, modelhost_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        request = modelhost_pb2.PredictRequest(model=name, inputs={"input": codec.from_numpy(X)})
        _, call = modelhost_pb2_grpc.ModelHostStub(channel).Predict.with_call(request, timeout=60)
        return dict(call.trailing_metadata())[CACHE_TRAILER]


def tiers(client: ModelHostClient) -> dict[str, str]:
    return {m.name: m.tier for m in client.list_models()}


def resident(client: ModelHostClient) -> set[str]:
    return {name for name, tier in tiers(client).items() if tier == "resident"}


def counter(server: Server, name: str, **labels: str) -> float:
    assert server.host is not None
    value = server.host.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_least_recently_used_versions_leave_and_page_back_in(
    client: ModelHostClient, server: Server
) -> None:
    twins = {name: load(client, name, seed) for seed, name in enumerate("abc")}
    assert resident(client) == {"a", "b", "c"}
    info = client.get_model("a")
    assert info.device_bytes == MODEL_BYTES and info.tier == "resident"
    client.predict("a", X)  # order of use, oldest first: b, c, a
    twins["d"] = load(client, "d", 3)
    assert tiers(client) == {"a": "resident", "b": "store", "c": "resident", "d": "resident"}
    client.predict("c", X)  # c, then a are used; d was loaded last: a, d, c? a is oldest
    client.predict("d", X)
    # b comes back: the least recently used (a) leaves for it.
    same(client.predict("b", X), reference(twins["b"], X))
    assert tiers(client) == {"a": "store", "b": "resident", "c": "resident", "d": "resident"}
    b = client.get_model("b")
    assert b.page_ins == 1 and b.last_used is not None
    # Each answer says whether it waited for a page-in.
    assert cache_trailer(server, "b") == "hit"
    assert cache_trailer(server, "a") == "miss"
    assert cache_trailer(server, "a") == "hit"
    # Every answer equals its in-process twin, and a version's output after a page-in is
    # bit-identical to its output before the eviction.
    before = client.predict("a", X)
    for name, twin in twins.items():
        same(client.predict(name, X), reference(twin, X))
    np.testing.assert_array_equal(client.predict("a", X), before)
    assert counter(server, "modelhost_evictions_total", model="a", version="1", tier="store") >= 1
    assert counter(server, "modelhost_page_ins_total", model="b", version="1", tier="store") == 1
    assert counter(server, "modelhost_cache_requests_total", result="miss") >= 2
    assert counter(server, "modelhost_device_budget_bytes", device="cpu") == BUDGET
    used = counter(server, "modelhost_device_resident_bytes", device="cpu")
    assert used == 3 * MODEL_BYTES


def test_pinned_versions_stay_and_alone_cannot_overflow(
    client: ModelHostClient, server: Server
) -> None:
    load(client, "p1", 1, residency="pinned")
    load(client, "p2", 2, residency="pinned")
    twins = {name: load(client, name, seed) for seed, name in enumerate("xy", 3)}
    for _ in range(3):  # x and y take turns in the one place left
        for name in "xy":
            same(client.predict(name, X), reference(twins[name], X))
    assert client.get_model("p1").tier == client.get_model("p2").tier == "resident"
    assert client.get_model("p1").residency == "pinned"
    assert client.get_model("p1").page_ins == 0
    load(client, "p3", 5, residency="pinned")
    error = expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: load(client, "p4", 6, residency="pinned"),
        "--device-memory-budget",
        "p1:1",
        "p3:1",
    )
    assert f"{BUDGET:,}" in error.message
    assert {m.name for m in client.list_models()} == {"p1", "p2", "p3", "x", "y"}
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.predict("x", X), "pinned")


def random_mix(
    server: Server,
    twins: dict[str, torch.nn.Module],
    after_each: Callable[[], object] = lambda: None,
) -> list[str]:
    """Eight clients on threads, each 15 Predicts of versions drawn at random: the
    failures (an answer that differs from the in-process twin's is one)."""
    expected = {name: reference(twin, X) for name, twin in twins.items()}
    failures: list[str] = []

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        with ModelHostClient(server.target, timeout=60) as own:
            for _ in range(15):
                name = rng.choice(list(twins))
                try:
                    same(own.predict(name, X), expected[name])
                except Exception as error:  # every failure counts
                    failures.append(f"{name}: {error!r}")
                after_each()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return failures


def test_random_mix_from_many_threads(client: ModelHostClient, server: Server) -> None:
    """Eight versions, room for three, one pinned: every answer right, none failed."""
    twins = {f"m{i}": load(client, f"m{i}", i) for i in range(7)}
    twins["pinned"] = load(client, "pinned", 7, residency="pinned")
    seen_resident: list[int] = []

    def watcher(stop: threading.Event) -> None:
        with ModelHostClient(server.target, timeout=60) as own:
            while not stop.is_set():
                seen_resident.append(
                    sum(m.device_bytes for m in own.list_models() if m.tier == "resident")
                )
                time.sleep(0.01)

    stop = threading.Event()
    watching = threading.Thread(target=watcher, args=(stop,))
    watching.start()
    failures = random_mix(server, twins)
    stop.set()
    watching.join(10)
    assert failures == [], failures[:5]
    assert max(seen_resident) <= BUDGET
    assert client.get_model("pinned").page_ins == 0
    assert sum(m.page_ins for m in client.list_models()) > 0


def test_concurrent_requests_share_one_page_in(client: ModelHostClient) -> None:
    twins = {name: load(client, name, seed) for seed, name in enumerate("abcd")}
    assert client.get_model("a").tier == "store"
    results: list[Any] = [None] * 16
    barrier = threading.Barrier(16)

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = client.predict("a", X)
        except ModelHostError as error:
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for result in results:
        same(result, reference(twins["a"], X))
    assert client.get_model("a").page_ins == 1


def test_a_device_pages_in_one_version_at_a_time_at_a_lower_priority(
    client: ModelHostClient,
) -> None:
    """Page-ins of different versions on one device run one after the other (each would
    hold the room it reserved, evicting more of what is in use), on a page-in thread
    whose CPU priority is below the server's (resident models keep their speed)."""
    import os

    from helpers.models import LOADS

    twins = {
        name: load(client, name, seed, architecture="slow_load_mlp", args={"seconds": 0.3})
        for seed, name in enumerate("abcde")
    }
    assert [client.get_model(n).tier for n in "ab"] == ["store", "store"]
    LOADS.clear()
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.update({n: client.predict(n, X)})) for n in "ab"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in "ab":
        same(results[name], reference(twins[name], X))
    assert len(LOADS) == 2
    (_, _, _, first_end), (_, _, second_start, _) = sorted(LOADS, key=lambda b: b[2])
    assert second_start >= first_end  # no overlap
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for thread, niceness, _, _ in LOADS:
        assert thread.startswith("page-in-cpu")
        assert niceness == min(19, base + 10)


def a_page_in_taking_the_thread(
    client: ModelHostClient,
) -> tuple[dict[str, torch.nn.Module], threading.Thread]:
    """Five versions whose page-ins take 0.6 s, room for three; a Predict of "a" has
    started, whose page-in holds the device's page-in thread (the twins, and its thread)."""
    twins = {
        name: load(client, name, seed, architecture="slow_load_mlp", args={"seconds": 0.6})
        for seed, name in enumerate("abcde")
    }
    assert resident(client) == {"c", "d", "e"}
    first = threading.Thread(target=lambda: same(client.predict("a", X), reference(twins["a"], X)))
    first.start()
    time.sleep(0.1)
    return twins, first


def test_a_page_in_nobody_waits_for_any_more_is_skipped(
    client: ModelHostClient, server: Server
) -> None:
    """Under overload page-ins queue behind each other; one whose requests have all passed
    their deadlines is not done when its turn comes (it would evict a version in use for
    nobody), and the next request for that version pages it in as usual."""
    twins, first = a_page_in_taking_the_thread(client)
    with ModelHostClient(server.target, config=ChannelConfig(retries=False)) as once:
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: once.predict("b", X, timeout=0.3))
    first.join(30)
    time.sleep(0.3)  # b's turn on the page-in thread came and went
    assert counter(server, "modelhost_page_ins_skipped_total") == 1
    assert client.get_model("b").page_ins == 0
    assert resident(client) == {"a", "d", "e"}  # only a's page-in evicted anything
    same(client.predict("b", X), reference(twins["b"], X))
    assert client.get_model("b").page_ins == 1


def test_a_queued_page_in_whose_caller_cancelled_is_skipped(
    client: ModelHostClient, server: Server
) -> None:
    """A page-in queued behind another one, whose only caller cancels (no deadline: it went
    away), is skipped when its turn comes: it would evict a version in use for nobody."""
    twins, first = a_page_in_taking_the_thread(client)
    request = pb.PredictRequest(model="b", inputs={"input": codec.from_numpy(X)})
    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.ModelHostStub(channel).Predict.future(request)  # no deadline
        time.sleep(0.2)  # queued behind a's page-in
        call.cancel()
    first.join(30)
    time.sleep(0.3)  # b's turn on the page-in thread came and went
    assert counter(server, "modelhost_page_ins_skipped_total") == 1
    assert client.get_model("b").page_ins == 0
    same(client.predict("b", X), reference(twins["b"], X))


def test_an_unload_while_a_page_in_runs_answers_its_request_first(
    client: ModelHostClient,
) -> None:
    """A version unloaded while its page-in is running (its module on its way back) answers
    the request that waits for it, then goes: the unload waits for it."""
    twins = {
        name: load(client, name, seed, architecture="slow_load_mlp", args={"seconds": 0.6})
        for seed, name in enumerate("abcde")
    }
    assert resident(client) == {"c", "d", "e"}
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(client.predict("a", X)))
    waiting.start()
    time.sleep(0.2)  # its page-in runs (0.6 s)
    assert client.unload_model("a") == [1]
    waiting.join(30)
    same(answers[0], reference(twins["a"], X))
    assert "a" not in resident(client)


def test_a_version_unloaded_while_its_page_in_waits_answers_unavailable(
    client: ModelHostClient, server: Server
) -> None:
    """A request waiting for a page-in queued behind another one, whose version is then
    unloaded, is told the version went away (UNAVAILABLE: a retry finds what serves now),
    not that it sent a bad input."""
    twins, first = a_page_in_taking_the_thread(client)
    outcome: list[Any] = []
    with ModelHostClient(server.target, config=ChannelConfig(retries=False)) as once:
        waiting = threading.Thread(
            target=lambda: outcome.append(
                expect(
                    grpc.StatusCode.UNAVAILABLE,
                    lambda: once.predict("b", X),
                    "unloaded while it waited",
                )
            )
        )
        waiting.start()  # queued behind a's page-in
        time.sleep(0.1)
        assert client.unload_model("b") == [1]
        waiting.join(30)
    first.join(30)
    assert len(outcome) == 1 and not first.is_alive()
    same(client.predict("c", X), reference(twins["c"], X))


def test_a_page_in_that_runs_out_of_memory_is_resource_exhausted_and_can_retry(
    client: ModelHostClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page-in whose allocation fails answers RESOURCE_EXHAUSTED (not INTERNAL); the
    version stays registered at the store tier, the others keep serving, and a later
    request pages it in once memory allows. (From the store tier here; a GPU version's
    host copy that fails to move back is dropped to the store tier the same way.)"""
    from helpers.models import ReloadHog

    twins = {n: load(client, n, seed, architecture="reload_hog") for seed, n in enumerate("abcd")}
    assert client.get_model("a").tier == "store"
    monkeypatch.setattr(ReloadHog, "FAIL", True)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.predict("a", X), "out of memory")
    assert client.get_model("a").tier == "store"
    assert resident(client) == {"c", "d"}  # b made room for it
    for name in "cd":
        same(client.predict(name, X), reference(twins[name], X))
    monkeypatch.setattr(ReloadHog, "FAIL", False)
    for name in "ab":
        same(client.predict(name, X), reference(twins[name], X))


def test_busy_versions_are_not_evicted_and_a_deadline_ends_the_wait(
    client: ModelHostClient, server: Server
) -> None:
    """A page-in waits for room that versions with requests in flight or queued hold; a
    request whose deadline passes first gets DEADLINE_EXCEEDED, and nothing else breaks.
    An unload while a page-in waits for room tells its request the version went away."""
    slow = build("slow_mlp", {**ARGS, "delay": DELAY}, seed=9)
    client.save_checkpoint("slow", slow.state_dict())
    for i in range(4):  # the fourth evicts the first
        client.load_model(
            f"s{i}",
            architecture="slow_mlp",
            checkpoint="slow",
            architecture_args={**ARGS, "delay": DELAY},
        )
    assert tiers(client) == {"s0": "store", "s1": "resident", "s2": "resident", "s3": "resident"}

    answers: list[Any] = []

    def ask(name: str) -> None:
        # No retries: a request failed by an eviction must show, not be retried.
        with ModelHostClient(server.target, config=ChannelConfig(retries=False)) as once:
            try:
                answers.append(once.predict(name, X, timeout=60))
            except ModelHostError as error:
                answers.append(error)

    def keep_busy(*names: str) -> list[threading.Thread]:
        """One request on each version: one runs, the others queue (the CPU lane)."""
        busy = [threading.Thread(target=ask, args=(n,)) for n in names]
        for t in busy:
            t.start()
        time.sleep(0.3)
        return busy

    client.predict("s1", X)  # s3 becomes the least recently used: its request will wait
    client.predict("s2", X)  # in the queue behind s1's and s2's
    busy = keep_busy("s1", "s2", "s3")
    started = time.monotonic()
    expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: client.predict("s0", X, timeout=0.3))
    assert time.monotonic() - started < 2.0
    for t in busy:
        t.join(30)
    assert len(answers) == 3
    for answer in answers:  # none was evicted from under its requests
        assert not isinstance(answer, ModelHostError), answer
        same(answer, reference(slow, X))
    assert [client.get_model(n).page_ins for n in ("s1", "s2", "s3")] == [0, 0, 0]
    # None left while busy (one evicted while it ran would still have answered).
    assert tiers(client) == {"s0": "store", "s1": "resident", "s2": "resident", "s3": "resident"}
    # s0 pages in (once its page-in finds room, even after the caller has gone).
    same(client.predict("s0", X, timeout=60), reference(slow, X))
    assert client.get_model("s0").page_ins == 1

    client.predict("s3", X, timeout=60)  # now s1 is the least recently used
    client.predict("s2", X, timeout=60)
    client.predict("s0", X, timeout=60)
    client.predict("s1", X, timeout=60)  # evicts s3
    assert client.get_model("s3").tier == "store"
    busy = keep_busy("s0", "s1", "s2")
    waited: list[Any] = []

    def wait_for_s3() -> None:
        with ModelHostClient(server.target, config=ChannelConfig(retries=False)) as once:
            waited.append(
                expect(
                    grpc.StatusCode.UNAVAILABLE,
                    lambda: once.predict("s3", X, timeout=60),
                    "unloaded while it waited",
                )
            )

    waiting = threading.Thread(target=wait_for_s3)
    waiting.start()
    time.sleep(0.3)
    assert server.host is not None
    assert server.host.models.get("s3").paging is not None  # s3 waits for room
    # Its page-in has not found room yet: the unload tells its request the version went
    # away (a retry finds what serves now), as for a page-in queued behind another.
    assert client.unload_model("s3") == [1]
    waiting.join(30)
    for t in busy:
        t.join(30)
    assert len(waited) == 1
    assert len(answers) == 6 and not any(isinstance(a, ModelHostError) for a in answers)
    assert "s3" not in tiers(client)


def test_hot_swap_of_an_evicted_version(
    client: ModelHostClient,
) -> None:
    for seed, name in enumerate("abc"):
        load(client, name, seed)
    old = load(client, "m", 3)  # evicts a
    for name in "bc":
        client.predict(name, X)
    load(client, "filler", 4)  # evicts m (least recently used)
    assert client.get_model("m").tier == "store"
    # Hot swap: version 2 of m, new weights under the same checkpoint name, while
    # version 1 is paged out; version 1 still pages in from its own bytes.
    new = build("tiny_mlp", ARGS, seed=5)
    client.save_checkpoint("m", new.state_dict(), overwrite=True)
    client.load_model("m", architecture="tiny_mlp", checkpoint="m", architecture_args=ARGS)
    same(client.predict("m", X), reference(new, X))
    same(client.predict("m", X, version=1), reference(old, X))


def test_the_checkpoint_of_an_evictable_version_is_not_deleted(
    client: ModelHostClient, server: Server
) -> None:
    load(client, "a", 0)
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: client.delete_checkpoint("a"),
        "a:1",
        "pinned",
    )
    assert [c.name for c in client.list_checkpoints()] == ["a"]
    load(client, "p", 1, residency="pinned")
    client.delete_checkpoint("p")  # a pinned version never needs it again
    client.unload_model("a")
    client.delete_checkpoint("a")
    assert client.list_checkpoints() == []


def test_a_restart_brings_pinned_versions_back_resident_and_the_others_on_first_use(
    settings: Settings,
) -> None:
    restoring = dataclasses.replace(settings, device_memory_budget=BUDGET, restore=True)
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        load(client, "p", 9, residency="pinned")
        twins = {name: load(client, name, seed) for seed, name in enumerate("abc")}
        assert tiers(client)["a"] == "store"
        outputs = {name: client.predict(name, X) for name in twins}
    with running(restoring) as second, ModelHostClient(second.target, timeout=60) as client:
        # Nothing but the pinned version was loaded at start.
        assert tiers(client) == {"p": "resident", "a": "store", "b": "store", "c": "store"}
        assert client.get_model("a").inputs == ()  # known once it is built
        assert client.get_model("a").device_bytes == MODEL_BYTES  # from its skeleton
        for name, twin in twins.items():
            answer = client.predict(name, X)
            same(answer, reference(twin, X))
            np.testing.assert_array_equal(answer, outputs[name])
        info = client.get_model("a")
        assert info.page_ins == 1 and info.parameter_count == MODEL_BYTES // 4
        assert info.device_bytes == MODEL_BYTES
        assert client.get_model("p").page_ins == 0
        # The restored versions count like any other: the record still holds them all.
        client.unload_model("a")
    with running(restoring) as third, ModelHostClient(third.target, timeout=60) as client:
        assert set(tiers(client)) == {"p", "b", "c"}


def test_a_version_restored_at_the_store_tier_shows_what_it_served_as(
    settings: Settings,
) -> None:
    """Before its first request builds it, a restored version shows the dtype, inputs and
    outputs it served with (from the record) and its parameters and weight bytes in that
    dtype (from its skeleton): OIP clients that discover inputs from metadata after a
    restart find them (red team 12, F6)."""
    restoring = dataclasses.replace(settings, device_memory_budget=200 << 20, restore=True)
    model = build("resnet18", {"num_classes": 10}, seed=6).half()
    fields = ("dtype", "parameter_count", "device_bytes", "inputs", "outputs")
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        client.save_checkpoint("half", model.state_dict())
        info = client.load_model(
            "r", architecture="resnet18", checkpoint="half", architecture_args={"num_classes": 10}
        )
        assert info.dtype == "float16" and info.outputs
        served = {name: getattr(info, name) for name in fields}
    with running(restoring) as second, ModelHostClient(second.target, timeout=60) as client:
        restored = client.get_model("r")
        assert restored.tier == "store"
        assert {name: getattr(restored, name) for name in fields} == served
        x = images(2).astype(np.float16)
        expected = reference(model, x)
        np.testing.assert_allclose(client.predict("r", x), expected, rtol=1e-2, atol=1e-2)
        assert {name: getattr(client.get_model("r"), name) for name in fields} == served


def test_a_restored_version_reserves_its_weights_not_its_checkpoint_file(
    settings: Settings,
) -> None:
    """A general checkpoint (weights and Adam's state: three times the weights) whose
    weights alone fit the budget serves after a restart as it did before."""
    budget = MODEL_BYTES + MODEL_BYTES // 2
    restoring = dataclasses.replace(settings, device_memory_budget=budget, restore=True)
    twin = build("tiny_mlp", ARGS, seed=4)
    optimizer = torch.optim.Adam(twin.parameters())
    twin(torch.from_numpy(X)).sum().backward()
    optimizer.step()
    general = {
        "model_state_dict": twin.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
    }
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        client.save_checkpoint("trained", general)
        assert client.list_checkpoints()[0].size_bytes > 2 * MODEL_BYTES
        client.load_model(
            "trained", architecture="tiny_mlp", checkpoint="trained", architecture_args=ARGS
        )
        before = client.predict("trained", X)
    with running(restoring) as second, ModelHostClient(second.target, timeout=60) as client:
        assert tiers(client) == {"trained": "store"}
        np.testing.assert_array_equal(client.predict("trained", X), before)
        same(before, reference(twin.eval(), X))


def test_a_restored_version_whose_architecture_is_gone_is_not_ready_and_says_why(
    settings: Settings,
) -> None:
    restoring = dataclasses.replace(settings, device_memory_budget=BUDGET, restore=True)
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        load(client, "gone", 1, architecture="slow_mlp")
        load(client, "kept", 2)
    without = [a for a in TEST_ARCHITECTURES if not a.startswith("slow_mlp=")]
    restarted = dataclasses.replace(restoring, architectures=without)
    with running(restarted) as second, ModelHostClient(second.target, timeout=60) as client:
        states = {m.name: (m.state, m.status_message) for m in client.list_models()}
        assert states["kept"] == ("ready", "")
        state, why = states["gone"]
        assert state == "failed" and "slow_mlp" in why
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.predict("gone", X))


def test_triton_clients_see_evicted_versions_ready_and_infer_pages_them_in(
    client: ModelHostClient, server: Server
) -> None:
    from helpers.triton import Triton, start_child

    twins = {name: load(client, name, seed) for seed, name in enumerate("abcd")}
    assert client.get_model("a").tier == "store"
    with start_child() as child:
        triton = Triton(child, server.target)
        assert triton.call("is_model_ready", "a") is True
        index = triton.call("get_model_repository_index", as_json=True)
        assert {m["name"]: m["state"] for m in index["models"]} == dict.fromkeys("abcd", "READY")
        _, outputs = triton.infer("a", {"input": X})
    ((_, values),) = outputs.values()
    same(values, reference(twins["a"], X))
    assert client.get_model("a").tier == "resident"


def test_the_warm_up_workspace_counts_against_the_budget(client: ModelHostClient) -> None:
    """On the CPU the workspace of a version whose activations were not measured (this
    builder declares no input) is estimated during its warm-up: the largest inputs plus
    outputs of one layer at its largest warm-up batch (here the ReLU's 8 x 256 floats in
    and out); that counts against the budget too."""
    load(client, "warm", 0, warmup_shape=(8, 16))
    workspace = 2 * 8 * 256 * 4
    assert client.get_model("warm").device_bytes == MODEL_BYTES + workspace
    load(client, "b", 1)
    load(client, "c", 2)  # three fit, but not with warm's workspace: it leaves
    assert tiers(client) == {"warm": "store", "b": "resident", "c": "resident"}


@pytest.mark.parametrize("host_tier", [False, True], ids=["store", "host-and-store"])
def test_state_machine_over_load_unload_predict_and_pin(
    settings: Settings, host_tier: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random sequences of loads (on demand or pinned), unloads and predictions: every
    answer is right, pinned versions stay, resident bytes stay within the budget, and a
    load fails only when pinned versions leave no room. With a host tier (turned on for
    the CPU, as on a GPU) that holds two versions, it holds exactly those listed in it."""
    from modelhost.server import cache
    from modelhost.server.host_tier import layout

    host_bytes = layout(build("tiny_mlp", ARGS))[1]
    if host_tier:
        monkeypatch.setattr(cache, "HOST_TIER_DEVICES", frozenset({"cuda", "cpu"}))
        settings = dataclasses.replace(settings, host_memory_budget=2 * host_bytes)
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    twins = {seed: build("tiny_mlp", ARGS, seed=seed) for seed in range(4)}
    expected = {seed: reference(twin, X) for seed, twin in twins.items()}
    names = st.sampled_from(["m0", "m1", "m2", "m3", "m4", "m5"])

    with (
        running(dataclasses.replace(settings, device_memory_budget=BUDGET)) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        for seed, twin in twins.items():
            client.save_checkpoint(f"w{seed}", twin.state_dict())

        class Cache(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                for model in client.list_models():
                    client.unload_model(model.name)
                self.hosted: dict[str, tuple[int, bool]] = {}  # name -> (seed, pinned)

            @precondition(lambda self: len(self.hosted) < 6)
            @rule(name=names, seed=st.integers(0, 3), pinned=st.booleans())
            def load(self, name: str, seed: int, pinned: bool) -> None:
                if name in self.hosted:
                    return
                options: dict[str, Any] = {"residency": "pinned"} if pinned else {}
                pinned_count = sum(p for _, p in self.hosted.values())
                try:
                    client.load_model(
                        name,
                        architecture="tiny_mlp",
                        checkpoint=f"w{seed}",
                        architecture_args=ARGS,
                        **options,
                    )
                except ModelHostError as error:
                    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    assert pinned_count == 3, error  # three pinned fill the budget
                    return
                self.hosted[name] = (seed, pinned)

            @precondition(lambda self: bool(self.hosted))
            @rule(data=st.data())
            def predict(self, data: st.DataObject) -> None:
                name = data.draw(st.sampled_from(sorted(self.hosted)))
                seed, pinned = self.hosted[name]
                if not pinned and sum(p for _, p in self.hosted.values()) == 3:
                    # Three pinned versions fill the budget: no room to page it in.
                    expect(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        lambda: client.predict(name, X),
                        "pinned",
                    )
                    return
                same(client.predict(name, X), expected[seed])

            @precondition(lambda self: bool(self.hosted))
            @rule(data=st.data())
            def unload(self, data: st.DataObject) -> None:
                name = data.draw(st.sampled_from(sorted(self.hosted)))
                client.unload_model(name)
                del self.hosted[name]

            @invariant()
            def within_budget(self) -> None:
                models = client.list_models()
                assert {m.name for m in models} == set(self.hosted)
                assert sum(m.device_bytes for m in models if m.tier == "resident") <= BUDGET
                for m in models:
                    if self.hosted[m.name][1]:
                        assert m.tier == "resident", m
                in_host = sum(m.tier == "host" for m in models)
                assert counter(server, "modelhost_host_tier_bytes") == in_host * host_bytes
                assert in_host <= (2 if host_tier else 0)

        Cache.TestCase.settings = hypothesis_settings(
            max_examples=10,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        Cache.TestCase().runTest()


def test_pinned_versions_and_ones_compiled_with_cuda_graphs_stay_on_their_device() -> None:
    """A CUDA graph pool stays with torch's compiled function whether its version leaves
    or not: evicting it would give nothing back, so the cache treats it as pinned."""
    from modelhost.server.hosted import stays_resident
    from modelhost.server.loading import LoadRequest

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert stays_resident(LoadRequest("m", residency="pinned"), cpu)
    assert not stays_resident(LoadRequest("m"), cuda)
    assert not stays_resident(LoadRequest("m", compile="default"), cuda)
    for mode in ("reduce-overhead", "max-autotune"):
        assert stays_resident(LoadRequest("m", compile=mode), cuda)
        assert not stays_resident(LoadRequest("m", compile=mode), cpu)  # no graphs there


def test_a_checkpoint_deleted_while_a_version_loads_from_it_stays_for_its_page_ins(
    client: ModelHostClient,
) -> None:
    """The bytes a LoadModel reads are held from before it reads them: a DeleteCheckpoint
    meanwhile takes the name, not the bytes the version will page in from again."""
    twin = build("tiny_mlp", ARGS, seed=5)
    client.save_checkpoint("w", twin.state_dict())
    loading = threading.Thread(
        target=lambda: client.load_model(
            "slow",
            architecture="slow_load_mlp",
            checkpoint="w",
            architecture_args={**ARGS, "seconds": 1.0},
        )
    )
    loading.start()
    time.sleep(0.4)  # reading the checkpoint
    client.delete_checkpoint("w")
    loading.join(30)
    assert client.get_model("slow").tier == "resident" and client.list_checkpoints() == []
    for seed, name in enumerate("abc"):  # push it out
        load(client, name, seed)
    assert client.get_model("slow").tier == "store"
    same(client.predict("slow", X), reference(twin, X))  # paged in from the held bytes


def test_an_unload_during_a_restored_versions_first_page_in_frees_what_it_built(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A restored version is built in full at its first page-in. When its callers have
    left (their deadlines passed) and it is unloaded meanwhile, the build ends on a
    version that is gone: what it built (a batcher on the shared lane, the module) was
    kept for good, counted by no budget, and the page-in failed unseen (red team 11, M2).
    Now it is freed, the page-in says why in the log, and the others serve on."""
    import logging

    restoring = dataclasses.replace(settings, device_memory_budget=BUDGET, restore=True)
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        load(client, "slow", 1, architecture="slow_load_mlp", args={"seconds": 1.0})
        twin = load(client, "b", 2)
    with (
        caplog.at_level(logging.INFO, "modelhost.server.cache"),
        running(restoring) as second,
        ModelHostClient(second.target, timeout=60) as client,
    ):
        assert tiers(client) == {"slow": "store", "b": "store"}
        quick = ModelHostClient(second.target, timeout=0.3)
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: quick.predict("slow", X))
        quick.close()
        assert client.unload_model("slow") == [1]
        assert second.host is not None
        lane = second.host.models._cpu_lane
        deadline = time.monotonic() + 10
        while "page-in of slow version 1" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "page-in of slow version 1: model 'slow' version 1 was unloaded" in caplog.text
        same(client.predict("b", X), reference(twin, X))
        assert len(lane._batchers) == 1  # b's: nothing of slow's is left on the lane
