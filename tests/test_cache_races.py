"""Races between loads, unloads, holds and the cache's budget (concurrency review 15),
against real servers on 127.0.0.1 and real locks on the store: a caller that leaves at any
moment leaves no hold behind and takes no held bytes away, a busy store lock never turns a
finished unload into an error, two loads never wait for each other's room, and memory an
unloaded version still uses stays counted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_cache import counter

from conftest import build, expect, reference
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError
from modelhost.server import Server, Settings, cache, running, store_locks
from modelhost.server.hosted import HostedModel

SMALL = {"features": 4, "hidden": 8, "classes": 3}
WIDE = {"features": 16, "hidden": 256, "classes": 4}
W = 4 * (16 * 256 + 256 + 256 * 4 + 4)  # WIDE's weights: 21,520 bytes
S = 2 * 8 * 256 * 4  # its CPU workspace estimate at warmup_shape (8, 16): 16,384 bytes
X = np.ones((1, 16), np.float32)
BRIEF = 0.05  # a brief slow_mlp: a first build's runs on the shared CPU lane wait little


@contextlib.contextmanager
def store_lock_held(store: Path) -> Iterator[None]:
    """store.lock held, as another server sharing the store holds it for a slow commit."""
    fd = os.open(store / "store.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def commits_held(server: Server) -> Iterator[None]:
    """The server's commit lock held (as a long record write would hold it)."""
    assert server.loop is not None and server.host is not None
    commits = server.host.models._commits
    release = asyncio.Event()
    taken = threading.Event()

    async def hold() -> None:
        async with commits:
            taken.set()
            await release.wait()

    done = asyncio.run_coroutine_threadsafe(hold(), server.loop)
    taken.wait(10)
    try:
        yield
    finally:
        server.loop.call_soon_threadsafe(release.set)
        done.result(10)


@contextlib.contextmanager
def serving(settings: Settings, budget: int) -> Iterator[tuple[Server, ModelHostClient]]:
    """A server with a device memory budget, and a client of it."""
    settings = dataclasses.replace(settings, device_memory_budget=budget)
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        yield server, client


def slow_version(server: Server, client: ModelHostClient, delay: float) -> HostedModel:
    """Hosts "a", a slow_mlp whose forward takes `delay` seconds (checkpoint "ck", which
    fits WIDE); its HostedModel."""
    client.save_checkpoint("ck", build("tiny_mlp", WIDE, seed=0).state_dict())
    slow = {**WIDE, "delay": delay}
    client.load_model("a", architecture="slow_mlp", checkpoint="ck", architecture_args=slow)
    assert server.host is not None
    return server.host.models.registry.get("a")


def holds(server: Server) -> dict[str, int]:
    assert server.host is not None
    return dict(server.host.models._store._holds._held)


@contextlib.contextmanager
def kept_busy(target: str, name: str, x: np.ndarray, callers: int = 3) -> Iterator[list[Exception]]:
    """`name` called by `callers` clients, each one request at a time, until the block
    ends (with one request at a time per version, it is never idle meanwhile). Yields the
    list of the errors they got."""
    stop = threading.Event()
    failures: list[Exception] = []

    def call() -> None:
        with ModelHostClient(target, timeout=60) as own:
            while not stop.is_set():
                try:
                    own.predict(name, x)
                except ModelHostError as error:
                    failures.append(error)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    try:
        yield failures
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def host(
    client: ModelHostClient,
    name: str,
    args: dict[str, int],
    seed: int,
    *,
    delay: float | None = None,
) -> torch.nn.Module:
    """Hosts `name` from a checkpoint of its own: a tiny_mlp, or with `delay` a slow_mlp
    whose forward takes that long and that runs one request at a time (so that a few
    callers keep it busy for good). Returns its twin in this process."""
    architecture = "tiny_mlp" if delay is None else "slow_mlp"
    arguments = args if delay is None else {**args, "delay": delay}
    model = build(architecture, arguments, seed=seed)
    checkpoint = f"{name}-{seed}"
    client.save_checkpoint(checkpoint, model.state_dict())
    client.load_model(
        name,
        architecture=architecture,
        checkpoint=checkpoint,
        architecture_args=arguments,
        batching=None if delay is None else {"max_batch_size": 1},
    )
    return model


