"""Checkpoint bytes in and out: the upload stream (read, hash, frame, prefetch) and the
download stream (write, hash, verify), for both clients."""

from __future__ import annotations

import hashlib
import io
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

from modelhost.client import archives, wire
from modelhost.client.errors import DataLossError, DeadlineExceededError, ResourceExhaustedError
from modelhost.client.types import CheckpointInfo
from modelhost.v1 import modelhost_pb2 as pb

DEFAULT_CHUNK_BYTES = 2 << 20
DEFAULT_MAX_DOWNLOAD_BYTES = 64 << 30
"""The largest checkpoint a client downloads unless told otherwise (`max_download_bytes`)."""
MAX_MEMORY_DOWNLOAD_BYTES = 2 << 30
"""The largest checkpoint a download without `dest` keeps in memory (it is held twice
while loaded); a larger one is refused at its header: pass `dest` to write it to a file."""
DEFAULT_STALL_SECONDS = 60.0
"""How long a transfer may go without moving (`stall_timeout`): twice the time the
server's default `--request-read-timeout` gives a client."""

T = TypeVar("T")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all; 0 when unknown) as a transfer proceeds."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | Mapping[str, Any]
"""What `save_checkpoint` uploads: a file path, bytes, or a state_dict / checkpoint dict."""


def serialize_source(source: Source) -> tuple[Iterator[memoryview], int]:
    """The bytes of a checkpoint source, as chunks of any size, and the total size."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _read_file(path), _file_size(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        return iter([view]), view.nbytes
    if isinstance(source, Mapping):
        import torch

        buffer = io.BytesIO()
        torch.save(source, buffer)
        view = buffer.getbuffer()
        return iter([view]), view.nbytes
    if hasattr(source, "state_dict"):
        raise TypeError("pass model.state_dict(), not the module itself")
    raise TypeError(f"cannot upload a {type(source).__name__}: pass a path, bytes or a dict")


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`save_checkpoint`'s metadata as a dict of strings; TypeError names the first
    entry that is not a string (protobuf would say only "bad argument type")."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a dict of strings, not a {type(metadata).__name__}: "
            "e.g. metadata={'epoch': '3'}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str (got {type(key).__name__} {key!r:.40})")
        if not isinstance(value, str):
            raise TypeError(
                f"metadata values must be str (got {type(value).__name__} for {key!r:.40}): "
                f"pass str(value), e.g. {{{key!r:.40}: {str(value)!r:.40}}}"
            )
    return dict(metadata)


def _file_size(path: Path) -> int:
    """The size of the file to upload, opened here, so that a directory, a missing or an
    unreadable file fails now with its own message (on the upload's thread, gRPC would
    report it as "Exception iterating requests!")."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    with path.open("rb") as file:
        return os.fstat(file.fileno()).st_size


def _read_file(path: Path, block: int = 8 << 20) -> Iterator[memoryview]:
    with path.open("rb") as file:
        while data := file.read(block):
            yield memoryview(data)


class Prefetch(Iterator[T]):
    """Runs `source` on a thread of its own, up to `depth` items ahead of the consumer.

    An upload reads, hashes and frames the next chunks while gRPC sends the current
    one. `close()` (also on exhaustion or error) stops the thread.
    """

    def __init__(self, source: Iterator[T], depth: int = 4) -> None:
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="modelhost-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
        except BaseException as error:  # handed to the consumer
            self._put((False, error))
            return
        self._put((False, None))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        while not self._ended:  # a consumer waiting when `close()` comes stops too
            try:
                has_item, value = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if has_item:
                return cast(T, value)
            self.close()
            if value is not None:
                raise value
        raise StopIteration

    def close(self) -> None:
        """Stops the producer thread; further items are dropped."""
        self._ended = True
        self._stop.set()


class Upload:
    """The request stream of an upload; hashes what it sends so the reply can be checked.

    Iterating gives the serialized requests: the header, then the chunks.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        *,
        metadata: Mapping[str, str] | None,
        overwrite: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Progress | None = None,
    ) -> None:
        metadata = check_metadata(metadata)
        self._blocks, self.size = serialize_source(source)
        self._header = pb.SaveCheckpointHeader(
            name=name,
            metadata=metadata,
            overwrite=overwrite,
            upload=pb.Upload(size_bytes=self.size),
        )
        self._chunk_bytes = chunk_bytes
        self._progress = progress
        self._sha256 = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        yield pb.SaveCheckpointRequest(header=self._header).SerializeToString()
        sent = 0
        for block in self._blocks:
            for start in range(0, block.nbytes, self._chunk_bytes):
                chunk = block[start : start + self._chunk_bytes]
                self._sha256.update(chunk)
                sent += chunk.nbytes
                yield wire.chunk_message(chunk)
                if self._progress:
                    self._progress(sent, self.size)

    def verify(self, reply: pb.CheckpointInfo) -> CheckpointInfo:
        """Checks the server stored exactly what was sent."""
        if reply.sha256 != self._sha256.hexdigest():
            raise DataLossError(
                f"checkpoint {reply.name!r}: server stored sha256 {reply.sha256}, "
                f"sent {self._sha256.hexdigest()}"
            )
        return CheckpointInfo.from_proto(reply)


class DownloadTooLarge(ResourceExhaustedError):
    """A download refused at its header: the checkpoint announced is larger than the
    client's limit, named as `setting` (the command line names its flag instead)."""

    def __init__(self, size: int, limit: int, setting: str = "max_download_bytes") -> None:
        super().__init__(
            f"download: the server announced {size:,} bytes, more than {setting} ({limit:,})"
        )
        self.size = size
        self.limit = limit


