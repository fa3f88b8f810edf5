"""The store's commit, step by step: the order of writes, fsyncs and renames, and a crash
between any two of them. A SIGKILL test never drops the page cache and rarely lands
between two steps; these tests record every step and crash a child process at each."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from conftest import expect
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running
from modelhost.server.store import CheckpointStore, Contents

OLD, NEW = b"old checkpoint bytes " * 1000, b"new checkpoint bytes " * 3000
CONTENTS = Contents("state_dict", 1)


def commit(root: Path, name: str, data: bytes) -> None:
    store = CheckpointStore(root)
    try:
        with store.begin() as pending:
            pending.write(data)
            pending.finish()
            store.commit(pending, name, CONTENTS, metadata={}, overwrite=True)
    finally:
        store.close()


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[], None]], list[Any]]]:
    """Records (what, path) of every write, fsync and rename while a function runs."""
    lock = threading.Lock()

    def recording(fn: Callable[[], None]) -> list[Any]:
        seen: list[Any] = []
        write, fsync, replace = os.write, os.fsync, os.replace

        def note(step: tuple[str, str]) -> None:
            with lock:
                if step[0] != "write" or not seen or seen[-1] != step:
                    seen.append(step)

        def on_write(fd: int, data: Any) -> int:
            note(("write", _path_of(fd)))
            return write(fd, data)

        def on_fsync(fd: int) -> None:
            note(("fsync", _path_of(fd)))
            fsync(fd)

        def on_replace(src: Any, dst: Any) -> None:
            note(("replace", f"{src} -> {dst}"))
            replace(src, dst)

        monkeypatch.setattr(os, "write", on_write)
        monkeypatch.setattr(os, "fsync", on_fsync)
        monkeypatch.setattr(os, "replace", on_replace)
        try:
            fn()
        finally:
            monkeypatch.undo()
        return seen

    yield recording


def _index(seen: list[Any], what: str, *parts: str) -> int:
    found = [
        i for i, (kind, text) in enumerate(seen) if kind == what and all(p in text for p in parts)
    ]
    assert found, (what, parts, seen)
    return found[-1]


def test_commit_makes_data_durable_before_it_becomes_visible(
    tmp_path: Path, steps: Callable[[Callable[[], None]], list[Any]]
) -> None:
    sha = hashlib.sha256(NEW).hexdigest()
    seen = steps(lambda: commit(tmp_path, "w", NEW))
    upload = _index(seen, "write", "/tmp/", ".upload-")
    upload_synced = _index(seen, "fsync", ".upload-")
    blob_renamed = _index(seen, "replace", ".upload-", f"blobs/{sha}")
    blobs_synced = _index(seen, "fsync", str(tmp_path / "blobs"))
    entry_synced = _index(seen, "fsync", ".write-w.json")
    entry_renamed = _index(seen, "replace", ".write-w.json", "checkpoints/w.json")
    entries_synced = _index(seen, "fsync", str(tmp_path / "checkpoints"))
    order = [
        upload,
        upload_synced,
        blob_renamed,
        blobs_synced,
        entry_synced,
        entry_renamed,
        entries_synced,
    ]
    assert order == sorted(order), seen
    assert seen[-1] == ("fsync", str(tmp_path / "checkpoints"))


def _durable_steps(root: Path, steps: Callable[[Callable[[], None]], list[Any]]) -> int:
    """How many fsyncs and renames one overwrite makes (on a copy of the store)."""
    scratch = root.parent / "count"
    commit(scratch, "w", OLD)
    seen = steps(lambda: commit(scratch, "w", NEW))
    return sum(kind in ("fsync", "replace") for kind, _ in seen)


def _crash_at(root: Path, step: int) -> int:
    """Overwrites "w" with NEW in a child process killed (os._exit) just before its
    `step`-th fsync or rename; returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handlers, no atexit, as in a crash
        count = [0]
        fsync, replace = os.fsync, os.replace

        def maybe_die() -> None:
            if count[0] == step:
                os._exit(99)
            count[0] += 1

        def die_fsync(fd: int) -> None:
            maybe_die()
            fsync(fd)

        def die_replace(src: Any, dst: Any) -> None:
            maybe_die()
            replace(src, dst)

        os.fsync, os.replace = die_fsync, die_replace  # type: ignore[assignment]
        try:
            commit(root, "w", NEW)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_crash_between_any_two_steps_leaves_old_or_new_complete(
    tmp_path: Path, steps: Callable[[Callable[[], None]], list[Any]]
) -> None:
    total = _durable_steps(tmp_path, steps)
    assert total >= 6
    outcomes = []
    for step in range(total + 1):
        root = tmp_path / f"crash-{step}"
        commit(root, "w", OLD)
        code = _crash_at(root, step)
        assert code == (99 if step < total else 0), step
        store = CheckpointStore(root)  # a restart: recovery runs
        store.recover()
        record = store.get("w")
        with store.open("w") as (_, file):
            data = file.read()
        assert data in (OLD, NEW), step
        assert record.sha256 == hashlib.sha256(data).hexdigest() and record.size_bytes == len(data)
        blobs = sorted(p.name for p in (root / "blobs").iterdir())
        assert blobs == [record.sha256], (step, "no unreferenced blob is left")
        assert [p.name for p in (root / "tmp").iterdir() if p.suffix != ".owner"] == []
        store.close()
        outcomes.append(data == NEW)
    # Before the entry's rename the old checkpoint stands; from it on, the new one.
    assert outcomes[0] is False and outcomes[-1] is True
    assert outcomes == sorted(outcomes)


def test_an_entry_whose_bytes_are_gone_is_data_loss(settings: Settings) -> None:
    """A manifest entry whose blob was removed behind the store's back (a bad restore of
    the volume, a hand-made rm) stays listed and answers DATA_LOSS until deleted."""
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        info = client.save_checkpoint("w", {"weight": torch.ones(2)})
        client.save_checkpoint("other", {"weight": torch.zeros(2)})
    (settings.store / "blobs" / info.sha256).unlink()
    with running(settings) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [c.name for c in client.list_checkpoints()] == ["other", "w"]
        for call in (
            lambda: client.download_checkpoint("w"),
            lambda: client.load_model("m", architecture="tiny_mlp", checkpoint="w"),
        ):
            expect(grpc.StatusCode.DATA_LOSS, call, "missing", info.sha256)
        other = client.download_checkpoint("other")
        assert isinstance(other, dict)
        assert other["weight"].sum() == 0
        client.delete_checkpoint("w")
        assert [c.name for c in client.list_checkpoints()] == ["other"]
