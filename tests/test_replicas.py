"""Several replicas on one store behind one client target: sharing checkpoints, spreading
calls round-robin, and a rolling restart under load without a failed call.

The client's retry policy (Predict, Get*, List* on UNAVAILABLE) and the server's drain
(NOT_SERVING, GOAWAY, calls in flight finish) and late bind (the port opens once restored
models are loaded) make the rolling restart lossless; tests/container repeats it with
containers."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import reference
from helpers.processes import free_port
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError
from modelhost.client.channel import service_config
from modelhost.server import Server, Settings, running
from modelhost.v1 import modelhost_pb2

MLP = {
    "0.weight": torch.randn(8, 4),
    "0.bias": torch.randn(8),
    "2.weight": torch.randn(3, 8),
    "2.bias": torch.randn(3),
}


def mlp() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.load_state_dict(MLP)
    return model.eval()


def served(server: Server) -> int:
    """How many Predict rows this replica has run for model "m"."""
    assert server.host is not None
    return server.host.models.get("m").batcher.statistics.snapshot().inference_count


@pytest.fixture
def replica_settings(settings: Settings) -> Iterator[list[Settings]]:
    """Two replicas on one store, each on a port of its own that it keeps over restarts."""
    yield [
        dataclasses.replace(settings, port=free_port(), restore=True, grace_seconds=10)
        for _ in range(2)
    ]


def test_service_config_retries_exactly_the_calls_without_side_effects() -> None:
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    retried = {(n["service"], n["method"]) for n in method["name"]}
    service = modelhost_pb2.DESCRIPTOR.services_by_name["ModelHost"]
    every = {(service.full_name, m.name) for m in service.methods}
    # A new RPC must be classified: retried, or one of those that change state.
    changes_state = {"SaveCheckpoint", "LoadModel", "UnloadModel", "DeleteCheckpoint"}
    assert every - retried == {(service.full_name, name) for name in changes_state}
    assert retried - every == {("grpc.health.v1.Health", "Check")}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert "methodConfig" not in json.loads(service_config(retries=False))


def test_a_draining_server_reports_not_serving_and_refuses_new_calls(
    replica_settings: list[Settings],
) -> None:
    replica = running(replica_settings[0])
    server = replica.__enter__()
    channel = grpc.insecure_channel(server.target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="modelhost.v1.ModelHost"), timeout=30
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopping = threading.Thread(target=replica.__exit__, args=(None, None, None))
    stopping.start()  # as on SIGTERM
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stopping.join(30)
    with ModelHostClient(server.target, timeout=2, config=ChannelConfig(retries=False)) as c:
        with pytest.raises(ModelHostError) as refused:
            c.list_models()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_replicas_share_the_store_and_split_the_calls(
    replica_settings: list[Settings], tmp_path: Path
) -> None:
    with ExitStack() as stack:
        a, b = (stack.enter_context(running(s)) for s in replica_settings)
        with ModelHostClient(a.target, timeout=60) as to_a:
            to_a.save_checkpoint("w", MLP)
        with ModelHostClient(b.target, timeout=60) as to_b:
            # Uploaded through one replica, loadable through the other.
            to_b.load_model("m", architecture="tiny_mlp", checkpoint="w")
        with ModelHostClient(a.target, timeout=60) as to_a:
            to_a.load_model("m", architecture="tiny_mlp", checkpoint="w")
        both = f"ipv4:{a.target},{b.target}"
        x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
        with ModelHostClient(both, timeout=60) as client:
            for _ in range(40):
                np.testing.assert_allclose(
                    client.predict("m", x), reference(mlp(), x), rtol=1e-6, atol=1e-6
                )
        # round_robin: each replica runs about half.
        assert served(a) >= 10 and served(b) >= 10, (served(a), served(b))
        assert served(a) + served(b) == 40


def test_rolling_restart_under_load_fails_no_call(replica_settings: list[Settings]) -> None:
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = reference(mlp(), x)
    running_now = [running(s) for s in replica_settings]
    replicas = [r.__enter__() for r in running_now]
    with ModelHostClient(replicas[0].target, timeout=60) as first:
        first.save_checkpoint("w", MLP)
        first.load_model("m", architecture="tiny_mlp", checkpoint="w")
    with ModelHostClient(replicas[1].target, timeout=60) as second:
        second.load_model("m", architecture="tiny_mlp", checkpoint="w")

    target = "ipv4:" + ",".join(r.target for r in replicas)
    stop = threading.Event()
    failures: list[str] = []
    done = [0] * 16

    def load(i: int) -> None:
        with ModelHostClient(target, timeout=30) as client:
            while not stop.is_set():
                try:
                    out = client.predict("m", x)
                    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
                    done[i] += 1
                except Exception as error:  # every failure counts
                    failures.append(repr(error))

    clients = [threading.Thread(target=load, args=(i,)) for i in range(16)]
    for t in clients:
        t.start()
    try:
        for i, settings in enumerate(replica_settings):
            time.sleep(1.0)
            running_now[i].__exit__(None, None, None)  # drains; the port closes
            running_now[i] = running(settings)
            new = running_now[i].__enter__()  # restores "m", then opens the port
            # Like a rollout's readiness wait: the new replica takes calls before the next.
            deadline = time.monotonic() + 30
            while served(new) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert served(new) >= 20, "the clients never came back to the new replica"
        time.sleep(1.0)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        for r in running_now:
            r.__exit__(None, None, None)
    assert failures == [], failures[:5]
    assert min(done) > 0, done