class Download:
    """Receives a DownloadCheckpoint stream into a file (`dest`) or memory.

    `feed` each message, then `finish()`; `abort()` (or `close()` before `finish()`)
    removes the partial file. A header announcing more than `max_bytes` (None: no
    limit), or without `dest` more than MAX_MEMORY_DOWNLOAD_BYTES, is refused before
    anything is kept.

    With `dest`, the bytes go to a partial file that the download creates itself in
    `dest`'s folder once the header has been accepted (`create_partial`: a new name,
    never an existing path or symlink followed), so a call that fails before then
    touches nothing there; `finish()` renames it onto `dest` (a symlink at `dest` is
    replaced, not written through) and `abort()` removes only that file.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str] | None,
        progress: Progress | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.dest = Path(dest) if dest is not None else None
        self.max_bytes = max_bytes
        self.info: pb.CheckpointInfo | None = None
        self._progress = progress
        self._sha256 = hashlib.sha256()
        self._received = 0
        self._finished = False
        self._buffer = io.BytesIO()
        self._part: Path | None = None  # created at the header, by `create_partial`
        self._file: BinaryIO | None = None

    def feed(self, message: pb.DownloadCheckpointResponse | memoryview) -> None:
        """Takes the next message of the stream (a chunk may come as a view).

        The header comes first, once, and its size bounds the chunks: a server that
        sends more is cut off at once, nothing past the size is written.
        """
        if isinstance(message, memoryview):
            chunk: bytes | memoryview = message
        elif message.HasField("info"):
            if self.info is not None:
                raise DataLossError("download: the server sent a second header")
            self._check(message.info)
            self.info = message.info
            if self.dest is not None:
                self._part, self._file = create_partial(self.dest)
            return
        else:
            chunk = message.chunk  # each access copies
        if self.info is None:
            raise DataLossError("download: the server sent a chunk before the header")
        self._received += len(chunk)
        if self._received > self.info.size_bytes:
            raise DataLossError(
                f"download: the server sent more than the {self.info.size_bytes} bytes it announced"
            )
        self._sha256.update(chunk)
        (self._file or self._buffer).write(chunk)
        if self._progress:
            self._progress(self._received, self.info.size_bytes)

    def _check(self, info: pb.CheckpointInfo) -> None:
        if self.max_bytes is not None and info.size_bytes > self.max_bytes:
            raise DownloadTooLarge(info.size_bytes, self.max_bytes)
        if self.dest is None and info.format not in IN_MEMORY:
            raise ValueError(_NOT_IN_MEMORY)
        if self.dest is None and info.size_bytes > MAX_MEMORY_DOWNLOAD_BYTES:
            raise ResourceExhaustedError(
                f"download: the server announced {info.size_bytes:,} bytes, more than a "
                f"download into memory keeps ({MAX_MEMORY_DOWNLOAD_BYTES:,}, "
                "MAX_MEMORY_DOWNLOAD_BYTES); pass dest= to write it to a file"
            )

    def abort(self) -> None:
        """Removes the partial file (the one this download created) after a failed stream."""
        if self._file:
            self._file.close()
        if self._part:
            self._part.unlink(missing_ok=True)
            self._part = None

    def close(self) -> None:
        """`abort()` unless `finish()` succeeded: the end of every download, however it went."""
        if not self._finished:
            self.abort()

    def finish(self) -> Path | Any:
        """Verifies the checksum; returns the file's path, or the loaded checkpoint."""
        info = self.info
        if info is None or info.sha256 != self._sha256.hexdigest():
            self.abort()
            expected = info.sha256 if info else "(no header)"
            raise DataLossError(
                f"download: sha256 {self._sha256.hexdigest()} does not match {expected}"
            )
        if self._file and self._part and self.dest:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._part.replace(self.dest)  # rename(2): a symlink at dest is replaced itself
            self._part = None
            self._finished = True
            return self.dest
        self._finished = True
        return load_checkpoint_bytes(self._buffer.getvalue(), info.format)


