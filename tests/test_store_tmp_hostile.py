"""A store shared with other servers: what they do (hold `store.lock`) or leave in tmp/
(holds and owner files of any kind) never stops this server answering, makes a delete or
an overwrite fail, or keeps it from starting."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import temp_files
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError
from modelhost.server import Server, Settings, running, store_locks
from modelhost.server.store import CheckpointStore


def state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(seed))}


def blobs(settings: Settings) -> set[str]:
    return {p.name for p in (settings.store / "blobs").iterdir()}


@contextlib.contextmanager
def live_owner(lock: Path) -> Iterator[None]:
    """Locks `lock` (through a file of its own, as another running server would)."""
    with open(lock, "a+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def answers_quickly(server: Server) -> None:
    """A health check and ListModels each answer well under a second."""
    with (
        grpc.insecure_channel(server.target) as channel,
        ModelHostClient(server.target, timeout=2) as client,
    ):
        start = time.monotonic()
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        client.list_models()
        assert time.monotonic() - start < 1


def test_a_delete_waiting_for_the_store_lock_leaves_the_server_answering(
    settings: Settings,
) -> None:
    with (
        running(settings) as server,
        ModelHostClient(server.target, timeout=30) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        client.save_checkpoint("a", state(1))
        with live_owner(settings.store / "store.lock"):  # another server's commit
            deleting = pool.submit(client.delete_checkpoint, "a")
            time.sleep(0.3)
            answers_quickly(server)
            time.sleep(1.7)
            assert not deleting.done()  # waits for the lock, off the event loop
        deleting.result(timeout=10)
        assert client.list_checkpoints() == []


def _plant_holds(holds: Path, kind: str, sha: str) -> None:
    """A live owner's holds file of the given kind; the listed ones name `sha`."""
    big = json.dumps([sha]) + " " * (2 << 20)  # a list of sha256, past the 1 MiB bound
    if kind == "nested":
        holds.write_text("[" * 100_000)
    elif kind == "fifo":
        os.mkfifo(holds)
    elif kind == "big":
        holds.write_text(big)
    elif kind == "symlink":
        target = holds.parent.parent.parent / "elsewhere.json"
        target.write_text(big)
        holds.symlink_to(target)


@pytest.mark.parametrize("kind", ["nested", "fifo", "big", "symlink"])
def test_a_planted_holds_file_holds_nothing_and_blocks_nothing(
    settings: Settings, kind: str
) -> None:
    tmp = settings.store / "tmp"
    with (
        running(settings) as server,
        ModelHostClient(server.target, timeout=5) as client,
    ):
        a = client.save_checkpoint("a", state(1)).sha256
        b = client.save_checkpoint("b", state(2)).sha256
        with live_owner(tmp / "evil.owner"):
            _plant_holds(tmp / "evil.holds", kind, a)
            try:
                client.delete_checkpoint("a")
                answers_quickly(server)
                c = client.save_checkpoint("b", state(3), overwrite=True).sha256
                assert client.get_checkpoint("b").sha256 == c
            finally:  # unblock a server that reads the FIFO
                with contextlib.suppress(OSError):
                    fd = os.open(tmp / "evil.holds", os.O_WRONLY | os.O_NONBLOCK)
                    os.write(fd, b"[]")
                    os.close(fd)
        assert a not in blobs(settings) and b not in blobs(settings)


def _plant_owners(tmp: Path, locked: Path) -> None:
    """Owner files that are no regular file: a FIFO, and a link to a file a process locks."""
    with contextlib.suppress(FileExistsError):
        os.mkfifo(tmp / "y.owner")
    with contextlib.suppress(FileExistsError):
        (tmp / "z.owner").symlink_to(locked)


def test_folders_and_links_in_tmp_do_not_stop_a_start_or_a_delete(settings: Settings) -> None:
    tmp, locked = settings.store / "tmp", settings.store / "locked"
    tmp.mkdir(parents=True)
    (tmp / "x.owner").mkdir()
    (tmp / "x.upload-1").mkdir()
    _plant_owners(tmp, locked)
    with (
        live_owner(locked),
        running(settings) as server,
        ModelHostClient(server.target, timeout=5) as client,
    ):
        _plant_owners(tmp, locked)  # again: the start removed them (no live server's)
        client.save_checkpoint("a", state(1))
        client.save_checkpoint("a", state(2), overwrite=True)
        client.delete_checkpoint("a")
        assert client.list_checkpoints() == []
        assert blobs(settings) == set()
    assert {"x.owner", "x.upload-1"} <= {p.name for p in tmp.iterdir()}


