"""The registry of hosted model versions (each a `hosted.HostedModel`).

`lease` resolves a name (and optional version) and pins the result under one
lock, so unloading a version never pulls it from under a request that found it:
`remove` takes it out of routing at once, and `HostedModel.retire` waits for its
leases to end before it stops the batcher and frees the memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from modelhost.server.errors import AlreadyExists, InvalidArgument, ModelNotFound
from modelhost.server.hosted import HostedModel

MAX_VERSION = 2**63 - 1  # versions travel as int64


class Registry:
    """Hosted versions by name; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, HostedModel]] = {}
        self._reserved: set[tuple[str, int]] = set()

    def reserve(self, name: str, version: int) -> int:
        """Claims a version number for a load in progress (0: the next free one)."""
        with self._lock:
            taken = set(self._models.get(name, {})) | {v for n, v in self._reserved if n == name}
            if version == 0:
                version = max(taken, default=0) + 1
            elif version in taken:
                raise AlreadyExists(f"model {name!r} version {version} is already hosted")
            if not 0 < version <= MAX_VERSION:
                raise InvalidArgument(
                    f"model {name!r}: version {version} is outside 1..{MAX_VERSION}"
                )
            self._reserved.add((name, version))
            return version

    def cancel(self, name: str, version: int) -> None:
        """Gives back a reservation after a failed load."""
        with self._lock:
            self._reserved.discard((name, version))

    def put(self, hosted: HostedModel) -> None:
        """Publishes a loaded version: from now on it serves (and is the newest if highest)."""
        with self._lock:
            self._reserved.discard((hosted.name, hosted.version))
            self._models.setdefault(hosted.name, {})[hosted.version] = hosted

    def _versions(self, name: str) -> dict[int, HostedModel]:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return versions

    def _find(self, name: str, version: int) -> HostedModel:
        versions = self._versions(name)
        chosen = max(versions) if version == 0 else version
        if chosen not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version} (hosted: {sorted(versions)})"
            )
        return versions[chosen]

    def get(self, name: str, version: int = 0) -> HostedModel:
        """The version asked for (0: the newest), without pinning it."""
        with self._lock:
            return self._find(name, version)

    @contextlib.contextmanager
    def lease(self, name: str, version: int = 0) -> Iterator[HostedModel]:
        """Resolves and pins a version for the duration of a request."""
        with self._lock:
            hosted = self._find(name, version)
            hosted.acquire()
        try:
            yield hosted
        finally:
            hosted.release()

    def select(self, name: str, version: int = 0) -> list[HostedModel]:
        """What `remove` would take out, without taking it (ModelNotFound if nothing)."""
        with self._lock:
            return self._select(name, version)

    def remove(self, name: str, version: int = 0) -> list[HostedModel]:
        """Takes one version (0: all) out of routing; the caller retires them."""
        with self._lock:
            removed = self._select(name, version)
            versions = self._models[name]
            for hosted in removed:
                del versions[hosted.version]
            if not versions:
                del self._models[name]
            return removed

    def _select(self, name: str, version: int) -> list[HostedModel]:
        if version == 0:
            versions = self._versions(name)
            return [versions[v] for v in sorted(versions)]
        return [self._find(name, version)]

    def hosts(self, name: str) -> bool:
        """Whether any version of `name` is hosted (an empty name never is)."""
        with self._lock:
            return name in self._models

    def versions(self, name: str) -> list[int]:
        """Hosted versions of `name`, ascending."""
        with self._lock:
            return sorted(self._models.get(name, {}))

    def all(self) -> list[HostedModel]:
        """Every hosted version, by name then version."""
        with self._lock:
            return [
                self._models[name][version]
                for name in sorted(self._models)
                for version in sorted(self._models[name])
            ]
