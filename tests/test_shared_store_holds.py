"""Holds across servers that share one store (replicas on a shared volume): the bytes an
evicted version on one server pages in from again stay, whatever another server does to
its checkpoint's name, for as long as that server runs."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect, reference
from helpers.stores import holds_files, put
from modelhost.client import ModelHostClient
from modelhost.server import Settings
from modelhost.server.errors import Refused
from modelhost.server.store import CheckpointStore

X = np.ones((2, 4), np.float32)


def evicted_on_a(a: ModelHostClient) -> torch.nn.Module:
    """Loads "m1" from checkpoint "ck" on A, then "m2", which evicts it; m1's twin."""
    m1, m2 = build("tiny_mlp", seed=1), build("tiny_mlp", seed=2)
    a.save_checkpoint("ck", m1.state_dict())
    a.save_checkpoint("other", m2.state_dict())
    a.load_model("m1", architecture="tiny_mlp", checkpoint="ck")
    a.load_model("m2", architecture="tiny_mlp", checkpoint="other")
    assert {m.name: m.tier for m in a.list_models()} == {"m1": "store", "m2": "resident"}
    return m1


def blobs(settings: Settings) -> set[str]:
    return {p.name for p in (settings.store / "blobs").iterdir()}


def test_an_overwrite_through_another_server_keeps_the_evicted_versions_bytes(
    replicas: tuple[ModelHostClient, ModelHostClient], settings: Settings
) -> None:
    a, b = replicas
    m1 = evicted_on_a(a)
    held = a.get_checkpoint("ck").sha256
    new = build("tiny_mlp", seed=3)
    b.save_checkpoint("ck", new.state_dict(), overwrite=True)
    assert held in blobs(settings)
    np.testing.assert_allclose(a.predict("m1", X), reference(m1, X), rtol=1e-5)
    # Once A lets go, the old bytes go.
    a.unload_model("m1")
    assert blobs(settings) == {b.get_checkpoint(n).sha256 for n in ("ck", "other")}


def test_a_delete_through_another_server_is_refused_while_a_version_needs_it(
    replicas: tuple[ModelHostClient, ModelHostClient], settings: Settings
) -> None:
    a, b = replicas
    m1 = evicted_on_a(a)
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: b.delete_checkpoint("ck"),
        "'ck' is needed by another server sharing the store",
        "unload it there first",
    )
    assert [c.name for c in b.list_checkpoints()] == ["ck", "other"]
    np.testing.assert_allclose(a.predict("m1", X), reference(m1, X), rtol=1e-5)
    a.unload_model("m1")
    b.delete_checkpoint("ck")
    assert blobs(settings) == {b.get_checkpoint("other").sha256}


def test_holds_live_and_die_with_their_server(tmp_path: Path) -> None:
    first, second = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    sha = put(first, "a", b"first")
    first.hold(sha)
    first.hold(sha)
    assert holds_files(tmp_path) == {f"{first.owner}.holds": [sha]}
    with pytest.raises(Refused, match=f"another server sharing the store \\({first.owner}\\)"):
        second.delete("a")
    put(second, "a", b"second", overwrite=True)
    second.recover()  # a starting server keeps what a live one holds
    assert (tmp_path / "blobs" / sha).exists()
    first.let_go(sha)
    assert holds_files(tmp_path) == {f"{first.owner}.holds": [sha]}  # held once more
    first.let_go(sha)
    assert holds_files(tmp_path) == {}
    assert not (tmp_path / "blobs" / sha).exists()

    # A server that dies holding bytes pins nothing: the others delete and clean up.
    sha = put(first, "b", b"third")
    first.hold(sha)
    first._locks.owner_file.close()  # the first server dies (the kernel drops its lock)
    second.delete("b")
    assert not (tmp_path / "blobs" / sha).exists()
    third = CheckpointStore(tmp_path)
    third.recover()
    assert holds_files(tmp_path) == {}
    for store in (second, third):
        store.close()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_crashed_servers_holds_are_removed_at_the_next_start(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path)
    sha = put(first, "a", b"bytes")
    first.hold(sha)
    (tmp_path / "checkpoints" / "a.json").unlink()  # the name went behind everyone's back
    first._locks.owner_file.close()  # the first server dies
    second = CheckpointStore(tmp_path)
    second.recover()
    assert not (tmp_path / "blobs" / sha).exists()
    assert holds_files(tmp_path) == {}
    second.close()


def test_a_hold_that_cannot_be_written_while_others_share_the_store_is_refused(
    tmp_path: Path,
) -> None:
    """A holds file that cannot be written for any reason but a full volume (here, a
    folder planted where it goes: EISDIR even for root) while another server shares the
    store refuses the hold with FAILED_PRECONDITION, not INTERNAL; alone, it is logged."""
    first, second = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    sha = put(first, "a", b"bytes")
    planted = tmp_path / "tmp" / f"{first.owner}.holds"
    planted.mkdir()
    (planted / "x").touch()
    with pytest.raises(Refused, match="could not record in the store that it holds"):
        first.hold(sha)
    assert first._holds.held_here() == set()
    second.close()
    second._locks.owner_file.close()
    first.hold(sha)  # alone now: logged, and held here
    assert first._holds.held_here() == {sha}
