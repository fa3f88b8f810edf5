"""`--restore` brings back the same bytes under the same name and version."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import expect, reference
from modelhost import cli
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running

NF = grpc.StatusCode.NOT_FOUND
X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


def saved(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load(client: ModelHostClient, name: str = "m", checkpoint: str = "w") -> Any:
    return client.load_model(name, architecture="tiny_mlp", checkpoint=checkpoint)


def same(actual: Any, expected: Any) -> None:
    """Equal up to float rounding (the server may sum in another order)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def blobs(settings: Settings) -> list[str]:
    return sorted(p.name for p in (settings.store / "blobs").iterdir())


@pytest.fixture
def restoring(settings: Settings) -> Settings:
    return dataclasses.replace(settings, restore=True)


def test_restore_serves_the_recorded_bytes_after_the_checkpoint_is_overwritten(
    restoring: Settings,
) -> None:
    first, second = mlp(1), mlp(2)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(first))
        sha = load(client).checkpoint_sha256
        client.save_checkpoint("w", saved(second), overwrite=True)
        same(client.predict("m", X), reference(first, X))
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        info = client.get_model("m", 1)
        assert info.checkpoint_sha256 == sha == hashlib.sha256(saved(first)).hexdigest()
        same(client.predict("m", X, version=1), reference(first, X))
        # The name holds the new bytes: a new load serves them, next to version 1.
        assert load(client).version == 2
        same(client.predict("m", X), reference(second, X))
        client.unload_model("m", 1)
        # No record refers to the first bytes any more: they are gone from the store.
        assert blobs(restoring) == [client.get_checkpoint("w").sha256]


def test_restore_after_the_checkpoint_is_deleted_uses_the_recorded_bytes(
    restoring: Settings,
) -> None:
    model = mlp(3)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        load(client)
        client.delete_checkpoint("w")
        assert client.list_checkpoints() == []
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [(m.name, m.version) for m in client.list_models()] == [("m", 1)]
        same(client.predict("m", X), reference(model, X))
        client.unload_model("m")
        assert blobs(restoring) == []
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert client.list_models() == []


def test_a_record_whose_bytes_are_gone_is_not_restored_and_says_why(
    restoring: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp(4)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        sha = load(client).checkpoint_sha256
        load(client, "other")
    (restoring.store / "blobs" / sha).unlink()
    with (
        caplog.at_level(logging.ERROR, "modelhost"),
        running(restoring) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        listed = client.list_models()  # ListModels shows what is not serving, and why
        assert [(m.name, m.version, m.state) for m in listed] == [
            ("m", 1, "failed"),
            ("other", 1, "failed"),
        ]
        assert all(
            sha in m.status_message and "no longer in the store" in m.status_message for m in listed
        )
        assert listed[0].checkpoint == "w" and listed[0].architecture == "tiny_mlp"
        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            assert cli.main(["list", "models", "--target", server.target]) == 0
        assert f"m v1 failed: {listed[0].status_message} (tiny_mlp, checkpoint w)" in (
            listing.getvalue()
        )
        expect(NF, lambda: client.get_model("m"), "version 1 was not restored", sha)
        expect(NF, lambda: client.get_model("m", 1), "version 1 was not restored", sha)
        assert "restored" not in expect(NF, lambda: client.get_model("m", 2)).message
    assert f"could not restore m version 1: checkpoint 'w' (sha256 {sha})" in caplog.text
    # The record keeps the entry: the same bytes uploaded again (any name) bring it back.
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        expect(NF, lambda: client.get_model("other"), "not restored", sha)
        client.save_checkpoint("again", saved(model))
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [(m.name, m.version) for m in client.list_models()] == [("m", 1), ("other", 1)]
        same(client.predict("m", X), reference(model, X))
        client.unload_model("m")
        client.delete_checkpoint("again")
    (restoring.store / "blobs" / sha).unlink()
    # UnloadModel drops a version that was not restored from the record.
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        expect(NF, lambda: client.get_model("other"), "not restored")
        assert [(m.name, m.state) for m in client.list_models()] == [("other", "failed")]
        assert client.unload_model("other") == [1]
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert client.list_models() == []
        error = expect(NF, lambda: client.get_model("other"), "not loaded")
        assert "restored" not in error.message


def test_a_record_written_before_sha256_pinning_still_restores_by_name(
    settings: Settings, restoring: Settings
) -> None:
    model = mlp(5)
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
    # The flat format of then: LoadRequest's fields, batching and preprocessing included.
    legacy = {
        "name": "m",
        "architecture": "tiny_mlp",
        "architecture_args": {},
        "checkpoint": "w",
        "version": 3,
        "device": "",
        "dtype": 0,
        "strict": True,
        "weights": "",
        "channels_last": False,
        "preprocessing": None,
        "labels": [],
        "warmup_shape": [],
        "compile": "",
        "autocast": 0,
        "max_batch_size": 4,
        "max_queue_delay_us": 0,
        "max_queue_size": 0,
        "preferred_batch_size": 0,
    }
    (settings.store / "hosted-models.json").write_text(json.dumps([legacy]))
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [(m.name, m.version) for m in client.list_models()] == [("m", 3)]
        assert client.get_model("m").batching.max_batch_size == 4
        same(client.predict("m", X), reference(model, X))
        client.save_checkpoint("w", saved(mlp(6)), overwrite=True)
    # Restored, the version is recorded with its bytes: they stay what it serves.
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        same(client.predict("m", X, version=3), reference(model, X))


def test_concurrent_loads_and_unloads_are_recorded_as_they_happened(
    restoring: Settings,
) -> None:
    """The record is written off the event loop; loads and unloads that race still leave
    it saying exactly what was serving: after a restart the same versions come back."""
    from concurrent.futures import ThreadPoolExecutor

    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(mlp(1)))

        def churn(index: int) -> None:
            name = f"m{index % 4}"
            load(client, name)
            if index % 3 == 0:
                client.unload_model(name, 0)  # every version of it

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(churn, range(48)))
            # The last writes race too: loads that end together, none written after them.
            list(pool.map(lambda index: load(client, f"last{index}"), range(8)))
        serving = sorted((m.name, m.version) for m in client.list_models())
        assert serving  # some survived the unloads
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert sorted((m.name, m.version) for m in client.list_models()) == serving
        for name, version in serving:
            same(client.predict(name, X, version=version), reference(mlp(1), X))
