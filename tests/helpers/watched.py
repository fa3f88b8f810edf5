"""Bytes that remember how far a reader got: the wire counters stop early, and tests check
they do."""

from __future__ import annotations

from typing import Any


class Watched(bytes):
    """Bytes that remember the furthest offset read from them."""

    furthest = -1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int):
            self.furthest = max(self.furthest, index)
        return super().__getitem__(index)