def without_deadline(client: ModelHostClient, name: str, x: np.ndarray) -> list[Any]:
    """A request for `name` without a deadline, on a thread of its own: the list gets its
    answer."""
    answers: list[Any] = []

    def call() -> None:
        with contextlib.suppress(ModelHostError):
            answers.append(client.predict(name, x))

    threading.Thread(target=call, daemon=True).start()
    return answers


def wait_until(check: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_load_whose_caller_leaves_during_its_commit_keeps_its_bytes(
    settings: Settings,
) -> None:
    """H2: the hold passes from the load to the version; it is never let go in between,
    so a checkpoint deleted meanwhile keeps the bytes the registered version pages in from."""
    with serving(settings, 3 * W) as (server, client):
        client.save_checkpoint("ck", build("tiny_mlp", WIDE, seed=1).state_dict())
        blob = settings.store / "blobs" / client.get_checkpoint("ck").sha256
        with commits_held(server):
            expect(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                lambda: client.load_model(
                    "m", architecture="tiny_mlp", checkpoint="ck", architecture_args=WIDE, timeout=2
                ),
            )
            client.delete_checkpoint("ck")  # the name goes; the load holds the bytes
        wait_until(lambda: [m.name for m in client.list_models()] == ["m"])
        assert blob.exists() and holds(server) == {blob.name: 1}
        for name in ("a", "b", "c"):  # room for three: m leaves its device
            client.save_checkpoint(name, build("tiny_mlp", WIDE, seed=2).state_dict())
            client.load_model(
                name, architecture="tiny_mlp", checkpoint=name, architecture_args=WIDE
            )
        assert client.get_model("m").tier == "store"
        served = client.predict("m", X)  # paged in from the held bytes
        np.testing.assert_allclose(served, reference(build("tiny_mlp", WIDE, seed=1), X), 1e-5)
        client.unload_model("m")
        assert not blob.exists() and blob.name not in holds(server)


def test_a_load_whose_caller_leaves_while_it_waits_to_hold_holds_nothing(
    settings: Settings,
) -> None:
    """M3: the hold still being taken when the caller leaves is let go once taken."""
    with (
        running(settings) as a,
        running(settings) as b,
        ModelHostClient(a.target, timeout=60) as ca,
        ModelHostClient(b.target) as cb,
    ):
        ca.save_checkpoint("ck", build("tiny_mlp", SMALL, seed=0).state_dict())
        with store_lock_held(settings.store):
            expect(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                lambda: ca.load_model(
                    "m",
                    architecture="tiny_mlp",
                    checkpoint="ck",
                    architecture_args=SMALL,
                    timeout=0.5,
                ),
            )
            time.sleep(0.5)  # the hold still waits for the lock
        time.sleep(1.0)  # the lock is free: the hold is taken (it looks every 50 ms at most)
        wait_until(lambda: not holds(a))  # and let go
        assert ca.list_models() == []
        wait_until(lambda: deleted(cb, "ck"))  # once A's holds file says so, none holds it


def deleted(client: ModelHostClient, checkpoint: str) -> bool:
    """Deletes a checkpoint; False while another server holds its bytes."""
    try:
        client.delete_checkpoint(checkpoint)
    except ModelHostError as error:
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
        return False
    return True


def test_a_busy_store_lock_does_not_fail_an_unload(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M4: the unload has happened; the let-go waits for the next store change."""
    monkeypatch.setattr(store_locks, "LOCK_WAIT", 1.0)
    with serving(settings, 10_000) as (server, client):  # evictable: it holds its bytes
        client.save_checkpoint("ck", build("tiny_mlp", SMALL, seed=0).state_dict())
        client.load_model("m", architecture="tiny_mlp", checkpoint="ck", architecture_args=SMALL)
        sha = client.get_checkpoint("ck").sha256
        assert holds(server) == {sha: 1}
        with store_lock_held(settings.store):
            assert client.unload_model("m") == [1]
        assert client.list_models() == [] and holds(server) == {sha: 1}
        client.delete_checkpoint("ck")  # the next change lets go first: the bytes go too
        assert holds(server) == {} and not (settings.store / "blobs" / sha).exists()


def test_two_loads_that_each_hold_room_for_their_weights_both_load(settings: Settings) -> None:
    """M1: room for two versions' weights, or for one version with its workspace: two
    loads at once do not wait for each other until one gives up (they did for 30 s)."""
    with serving(settings, 2 * W + S // 2) as (_, client):
        client.save_checkpoint("ck", build("tiny_mlp", WIDE, seed=0).state_dict())
        outcomes: dict[str, str] = {}
        start = threading.Barrier(2)

        def load(name: str) -> None:
            start.wait()
            try:
                client.load_model(
                    name,
                    architecture="slow_mlp",
                    checkpoint="ck",
                    architecture_args={**WIDE, "delay": 0.05},
                    warmup_shape=(8, 16),
                    timeout=20,
                )
                outcomes[name] = "ok"
            except ModelHostError as error:
                outcomes[name] = error.code.name

        threads = [threading.Thread(target=load, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert outcomes == {"a": "ok", "b": "ok"}
        tiers = sorted(m.tier for m in client.list_models())
        assert tiers == ["resident", "store"]
        for name in "ab":
            assert client.predict(name, X).shape == (1, 4)


def test_an_unloaded_version_counts_until_its_requests_are_done(settings: Settings) -> None:
    """M2: a load waits for the room an unloaded version's last requests still use."""
    budget = W + W // 2  # one version fits, not two
    with serving(settings, budget) as (server, client):
        a = slow_version(server, client, delay=1.0)
        callers = [threading.Thread(target=client.predict, args=("a", X)) for _ in range(2)]
        for caller in callers:
            caller.start()
        wait_until(lambda: a.batcher.running)
        unloading = threading.Thread(target=client.unload_model, args=("a",))
        unloading.start()
        wait_until(lambda: a.retiring)
        client.load_model("b", architecture="tiny_mlp", checkpoint="ck", architecture_args=WIDE)
        assert a.runner.module is None, "b was counted in while a's module was in use"
        for thread in [*callers, unloading]:
            thread.join(30)


def test_a_running_batch_whose_callers_left_keeps_its_version_resident(
    settings: Settings,
) -> None:
    """L1: no eviction from under a forward pass, even one nobody waits for any more."""
    budget = W + W // 2
    with serving(settings, budget) as (server, client):
        a = slow_version(server, client, delay=2.0)
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: client.predict("a", X, timeout=0.5))
        assert a.batcher.running  # its forward pass goes on
        loading = threading.Thread(
            target=client.load_model,
            args=("b",),
            kwargs={"architecture": "tiny_mlp", "checkpoint": "ck", "architecture_args": WIDE},
        )
        loading.start()
        while a.batcher.running:
            assert a.runner.module is not None and a.tier == "resident"
            time.sleep(0.02)
        loading.join(30)
        assert client.get_model("a").tier == "store"
        assert client.get_model("b").tier == "resident"


def test_a_page_in_waiting_for_busy_room_holds_up_no_other_page_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 14, F5: a page-in that waits for room held by busy versions once waited on
    its device's only page-in thread, for as long as they stayed busy (for ever, under
    steady traffic, for a request without a deadline), and every other page-in waited
    behind it. Now a page-in without room waits off the page-in thread: another version
    that fits pages in meanwhile."""
    # Here the page-in waits without claiming the room (claims have tests of their own).
    monkeypatch.setattr(cache, "CLAIM_AFTER", 60.0)
    small = {"features": 4, "hidden": 8, "classes": 3}
    large = {"features": 4, "hidden": 64, "classes": 3}
    x = np.ones((1, 4), np.float32)
    budget = dataclasses.replace(settings, device_memory_budget=2100)
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        twins = {
            "big": host(client, "big", large, 1),
            # One request at a time: the others wait queued, so it is never idle.
            "busy": host(client, "busy", small, 2, delay=1.5),
            "idle": host(client, "idle", small, 3),
            "cold": host(client, "cold", small, 4),
        }
        sizes = {m.name: m.device_bytes for m in client.list_models()}
        assert sizes["big"] + sizes["busy"] > 2100
        assert sizes["busy"] + sizes["idle"] + sizes["cold"] <= 2100
        client.predict("big", x)  # evicts the three others
        client.predict("busy", x)  # evicts `big`
        client.predict("idle", x)
        tiers = {m.name: m.tier for m in client.list_models()}
        assert tiers == {
            "big": "store",
            "busy": "resident",
            "idle": "resident",
            "cold": "store",
        }
        with kept_busy(server.target, "busy", x):  # three callers of 1.5 s requests
            time.sleep(0.5)
            waiting = without_deadline(client, "big", x)
            time.sleep(1.0)
            cold = client.predict("cold", x, timeout=10)  # pages in while `big` waits
            np.testing.assert_allclose(cold, reference(twins["cold"], x), rtol=1e-5)
            assert client.get_model("big").tier == "store" and not waiting
        deadline = time.monotonic() + 20  # `busy` is idle now: `big` pages in
        while not waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        np.testing.assert_allclose(waiting[0], reference(twins["big"], x), rtol=1e-5)


def test_a_restored_version_whose_workspace_has_no_room_holds_up_no_other_page_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 16, 6: a version registered at restart from a record that does not say what
    it held (written before records did) knows its weights, not its workspace, until its
    first page-in builds it; that build then reserved its workspace waiting on the device's
    only page-in thread, for as long as busy versions held the room (F5 again, after a
    restart). It takes its room at once or not at all: its requests wait off the thread,
    another version pages in meanwhile, and its next page-in reserves weights and
    workspace before it builds."""
    # Here the page-in waits without claiming the room (claims have tests of their own).
    monkeypatch.setattr(cache, "CLAIM_AFTER", 60.0)
    x = np.ones((1, 4), np.float32)
    restoring = dataclasses.replace(settings, restore=True, device_memory_budget=10**8)
    slow_weights = {**WIDE, "seconds": 0.3}  # its weights take 0.3 s to load
    twins = {
        "big": build("slow_load_mlp", slow_weights, seed=1),
        "busy": build("slow_mlp", {**SMALL, "delay": BRIEF}, seed=2),
        "cold": build("tiny_mlp", SMALL, seed=3),
    }
    with running(restoring) as first, ModelHostClient(first.target, timeout=60) as client:
        for name, model in twins.items():
            client.save_checkpoint(name, model.state_dict())
        client.load_model(
            "big",
            architecture="slow_load_mlp",
            checkpoint="big",
            architecture_args=slow_weights,
            warmup_shape=(8, 16),  # a CPU workspace: the estimate for 8 rows
        )
        client.load_model(
            "busy",
            architecture="slow_mlp",
            checkpoint="busy",
            architecture_args={**SMALL, "delay": BRIEF},
            batching={"max_batch_size": 1},  # one request at a time: never idle below
        )
        client.load_model(
            "cold", architecture="tiny_mlp", checkpoint="cold", architecture_args=SMALL
        )
        sizes = {m.name: m.device_bytes for m in client.list_models()}
    assert sizes["big"] == W + S
    record = json.loads((settings.store / "hosted-models.json").read_text())
    for entry in record["value"]:
        del entry["served"]["device_bytes"]
    (settings.store / "hosted-models.json").write_text(json.dumps(record))
    # `big` and `busy` do not fit together, `big`'s weights and `busy` do, and so does
    # `big` alone, weights and workspace.
    budget = sizes["big"] + sizes["busy"] - 1
    restarted = dataclasses.replace(restoring, device_memory_budget=budget)
    with running(restarted) as second, ModelHostClient(second.target, timeout=60) as client:
        assert {m.name: m.tier for m in client.list_models()} == dict.fromkeys(twins, "store")
        assert client.get_model("big").device_bytes == W  # its weights: all it knows yet
        client.predict("busy", x)
        with kept_busy(second.target, "busy", x):
            time.sleep(0.5)
            answers = without_deadline(client, "big", X)
            time.sleep(1.0)
            cold = client.predict("cold", x, timeout=10)  # pages in while `big` waits
            np.testing.assert_allclose(cold, reference(twins["cold"], x), rtol=1e-5)
            assert client.get_model("big").tier == "store" and not answers
            assert client.get_model("big").device_bytes == W + S  # learnt from its build
        assert second.host is not None
        usage: list[int] = []  # while its page-in runs: weights and workspace reserved
        deadline = time.monotonic() + 20  # `busy` is idle now: `big` pages in
        while not answers and time.monotonic() < deadline:
            usage.append(second.host.models.cache.usage()["cpu"][0])
            time.sleep(0.01)
        np.testing.assert_allclose(answers[0], reference(twins["big"], X), rtol=1e-5)
        # Review 17, 2: the room for its weights, asked as they load, gave the workspace's
        # back for as long as they loaded (another load could take it).
        assert W not in usage, "the workspace's room was given back during the build"
        big = client.get_model("big")
        assert big.tier == "resident" and big.device_bytes == W + S and big.page_ins == 1


