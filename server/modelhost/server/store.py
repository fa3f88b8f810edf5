"""The checkpoint store: a folder of content-addressed files and a manifest entry per name.

Layout under the root (folders 0700, files 0600):

    blobs/<sha256>            the checkpoint bytes, named by their hash
    checkpoints/<name>.json   the manifest entry: name, sha256, size, format, metadata, ...
    tmp/                      uploads in progress, and per server using the store: a lock
                              file (<owner>.owner) and the blobs it holds (<owner>.holds);
                              <owner>.starting-<n>: an owner file not yet in place
    store.lock                taken (flock) around commits, deletes and clean-up
    <state>.json              server state (the restore record), with the blobs it pins

A write streams into tmp/ while hashing, is validated, fsynced and renamed into
blobs/; then the manifest entry is written the same way. Renaming the entry is the
commit: a reader sees the old checkpoint or the new one, never a part. A crash
leaves at most temp files or an unreferenced blob, both removed at the next start.

Several servers may share one store (replicas on a shared volume): each names its
temp files after itself and holds a lock on `tmp/<owner>.owner` while it runs (locked
before it is in place), so clean-up only removes the temp files of servers that are gone
(each server's lock probed right before its files are removed); commits, deletes and
the removal of unreferenced blobs hold `store.lock`, so no server removes a blob
another is about to refer to.

A state document (`write_state`) may pin blobs: a pinned blob stays, whatever happens
to the names, until no document pins it and no entry refers to it. A server may also
hold blobs while it runs (`hold`: a model version it may page in again): its holds are
in `tmp/<owner>.holds`, so every server sharing the store keeps those blobs, and refuses
to delete a checkpoint whose bytes another holds; the holds of a server that is gone
count for nothing, and the next start removes them. A server holding more than MAX_HOLDS
blobs writes that it holds every blob (the list would not fit in MAX_HOLDS_BYTES): until
it holds fewer, the others remove no blob and refuse every delete of a checkpoint. A
holds file that no server would write (not a regular file, over MAX_HOLDS_BYTES, neither
a list of sha256 nor that mark) counts for nothing, and an owner file that is not a
regular file is no live server's: both are logged. A full volume (ENOSPC, EDQUOT), or a
file system that refuses a file this large (EFBIG: `ulimit -f`, FAT's 4 GiB), is reported
as StoreFull, and leaves nothing behind.

Blobs are read (LoadModel, a page-in, a restore, DownloadCheckpoint) only through
`open_blob`/`open`: opened without following a symlink or waiting on a FIFO, and refused
(DataLoss) unless they are regular files; readers that need a path get one naming that open
file, never the name in `blobs/` again.

The careful file primitives are in `store_files`, the holds in `store_holds`, the locks in
`store_locks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, cast

from modelhost.server.errors import (
    AlreadyExists,
    CheckpointNotFound,
    DataLoss,
    InvalidName,
    LimitExceeded,
    MissingBytes,
    Refused,
    StoreBusy,
)
from modelhost.server.names import check_name
from modelhost.server.store_files import (
    DIR_MODE,
    SHA256,
    PendingWrite,
    Unreadable,
    file_kind,
    fsync_dir,
    open_regular,
    read_json,
    removed,
    replace_file,
    space,
)
from modelhost.server.store_holds import EVERY, Everything, Holds
from modelhost.server.store_locks import StoreLocks

log = logging.getLogger(__name__)

_OPEN_FILES = Path("/proc/self/fd")  # /proc/self/fd/N: the file open as N, reopened as itself
_VALUE, _PINS = "value", "pinned_blobs"  # a state document's keys
MAX_ENTRY_BYTES = 4 << 20  # a manifest entry: 64 metadata entries of 4 KiB, JSON-escaped
MAX_STATE_BYTES = 256 << 20  # a state document (the restore record)


@dataclass(frozen=True)
class CheckpointRecord:
    """A manifest entry."""

    name: str
    sha256: str
    size_bytes: int
    format: str
    tensor_count: int
    created: float
    metadata: dict[str, str] = field(default_factory=dict)
    epoch: int | None = None
    loss: float | None = None


@dataclass(frozen=True)
class Contents:
    """What validation found in a file: filled into its manifest entry."""

    format: str
    tensor_count: int
    epoch: int | None = None
    loss: float | None = None


class CheckpointStore:
    """Stores checkpoints under validated names; safe for concurrent threads."""

    def __init__(
        self, root: Path, *, max_checkpoint_bytes: int = 0, direct_io: bool = True
    ) -> None:
        self.root = root.resolve()
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.direct_io = direct_io
        self._blobs = self.root / "blobs"
        self._entries = self.root / "checkpoints"
        self._tmp = self.root / "tmp"
        for folder in (self.root, self._blobs, self._entries, self._tmp):
            if folder.is_symlink():
                raise OSError(f"{folder} is a symbolic link: the store's folders must be its own")
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(folder, DIR_MODE)
        self._lock = threading.Lock()  # the temp file counter, and the late let-gos
        self._counter = 0
        self._locks = StoreLocks(self.root, self._tmp)
        self.owner = self._locks.owner
        self._holds = Holds(self._tmp, self._locks, self._temp_name)
        self._letting_go: list[str] = []  # let go of while the store's lock was busy

    @property
    def file_locks(self) -> bool:
        """Whether the file system has locks (else: use the store from one server only)."""
        return self._locks.file_locks

    def close(self) -> None:
        """Releases this server's hold on the store (also done when the process ends)."""
        self._holds.close()
        self._locks.close()

    # Reading

    def get(self, name: str) -> CheckpointRecord:
        """The manifest entry of `name`; CheckpointNotFound if there is none."""
        try:
            record = CheckpointRecord(**read_json(self._entry_path(name), MAX_ENTRY_BYTES))
            _check_record(record, name)
            return record
        except FileNotFoundError:
            raise CheckpointNotFound(f"checkpoint {name!r} not found") from None
        except (ValueError, TypeError) as error:
            raise DataLoss(
                f"the manifest entry of checkpoint {name!r} is unreadable ({error}); "
                "DeleteCheckpoint removes it"
            ) from None

    def list(self) -> list[CheckpointRecord]:
        """Every readable entry, sorted by name."""
        records = []
        for path in sorted(self._entries.glob("*.json")):
            try:
                records.append(self.get(path.stem))
            except (CheckpointNotFound, InvalidName):
                continue  # deleted meanwhile, or not ours
            except DataLoss as error:
                log.warning("%s", error)
        return records

    def blob_path(self, record: CheckpointRecord) -> Path:
        """Where the bytes of `record` are: a check that they are there, a regular file
        (read them through `open_blob`, which checks again what it opens).

        MissingBytes (DATA_LOSS) when the entry still names bytes that are gone;
        CheckpointNotFound when the checkpoint was deleted or replaced meanwhile; DataLoss
        when something else is there (a symlink, a FIFO, a folder).
        """
        path = self._blob(record.sha256)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self._missing(record)
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_blob(record, file_kind(info.st_mode))
        _check_size(record, info)
        return path

    @contextlib.contextmanager
    def open_blob(self, record: CheckpointRecord) -> Iterator[Path]:
        """The bytes of `record`, open, as a path naming the open file (/proc/self/fd/N),
        for readers that take a path (torch.load with mmap, safetensors, zipfile): opening
        it opens that file again, whatever `blobs/` holds meanwhile. Valid until the block
        ends; what was memory-mapped from it stays valid after.

        Refused with DataLoss unless the blob is a regular file: a symlink is not followed
        and a FIFO is not waited on (the open does neither). MissingBytes / CheckpointNotFound
        as `blob_path`.
        """
        fd = self._open_blob(record)
        try:
            yield _OPEN_FILES / str(fd)
        finally:
            os.close(fd)

    def _missing(self, record: CheckpointRecord) -> NoReturn:
        """Raises why the bytes of `record` cannot be read."""
        try:
            current = self.get(record.name).sha256
        except CheckpointNotFound:
            current = None
        if current == record.sha256:
            raise MissingBytes(
                f"checkpoint {record.name!r}: its bytes (sha256 {record.sha256}) are missing "
                "from the store; upload it again, or delete it"
            )
        raise CheckpointNotFound(f"checkpoint {record.name!r} was deleted or replaced meanwhile")

    def has_blob(self, sha256: str) -> bool:
        """Whether the bytes with this sha256 are in the store."""
        return self._blob(sha256).exists()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[tuple[CheckpointRecord, IO[bytes]]]:
        """The entry of `name` and its file, open for reading.

        Once open, the bytes stay readable even if the checkpoint is deleted or
        replaced meanwhile.
        """
        record = self.get(name)
        with os.fdopen(self._open_blob(record), "rb") as file:
            yield record, file

    def _open_blob(self, record: CheckpointRecord) -> int:
        """A descriptor of `record`'s bytes, open for reading (`open_regular`; DataLoss
        when they are not a regular file)."""
        try:
            fd, _ = open_regular(self._blob(record.sha256))
        except FileNotFoundError:
            self._missing(record)
        except Unreadable as error:
            raise _not_a_blob(record, error.what) from None
        try:
            _check_size(record, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    # Writing

    def begin(self) -> PendingWrite:
        """A new temp file for an upload or snapshot."""
        with self._lock:
            self._counter += 1
            suffix = f"{self._counter}-{time.monotonic_ns()}"
        path = self._tmp / f"{self.owner}.upload-{suffix}"
        with space():
            return PendingWrite(path, self.max_checkpoint_bytes, self.direct_io)

    def check_free(self, name: str, overwrite: bool) -> None:
        """Fails early with AlreadyExists when `name` is taken and not to be replaced."""
        if not overwrite and self._entry_path(name).exists():
            raise AlreadyExists(
                f"checkpoint {name!r} already exists (pass overwrite=True to replace it: "
                "--overwrite on the command line)"
            )

    def commit(
        self,
        pending: PendingWrite,
        name: str,
        contents: Contents,
        *,
        metadata: dict[str, str],
        overwrite: bool,
    ) -> CheckpointRecord:
        """Moves a finished, validated temp file into the store under `name`."""
        entry = self._entry_path(name)
        record = CheckpointRecord(
            name=name,
            sha256=pending.sha256,
            size_bytes=pending.size,
            format=contents.format,
            tensor_count=contents.tensor_count,
            created=time.time(),
            metadata=dict(metadata),
            epoch=contents.epoch,
            loss=contents.loss,
        )
        with self._locked(), space():
            self.check_free(name, overwrite)
            previous = _sha_of(entry)
            blob = self._blobs / record.sha256
            # A symlink or FIFO planted there, or a file of another size, is replaced.
            fresh = not _holds_bytes(blob, record.size_bytes)
            if fresh:
                os.replace(pending.path, blob)
            else:
                pending.discard()  # same bytes are stored already
            pending.committed = True
            try:
                if fresh:
                    fsync_dir(self._blobs)
                self._write_entry(entry, record)
            except BaseException:
                self._drop_blob_if_unused(record.sha256)  # e.g. a full disk: nothing changes
                raise
            if previous and previous != record.sha256:
                self._drop_blob_if_unused(previous)
        log.info(
            "stored checkpoint %s (%d bytes, sha256 %s)",
            name,
            record.size_bytes,
            record.sha256[:12],
        )
        return record

    def delete(self, name: str) -> None:
        """Removes `name`; CheckpointNotFound if there is none, Refused (FAILED_PRECONDITION)
        while another server sharing the store holds its bytes."""
        entry = self._entry_path(name)
        with self._locked():
            sha = _sha_of(entry)
            if sha is None:
                raise CheckpointNotFound(f"checkpoint {name!r} not found")
            holders = sorted(
                f"{owner}{', which holds every blob' if held is EVERY else ''}"
                for owner, held in self._holds.held_elsewhere().items()
                if sha in held
            )
            if holders:
                raise Refused(
                    f"checkpoint {name!r} is needed by another server sharing the store "
                    f"({', '.join(holders[:10])}): a model version there may be paged in from "
                    "it again; unload it there first (or load it with residency pinned)"
                )
            entry.unlink()
            fsync_dir(self._entries)
            if sha:  # "": an unreadable entry, which refers to nothing
                self._drop_blob_if_unused(sha)

    def recover(self) -> None:
        """At start: removes the temp files (and holds) of servers that are gone, and the
        blobs nothing refers to, pins or holds."""
        with self._locked():
            live = self._locks.live_owners()
            for leftover in self._tmp.iterdir():
                if leftover.name.split(".", 1)[0] in live:
                    continue
                # Probed again now: a server may have started since `live` was taken.
                if not self._locks.in_use(leftover) and removed(leftover):
                    log.info("removed %s, left by a server that is gone", leftover.name)
            try:
                used = self._used_blobs()
            except DataLoss as error:
                log.error("%s: unreferenced blobs are kept", error)
                return
            for blob in self._blobs.iterdir():
                if blob.name not in used and removed(blob):
                    log.info("removed unreferenced blob %s", blob.name)
            for sha in used:  # kept: reading them answers DATA_LOSS until deleted
                if not (self._blobs / sha).exists():
                    log.error("checkpoint store: blob %s is missing", sha)

    # Internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads, then every server sharing the store; holds let go of
        while the lock was busy are let go of first."""
        with self._locks.held():
            self._let_go_late()
            yield

    def _entry_path(self, name: str) -> Path:
        return self._entries / f"{check_name(name, 'checkpoint')}.json"

    def _state_path(self, name: str) -> Path:
        return self.root / f"{check_name(name, 'state')}.json"

    def _blob(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise CheckpointNotFound(f"{sha256!r} is not a sha256")
        return self._blobs / sha256

    def hold(self, sha256: str) -> None:
        """Keeps a blob while this server needs it (a version that may be paged in again
        from it), whatever happens to the names, for every server sharing the store;
        `let_go` when it no longer does."""
        with self._locked():
            self._holds.hold(sha256)

    def let_go(self, sha256: str) -> None:
        """One hold less on a blob (the other servers are told, and the blob removed if
        nothing uses it any more). Never fails: it follows a change that has happened (an
        unload, a load that ended). While the store's lock is busy (StoreBusy), the
        let-go waits for the next change to take it, and the blob stays held meanwhile."""
        with self._lock:
            self._letting_go.append(sha256)
        try:
            with self._locked():  # which lets go of it, with any let go of before
                pass
        except StoreBusy as error:
            log.warning("letting go of blob %s later: %s", sha256[:12], error)

    def _let_go_late(self) -> None:
        """The let-gos waiting for the store's lock (call holding it)."""
        with self._lock:
            shas, self._letting_go = self._letting_go, []
        for sha in shas:
            if self._holds.let_go(sha):
                self._drop_blob_if_unused(sha)

    def _used_blobs(self) -> set[str]:
        """Blobs an entry refers to, a state document pins, or a live server holds."""
        used = self._holds.held_here()
        for held in self._holds.held_elsewhere().values():
            if isinstance(held, Everything):  # more than its holds file can list
                return {blob.name for blob in self._blobs.iterdir()}
            used |= held
        used.update(filter(None, map(_sha_of, self._entries.glob("*.json"))))
        for state in self.root.glob("*.json"):
            pinned = _pinned_by(state)
            if pinned is None:  # what it pins is unknown: no blob may be removed
                raise DataLoss(f"the state document {state.name} is unreadable")
            used |= pinned
        return used

    def _drop_blob_if_unused(self, sha: str) -> None:
        """Clean-up after a change that has happened (a commit, a delete): a failure is
        logged, not raised, and leaves a blob that the next start removes."""
        try:
            if sha not in self._used_blobs():
                (self._blobs / sha).unlink(missing_ok=True)
        except Exception:
            log.exception("could not remove blob %s, which nothing may use any more", sha)

    def _temp_name(self, path: Path) -> Path:
        return self._tmp / f"{self.owner}.write-{path.name}-{time.monotonic_ns()}"

    def _write_entry(self, entry: Path, record: CheckpointRecord) -> None:
        replace_file(
            self._temp_name(entry),
            entry,
            json.dumps(asdict(record), indent=1, sort_keys=True).encode(),
        )

    # Server state kept beside the checkpoints (e.g. the models to restore)

    def write_state(self, name: str, value: Any, pins: Collection[str] = ()) -> None:
        """Atomically stores a small JSON document in the store's root.

        `pins` are the sha256 of the blobs it refers to: they stay, whatever happens to
        the names, until no document pins them and no entry refers to them (a string
        that is not a sha256 pins nothing). A blob the document did not pin before must
        be there (else CheckpointNotFound, and nothing changes).
        """
        path = self._state_path(name)
        wanted = {sha for sha in pins if SHA256.fullmatch(sha)}
        with self._locked(), space():
            before = _pinned_by(path) or set()
            for sha in sorted(wanted - before):
                if not self.has_blob(sha):
                    raise CheckpointNotFound(f"checkpoint bytes sha256 {sha} are not in the store")
            data = json.dumps({_VALUE: value, _PINS: sorted(wanted)}).encode()
            if len(data) > MAX_STATE_BYTES:  # the next start could not read it back
                raise LimitExceeded(
                    f"the {name} record would take {len(data):,} bytes; the limit is "
                    f"{MAX_STATE_BYTES:,}"
                )
            replace_file(self._temp_name(path), path, data)
            for sha in before - wanted:
                self._drop_blob_if_unused(sha)

    def read_state(self, name: str) -> Any:
        """The value `write_state` stored, or None if there is none."""
        return _read_state(self._state_path(name))

    def set_aside_state(self, name: str, read: Callable[[], object]) -> str | None:
        """Renames state document `name`, which `read()` found unreadable (ValueError), to
        a name no later write replaces, beside it; returns that name. Under the store's
        lock, and only if `read()` still fails there: another server may have written a
        readable one since (red team 10, S1), and then nothing moves (None). It still
        counts as a state document: what it may pin stays until someone mends it or
        deletes it."""
        path = self._state_path(name)
        with self._locked():
            try:
                read()
                return None
            except ValueError:
                pass
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = path.with_name(f"{path.stem}.unreadable-{stamp}-{secrets.token_hex(4)}.json")
            os.rename(path, aside)
            fsync_dir(self.root)
        return aside.name


def _not_a_blob(record: CheckpointRecord, why: str) -> DataLoss:
    """The refusal of a blob that is not a regular file the store wrote."""
    return DataLoss(
        f"checkpoint {record.name!r}: its bytes in the store (blobs/{record.sha256}) are not "
        f"a regular file ({why}), so they are not read; upload the checkpoint again (the "
        "same bytes replace what is there), or delete it"
    )


def _check_size(record: CheckpointRecord, info: os.stat_result) -> None:
    """DataLoss when a blob is not as long as the bytes it was stored with: truncated or
    extended in place behind the store (memory-mapping a truncated one ends the process
    with SIGBUS when a page past its end is read)."""
    if info.st_size != record.size_bytes:
        raise DataLoss(
            f"checkpoint {record.name!r}: its bytes in the store (blobs/{record.sha256}) "
            f"are {info.st_size:,} bytes long, not the {record.size_bytes:,} they were "
            "stored with: they were changed behind the store, so they are not read; upload "
            "the checkpoint again (the same bytes replace what is there), or delete it"
        )


def _holds_bytes(blob: Path, size: int) -> bool:
    """Whether `blob` is a regular file of `size` bytes (not following a symlink)."""
    try:
        info = os.lstat(blob)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def _int64(value: Any) -> bool:
    return type(value) is int and -(1 << 63) <= value < 1 << 63


def _double(value: Any) -> bool:
    return type(value) is float or (type(value) is int and abs(value) <= 1 << 53)


def _wrapped(document: Any) -> bool:
    """Whether a state document has the form `write_state` writes (older ones are bare)."""
    return isinstance(document, dict) and set(document) == {_VALUE, _PINS}


def _check_record(record: CheckpointRecord, name: str) -> None:
    """ValueError unless a manifest entry read from `name`'s file is one the store wrote."""

    def number(value: Any, kind: type | tuple[type, ...], low: float, high: float) -> bool:
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
        return bool(low <= float(cast(float, value)) <= high)  # also false for NaN

    problems = [
        what
        for what, fine in (
            ("name (not its file's)", record.name == name),
            (
                "sha256",
                isinstance(record.sha256, str) and bool(SHA256.fullmatch(record.sha256)),
            ),
            ("size_bytes", number(record.size_bytes, int, 0, 1 << 62)),
            ("format", isinstance(record.format, str) and len(record.format) <= 64),
            ("tensor_count", number(record.tensor_count, int, 0, 1 << 62)),
            ("created", number(record.created, (int, float), 0, 253402300799)),  # ≤ 9999
            (
                "metadata",
                isinstance(record.metadata, dict)
                and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in record.metadata.items()
                ),
            ),
            # As formats.py reads them from a training checkpoint: an int64, any double
            # (a diverged run's loss is NaN or infinite).
            ("epoch", record.epoch is None or _int64(record.epoch)),
            ("loss", record.loss is None or _double(record.loss)),
        )
        if not fine
    ]
    if problems:
        raise ValueError(f"fields not as the store writes them: {', '.join(problems)}")


def _sha_of(entry: Path) -> str | None:
    """The sha256 a manifest entry names (None: there is no entry; "": it is unreadable,
    and refers to nothing)."""
    try:
        document = read_json(entry, MAX_ENTRY_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""
    sha = document.get("sha256") if isinstance(document, dict) else None
    return sha if isinstance(sha, str) and SHA256.fullmatch(sha) else ""


def _pinned_by(state: Path) -> set[str] | None:
    """The blobs a state document pins (none if it has none, or there is none); None if
    it is there but cannot be read."""
    try:
        document = read_json(state, MAX_STATE_BYTES)
    except FileNotFoundError:
        return set()
    except (OSError, ValueError):
        return None
    pins = document.get(_PINS, []) if _wrapped(document) else []
    return {sha for sha in pins if isinstance(sha, str) and SHA256.fullmatch(sha)}


def _read_state(path: Path) -> Any:
    try:
        document = read_json(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    return document[_VALUE] if _wrapped(document) else document  # older: the bare value
