"""The bound on a holds file, which writer and readers agree on: a server lists up to
MAX_HOLDS held blobs, which every server reads (MAX_HOLDS_BYTES); one holding more says
it holds every blob, and until it holds fewer the others sharing the store remove no blob
and refuse every delete. Never a file the others ignore, with bytes a live server still
pages in from deleted under it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import build, expect, reference
from helpers.stores import holds_files, put
from modelhost.client import ModelHostClient
from modelhost.server import Settings, store_holds
from modelhost.server.errors import Refused
from modelhost.server.store import CheckpointStore
from modelhost.server.store_holds import EVERY_BLOB, MAX_HOLDS, MAX_HOLDS_BYTES

X = np.ones((2, 4), np.float32)


def blobs_in(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").iterdir()}


def test_the_longest_list_a_server_writes_is_one_the_others_read(tmp_path: Path) -> None:
    """MAX_HOLDS blobs, written as a server writes them, fit in MAX_HOLDS_BYTES, and a
    reader keeps every one of them (the last one listed included); one more is the mark."""
    reader = CheckpointStore(tmp_path)
    kept = put(reader, "kept", b"bytes held by the other server")
    shas = sorted({hashlib.sha256(str(i).encode()).hexdigest() for i in range(MAX_HOLDS - 1)})
    held = [*shas, kept]
    document = store_holds.holds_document(held)
    assert len(document) <= MAX_HOLDS_BYTES
    assert json.loads(document) == sorted(held)
    assert json.loads(store_holds.holds_document([*held, "f" * 64])) == EVERY_BLOB
    with open(tmp_path / "tmp" / "other.owner", "a+b") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # another server runs
        (tmp_path / "tmp" / "other.holds").write_bytes(document)
        with pytest.raises(Refused, match="needed by another server sharing the store"):
            reader.delete("kept")
        reader.recover()
        assert kept in {p.name for p in (tmp_path / "blobs").iterdir()}
    reader.close()


def test_a_server_holding_more_than_the_bound_keeps_every_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_holds, "MAX_HOLDS", 2)
    caplog.set_level(logging.WARNING, logger="modelhost.server.store")
    first, second = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    a, b, c = (put(first, name, name.encode() * 8) for name in ("a", "b", "c"))
    first.hold(a)
    first.hold(b)
    assert holds_files(tmp_path) == {f"{first.owner}.holds": sorted([a, b])}
    free = put(second, "free", b"nobody holds these")
    second.delete("free")  # within the bound: a blob nobody holds goes
    assert free not in blobs_in(tmp_path)

    first.hold(c)  # one past the bound
    assert holds_files(tmp_path) == {f"{first.owner}.holds": EVERY_BLOB}
    assert "more than its holds file lists (2)" in caplog.text
    free = put(second, "free", b"nobody holds these")
    with pytest.raises(Refused, match=f"\\({first.owner}, which holds every blob\\)"):
        second.delete("free")
    assert second.get("free").sha256 == free
    newer = put(second, "free", b"other bytes", overwrite=True)  # the old bytes stay
    second.recover()  # a start removes nothing either
    CheckpointStore(tmp_path).recover()
    assert {a, b, c, free, newer} <= blobs_in(tmp_path)

    first.let_go(c)  # within the bound again: the list, and deletes go through
    assert holds_files(tmp_path) == {f"{first.owner}.holds": sorted([a, b])}
    assert "fit in its holds file again" in caplog.text
    second.delete("free")
    second.recover()
    assert blobs_in(tmp_path) == {a, b, c}
    with pytest.raises(Refused):
        second.delete("a")  # still held
    for s in (first, second):
        s.close()


def test_past_the_bound_another_server_deletes_nothing(
    replicas: tuple[ModelHostClient, ModelHostClient],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers on one store that list at most one held blob."""
    monkeypatch.setattr(store_holds, "MAX_HOLDS", 1)  # read at each write of a holds file
    a, b = replicas
    m1, m2 = build("tiny_mlp", seed=1), build("tiny_mlp", seed=2)
    a.save_checkpoint("ck", m1.state_dict())
    a.save_checkpoint("other", m2.state_dict())
    a.load_model("m1", architecture="tiny_mlp", checkpoint="ck")
    b.save_checkpoint("free", build("tiny_mlp", seed=3).state_dict())
    expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: b.delete_checkpoint("ck"))
    b.delete_checkpoint("free")  # one blob held: it is listed, the others go
    a.load_model("m2", architecture="tiny_mlp", checkpoint="other")  # two: every blob
    assert {m.name: m.tier for m in a.list_models()} == {"m1": "store", "m2": "resident"}
    free = b.save_checkpoint("free", build("tiny_mlp", seed=3).state_dict()).sha256
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: b.delete_checkpoint("free"),
        "which holds every blob",
    )
    expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: b.delete_checkpoint("ck"))
    b.save_checkpoint("ck", build("tiny_mlp", seed=4).state_dict(), overwrite=True)
    np.testing.assert_allclose(a.predict("m1", X), reference(m1, X), rtol=1e-5)  # paged in
    assert free in blobs_in(settings.store)
    a.unload_model("m2")  # one blob held again: the list
    b.delete_checkpoint("free")
    assert free not in blobs_in(settings.store)
    a.unload_model("m1")
    b.delete_checkpoint("ck")
