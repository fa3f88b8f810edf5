"""The store on its own: atomic commits, recovery after a crash, permissions, names."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path

import pytest

from modelhost.server import staged_writer, store_files
from modelhost.server.errors import (
    AlreadyExists,
    CheckpointNotFound,
    DataLoss,
    InvalidName,
    LimitExceeded,
    StoreFull,
)
from modelhost.server.names import check_name
from modelhost.server.staged_writer import StagedWriter
from modelhost.server.store import CheckpointStore, Contents

CONTENTS = Contents("state_dict", 1)


def put(store: CheckpointStore, name: str, data: bytes, overwrite: bool = False) -> str:
    with store.begin() as pending:
        pending.write(data)
        pending.finish()
        return store.commit(pending, name, CONTENTS, metadata={}, overwrite=overwrite).sha256


def files(root: Path) -> list[str]:
    """The store's files, without its lock files (store.lock, tmp/<owner>.owner)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != "store.lock" and p.suffix != ".owner"
    )


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
    with pytest.raises(DataLoss, match="symbolic links"):
        store.get("link")


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "../x", "x" * 129, "-x", "a b", "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name, "checkpoint")


@pytest.mark.parametrize("name", ["a", "resnet50-v2.1", "A_b-c.d", "x" * 128, "0"])
def test_good_names(name: str) -> None:
    assert check_name(name, "checkpoint") == name


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
@pytest.mark.parametrize(
    "sizes",
    [[], [1], [4096], [8191, 1], [8192], [8193], [3000] * 7, [20_000, 5, 4091]],
    ids=str,
)
def test_staged_writer_writes_exactly_the_bytes(
    tmp_path: Path, direct: bool, sizes: list[int]
) -> None:
    """Stage boundaries, direct I/O padding and the tail: the file is the bytes written."""
    pieces = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = StagedWriter(fd, direct=direct, stage_bytes=8192)
        assert writer.direct <= direct
        for piece in pieces:
            writer.write(memoryview(piece))
        writer.close(sum(sizes))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)


def test_staged_writer_falls_back_when_direct_writes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems take O_DIRECT at open and refuse it on write (EINVAL)."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    real_write = os.write

    def refusing_write(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(staged_writer.os, "write", refusing_write)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = StagedWriter(fd, stage_bytes=8192)
        writer.write(b"x" * 10_000)
        writer.close(10_000)
        assert not writer.direct
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 10_000


def test_large_write_is_hashed_and_committed_whole(tmp_path: Path) -> None:
    """Many uneven chunks through a pending write: size, sha256 and bytes all match."""
    store = CheckpointStore(tmp_path)
    chunks = [os.urandom(size) for size in (1 << 20, 3, (3 << 20) + 17, 4096, 9 << 20)]
    with store.begin() as pending:
        for chunk in chunks:
            pending.write(chunk)
        pending.finish()
        record = store.commit(pending, "big", CONTENTS, metadata={}, overwrite=False)
    data = b"".join(chunks)
    assert record.size_bytes == len(data)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    with store.open("big") as (_, file):
        assert file.read() == data


@pytest.mark.parametrize("direct_io", [True, False])
def test_store_writes_with_or_without_direct_io(tmp_path: Path, direct_io: bool) -> None:
    store = CheckpointStore(tmp_path, direct_io=direct_io)
    data = os.urandom(100_000)
    with store.begin() as pending:
        assert pending._writer.direct <= direct_io
        pending.write(data)
        pending.finish()
        store.commit(pending, "c", CONTENTS, metadata={}, overwrite=False)
    with store.open("c") as (_, file):
        assert file.read() == data


def test_shared_store_keeps_the_uploads_of_live_servers(tmp_path: Path) -> None:
    """Two servers on one store (replicas on a shared volume): a starting one leaves the
    other's upload in progress alone, and cleans up after a server that is gone."""
    first = CheckpointStore(tmp_path)
    upload = first.begin()
    upload.write(b"half an upload")
    second = CheckpointStore(tmp_path)
    second.recover()  # the first is alive: its temp file stays
    assert upload.path.exists()
    upload.write(b" and the rest")
    upload.finish()
    first.commit(upload, "shared", CONTENTS, metadata={}, overwrite=False)
    assert second.get("shared").size_bytes == len(b"half an upload and the rest")

    stranded = first.begin()
    stranded.write(b"never finished")
    first._locks.owner_file.close()  # the first server dies (the kernel drops its lock)
    third = CheckpointStore(tmp_path)
    third.recover()
    assert not stranded.path.exists()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(
        f"{store.owner}.owner" for store in (second, third)
    )
    assert third.get("shared").sha256 == second.get("shared").sha256
    for store in (second, third):
        store.close()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_store_works_where_the_file_system_has_no_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some NFS mounts refuse flock (ENOLCK): one server still works, as if alone."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "gone-1-1.upload-1").write_bytes(b"left by a crash")

    def no_locks(file: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    store = CheckpointStore(tmp_path)
    assert not store.file_locks
    store.recover()
    assert files(tmp_path) == []
    put(store, "c", b"bytes")
    store.delete("c")
    assert files(tmp_path) == []


def test_state_pins_keep_blobs_until_no_document_pins_them(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    sha = put(store, "a", b"first")
    store.write_state("record", ["m"], pins=[sha])
    put(store, "a", b"second", overwrite=True)
    store.delete("a")
    CheckpointStore(tmp_path).recover()
    assert files(tmp_path) == [f"blobs/{sha}", "record.json"]
    # A blob not pinned yet must be there to be pinned: else nothing changes.
    with pytest.raises(CheckpointNotFound, match="not in the store"):
        store.write_state("record", ["m", "n"], pins=[sha, hashlib.sha256(b"gone").hexdigest()])
    assert store.read_state("record") == ["m"]
    store.write_state("record", [])
    assert files(tmp_path) == ["record.json"]


def test_state_written_before_pins_reads_as_written(tmp_path: Path) -> None:
    (tmp_path / "record.json").write_text('[{"name": "m"}]')
    assert CheckpointStore(tmp_path).read_state("record") == [{"name": "m"}]


def test_a_full_disk_is_store_full_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_write_entry", full)  # the blob is in place, its entry fails
    with pytest.raises(StoreFull, match="checkpoint store is full"):
        put(store, "a", b"bytes")
    assert files(tmp_path) == []


def test_a_write_that_cannot_start_leaves_no_file_and_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)

    def no_buffers(*args: object, **kwargs: object) -> None:
        raise MemoryError("no memory for the staging buffers")

    monkeypatch.setattr(store_files, "StagedWriter", no_buffers)
    descriptors = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MemoryError):
        store.begin()
    assert len(os.listdir("/proc/self/fd")) == descriptors
    assert files(tmp_path) == []
    store.close()
