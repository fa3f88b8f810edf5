"""The restore record (`--restore`): which versions this server hosts, how each was
loaded, and the checkpoint bytes each loaded, kept in the store as `hosted-models.json`.

An entry is `{"request": <the LoadModelRequest, as protobuf JSON>, "loaded_checkpoint":
<the checkpoint record it loaded>, "served": <its dtype, inputs, outputs and device bytes,
as ModelInfo JSON>}`: messages themselves, so `buf breaking` guards the record's
compatibility. What it served as lets a version restored at the store tier show them
before it is built, and its first page-in reserve its weights and workspace at once.
`RecordFormat` converts (messages.py supplies it: nothing here knows protobuf). The store
keeps the bytes an entry names until no entry names them. Entries written before this
format (flat LoadRequest fields) still read.

models.py writes the record before what it records takes effect: a LoadModel or
UnloadModel whose record cannot be written (a full volume) changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from modelhost.server.hosted import HostedModel, Served
from modelhost.server.loading import LoadRequest
from modelhost.server.store import CheckpointRecord, CheckpointStore

log = logging.getLogger(__name__)

HOSTED_STATE = "hosted-models"
REQUEST, LOADED_CHECKPOINT, SERVED = "request", "loaded_checkpoint", "served"
Key = tuple[str, int]


class RecordFormat(Protocol):
    """How a LoadRequest, and what its version served as, are written into the record
    and read back."""

    def dump(self, request: LoadRequest) -> dict[str, Any]: ...

    def load(self, entry: dict[str, Any]) -> LoadRequest: ...

    def dump_served(self, served: Served) -> dict[str, Any]: ...

    def load_served(self, entry: dict[str, Any]) -> Served: ...


@dataclass
class Unrestored:
    """A recorded version that is not serving (not restored, or not yet), and why."""

    entry: dict[str, Any]
    request: LoadRequest
    reason: str


class RestoreRecord:
    """The record of hosted versions, and the recorded versions that are not serving."""

    def __init__(self, store: CheckpointStore, formats: RecordFormat, *, enabled: bool) -> None:
        self.enabled = enabled
        self.unrestored: dict[Key, Unrestored] = {}
        self._store = store
        self._formats = formats
        self._written: Any = None  # the record as last read or written

    def write(self, hosted: Iterable[HostedModel], leaving: Collection[Key] = ()) -> None:
        """Records `hosted` (with the versions not restored yet), less `leaving`.
        Writes nothing when nothing changed (a restore as recorded, on a full disk).
        Models calls it on a thread (an fsync), one write at a time, and changes
        `unrestored` only between writes."""
        if not self.enabled:
            return
        entries = {(h.name, h.version): self._entry(h) for h in hosted}
        for key, unrestored in self.unrestored.items():
            entries.setdefault(key, unrestored.entry)
        kept = json.loads(json.dumps([entries[k] for k in sorted(entries) if k not in leaving]))
        if kept == self._written:
            return
        pins = {sha for entry in kept if (sha := _pinned_sha(entry))}
        self._store.write_state(HOSTED_STATE, kept, pins)
        self._written = kept

    def _read_list(self) -> list[Any] | None:
        state = self._store.read_state(HOSTED_STATE)
        if state is not None and not isinstance(state, list):
            raise ValueError(f"a JSON {type(state).__name__}, not a list of entries")
        return state

    def _set_aside(self, error: ValueError) -> list[Any] | None:
        """Moves an unreadable record aside (unless another server wrote a readable one
        meanwhile: that one is read) and logs it."""
        try:
            aside = self._store.set_aside_state(HOSTED_STATE, self._read_list)
            if aside is None:
                return self._read_list()
        except ValueError:  # unreadable again already: the next write replaces it
            aside = "where it was (it changed as it was being moved aside)"
        except OSError as failed:  # the next write replaces it
            aside = f"where it was (it could not be moved aside: {failed.strerror})"
        log.error(
            "the restore record cannot be read (%s): nothing is restored; it is now %s "
            "(a state document the server cannot read also keeps any checkpoint bytes "
            "from being removed: mend it, or delete it)",
            error,
            aside,
        )
        return None

    def read(self) -> list[tuple[LoadRequest, CheckpointRecord | None, Served | None]]:
        """Every recorded version, marked not restored until it is; entries that cannot
        be read are logged and dropped at the next write. A record that cannot be read at
        all (not a JSON list in a regular file: edited, or planted) restores nothing: it is
        moved aside, where it stays for its owner to mend, and the server starts."""
        try:
            state = self._read_list()
        except ValueError as error:
            state = self._set_aside(error)
        state = self._written = state or []
        found = []
        self.unrestored = {}
        for entry in state:
            try:
                request = self._formats.load(entry.get(REQUEST, entry))
                loaded = entry.get(LOADED_CHECKPOINT)
                loaded_from = CheckpointRecord(**loaded) if loaded else None
            except Exception as error:
                log.error("restore record: cannot read the entry %.200s (%s)", entry, error)
                continue
            key = (request.name, request.version)
            self.unrestored[key] = Unrestored(entry, request, "the server is still restoring")
            found.append((request, loaded_from, self._served(entry)))
        return found

    def _served(self, entry: dict[str, Any]) -> Served | None:
        """What an entry says its version served as; None if it does not say (written
        before it did) or says it wrongly (logged: the version is restored without it)."""
        served = entry.get(SERVED)
        if served is None:
            return None
        try:
            return self._formats.load_served(served)
        except Exception as error:
            log.error("restore record: ignoring the entry's %r %.200s (%s)", SERVED, served, error)
            return None

    def _entry(self, hosted: HostedModel) -> dict[str, Any]:
        entry: dict[str, Any] = {REQUEST: self._formats.dump(hosted.request)}
        served = hosted.served()
        try:
            if served is not None:
                entry[SERVED] = self._formats.dump_served(served)
        except (TypeError, ValueError) as error:  # optional: a restore shows less without it
            log.warning("restore record: %s version %d: %s", hosted.name, hosted.version, error)
        if hosted.loaded.record is not None:
            loaded = dataclasses.replace(hosted.loaded.record, metadata={})
            entry[LOADED_CHECKPOINT] = dataclasses.asdict(loaded)
        return entry


def _pinned_sha(entry: dict[str, Any]) -> str | None:
    loaded = entry.get(LOADED_CHECKPOINT)
    sha = loaded.get("sha256") if isinstance(loaded, dict) else None
    return sha if isinstance(sha, str) else None
