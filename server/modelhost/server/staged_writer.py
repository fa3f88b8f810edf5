"""Appending large files fast: aligned staging buffers, direct I/O, writes overlapped.

A checkpoint is written once and read later (LoadModel maps it or copies it to the
device), so keeping the written bytes in the page cache buys little and costs a copy
into freshly allocated cache pages: the slowest part of an upload. Where the file
system allows it, the file is opened for direct I/O (O_DIRECT) and written from
page-aligned buffers; elsewhere (tmpfs, other systems) the same code writes through
the page cache. Either way one buffer fills while the other is written on a thread of
its own, so hashing the next bytes overlaps the disk.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

STAGE_BYTES = 8 << 20
"""Size of each of the two staging buffers: large sequential writes, little memory."""

BLOCK = 4096
"""Direct I/O alignment of offsets and lengths (covers 512- and 4096-byte sectors)."""


class StagedWriter:
    """Appends to the open file `fd`; `close(size)` makes it durable at exactly `size` bytes.

    With `direct`, tries direct I/O (`self.direct` says whether it is on).
    """

    def __init__(self, fd: int, *, direct: bool = True, stage_bytes: int = STAGE_BYTES) -> None:
        if stage_bytes % BLOCK:
            raise ValueError(f"stage_bytes must be a multiple of {BLOCK}")
        self._fd = fd
        self.direct = direct and _set_direct(fd, True)
        self._buffers = [mmap.mmap(-1, stage_bytes) for _ in range(2)]
        self._current = 0
        self._fill = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._inflight: Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Copies `data` into the staging buffers, starting a write whenever one is full."""
        view = memoryview(data).cast("B")
        while view:
            buffer = self._buffers[self._current]
            count = min(len(view), len(buffer) - self._fill)
            buffer[self._fill : self._fill + count] = view[:count]
            self._fill += count
            view = view[count:]
            if self._fill == len(buffer):
                self._submit(self._fill)

    def close(self, size: int) -> None:
        """Writes what is staged, trims direct I/O padding to `size`, fsyncs."""
        try:
            if self._fill:
                length = self._fill
                if self.direct:  # direct writes are whole blocks: pad, then truncate
                    length = -(-length // BLOCK) * BLOCK
                    self._buffers[self._current][self._fill : length] = bytes(length - self._fill)
                self._submit(length)
            self._wait()
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        finally:
            self.release()

    def release(self) -> None:
        """Lets a write in flight end (its error ignored) and frees the buffers."""
        self._pool.shutdown(wait=True)
        self._inflight = None
        self._buffers = []

    def _submit(self, length: int) -> None:
        self._wait()
        self._inflight = self._pool.submit(self._write_buffer, self._current, length)
        self._current ^= 1
        self._fill = 0

    def _wait(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _write_buffer(self, index: int, length: int) -> None:
        done = 0
        buffer = self._buffers[index]
        while done < length:
            try:
                done += os.write(self._fd, memoryview(buffer)[done:length])
            except OSError as error:
                # Some file systems accept O_DIRECT at open and refuse it on write.
                if error.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = _set_direct(self._fd, False)


def _set_direct(fd: int, on: bool) -> bool:
    """Turns O_DIRECT on or off for `fd`; returns whether it is on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on
