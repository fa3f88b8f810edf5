"""The checkpoint store's careful file primitives: files created owner-only and never through
a symlink, atomic replacement (written, fsynced, renamed, folder fsynced), reads that open
only regular files (no symlink followed, no FIFO waited on) and bound what they read, a full
volume reported as StoreFull, and `PendingWrite`, the temp file an upload streams into.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelhost.server.errors import LimitExceeded, StoreFull
from modelhost.server.staged_writer import StagedWriter

log = logging.getLogger("modelhost.server.store")  # the store's log, as it was in store.py

FILE_MODE = 0o600
DIR_MODE = 0o700
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # StoreFull: RESOURCE_EXHAUSTED
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS  # no symlink followed, no FIFO waited on
SHA256 = re.compile(r"[0-9a-f]{64}")  # the name of a blob (blobs/<sha256>)


@contextlib.contextmanager
def space() -> Iterator[None]:
    """Reports a full volume (or a spent quota, or a file larger than the file system
    takes) as StoreFull: RESOURCE_EXHAUSTED."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL:
            raise
        raise store_full(error) from None


def store_full(error: OSError) -> StoreFull:
    """The StoreFull an OSError of a full volume (errno in FULL) is reported as."""
    if error.errno == errno.EFBIG:
        return StoreFull(
            "the checkpoint store's file system refused a file this large "
            f"({os.strerror(error.errno)}: a file-size limit such as ulimit -f, or the "
            "largest file the file system holds); nothing was stored"
        )
    return StoreFull(f"the checkpoint store is full ({os.strerror(error.errno or 0)})")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingWrite:
    """A temp file in the store that hashes what is written to it.

    Use as a context manager: unless `CheckpointStore.commit` took the file, it is
    removed on exit, whatever happened.
    """

    def __init__(self, path: Path, max_bytes: int, direct_io: bool = True) -> None:
        self.path = path
        self.size = 0
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, FILE_MODE)
        try:
            self._writer = StagedWriter(self._fd, direct=direct_io)
        except BaseException:  # e.g. no memory for the staging buffers: leave nothing
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise
        self._closed = False
        self.committed = False

    def __enter__(self) -> PendingWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()

    def write(self, data: bytes | memoryview) -> int:
        """Appends `data`; raises LimitExceeded past the store's size limit."""
        self.size += len(data)
        if self._max_bytes and self.size > self._max_bytes:
            raise LimitExceeded(
                f"checkpoint exceeds max_checkpoint_bytes ({self._max_bytes} bytes)"
            )
        self._hash.update(data)
        with space():
            self._writer.write(data)
        return len(data)

    def flush(self) -> None:
        """For file-like use (torch.save); `finish` makes the bytes durable."""

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Makes the bytes durable and closes the file."""
        try:
            with space():
                self._writer.close(self.size)
        finally:
            self._close()

    def discard(self) -> None:
        """Closes and removes the temp file."""
        self._writer.release()
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, what in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return f"file type {stat.S_IFMT(mode):o}"


def replace_file(tmp: Path, path: Path, data: bytes) -> None:
    """Atomically replaces `path` with `data`: written to `tmp`, fsynced, renamed, and the
    folder fsynced."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Unreadable(ValueError):
    """A path that is not a regular file that can be opened: why, and `what` is there."""

    def __init__(self, why: str, what: str) -> None:
        super().__init__(why)
        self.what = what


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """`path` open for reading, and its status: refused (Unreadable) unless it is a
    regular file, without following a symlink or waiting on a FIFO (O_NOFOLLOW,
    O_NONBLOCK, which makes no difference to reading a regular file). FileNotFoundError
    if there is none."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as error:  # a symlink (ELOOP), a socket (ENXIO), no permission
        why = error.strerror or str(error)
        raise Unreadable(why, "a symbolic link" if error.errno == errno.ELOOP else why) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable("not a regular file", file_kind(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_json(path: Path, limit: int) -> Any:
    """The JSON document in `path`, read with bounds: anyone with write access to the store
    may have put anything there. FileNotFoundError if there is none; ValueError if it is not
    a regular file of at most `limit` bytes holding JSON nested at most a few hundred deep
    (a symlink, a FIFO, a folder: `open_regular` does not follow or wait)."""
    fd, info = open_regular(path)
    with os.fdopen(fd, "rb") as file:
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than {limit}")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deep") from None


def removed(path: Path) -> bool:
    """Removes a leftover. One that cannot be removed (a folder some other process made
    there) is logged and left: it must not stop a start."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("left %s in the checkpoint store (%s)", path, error.strerror)
        return False
    return True
