"""The blobs running servers hold (a model version each may page in again), across the
servers sharing one store: each lists its holds in `tmp/<owner>.holds`, and reads those of
the other live servers. A server holding more than MAX_HOLDS blobs writes EVERY_BLOB
instead of the list. A holds file that no server would write counts for nothing, and is
logged. A new hold that cannot be written while other servers share the store is not
taken (the load that wanted it fails), since they would be free to remove the blob.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable, Collection
from pathlib import Path

from modelhost.server.errors import Refused
from modelhost.server.store_files import FULL, SHA256, read_json, replace_file, store_full
from modelhost.server.store_locks import StoreLocks

log = logging.getLogger("modelhost.server.store")  # the store's log, as it was in store.py

HOLDS = ".holds"  # tmp/<owner>.holds: the blobs a running server holds
MAX_HOLDS_BYTES = 1 << 20  # a larger holds file is not a server's: it counts for nothing
MAX_HOLDS = 15_000
"""Blobs a holds file lists: 68 bytes each (`"<sha256>", `), 1,020,000 bytes in all, within
MAX_HOLDS_BYTES, which every server reads (also those of earlier releases). A server
holding more writes EVERY_BLOB instead."""
EVERY_BLOB = {"every_blob": True}  # the holds file of a server holding more than MAX_HOLDS
_EVERY_BLOB = json.dumps(EVERY_BLOB).encode()


class Everything:
    """What a server holding more than MAX_HOLDS blobs holds: any blob."""

    def __contains__(self, sha: object) -> bool:
        return True


EVERY = Everything()
Held = set[str] | Everything  # what another server holds


class Holds:
    """The blobs this server holds (counted), published in its holds file, and those the
    other live servers sharing the store hold. Used under the store's lock."""

    def __init__(self, tmp: Path, locks: StoreLocks, temp_name: Callable[[Path], Path]) -> None:
        self._tmp = tmp
        self._locks = locks
        self._temp_name = temp_name
        self._held: collections.Counter[str] = collections.Counter()
        self._holds = tmp / f"{locks.owner}{HOLDS}"
        self._holds_all = False  # the holds file says EVERY_BLOB (more than MAX_HOLDS)

    def hold(self, sha256: str) -> None:
        """One more hold on a blob; a new one is published first. If that fails while
        other live servers share the store (they would be free to remove the blob), the
        blob is not held and the error is raised (StoreFull for a full volume); a lone
        server logs it (a server that starts later reads what its next write says)."""
        if sha256 not in self._held:
            try:
                self._write([*self._held, sha256])
            except OSError as error:
                others = self._locks.live_owners() - {self._locks.owner}
                if others:
                    log.error(
                        "could not record the blobs this server holds in %s (%s): not "
                        "holding %s, which %d other servers sharing the store could remove",
                        self._holds,
                        error,
                        sha256,
                        len(others),
                    )
                    if error.errno in FULL:
                        raise store_full(error) from None
                    raise Refused(
                        f"this server could not record in the store that it holds the bytes "
                        f"{sha256[:12]} ({error.strerror or error}), and {len(others)} other "
                        "servers sharing the store would be free to remove them: the load is "
                        "refused; check the store's volume (space, permissions)"
                    ) from None
                self._unpublished(error)
        self._held[sha256] += 1

    def let_go(self, sha256: str) -> bool:
        """One hold less on a blob; True (and published) when this server holds it no
        more (a failed write is logged: the other servers keep the blob meanwhile)."""
        self._held[sha256] -= 1
        if self._held[sha256] <= 0:
            del self._held[sha256]
            try:
                self._write(list(self._held))
            except OSError as error:
                self._unpublished(error)
            return True
        return False

    def held_here(self) -> set[str]:
        """The blobs this server holds."""
        return set(self._held)

    def held_elsewhere(self) -> dict[str, Held]:
        """The blobs each other live server sharing the store holds, by owner."""
        return {
            owner: holds_in(self._tmp / f"{owner}{HOLDS}")
            for owner in self._locks.live_owners() - {self._locks.owner}
        }

    def close(self) -> None:
        """Removes this server's holds file."""
        self._holds.unlink(missing_ok=True)

    def _write(self, held: list[str]) -> None:
        """Writes the holds file where the other servers sharing the store read it (no
        holds: no file)."""
        if held:
            data = holds_document(held)
            replace_file(self._temp_name(self._holds), self._holds, data)
        else:
            data = b""
            self._holds.unlink(missing_ok=True)
        every = data == _EVERY_BLOB
        if every and not self._holds_all:
            log.warning(
                "this server holds the bytes of %d checkpoints, more than its holds file "
                "lists (%d): until it holds fewer, the servers sharing the store remove no "
                "blob and refuse every DeleteCheckpoint",
                len(held),
                MAX_HOLDS,
            )
        elif self._holds_all and not every:
            log.warning("this server's holds fit in its holds file again")
        self._holds_all = every

    def _unpublished(self, error: OSError) -> None:
        log.error(
            "could not record the blobs this server holds in %s (%s): until a later write "
            "does, other servers sharing the store see what it said before",
            self._holds,
            error,
        )


def holds_document(held: Collection[str]) -> bytes:
    """A holds file: the list of the blobs held, or EVERY_BLOB past MAX_HOLDS of them."""
    return _EVERY_BLOB if len(held) > MAX_HOLDS else json.dumps(sorted(held)).encode()


def holds_in(path: Path) -> Held:
    """The blobs a server's holds file names (none if there is none; EVERY: all). Another
    server may have put anything there: what is not a regular file of at most
    MAX_HOLDS_BYTES with a JSON list of sha256 (or EVERY_BLOB) in it is logged, and holds
    nothing."""
    try:
        held = read_json(path, MAX_HOLDS_BYTES)
    except FileNotFoundError:
        return set()
    except (OSError, ValueError):
        held = None
    if isinstance(held, dict) and held == EVERY_BLOB and held["every_blob"] is True:
        return EVERY
    if not isinstance(held, list) or not all(
        isinstance(sha, str) and SHA256.fullmatch(sha) for sha in held
    ):
        log.warning(
            "ignoring holds file %s: not a JSON list of sha256 in a regular file of at most "
            "%d bytes",
            path.name,
            MAX_HOLDS_BYTES,
        )
        return set()
    return set(held)