@pytest.mark.parametrize("callers", ["wait", "leave"])
def test_unloads_of_busy_versions_hold_none_of_asyncios_threads(
    settings: Settings, callers: str
) -> None:
    """Session 16's note, 9: an unload waited for its version's last request on one of
    asyncio's default threads, which also parse requests over 1 MiB: as many unloads of
    busy versions as there are such threads stalled every large request until one of those
    versions was done. The unload waits on the event loop now, and frees the version on
    threads of its own (review 17, 1: callers that had left, their batch still running,
    held those threads for as long as it ran)."""
    slow = {**SMALL, "delay": 2.0}
    x = np.ones((1, 4), np.float32)
    threads = ThreadPoolExecutor(1, thread_name_prefix="asyncio-default")
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        assert server.loop is not None
        server.loop.call_soon_threadsafe(server.loop.set_default_executor, threads)
        client.save_checkpoint("ck", build("slow_mlp", slow, seed=0).state_dict())
        names = ["a", "b", "c"]  # more than the threads; one after another on the lane
        for name in [*names, "idle"]:
            client.load_model(
                name, architecture="slow_mlp", checkpoint="ck", architecture_args=slow
            )
        timeout = 0.4 if callers == "leave" else 30

        def call(name: str) -> None:
            with contextlib.suppress(ModelHostError):  # a caller that leaves
                client.predict(name, x, timeout=timeout)

        requests = [threading.Thread(target=call, args=(n,)) for n in names]
        unloads = [threading.Thread(target=client.unload_model, args=(n,)) for n in names]
        for thread in requests:
            thread.start()
        time.sleep(0.5)  # the first runs; a caller that leaves has left
        started = time.monotonic()
        for thread in unloads:
            thread.start()
        time.sleep(0.3)
        large = np.zeros((1 << 18, 4), np.float32)  # 4 MiB: parsed on one of those threads
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.predict("nobody", large, timeout=30))
        took = time.monotonic() - started
        # Nor does an idle version's unload wait for theirs (for the threads that free
        # versions, or for the lane to drop requests whose callers left).
        unloading = time.monotonic()
        client.unload_model("idle")
        unload_took = time.monotonic() - unloading
        for thread in [*requests, *unloads]:
            thread.join(30)
        assert took < 1.5, f"a large request waited {took:.1f} s for the unloads' threads"
        assert unload_took < 1.0, f"an idle version's unload took {unload_took:.1f} s"
        assert client.list_models() == []
    threads.shutdown()


