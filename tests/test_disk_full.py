"""A full store volume: RESOURCE_EXHAUSTED, and nothing changed (a 4 MiB tmpfs filled up)."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import REPLICA_BUDGET, expect, reference, temp_files
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running

RE = grpc.StatusCode.RESOURCE_EXHAUSTED
X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def saved(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load(client: ModelHostClient) -> Any:
    return client.load_model("m", architecture="tiny_mlp", checkpoint="w")


def same(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "volume"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def on_volume(settings: Settings, volume: Path) -> Settings:
    return dataclasses.replace(settings, store=volume / "store", restore=True)


def fill(volume: Path) -> Path:
    """Writes a file that takes every free byte of the volume; returns it."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def hosted(client: ModelHostClient) -> list[tuple[str, int]]:
    return [(m.name, m.version) for m in client.list_models()]


def test_load_on_a_full_store_changes_nothing_and_a_retry_gets_version_1(
    volume: Path, on_volume: Settings
) -> None:
    model = mlp(1)
    with running(on_volume) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        filler = fill(volume)
        expect(RE, lambda: load(client), "checkpoint store is full")
        assert hosted(client) == []
        filler.unlink()
        assert load(client).version == 1
        same(client.predict("m", X), reference(model, X))
    with running(on_volume) as server, ModelHostClient(server.target, timeout=60) as client:
        assert hosted(client) == [("m", 1)]


def test_unload_on_a_full_store_changes_nothing(volume: Path, on_volume: Settings) -> None:
    model = mlp(2)
    with running(on_volume) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        load(client)
        filler = fill(volume)
        expect(RE, lambda: client.unload_model("m"), "checkpoint store is full")
        assert hosted(client) == [("m", 1)]
        same(client.predict("m", X), reference(model, X))
    with running(on_volume) as server, ModelHostClient(server.target, timeout=60) as client:
        assert hosted(client) == [("m", 1)]  # the record is as it was
        filler.unlink()
        assert client.unload_model("m") == [1]
    with running(on_volume) as server, ModelHostClient(server.target, timeout=60) as client:
        assert hosted(client) == []


@pytest.mark.parametrize("direct_io", [True, False])
def test_uploads_and_snapshots_on_a_full_store_leave_nothing(
    volume: Path, on_volume: Settings, direct_io: bool
) -> None:
    store = on_volume.store
    settings = dataclasses.replace(on_volume, direct_io=direct_io)
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(mlp(3)))
        load(client)
        filler = fill(volume)
        expect(RE, lambda: client.save_checkpoint("big", os.urandom(3 << 20)), "store is full")
        expect(RE, lambda: client.save_checkpoint("small", saved(mlp(4))), "store is full")
        expect(RE, lambda: client.snapshot("m", "snap"), "store is full")
        assert temp_files(store) == []
        assert [c.name for c in client.list_checkpoints()] == ["w"]
        assert len(list((store / "blobs").iterdir())) == 1
        filler.unlink()
        client.save_checkpoint("small", saved(mlp(4)))
        client.snapshot("m", "snap")
        assert [c.name for c in client.list_checkpoints()] == ["small", "snap", "w"]


def test_a_load_whose_hold_cannot_be_written_is_refused_while_another_server_shares_the_store(
    volume: Path, settings: Settings
) -> None:
    """An evictable version holds the bytes it pages in from, in a holds file the other
    servers sharing the store read: one that cannot be written would leave them free to
    remove those bytes, so the load is refused (and, once there is room, goes through). A
    lone server loads anyway."""
    shared = dataclasses.replace(settings, store=volume / "store")
    evictable = dataclasses.replace(shared, device_memory_budget=REPLICA_BUDGET)
    model = mlp(5)
    with running(evictable) as first, ModelHostClient(first.target, timeout=60) as a:
        a.save_checkpoint("w", saved(model))
        filler = fill(volume)
        with running(shared) as second, ModelHostClient(second.target, timeout=60) as b:
            expect(RE, lambda: load(a), "checkpoint store is full")
            assert hosted(a) == []
            filler.unlink()
            assert load(a).version == 1
            expect(
                grpc.StatusCode.FAILED_PRECONDITION,
                lambda: b.delete_checkpoint("w"),
                "needed by another server",
            )
        a.unload_model("m")
        fill(volume)
        assert load(a).version == 1  # alone again: its holds file is for later servers
        same(a.predict("m", X), reference(model, X))
