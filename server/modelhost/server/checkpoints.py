"""Checkpoint operations over the store: uploads (spooled while they arrive), snapshots
of hosted models, downloads, listing and deletion.

Nothing is visible unless all of it is valid: an upload streams into a temp file while
it is hashed, is checked (size, announced sha256, a `weights_only` look at its
contents) and only then committed (store.py). Blocking work runs on the I/O executor.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from modelhost.server import formats
from modelhost.server.errors import (
    ChecksumMismatch,
    DataLoss,
    InvalidArgument,
    LimitExceeded,
    Refused,
)
from modelhost.server.hosted import HostedModel
from modelhost.server.metrics import Metrics
from modelhost.server.names import check_name
from modelhost.server.registry import Registry
from modelhost.server.store import CheckpointRecord, CheckpointStore, Contents, PendingWrite

SPOOL_CHUNKS = 8
Release = Callable[[], None]
Keep = Callable[[], Release]
"""Keeps the bytes of the request message read last counted (the gate's receiving budget)
until the Release it returns is called."""
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 4096
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Upload:
    """SaveCheckpoint of bytes that follow: `size_bytes` and `sha256` are optional checks."""

    name: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    overwrite: bool = False
    size_bytes: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class Snapshot:
    """SaveCheckpoint of a hosted model's state_dict (version 0: the newest)."""

    name: str
    model: str
    version: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    overwrite: bool = False


class Checkpoints:
    """Uploads, snapshots, downloads and deletions of the store's checkpoints."""

    def __init__(
        self,
        store: CheckpointStore,
        registry: Registry,
        metrics: Metrics,
        io: Executor,
        *,
        chunk_bytes: int,
        allow_pickled: bool,
    ) -> None:
        self.store = store
        self._registry = registry
        self._metrics = metrics
        self._io = io
        self._chunk_bytes = chunk_bytes
        self._unsafe = allow_pickled

    async def upload(
        self,
        header: Upload,
        chunks: AsyncIterator[bytes | memoryview],
        keep: Keep | None = None,
    ) -> CheckpointRecord:
        """Streams an upload into the store; nothing is visible unless all of it is valid.
        `keep` keeps the bytes of the chunk read last counted (the gate's receiving
        budget) until it is written."""
        name, metadata = self._checked_target(header.name, header.metadata, header.overwrite)
        self._check_announced(header)
        loop = asyncio.get_running_loop()
        expected = header.size_bytes
        with self.store.begin() as pending:
            await self._spool(_at_most(chunks, expected), pending, keep)
            if expected and pending.size != expected:
                raise InvalidArgument(
                    f"upload announced {expected} bytes but sent {pending.size}; nothing stored"
                )
            await loop.run_in_executor(self._io, pending.finish)
            wanted = header.sha256.lower()
            if wanted and wanted != pending.sha256:
                raise ChecksumMismatch(
                    f"upload has sha256 {pending.sha256}, announced {wanted}; nothing stored"
                )
            contents = await loop.run_in_executor(
                self._io, lambda: formats.inspect(pending.path, allow_pickled=self._unsafe)
            )
            record = await self._commit(pending, name, contents, metadata, header.overwrite)
        self._metrics.checkpoint_bytes.labels("in").inc(record.size_bytes)
        return record

    def _check_announced(self, header: Upload) -> None:
        """Refuses an announced size or sha256 that no upload can match, before any byte."""
        if header.sha256 and not _SHA256.fullmatch(header.sha256):
            raise InvalidArgument(
                f"sha256 {header.sha256[:80]!r} is not 64 hexadecimal digits; nothing stored"
            )
        if header.size_bytes < 0:
            raise InvalidArgument(f"size_bytes is negative ({header.size_bytes}); nothing stored")
        limit = self.store.max_checkpoint_bytes
        if limit and header.size_bytes > limit:
            raise LimitExceeded(
                f"the upload announces {header.size_bytes} bytes; the limit is {limit} "
                "bytes (max_checkpoint_bytes)"
            )

    async def _spool(
        self,
        chunks: AsyncIterator[bytes | memoryview],
        pending: PendingWrite,
        keep: Keep | None,
    ) -> None:
        """Hashes and writes chunks in order on an I/O thread while the next ones arrive.

        Up to SPOOL_CHUNKS chunks wait in memory: reading never stops for a write, so
        HTTP/2 flow control does not stall the sender. Each stays counted in the
        receiving budget (`keep`) until it is written, or the upload ends. On any failure
        the write in flight finishes before the caller discards the file.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bytes | memoryview, Release] | None] = asyncio.Queue(
            maxsize=SPOOL_CHUNKS
        )
        failures: list[BaseException] = []
        inflight: list[asyncio.Future[Any]] = []
        kept: list[Release] = []  # each called once: by the writer, or at the end

        async def write() -> None:
            while (item := await queue.get()) is not None:
                chunk, release = item
                if not failures:  # else drained, so the reader never blocks on a full queue
                    inflight[:] = [loop.run_in_executor(self._io, pending.write, chunk)]
                    try:
                        await inflight[0]
                    except Exception as error:
                        failures.append(error)
                kept.remove(release)
                release()

        writer: asyncio.Future[Any] = asyncio.create_task(write())
        try:
            async for chunk in chunks:
                if failures:
                    break
                release = keep() if keep else _nothing
                kept.append(release)
                await queue.put((chunk, release))
            await queue.put(None)
            await writer
        except BaseException:
            writer.cancel()
            await asyncio.wait([writer, *inflight])
            raise
        finally:
            for release in kept:  # chunks never written: the upload failed or was cancelled
                release()
        if failures:
            raise failures[0]

    async def snapshot(self, header: Snapshot) -> CheckpointRecord:
        """Saves a hosted model's state_dict (on the CPU, in its served dtype)."""
        name, metadata = self._checked_target(header.name, header.metadata, header.overwrite)
        model = check_name(header.model, "model")
        loop = asyncio.get_running_loop()
        with self._registry.lease(model, header.version) as hosted:
            await hosted.ensure_resident()
            metadata = {
                "snapshot_of": f"{hosted.name}:{hosted.version}",
                "architecture": hosted.spec.architecture,
                **metadata,
            }
            with self.store.begin() as pending:
                count = await loop.run_in_executor(self._io, _save_state_dict, hosted, pending)
                await loop.run_in_executor(self._io, pending.finish)
                contents = Contents(formats.STATE_DICT, count)
                return await self._commit(pending, name, contents, metadata, header.overwrite)

    def _checked_target(
        self, name: str, metadata: Mapping[str, str], overwrite: bool
    ) -> tuple[str, dict[str, str]]:
        """An upload's checkpoint name and metadata, checked; the name must be free unless
        `overwrite`."""
        name = check_name(name, "checkpoint")
        metadata = dict(metadata)
        if len(metadata) > MAX_METADATA_ENTRIES:
            raise InvalidArgument(
                f"metadata has {len(metadata)} entries; the limit is {MAX_METADATA_ENTRIES}"
            )
        for key, value in metadata.items():
            size = len(key.encode()) + len(value.encode())  # UTF-8 bytes, not characters
            if size > MAX_METADATA_BYTES:
                raise InvalidArgument(
                    f"metadata entry {key!r:.80} is {size} bytes (UTF-8); "
                    f"the limit is {MAX_METADATA_BYTES}"
                )
        self.store.check_free(name, overwrite)
        return name, metadata

    async def _commit(
        self,
        pending: PendingWrite,
        name: str,
        contents: Contents,
        metadata: dict[str, str],
        overwrite: bool,
    ) -> CheckpointRecord:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._io,
            lambda: self.store.commit(
                pending, name, contents, metadata=metadata, overwrite=overwrite
            ),
        )

    async def download(self, name: str) -> AsyncIterator[CheckpointRecord | bytes]:
        """The checkpoint's record, then its bytes in chunks."""
        loop = asyncio.get_running_loop()
        with self.store.open(check_name(name, "checkpoint")) as (record, file):
            yield record
            sent = self._metrics.checkpoint_bytes.labels("out")
            while chunk := await loop.run_in_executor(self._io, file.read, self._chunk_bytes):
                sent.inc(len(chunk))
                yield chunk

    async def list(self) -> list[CheckpointRecord]:
        """Every entry (a read of each manifest entry: on the I/O executor)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, self.store.list)

    def get(self, name: str) -> CheckpointRecord:
        return self.store.get(check_name(name, "checkpoint"))

    async def delete(self, name: str) -> None:
        """Deletes a checkpoint, unless an on-demand version would page in from it again
        (FAILED_PRECONDITION naming them: unload them, or load them pinned), here or on
        another server sharing the store (`CheckpointStore.delete`, on the I/O executor:
        it waits for `store.lock`, which another server may hold)."""
        name = check_name(name, "checkpoint")
        try:
            sha = self.store.get(name).sha256
        except DataLoss:  # an unreadable entry: nothing was loaded from it, deleting it helps
            sha = ""
        needed = [
            f"{h.name}:{h.version}"
            for h in self._registry.all()
            if sha and h.pages_in_from == sha and h.spec.checkpoint == name
        ]
        if needed:
            raise Refused(
                f"checkpoint {name!r} is needed by model versions that may leave their device "
                f"and be paged in from it again: {', '.join(needed[:10])}; unload them first "
                "(or load them with residency pinned)"
            )
        await asyncio.get_running_loop().run_in_executor(self._io, self.store.delete, name)


def _nothing() -> None:
    pass


async def _at_most(
    chunks: AsyncIterator[bytes | memoryview], announced: int
) -> AsyncIterator[bytes | memoryview]:
    """The chunks, failing as soon as they pass the `announced` size (0: none announced)."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if announced and received > announced:
            raise InvalidArgument(
                f"upload announced {announced} bytes but sent at least {received}; nothing stored"
            )
        yield chunk


def _save_state_dict(hosted: HostedModel, pending: PendingWrite) -> int:
    module = hosted.loaded.module
    assert module is not None, "a leased, resident version has its module"
    state = {key: tensor.detach().cpu() for key, tensor in module.state_dict().items()}
    torch.save(state, pending)  # type: ignore[arg-type]
    return len(state)