def test_loads_waiting_for_the_store_lock_hold_up_neither_requests_nor_token_looks(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team 14, F6: LoadModel's hold waited for another replica's store lock on one of
    asyncio's default threads, which also parse requests over 1 MiB and look at the token
    files. Eight such loads stalled a 2 MiB Predict for 29 s and kept a revoked token
    working for 25 s. Store work has threads of its own now, and so does the look."""
    monkeypatch.setattr(store_locks, "LOCK_WAIT", 8.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("keep\nleaked\n")
    served = dataclasses.replace(settings, token_file=str(tokens))
    big = np.ones((1 << 17, 4), np.float32)  # 2 MiB: parsed on a thread
    with (
        running(served) as server,
        ModelHostClient(server.target, config=ChannelConfig(token="keep")) as client,
    ):
        twin = build("tiny_mlp", SMALL, seed=5)
        client.save_checkpoint("w", twin.state_dict())
        client.load_model("m", architecture="tiny_mlp", checkpoint="w", architecture_args=SMALL)
        outcomes: list[str] = []

        def load(index: int) -> None:
            try:
                client.load_model(
                    f"l{index}", architecture="tiny_mlp", checkpoint="w", architecture_args=SMALL
                )
                outcomes.append("OK")
            except ModelHostError as error:
                outcomes.append(error.code.name)

        with store_lock_held(Path(settings.store)):
            loads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
            for thread in loads:
                thread.start()
            time.sleep(1.0)  # every load waits for the lock now
            answer = client.predict("m", big, timeout=5)
            np.testing.assert_allclose(answer, reference(twin, big), rtol=1e-5, atol=1e-6)
            tokens.write_text("keep\n")  # revoked
            with ModelHostClient(server.target, config=ChannelConfig(token="leaked")) as leaked:
                until = time.monotonic() + 5
                refused = False
                while not refused and time.monotonic() < until:
                    try:
                        leaked.list_models()
                        time.sleep(0.2)
                    except ModelHostError as error:
                        refused = error.code == grpc.StatusCode.UNAUTHENTICATED
                assert refused, "the revoked token still works while the loads wait"
        for thread in loads:
            thread.join(60)
        assert outcomes == ["OK"] * 8  # once the lock was free


def claims(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "claims room" in r.getMessage()]


def test_a_version_whose_room_versions_in_constant_use_hold_claims_it_and_gets_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team 15, F1: a version whose room is held by versions in constant use (never
    idle together) waited until the server's wait ended, then RESOURCE_EXHAUSTED, however
    often it was asked for; so did a LoadModel. After CLAIM_AFTER each claims their room:
    their new requests wait while those running finish, it evicts them once idle together
    and pages in (or loads); they page back in after. A claim that got its room lets the
    device claim again at once. Every request of theirs is answered, and correctly."""
    monkeypatch.setattr(cache, "ROOM_WAIT_SECONDS", 6.0)
    monkeypatch.setattr(cache, "CLAIM_BACKOFF", 60.0)  # only after a claim that lapsed
    caplog.set_level(logging.INFO, "modelhost.server.cache")
    large = {"features": 4, "hidden": 64, "classes": 3}
    x = np.ones((1, 4), np.float32)
    budget = dataclasses.replace(settings, device_memory_budget=2100)
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        twins = {
            "big": host(client, "big", large, 1),
            # One request at a time: with two callers each, neither is ever idle.
            "a": host(client, "a", SMALL, 2, delay=BRIEF),
            "b": host(client, "b", SMALL, 3, delay=BRIEF),
        }
        client.predict("a", x)
        client.predict("b", x)
        sizes = {m.name: m.device_bytes for m in client.list_models()}
        assert sizes["big"] + max(sizes["a"], sizes["b"]) > 2100 >= sizes["a"] + sizes["b"]
        with kept_busy(server.target, "a", x, 2) as a, kept_busy(server.target, "b", x, 2) as b:
            time.sleep(0.3)
            started = time.monotonic()
            answer = client.predict("big", x, timeout=20)
            took = time.monotonic() - started
            np.testing.assert_allclose(answer, reference(twins["big"], x), rtol=1e-5)
            time.sleep(0.3)  # `a` and `b` page back in and serve on
            client.save_checkpoint("big2", build("tiny_mlp", large, seed=5).state_dict())
            client.load_model(  # waits for room up to 30 s (models.ROOM_WAIT_SECONDS)
                "big2", architecture="tiny_mlp", checkpoint="big2", architecture_args=large
            )
            time.sleep(0.3)
        assert took < 6.0, "it waited until the server's wait ended"
        assert not a and not b, (a + b)[:3]
        assert counter(server, "modelhost_room_claims_total", outcome="got_room") == 2
        assert counter(server, "modelhost_room_claims_total", outcome="lapsed") == 0
        twin = build("tiny_mlp", large, seed=5)
        np.testing.assert_allclose(client.predict("big2", x), reference(twin, x), rtol=1e-5)
        for name in ("a", "b"):
            np.testing.assert_allclose(
                client.predict(name, x), reference(twins[name], x), rtol=1e-5
            )
            assert client.get_model(name).page_ins >= 1


def test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team 15, F2, and claims: a page-in waiting for room that a busy version held
    evicted every idle version at each look though that was not enough, for as long as it
    waited (for ever, for a request without a deadline). Idle versions leave only when
    that makes room now; a claim on the room of a version held by long requests lapses
    after CLAIM_SECONDS without evicting anything, its device makes no other claim for
    CLAIM_BACKOFF, and the page-in ends after ROOM_WAIT_SECONDS with RESOURCE_EXHAUSTED.
    While the claim lives, another version pages in only into room it leaves free, and
    one refused meanwhile is told the claim held its room."""
    monkeypatch.setattr(cache, "ROOM_WAIT_SECONDS", 5.0)
    monkeypatch.setattr(cache, "CLAIM_AFTER", 0.5)
    monkeypatch.setattr(cache, "CLAIM_SECONDS", 2.0)
    caplog.set_level(logging.INFO, "modelhost.server.cache")
    large = {"features": 4, "hidden": 64, "classes": 3}
    x = np.ones((1, 4), np.float32)
    budget = dataclasses.replace(settings, device_memory_budget=2100)
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        twins = {
            "big": host(client, "big", large, 1),
            "hot": host(client, "hot", SMALL, 2, delay=0.2),
            "used": host(client, "used", SMALL, 3),
            "cold": host(client, "cold", SMALL, 4),
        }
        client.predict("big", x)  # evicts the three others
        client.predict("hot", x)
        client.predict("used", x)
        sizes = {m.name: m.device_bytes for m in client.list_models()}
        assert server.host is not None
        assert sizes["big"] + sizes["hot"] > 2100 >= sizes["hot"] + sizes["used"] + sizes["cold"]
        assert sizes["big"] + sizes["used"] > 2100
        assert client.get_model("cold").tier == "store"
        before = client.get_model("used").page_ins
        stop = threading.Event()
        answers = []

        def use() -> None:  # a version in regular use, every 0.1 s
            with ModelHostClient(server.target, timeout=60) as own:
                while not stop.is_set():
                    answers.append(own.predict("used", x))
                    time.sleep(0.1)

        user = threading.Thread(target=use)
        user.start()
        try:
            # 15 callers of 0.2 s requests, one at a time: 3 s to drain (all CPU models
            # share one lane: one long request would hold up `used` as well).
            with kept_busy(server.target, "hot", x, callers=15):
                time.sleep(0.3)
                with ThreadPoolExecutor(1) as waiter:
                    started = time.monotonic()
                    big = waiter.submit(client.predict, "big", x, timeout=20)
                    wait_until(lambda: claims(caplog.records), 10)
                    claimed = time.monotonic()
                    # A look for room that must end now is told the claim held it (over
                    # gRPC, the client's own deadline ends the call first: a refusal after
                    # ROOM_WAIT_SECONDS says the same).
                    with pytest.raises(cache.NoRoomInTime, match="the room big:1 claims"):
                        server.host.models.cache.reserve(
                            ("cold", 1),
                            torch.device("cpu"),
                            sizes["cold"],
                            deadline=time.monotonic(),
                        )
                    cold = client.predict("cold", x, timeout=20)
                    np.testing.assert_allclose(cold, reference(twins["cold"], x), rtol=1e-5)
                    # Only once the claim has lapsed: the room it left free was too small.
                    assert time.monotonic() - claimed > 1.0
                    expect(  # a deadline far off (or none): the server's wait ends first
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        big.result,
                        "within 5 s: busy versions (hot:1",
                    )
                    assert time.monotonic() - started < 10
        finally:
            stop.set()
            user.join(30)
        assert len(claims(caplog.records)) == 1, "another claim within CLAIM_BACKOFF"
        assert counter(server, "modelhost_room_claims_total", outcome="lapsed") == 1
        assert len(answers) >= 10
        assert client.get_model("used").page_ins == before, "evicted for nothing"
        np.testing.assert_allclose(answers[-1], reference(twins["used"], x), rtol=1e-5)
        # Nothing busy: it gets in, evicting what it needs.
        np.testing.assert_allclose(client.predict("big", x), reference(twins["big"], x), rtol=1e-5)
