"""Metrics series of names that come and go: a name's series last while a version of it is
hosted. Unloading its last version removes them (requests, latency, loads, background
compiles), a version that replaces another keeps them counting, and a value recorded for
a name that is gone counts under model="" rather than bringing its series back."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from conftest import build, expect
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running
from modelhost.server.metrics import Metrics

X = np.ones((2, 4), np.float32)
NAMES = 20  # load/predict/unload cycles of distinct names


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[Server, ModelHostClient]]:
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("ck", build("tiny_mlp", seed=1).state_dict())
        yield server, client


def metrics(server: Server) -> Metrics:
    assert server.host is not None
    return server.host.metrics


def samples(server: Server) -> list[tuple[str, dict[str, str]]]:
    """Every sample a scrape would show: (name, labels)."""
    return [
        (sample.name, sample.labels)
        for family in metrics(server).registry.collect()
        for sample in family.samples
    ]


def models_labelled(server: Server) -> set[str]:
    return {labels["model"] for _, labels in samples(server) if "model" in labels}


def value(server: Server, name: str, **labels: str) -> float | None:
    return metrics(server).registry.get_sample_value(name, labels)


def cycle(client: ModelHostClient, name: str) -> None:
    client.load_model(name, architecture="tiny_mlp", checkpoint="ck")
    client.predict(name, X)
    client.unload_model(name)


def test_names_that_come_and_go_leave_no_series(served: tuple[Server, ModelHostClient]) -> None:
    server, client = served
    cycle(client, "warm-up")  # the first cycle adds the series of model="" (UnloadModel, ...)
    baseline = len(samples(server))
    assert models_labelled(server) == {""}
    for i in range(NAMES):
        client.load_model(f"m{i}", architecture="tiny_mlp", checkpoint="ck")
        client.predict(f"m{i}", X)
    # While hosted, each name has its request, latency and load series.
    assert models_labelled(server) == {"", *(f"m{i}" for i in range(NAMES))}
    assert value(server, "modelhost_requests_total", method="Predict", model="m3", code="OK") == 1
    assert value(server, "modelhost_load_seconds_count", model="m3") == 1
    assert len(samples(server)) > baseline + NAMES * 20
    for i in range(NAMES):
        client.unload_model(f"m{i}")
    assert models_labelled(server) == {""}
    assert len(samples(server)) == baseline
    for i in range(NAMES):  # the same again, one name at a time
        cycle(client, f"n{i}")
    assert len(samples(server)) == baseline
    # The unloads themselves counted, under model="" (the name was gone when they ended).
    assert value(server, "modelhost_requests_total", method="UnloadModel", model="", code="OK") == (
        2 * NAMES + 1
    )


def test_a_version_that_replaces_another_keeps_the_names_series(
    served: tuple[Server, ModelHostClient],
) -> None:
    server, client = served

    def predicted() -> float | None:
        return value(server, "modelhost_requests_total", method="Predict", model="m", code="OK")

    client.load_model("m", architecture="tiny_mlp", checkpoint="ck")
    for _ in range(3):
        client.predict("m", X)
    # A hot swap: version 2 comes, then version 1 goes.
    client.load_model("m", architecture="tiny_mlp", checkpoint="ck")
    client.unload_model("m", 1)
    assert predicted() == 3
    assert value(server, "modelhost_load_seconds_count", model="m") == 2
    client.predict("m", X)
    assert predicted() == 4
    # Two versions, one of them unloaded: the name stays, so do its series.
    client.load_model("m", architecture="tiny_mlp", checkpoint="ck")
    client.unload_model("m", 3)
    client.predict("m", X)
    assert predicted() == 5
    assert value(server, "modelhost_batch_requests_count", model="m", version="2") == 2
    assert value(server, "modelhost_batch_requests_count", model="m", version="1") is None
    # Its last version gone, the name's series go; loaded again, it counts from zero.
    client.unload_model("m")
    assert predicted() is None
    assert "m" not in models_labelled(server)
    client.load_model("m", architecture="tiny_mlp", checkpoint="ck")
    client.predict("m", X)
    assert predicted() == 1
    assert value(server, "modelhost_load_seconds_count", model="m") == 1


def test_values_recorded_after_the_last_unload_do_not_bring_the_series_back(
    served: tuple[Server, ModelHostClient],
) -> None:
    """A request that found the name hosted but ends after its unload, or a background
    compile that ends after it, counts under model=""."""
    server, client = served
    client.load_model("m", architecture="tiny_mlp", checkpoint="ck")
    compiled = metrics(server).compile_observer("m")  # as a load of a compiled version makes it
    compiled(True, 0.5)
    assert value(server, "modelhost_background_compiles_total", model="m", outcome="compiled") == 1
    client.unload_model("m")
    assert "m" not in models_labelled(server)
    compiled(False, 0.5)
    metrics(server).requests.labels("Predict", "m", "OK").inc()
    metrics(server).latency.labels("Predict", "m").observe(0.1)
    assert "m" not in models_labelled(server)
    assert value(server, "modelhost_background_compiles_total", model="", outcome="failed") == 1
    assert value(server, "modelhost_requests_total", method="Predict", model="", code="OK") == 1


def test_a_page_in_that_ends_after_its_unload_records_nothing(settings: Settings) -> None:
    """Red team 15, F4: a page-in whose only request had left at its deadline, and whose
    version was unloaded while it ran, recorded modelhost_page_ins_total for that version
    after the unload had removed its series: one series left for ever per such unload."""
    small = {"features": 4, "hidden": 8, "classes": 3}
    budget = dataclasses.replace(settings, device_memory_budget=300)  # one of them
    x = np.ones((1, 4), np.float32)
    with running(budget) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("ck", build("tiny_mlp", small, seed=1).state_dict())
        client.load_model("keep", architecture="tiny_mlp", checkpoint="ck", architecture_args=small)
        client.load_model(
            "slow",
            architecture="slow_load_mlp",
            checkpoint="ck",
            architecture_args={**small, "seconds": 1.0},  # each load of its weights: 1 s
        )
        client.predict("keep", x)  # `slow` leaves
        assert server.host is not None
        slow = server.host.models.get("slow")
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: client.predict("slow", x, timeout=0.3))
        assert slow.paging is not None and not slow.paging.done()  # its page-in runs on
        client.unload_model("slow")
        slow.paging.result(10)
        assert "slow" not in models_labelled(server)
        assert client.get_model("keep").page_ins == 1
