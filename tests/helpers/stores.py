"""Checkpoints committed straight into a store, and the holds files its servers write."""

from __future__ import annotations

import json
from pathlib import Path

from modelhost.server.store import CheckpointStore, Contents


def put(into: CheckpointStore, name: str, data: bytes, overwrite: bool = False) -> str:
    """Commits `data` as checkpoint `name`; returns its sha256."""
    with into.begin() as pending:
        pending.write(data)
        pending.finish()
        record = into.commit(
            pending, name, Contents("state_dict", 1), metadata={}, overwrite=overwrite
        )
    return record.sha256


def holds_files(root: Path) -> dict[str, object]:
    """Each holds file of the store at `root`, parsed, by file name."""
    return {p.name: json.loads(p.read_text()) for p in (root / "tmp").glob("*.holds")}
