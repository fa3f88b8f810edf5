"""Servers starting together on one store (replicas on a shared volume; red team 14, F7):
a start's clean-up (`recover`) never removes the owner file of a server that starts
meanwhile, and another start's brief probe of that file never fails a start. The timing
is forced: the other server starts at the worst moment of a clean-up."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from helpers.stores import put
from modelhost.server.errors import Refused
from modelhost.server.store import CheckpointStore

_flock = fcntl.flock


def tmp_names(root: Path) -> set[str]:
    return {p.name for p in (root / "tmp").iterdir()}


def live_to(store: CheckpointStore, other: CheckpointStore, root: Path) -> None:
    """`other` runs as far as `store` can tell: its owner file is in place, locked, and
    its holds count (a delete of a checkpoint it holds is refused)."""
    assert f"{other.owner}.owner" in tmp_names(root)
    assert other.owner in store._locks.live_owners()
    sha = put(store, "ckpt", b"bytes the other server pages in from")
    other.hold(sha)
    with pytest.raises(Refused, match=other.owner):
        store.delete("ckpt")
    assert (root / "blobs" / sha).exists()


@pytest.fixture
def first_flock_of_a_start(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Callable[[IO[bytes] | int], None]], None]]:
    """Runs a given function once, at the first flock a store's start takes (on its owner
    file, just created), before that flock."""
    hooks: list[Callable[[IO[bytes] | int], None]] = []

    def flock(file: IO[bytes] | int, operation: int) -> None:
        if hooks:
            hooks.pop()(file)
        _flock(file, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    yield hooks.append
    assert not hooks, "the hook never ran"


def test_a_server_starting_while_another_cleans_up_keeps_its_files(tmp_path: Path) -> None:
    """B starts after A's clean-up listed the live servers, before it removes anything (a
    slow clean-up on a big store): A removes only what the gone server left."""
    a = CheckpointStore(tmp_path)
    gone = tmp_path / "tmp" / "gone-1-1.upload-1"
    gone.write_bytes(b"left by a crash")
    started: list[CheckpointStore] = []
    listed = a._locks.live_owners

    def listed_then_b_starts() -> set[str]:
        live = listed()
        if not started:
            started.append(CheckpointStore(tmp_path))
        return live

    a._locks.live_owners = listed_then_b_starts  # type: ignore[method-assign]
    a.recover()
    a._locks.live_owners = listed  # type: ignore[method-assign]
    assert started, "recover() no longer lists the live owners: force the timing elsewhere"
    (b,) = started
    assert not gone.exists()
    live_to(a, b, tmp_path)


def test_a_clean_up_between_a_starts_create_and_lock_removes_nothing_it_needs(
    tmp_path: Path,
    first_flock_of_a_start: Callable[[Callable[[IO[bytes] | int], None]], None],
) -> None:
    """A's clean-up runs after B created its owner file and before B locked it: that file
    is not yet in place as an owner file (A may remove it, and B then starts over)."""
    a = CheckpointStore(tmp_path)
    owner_files_removed: list[set[str]] = []

    def clean_up(file: IO[bytes] | int) -> None:
        before = {name for name in tmp_names(tmp_path) if name.endswith(".owner")}
        a.recover()
        owner_files_removed.append(before - tmp_names(tmp_path))

    first_flock_of_a_start(clean_up)
    b = CheckpointStore(tmp_path)
    assert owner_files_removed == [set()]
    live_to(a, b, tmp_path)
    assert tmp_names(tmp_path) == {
        f"{a.owner}.owner",
        f"{b.owner}.owner",
        f"{b.owner}.holds",
    }


def test_another_starts_brief_probe_does_not_fail_a_start(
    tmp_path: Path,
    first_flock_of_a_start: Callable[[Callable[[IO[bytes] | int], None]], None],
) -> None:
    """Another server's clean-up probes B's new owner file (a brief lock of its own) just
    as B locks it: B waits the probe out."""
    a = CheckpointStore(tmp_path)

    def probe(file: IO[bytes] | int) -> None:
        fd = file if isinstance(file, int) else file.fileno()
        probing = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # the same file, opened again
        _flock(probing, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.05, os.close, (probing,)).start()  # which lets the lock go

    first_flock_of_a_start(probe)
    b = CheckpointStore(tmp_path)
    live_to(a, b, tmp_path)


def test_a_starting_servers_file_stays_and_one_whose_server_died_goes(tmp_path: Path) -> None:
    """A start that died before its rename leaves `<owner>.starting-<n>` (unlocked): the
    next clean-up removes it. One that a starting server holds locked stays."""
    CheckpointStore(tmp_path).close()
    tmp = tmp_path / "tmp"
    (tmp / "dead-1-1.starting-1").write_bytes(b"")
    with open(tmp / "starting-2-2.starting-1", "a+b") as starting:
        _flock(starting, fcntl.LOCK_EX)
        store = CheckpointStore(tmp_path)
        store.recover()
        assert tmp_names(tmp_path) == {f"{store.owner}.owner", "starting-2-2.starting-1"}


def test_a_store_without_file_locks_still_starts_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some NFS mounts refuse flock: the owner file is still put in place, a warning says
    not to share the store, and the clean-up removes every other server's files."""
    CheckpointStore(tmp_path).close()
    tmp = tmp_path / "tmp"
    for name in ("dead-1-1.starting-1", "dead-1-1.owner", "dead-1-1.upload-1"):
        (tmp / name).write_bytes(b"")

    def no_locks(file: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, "modelhost.server.store_locks"):
        store = CheckpointStore(tmp_path)
    assert not store.file_locks
    assert "no file locks" in caplog.text
    store.recover()
    assert tmp_names(tmp_path) == {f"{store.owner}.owner"}
    store.close()
    assert tmp_names(tmp_path) == set()