def test_an_overwrite_whose_clean_up_fails_is_answered_as_committed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: CheckpointStore) -> set[str]:
        raise OSError(errno.EIO, "Input/output error")

    with (
        running(settings) as server,
        ModelHostClient(server.target, timeout=10) as client,
    ):
        first = client.save_checkpoint("a", state(1)).sha256
        monkeypatch.setattr(CheckpointStore, "_used_blobs", broken)
        second = client.save_checkpoint("a", state(2), overwrite=True).sha256
        monkeypatch.undo()
        assert client.get_checkpoint("a").sha256 == second != first
    assert blobs(settings) == {first, second}  # the next start removes the first


def test_unreadable_manifest_entries_are_data_loss_and_can_be_deleted(
    settings: Settings,
) -> None:
    """Entries in checkpoints/ that the store did not write (deep or huge JSON, a FIFO, a
    symlink, a record of the wrong shape, a sha256 that is a path): listing skips them at
    once, reading one is DATA_LOSS saying why, deleting one removes it, and the server
    starts again with them there."""
    entries = settings.store / "checkpoints"
    with running(settings) as server, ModelHostClient(server.target, timeout=5) as client:
        client.save_checkpoint("good", state(1))
        planted = {
            "deep": lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
            "huge": lambda p: p.write_bytes(b"{" + b" " * (5 << 20) + b"}"),
            "fifo": os.mkfifo,
            "link": lambda p: os.symlink(entries / "good.json", p),
            "shape": lambda p: p.write_text('{"name": 3}'),
            "types": lambda p: like_good(p, size_bytes="a string", metadata={"k": 1}),
            "time": lambda p: like_good(p, created=1e300),
            "renamed": lambda p: like_good(p, name="good"),
            "path": lambda p: p.write_text(
                (entries / "good.json")
                .read_text()
                .replace(client.get_checkpoint("good").sha256, "../../../../etc/passwd")
            ),
        }

        def like_good(path: Path, **changes: object) -> None:
            """The entry of "good" with `changes`, planted as `path`'s checkpoint."""
            entry = {**json.loads((entries / "good.json").read_text()), "name": path.stem}
            path.write_text(json.dumps({**entry, **changes}))

        for name, plant in planted.items():
            plant(entries / f"{name}.json")
        start = time.monotonic()
        assert [c.name for c in client.list_checkpoints()] == ["good"]
        assert time.monotonic() - start < 1
        for name in planted:
            with pytest.raises(Exception) as caught:
                client.get_checkpoint(name)
            assert caught.value.code == grpc.StatusCode.DATA_LOSS, caught.value  # type: ignore[attr-defined]
            assert "unreadable" in str(caught.value)
            with pytest.raises(Exception) as caught:
                client.download_checkpoint(name)
            assert caught.value.code == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
        for name in ("deep", "huge", "fifo", "link"):
            client.delete_checkpoint(name)
        left = sorted(p.stem for p in entries.iterdir())
        assert left == ["good", "path", "renamed", "shape", "time", "types"]
    with running(settings) as server, ModelHostClient(server.target, timeout=5) as client:
        assert [c.name for c in client.list_checkpoints()] == ["good"]
        assert client.download_checkpoint("good")["w"].tolist() == [1.0] * 4
        answers_quickly(server)


def test_a_store_lock_held_too_long_is_unavailable_not_a_thread_forever(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that hangs holding store.lock: a delete or an upload here gives up after
    LOCK_WAIT with UNAVAILABLE (retryable), nothing changes, and all works once it is
    released."""
    monkeypatch.setattr(store_locks, "LOCK_WAIT", 0.5)
    with (
        running(settings) as server,
        ModelHostClient(server.target, timeout=10, config=ChannelConfig(retries=False)) as client,
    ):
        client.save_checkpoint("a", state(1))
        with live_owner(settings.store / "store.lock"):  # a hung server's commit
            for call in (
                lambda: client.delete_checkpoint("a"),
                lambda: client.save_checkpoint("b", state(2)),
            ):
                with pytest.raises(ModelHostError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                assert "store.lock" in caught.value.message
            answers_quickly(server)
        assert [c.name for c in client.list_checkpoints()] == ["a"]
        assert temp_files(settings.store) == []
        client.save_checkpoint("b", state(2))
        client.delete_checkpoint("a")
        assert [c.name for c in client.list_checkpoints()] == ["b"]
