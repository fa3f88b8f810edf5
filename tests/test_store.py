"""The store on its own: atomic commits, recovery after a crash, permissions, names."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from modelhost.server.errors import AlreadyExists, CheckpointNotFound, InvalidName, LimitExceeded
from modelhost.server.names import check_name
from modelhost.server.store import CheckpointStore, Contents

CONTENTS = Contents("state_dict", 1)


def put(store: CheckpointStore, name: str, data: bytes, overwrite: bool = False) -> str:
    with store.begin() as pending:
        pending.write(data)
        pending.finish()
        return store.commit(pending, name, CONTENTS, metadata={}, overwrite=overwrite).sha256


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_commit_read_overwrite_delete(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    sha = put(store, "a", b"first")
    assert sha == hashlib.sha256(b"first").hexdigest()
    record = store.get("a")
    assert (record.size_bytes, record.format) == (5, "state_dict")
    with store.open("a") as (_, file):
        assert file.read() == b"first"
    with pytest.raises(AlreadyExists):
        put(store, "a", b"second")
    put(store, "a", b"second", overwrite=True)
    with store.open("a") as (_, file):
        assert file.read() == b"second"
    assert files(tmp_path) == [
        "blobs/" + hashlib.sha256(b"second").hexdigest(),
        "checkpoints/a.json",
    ]
    store.delete("a")
    assert files(tmp_path) == []
    with pytest.raises(CheckpointNotFound):
        store.get("a")


def test_same_bytes_share_one_blob_until_the_last_name_goes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    put(store, "a", b"same")
    put(store, "b", b"same")
    assert len(list((tmp_path / "blobs").iterdir())) == 1
    store.delete("a")
    with store.open("b") as (_, file):
        assert file.read() == b"same"
    store.delete("b")
    assert list((tmp_path / "blobs").iterdir()) == []


def test_open_file_survives_delete_and_overwrite(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    put(store, "a", b"old bytes")
    with store.open("a") as (_, file):
        put(store, "a", b"new bytes", overwrite=True)
        assert file.read() == b"old bytes"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, max_checkpoint_bytes=10)
    with pytest.raises(LimitExceeded, match="10 bytes"), store.begin() as pending:
        pending.write(b"x" * 11)
    with pytest.raises(RuntimeError), store.begin() as pending:
        pending.write(b"abc")
        raise RuntimeError("client went away")
    assert files(tmp_path) == []


def test_recover_removes_leftovers_and_keeps_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    put(store, "kept", b"kept bytes")
    (tmp_path / "tmp" / "upload-crashed").write_bytes(b"half")
    (tmp_path / "blobs" / ("0" * 64)).write_bytes(b"orphan: renamed, never committed")
    CheckpointStore(tmp_path).recover()
    assert files(tmp_path) == [
        "blobs/" + hashlib.sha256(b"kept bytes").hexdigest(),
        "checkpoints/kept.json",
    ]


def test_files_are_private(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "s")
    put(store, "a", b"secret")
    for path in (tmp_path / "s").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_entries_are_not_followed_through_symlinks(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "s")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (tmp_path / "s" / "checkpoints" / "link.json").symlink_to(outside)
    with pytest.raises(OSError):
        store.get("link")


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "../x", "x" * 129, "-x", "a b", "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name, "checkpoint")


@pytest.mark.parametrize("name", ["a", "resnet50-v2.1", "A_b-c.d", "x" * 128, "0"])
def test_good_names(name: str) -> None:
    assert check_name(name, "checkpoint") == name
