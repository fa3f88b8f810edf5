"""How servers that share one store (replicas on a shared volume) keep out of each other's
way: each holds a lock on `tmp/<owner>.owner` while it runs, so a starting server removes
only the temp files of servers that are gone, and commits, deletes and blob clean-up hold
`store.lock`. On a file system without locks (some NFS mounts) a store works for one
server only, with a warning.

An owner file is locked whenever it is in place: a starting server creates it as
`tmp/<owner>.starting-<n>`, locks that, and renames it to `<owner>.owner` (the lock goes
with the open file). A start elsewhere removes a `.starting-` file only when no one holds
its lock (its server died before the rename, or has not locked it yet: that server then
finds its file gone at the rename, and starts over under the next name). A starting
server waits out the brief lock another start's probe takes on its file (`_held`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from modelhost.server.errors import StoreBusy

log = logging.getLogger(__name__)

OWNER = ".owner"
STARTING = ".starting-"
"""tmp/<owner>.starting-<n>: a starting server's owner file, before it is locked in place."""
LOCK_WAIT = 30.0
"""Seconds a commit, delete or hold waits for the store's lock (commits take milliseconds)."""
_FILE_MODE = 0o600
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class StoreLocks:
    """This server's owner lock and the store's lock."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self._tmp = tmp
        self._lock = threading.Lock()
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]
        self.owner = f"{host}-{os.getpid()}-{time.time_ns()}"
        self._owner_path = tmp / f"{self.owner}{OWNER}"
        self.owner_file, self.file_locks = self._place_owner_file()
        if not self.file_locks:
            log.warning("the store's file system has no file locks: do not share the store")
        self._store_lock = _open_lock(root / "store.lock")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """This process's threads, then every server sharing the store; StoreBusy after
        LOCK_WAIT seconds (a server that hangs holding it must not take our threads)."""
        deadline = time.monotonic() + LOCK_WAIT
        if not self._lock.acquire(timeout=LOCK_WAIT):
            raise StoreBusy(f"this server's store work took more than {LOCK_WAIT:g} s; try again")
        try:
            if self.file_locks:
                self._wait_for_store_lock(deadline)
            try:
                yield
            finally:
                if self.file_locks:
                    _flock(self._store_lock, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _wait_for_store_lock(self, deadline: float) -> None:
        if _flock_by(self._store_lock, deadline) is None:
            raise StoreBusy(
                f"another server sharing the store has held store.lock for more than "
                f"{LOCK_WAIT:g} s; try again"
            )

    def _place_owner_file(self) -> tuple[IO[bytes], bool]:
        """This server's owner file, open and locked before it appears under its name (so
        no other server's start takes it for a gone server's), and whether the file system
        has locks."""
        deadline = time.monotonic() + LOCK_WAIT
        attempt = 0
        while True:
            attempt += 1
            starting = self._tmp / f"{self.owner}{STARTING}{attempt}"
            file = _open_lock(starting, os.O_EXCL)
            try:
                locks = _flock_by(file, deadline)
                if locks is None:
                    raise StoreBusy(
                        f"could not lock this server's new owner file {starting.name} in "
                        f"{LOCK_WAIT:g} s (another server's start probes it only for an "
                        "instant): something else holds it"
                    )
                os.rename(starting, self._owner_path)  # the open file keeps its lock
            except FileNotFoundError:
                # Another server's start removed it before we locked it (as a starting
                # server's that died): start over under the next name.
                file.close()
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"other servers' starts kept removing this server's new owner file "
                        f"for {LOCK_WAIT:g} s; try again"
                    ) from None
                continue
            except BaseException:
                file.close()
                starting.unlink(missing_ok=True)
                raise
            return file, locks

    def live_owners(self) -> set[str]:
        """The owners (temp file prefixes) of the servers using the store now."""
        live = {self.owner}
        for lock in self._tmp.glob(f"*{OWNER}"):
            owner = lock.name.removesuffix(OWNER)
            if owner != self.owner and self.file_locks and _held(lock):
                live.add(owner)
        return live

    def in_use(self, leftover: Path) -> bool:
        """Whether a file in tmp/ is a running or starting server's, probed now: right
        before it is removed, never from a list of the live owners taken earlier (a server
        may have started since)."""
        owner, _, rest = leftover.name.partition(".")
        if owner == self.owner:
            return True
        if not self.file_locks:
            return False  # one server only: every other owner is gone
        if f".{rest}".startswith(STARTING) and _held(leftover):
            return True  # a starting server's owner file, locked, before its rename
        return _held(self._tmp / f"{owner}{OWNER}")

    def close(self) -> None:
        self._owner_path.unlink(missing_ok=True)  # before the lock goes: never in place unlocked
        self.owner_file.close()
        self._store_lock.close()


def _open_lock(path: Path, flags: int = 0) -> IO[bytes]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS | flags, _FILE_MODE)
    return os.fdopen(fd, "r+b")


def _flock(file: IO[bytes] | int, operation: int) -> bool:
    """flock; False where the file system has no locks (some NFS mounts)."""
    try:
        fcntl.flock(file, operation)
    except BlockingIOError:
        raise
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    return True


def _flock_by(file: IO[bytes], deadline: float) -> bool | None:
    """An exclusive flock, waited for (polling) until `deadline`: True once taken, False
    where the file system has no locks, None if it was still held at the deadline."""
    pause = 0.001
    while True:
        try:
            return _flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(2 * pause, 0.05)


def _held(lock: Path) -> bool:
    """Whether a live process holds `lock` (an owner file in tmp/, or a starting server's
    `.starting-` one). Anything there but a regular file (a directory, a FIFO, a symbolic
    link) is no server's: not live."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NONBLOCK | _OPEN_FLAGS)
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("ignoring %s in the store's tmp/ (%s)", lock.name, error.strerror)
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("ignoring %s in the store's tmp/: not a regular file", lock.name)
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False
