"""How servers that share one store (replicas on a shared volume) keep out of each other's
way: each holds a lock on `tmp/<owner>.owner` while it runs, so a starting server removes
only the temp files of servers that are gone, and commits, deletes and blob clean-up hold
`store.lock`. On a file system without locks (some NFS mounts) a store works for one
server only, with a warning.
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
        self.owner_file = _open_lock(self._owner_path)
        self.file_locks = _flock(self.owner_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        pause = 0.001
        while True:
            try:
                _flock(self._store_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"another server sharing the store has held store.lock for more than "
                        f"{LOCK_WAIT:g} s; try again"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.05)

    def live_owners(self) -> set[str]:
        """The owners (temp file prefixes) of the servers using the store now."""
        live = {self.owner}
        for lock in self._tmp.glob(f"*{OWNER}"):
            owner = lock.name.removesuffix(OWNER)
            if owner != self.owner and self.file_locks and _held(lock):
                live.add(owner)
        return live

    def close(self) -> None:
        self.owner_file.close()
        self._owner_path.unlink(missing_ok=True)
        self._store_lock.close()


def _open_lock(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, _FILE_MODE)
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


def _held(lock: Path) -> bool:
    """Whether a live process holds `lock` (an owner file in tmp/). Anything there but a
    regular file (a directory, a FIFO, a symbolic link) is no server's: not live."""
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
