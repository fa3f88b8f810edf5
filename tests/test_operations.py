"""Running it: restart recovery, graceful shutdown, limits, deadlines, metrics."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import expect, images, reference, resnet18, serve, temp_files
from helpers.processes import ServerProcess, free_port
from modelhost.client import ModelHostClient, ModelHostError
from modelhost.server import Settings, running

TESTS = Path(__file__).resolve().parent
RE = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_restart_recovery_restores_models_versions_and_options(settings: Settings) -> None:
    recovering = dataclasses.replace(settings, restore=True)
    first, second = resnet18(seed=1), resnet18(seed=2)
    x = images(2)
    with running(recovering) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w1", first.state_dict())
        client.save_checkpoint("w2", second.state_dict())
        for checkpoint in ("w1", "w2"):
            client.load_model(
                "m",
                architecture="resnet18",
                checkpoint=checkpoint,
                architecture_args={"num_classes": 10},
                batching={"max_batch_size": 4},
                labels=list("abcdefghij"),
            )
        client.load_model(
            "half",
            architecture="resnet18",
            checkpoint="w1",
            dtype="bfloat16",
            architecture_args={"num_classes": 10},
            version=7,
        )
        client.load_model(
            "gone", architecture="resnet18", checkpoint="w2", architecture_args={"num_classes": 10}
        )
        client.unload_model("gone")
        before = {(m.name, m.version): m for m in client.list_models()}
    with running(recovering) as server, ModelHostClient(server.target, timeout=60) as client:
        assert client.health("modelhost.v1.ModelHost") == "SERVING"
        after = {(m.name, m.version): m for m in client.list_models()}
        assert after.keys() == before.keys() == {("m", 1), ("m", 2), ("half", 7)}
        for key, info in after.items():
            old = before[key]
            assert (info.checkpoint, info.dtype, info.batching, info.label_count) == (
                old.checkpoint,
                old.dtype,
                old.batching,
                old.label_count,
            )
        np.testing.assert_array_equal(client.predict("m", x), reference(second, x))
        np.testing.assert_array_equal(client.predict("m", x, version=1), reference(first, x))
        client.delete_checkpoint("w1")
    # Deleting a checkpoint name keeps the bytes the record pins: everything comes back,
    # version 1 with the weights it was loaded with.
    with running(recovering) as server, ModelHostClient(server.target, timeout=60) as client:
        restored = {(m.name, m.version) for m in client.list_models()}
        assert restored == {("m", 1), ("m", 2), ("half", 7)}
        np.testing.assert_array_equal(client.predict("m", x, version=1), reference(first, x))
    # Without the setting nothing is restored.
    with running(settings) as server, ModelHostClient(server.target) as client:
        assert client.list_models() == []


def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path: Path) -> None:
    env = {"PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--architecture", "recorder=helpers.models:recorder", "--grace-seconds", "20"]
    with (
        ServerProcess.start(tmp_path / "store", args=args, env=env) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        serve(
            client,
            "slow",
            architecture="recorder",
            checkpoint="w",
            architecture_args={"delay": 1.5},
        )
        x = np.ones((1, 2), np.float32)
        result: list[Any] = []
        caller = threading.Thread(target=lambda: result.append(client.predict("slow", x)))
        caller.start()
        time.sleep(0.3)  # the call is running on the model now
        stopped = time.monotonic()
        os.kill(server.pid, 15)
        time.sleep(0.2)
        with ModelHostClient(server.target, timeout=5) as late:
            with pytest.raises(ModelHostError) as refused:
                late.predict("slow", x)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        caller.join(30)
        np.testing.assert_array_equal(result[0], x * 2)  # the in-flight call finished
        assert server.stop(timeout=30) == 0
        assert time.monotonic() - stopped < 20
        assert server.log_count("modelhost stopped") == 1


def test_sigterm_during_a_load_that_never_ends_still_exits_within_the_grace(
    tmp_path: Path,
) -> None:
    """A LoadModel still building when the server stops (a long compile, a builder that
    hangs) is abandoned after the grace period: the process exits 0 without it."""
    env = {"PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--architecture", "slow_builder=helpers.models:slow_builder", "--grace-seconds", "1"]
    with (
        ServerProcess.start(tmp_path / "store", args=args, env=env) as server,
        ModelHostClient(server.target, timeout=120) as client,
    ):
        outcome: list[Any] = []
        client.save_checkpoint("w", {"scale": torch.full((1,), 2.0)})

        def load() -> None:
            try:
                client.load_model(
                    "hung",
                    architecture="slow_builder",
                    checkpoint="w",
                    architecture_args={"seconds": 3600.0},
                )
            except ModelHostError as error:
                outcome.append(error.code)

        loading = threading.Thread(target=load)
        loading.start()
        time.sleep(1.0)  # the builder is sleeping on a load thread now
        stopped = time.monotonic()
        assert server.stop(timeout=30) == 0
        assert time.monotonic() - stopped < 10
        assert server.log_count("exiting without threads still at work: load") == 1
        loading.join(30)
        assert outcome and outcome[0] in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        ), outcome


def test_repeated_sigterm_still_exits_zero(tmp_path: Path) -> None:
    """Orchestrators and impatient users signal again; the exit stays clean (Python
    restores the default SIGTERM action while it exits, which used to end it with -15)."""
    with ServerProcess.start(tmp_path / "store") as server:
        deadline = time.monotonic() + 30
        while server.returncode is None and time.monotonic() < deadline:
            os.kill(server.pid, 15)
            time.sleep(0.05)
        assert server.stop(timeout=30) == 0


def test_limits_answer_with_their_value(settings: Settings) -> None:
    limited = dataclasses.replace(
        settings, max_message_bytes=1 << 20, max_checkpoint_bytes=100_000, max_tensor_elements=1000
    )
    with running(limited) as server, ModelHostClient(server.target, timeout=60) as client:
        expect(
            RE,
            lambda: client.save_checkpoint("big", resnet18().state_dict()),
            "100000",
            "max_checkpoint_bytes",
        )
        assert client.list_checkpoints() == []
        assert temp_files(settings.store) == []
        client.save_checkpoint(
            "mlp",
            {
                "0.weight": torch.zeros(8, 4),
                "0.bias": torch.zeros(8),
                "2.weight": torch.zeros(3, 8),
                "2.bias": torch.zeros(3),
            },
        )
        client.load_model("mlp", architecture="tiny_mlp", checkpoint="mlp")
        expect(
            RE,
            lambda: client.predict("mlp", np.zeros((300, 4), np.float32)),
            "1200",
            "1000",
            "max_tensor_elements",
        )
        expect(
            RE, lambda: client.predict("mlp", np.zeros((1 << 19, 4), np.float32)), str(1 << 20)
        )  # gRPC's own message limit names it
        assert client.predict("mlp", np.zeros((2, 4), np.float32)).shape == (2, 3)


def test_max_concurrent_rpcs(settings: Settings) -> None:
    limited = dataclasses.replace(settings, max_concurrent_rpcs=2)
    with running(limited) as server, ModelHostClient(server.target, timeout=60) as client:
        serve(
            client,
            "slow",
            architecture="recorder",
            checkpoint="w",
            architecture_args={"delay": 0.5},
            batching={"max_batch_size": 1},
        )
        outcomes: list[Any] = []

        def call(i: int) -> None:
            try:
                outcomes.append(client.predict("slow", np.full((1, 2), i, np.float32)))
            except ModelHostError as error:
                outcomes.append(error)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = [o for o in outcomes if isinstance(o, ModelHostError)]
        assert refused and all(e.code == RE for e in refused)
        assert 2 <= len(outcomes) - len(refused) < 6


def test_load_seconds_cover_the_whole_load_warm_up_included(client: ModelHostClient) -> None:
    """ModelInfo.load_seconds is the LoadModel's time from request to ready: a warm-up of
    a model that takes 0.2 s per run counts (its weights load in milliseconds)."""
    client.save_checkpoint("w", {"scale": torch.full((1,), 2.0)})
    info = client.load_model(
        "slow",
        architecture="recorder",
        checkpoint="w",
        architecture_args={"delay": 0.2},
        warmup_shape=(1, 2),
        batching={"max_batch_size": 1},
    )
    assert 0.2 <= info.load_seconds < 30
    assert client.get_model("slow").load_seconds == info.load_seconds


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_cpu_version_compiles_on_its_load_thread_not_the_shared_lane(
    client: ModelHostClient, compiled: bool
) -> None:
    """Compiling takes seconds to minutes, and every CPU version runs on one lane: a
    compiled version's first warm-up run (the one that compiles) runs on the load thread,
    so the other CPU versions keep answering; without compile it runs on the lane."""
    from helpers.models import THREADS_SEEN

    THREADS_SEEN.clear()
    client.save_checkpoint("two", {"scale": torch.tensor(2.0)})
    client.load_model(
        "namer",
        architecture="thread_namer",
        checkpoint="two",
        warmup_shape=(2, 3),
        batching={"max_batch_size": 1},
        compile="default" if compiled else "",
    )
    np.testing.assert_array_equal(client.predict("namer", np.ones((1, 3), np.float32)), 2.0)
    warm_up, request = THREADS_SEEN[0], THREADS_SEEN[-1]
    assert warm_up.startswith("load" if compiled else "lane-cpu"), THREADS_SEEN
    assert request == "lane-cpu", THREADS_SEEN


def test_load_whose_caller_gave_up_leaves_nothing_behind(client: ModelHostClient) -> None:
    client.save_checkpoint("w", {"scale": torch.full((1,), 2.0)})
    with pytest.raises(ModelHostError) as caught:
        client.load_model(
            "late",
            architecture="slow_builder",
            checkpoint="w",
            architecture_args={"seconds": 1.0},
            timeout=0.2,
        )
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # the load finishes in the background and is thrown away
    assert client.list_models() == []
    info = client.load_model(
        "late", architecture="slow_builder", checkpoint="w", architecture_args={"seconds": 0.0}
    )
    assert info.version == 1  # the abandoned load released its version


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_prometheus_metrics(settings: Settings) -> None:
    observed = dataclasses.replace(settings, metrics_port=free_port())
    with running(observed) as server, ModelHostClient(server.target, timeout=60) as client:
        info = client.save_checkpoint("w", resnet18().state_dict())
        client.load_model(
            "m", architecture="resnet18", checkpoint="w", architecture_args={"num_classes": 10}
        )
        for rows in (1, 2, 3):
            client.predict("m", images(rows))
        with pytest.raises(ModelHostError):
            client.predict("no-such-model", images(1))
        client.download_checkpoint("w")
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for version in (2, 3):  # rollouts: an unloaded version's series go with it
            client.load_model(
                "m", architecture="resnet18", checkpoint="w", architecture_args={"num_classes": 10}
            )
            client.predict("m", images(1))
            client.unload_model("m", version - 1)
        rolled = urllib.request.urlopen(url, timeout=10).read().decode()
    series = [line for line in rolled.splitlines() if 'version="' in line]
    assert series and all('model="m",version="3"' in line for line in series), series
    assert _sample(text, "modelhost_requests_total", method="Predict", model="m", code="OK") == 3
    assert (
        _sample(text, "modelhost_requests_total", method="Predict", model="", code="NOT_FOUND") == 1
    )
    assert "no-such-model" not in text  # unknown names never become labels
    assert _sample(text, "modelhost_request_seconds_count", method="Predict", model="m") == 3
    assert _sample(text, "modelhost_batch_rows_sum", model="m", version="1") == 6
    assert _sample(text, "modelhost_batch_requests_count", model="m", version="1") == 3
    assert _sample(text, "modelhost_queue_depth", model="m", version="1") == 0
    assert _sample(text, "modelhost_model_device_bytes", model="m", version="1") > 40e6
    assert _sample(text, "modelhost_load_seconds_count", model="m") == 1
    assert _sample(text, "modelhost_checkpoint_bytes_total", direction="in") == info.size_bytes
    assert _sample(text, "modelhost_checkpoint_bytes_total", direction="out") == info.size_bytes