PARTIAL_SUFFIX = ".part"
_PARTIAL_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def create_partial(dest: Path) -> tuple[Path, BinaryIO]:
    """Creates the partial file of a download to `dest`: a new, hidden, unique name in
    `dest`'s folder (`.NAME.RANDOM.part`), made with O_CREAT|O_EXCL|O_NOFOLLOW, so an
    existing file or a symlink planted there is never followed, truncated or reused.
    Its mode is 0o666 less the umask, what `open("wb")` gives `dest` itself. A `dest`
    that is a directory, or whose folder is missing or not writable, is refused naming
    that path, not the partial file's."""
    if dest.is_dir() and not dest.is_symlink():  # a symlink is replaced, as documented above
        raise IsADirectoryError(f"download: {dest} is a directory; pass the file to write")
    name = dest.name if len(os.fsencode(dest.name)) <= 200 else "download"
    for _ in range(100):
        part = dest.with_name(f".{name}.{secrets.token_hex(8)}{PARTIAL_SUFFIX}")
        try:
            fd = os.open(part, _PARTIAL_FLAGS, 0o666)
        except FileExistsError:
            continue
        except OSError as error:  # the folder's fault: name it, not the hidden partial file
            raise type(error)(error.errno, error.strerror, str(dest.parent)) from None
        try:
            return part, os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
    raise FileExistsError(f"download: no free name for a partial file next to {dest}")


IN_MEMORY = (
    pb.CHECKPOINT_FORMAT_SAFETENSORS,
    pb.CHECKPOINT_FORMAT_STATE_DICT,
    pb.CHECKPOINT_FORMAT_GENERAL_CHECKPOINT,
)
"""The formats a download without `dest` can load."""
_NOT_IN_MEMORY = "this checkpoint cannot be loaded safely in memory; pass dest= to save it"


def load_checkpoint_bytes(data: bytes, fmt: int) -> Any:
    """Loads downloaded bytes safely: safetensors, or torch.load(weights_only=True) of an
    archive checked first (archives.UnsafeArchive for a zip bomb: torch would inflate it)."""
    if fmt not in IN_MEMORY:
        raise ValueError(_NOT_IN_MEMORY)
    if fmt == pb.CHECKPOINT_FORMAT_SAFETENSORS:
        from safetensors.torch import load

        return load(data)
    import torch

    if data.startswith(archives.MAGIC):
        archives.entries(io.BytesIO(data), len(data), "the downloaded checkpoint")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class Stall:
    """Cancels a transfer that stops moving: no message received (a download) or
    request message taken by gRPC to send (an upload) for `seconds` (None: never).

    Wrap the request stream in `sending`, call `received()` for each message received,
    `start(cancel)` once the call exists; used as a context manager around the call, it
    turns the failure of a cancelled call into `DeadlineExceededError`. The wait for an
    upload's reply after its last chunk is not watched: the server commits then.
    """

    def __init__(self, rpc: str, seconds: float | None) -> None:
        self.rpc = rpc
        self.seconds = seconds
        self.fired = False
        self._last = time.monotonic()
        self._stopped = threading.Event()

    def moved(self) -> None:
        self._last = time.monotonic()

    def received(self, message: pb.DownloadCheckpointResponse | memoryview) -> None:
        """A download's message (a chunk comes as a view): progress only if it carries
        bytes or is the header, so empty messages do not keep a stalled download alive
        (nor does a reply refused unparsed, `calls.Refused`: feeding it raises)."""
        if not isinstance(message, (memoryview, pb.DownloadCheckpointResponse)):
            return
        if len(message) if isinstance(message, memoryview) else message.HasField("info"):
            self.moved()

    def sending(self, requests: Iterator[T]) -> Iterator[T]:
        """`requests`, each one taken counting as a move; the watch ends after the last."""
        for request in requests:
            self.moved()
            yield request
        self._stopped.set()

    def start(self, cancel: Callable[[], object]) -> None:
        """Watches on a thread of its own, calling `cancel` (thread-safe) on a stall."""
        if self.seconds is not None:
            self.moved()
            threading.Thread(
                target=self._watch, args=(self.seconds, cancel), name="modelhost-stall", daemon=True
            ).start()

    def _watch(self, seconds: float, cancel: Callable[[], object]) -> None:
        while not self._stopped.wait(self._last + seconds - time.monotonic()):
            if time.monotonic() - self._last >= seconds and not self._stopped.is_set():
                self.fired = True
                cancel()
                return

    def __enter__(self) -> Stall:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self._stopped.set()
        if self.fired and error is not None:
            raise DeadlineExceededError(
                f"{self.rpc}: nothing received or sent for {self.seconds:g} s (stall_timeout)"
            ) from None
