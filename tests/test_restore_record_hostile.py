"""A restore record that cannot be read does not stop the server (red team round 9, L3):
`5` crashed the start with a TypeError, and a record that was not JSON, empty or a symlink
made it refuse to start. Replicas share the record, so one bad file stopped every one of
them. Now nothing is restored, the file is kept aside for its owner, and the server
serves and records anew."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_restore import X, load, mlp, saved

from conftest import reference
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running

RECORD = "hosted-models.json"


def symlinked(path: Path) -> None:
    """The record moved elsewhere, and a symlink to it in its place."""
    elsewhere = path.with_name("elsewhere.txt")
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


BAD: dict[str, Callable[[Path], object]] = {
    "a number": lambda path: path.write_text("5"),
    "a number, wrapped": lambda path: path.write_text('{"value": 5, "pinned_blobs": []}'),
    "an object": lambda path: path.write_text('{"m": 1}'),
    "not JSON": lambda path: path.write_text("[{"),
    "empty": lambda path: path.write_text(""),
    "a symlink to a good record": symlinked,
}
UNKNOWN_PINS = {"not JSON", "empty", "a symlink to a good record"}


@pytest.mark.parametrize("spoil", list(BAD), ids=list(BAD))
def test_an_unreadable_record_restores_nothing_and_is_kept_aside(
    settings: Settings, spoil: str, caplog: pytest.LogCaptureFixture
) -> None:
    restoring = dataclasses.replace(settings, restore=True)
    store = settings.store
    model = mlp(1)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        client.save_checkpoint("other", saved(mlp(2)))
        load(client)
    BAD[spoil](store / RECORD)
    spoiled = (store / RECORD).read_bytes() if not (store / RECORD).is_symlink() else None
    with (
        caplog.at_level(logging.ERROR, "modelhost.server.restore"),
        running(restoring) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        assert client.list_models() == []
        (aside,) = store.glob("hosted-models.unreadable-*.json")
        assert "the restore record cannot be read" in caplog.text and aside.name in caplog.text
        if spoiled is not None:
            assert aside.read_bytes() == spoiled  # kept as it was, for its owner to mend
        # Unless it is JSON, what it pins is unknown: no checkpoint bytes go while it is there.
        other = client.get_checkpoint("other").sha256
        client.delete_checkpoint("other")
        assert (store / "blobs" / other).exists() == (spoil in UNKNOWN_PINS)
        load(client, "again")  # the server serves, and records anew
        np.testing.assert_allclose(client.predict("again", X), reference(model, X), rtol=1e-5)
        aside.unlink()
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert [m.name for m in client.list_models()] == ["again"]
        assert not (store / "blobs" / other).exists()  # a start removes unused bytes
        np.testing.assert_allclose(client.predict("again", X), reference(model, X), rtol=1e-5)


def test_a_record_another_server_mended_meanwhile_is_read_not_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Between a start's failed read of the record and its move aside, another server
    sharing the store may write a readable one (red team 10, S1: that good record was set
    aside as unreadable). The move looks again under the store's lock: a record that
    reads now stays, and is what the start restores from."""
    from modelhost.server.restore import HOSTED_STATE, RestoreRecord
    from modelhost.server.store import CheckpointStore

    store = CheckpointStore(tmp_path / "store")
    (tmp_path / "store" / RECORD).write_text("[{")
    real_read = store.read_state

    def read_then_mended(name: str) -> object:
        try:
            return real_read(name)
        finally:  # another server writes a readable record right after this read
            store.read_state = real_read  # type: ignore[method-assign]
            store.write_state(HOSTED_STATE, [])

    store.read_state = read_then_mended  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "modelhost.server.restore"):
        assert RestoreRecord(store, formats=None, enabled=True).read() == []  # type: ignore[arg-type]
    assert not list((tmp_path / "store").glob("hosted-models.unreadable-*"))
    assert "cannot be read" not in caplog.text
    assert store.read_state(HOSTED_STATE) == []
    (tmp_path / "store" / RECORD).write_text("[{")  # unreadable when looked at again: aside
    assert RestoreRecord(store, formats=None, enabled=True).read() == []  # type: ignore[arg-type]
    assert len(list((tmp_path / "store").glob("hosted-models.unreadable-*"))) == 1
    store.close()


SERVED: dict[str, tuple[object, bool]] = {
    # case: (what the entry says it served as, whether that is logged as ignored)
    "bool": ({"dtype": "DATA_TYPE_BOOL"}, False),  # no dtype a version serves in
    "no-such-dtype": ({"dtype": "no such type"}, True),
    "negative-dim": ({"inputs": [{"name": "x", "shape": [-7]}]}, True),
    "rank-10": ({"outputs": [{"name": "y", "shape": list(range(1, 11))}]}, True),
    "no-dtype": ({"page_ins": 1}, True),
    # Fields it does not use, or does not know (a newer server's record), are skipped.
    "more-fields": ({"dtype": "DATA_TYPE_FLOAT32", "page_ins": 1, "added_later": True}, False),
    "negative-bytes": ({"dtype": "DATA_TYPE_FLOAT32", "device_bytes": "-5"}, True),
    "float-bytes": ({"dtype": "DATA_TYPE_FLOAT32", "device_bytes": 5.5}, True),
    "word-bytes": ({"dtype": "DATA_TYPE_FLOAT32", "device_bytes": "lots"}, True),
    "huge-bytes": ({"dtype": "DATA_TYPE_FLOAT32", "device_bytes": str(1 << 70)}, True),
    "a-list": (["not", "an", "object"], True),
}


@pytest.mark.parametrize("case", list(SERVED), ids=list(SERVED))
def test_what_an_entry_says_its_version_served_as_is_checked(
    settings: Settings, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry's "served" facts that are not ModelInfo JSON of a dtype, inputs, outputs
    and device bytes a version can have are ignored (logged), and the version restores
    without them, at the store tier, built from its skeleton at its first request."""
    served, ignored = SERVED[case]
    restoring = dataclasses.replace(settings, restore=True, device_memory_budget=1 << 20)
    model = mlp(3)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        load(client)
    record = json.loads((settings.store / RECORD).read_text())
    (entry,) = record["value"]
    weights = str(4 * (4 * 8 + 8 + 8 * 3 + 3))  # mlp's, with no warm-up: all it holds
    assert entry["served"] == {
        "dtype": "DATA_TYPE_FLOAT32",
        "device_bytes": weights,
        "device": "cpu",
    }
    entry["served"] = served
    (settings.store / RECORD).write_text(json.dumps(record))
    with (
        caplog.at_level(logging.ERROR, "modelhost.server.restore"),
        running(restoring) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        info = client.get_model("m")
        assert (info.tier, info.dtype, info.inputs, info.outputs) == ("store", "float32", (), ())
        logged = "ignoring the entry's 'served'" in caplog.text
        assert logged == ignored, caplog.text
        np.testing.assert_allclose(client.predict("m", X), reference(model, X), rtol=1e-5)


BUDGET = 1 << 20


def hosted_then_recorded(
    restoring: Settings, model: torch.nn.Module, served: dict[str, str], *, pinned: bool = False
) -> int:
    """Hosts `model` as "m" (and, if `pinned`, a pinned "p" of the same checkpoint), then
    changes what the record says "m" served as by `served`; returns "m"'s device bytes."""
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", saved(model))
        load(client)
        if pinned:
            client.load_model("p", architecture="tiny_mlp", checkpoint="w", residency="pinned")
        weights: int = client.get_model("m").device_bytes
    record = json.loads((restoring.store / RECORD).read_text())
    record["value"][0]["served"] |= served
    (restoring.store / RECORD).write_text(json.dumps(record))
    return weights


@pytest.mark.parametrize("pinned", [False, True], ids=["alone", "beside-a-pinned-one"])
def test_device_bytes_an_entry_says_beyond_the_budget_are_held_to_it(
    settings: Settings, pinned: bool
) -> None:
    """A restored version reserves at its first page-in what its entry says it held
    (red team 16, F8). An entry that says more than the device's budget (written under a
    larger one, on another replica's GPU, or edited) does not make it not fit: it counts
    the budget at most until its build measures what it really holds, and where pinned
    versions leave less than that, it reserves its weights and is built (review 19, 1:
    it could never be built). A record written meanwhile keeps what the entry said
    (review 19, 2: the cap here is no cap at the next start)."""
    model, said = mlp(3), str(1 << 50)
    restoring = dataclasses.replace(settings, restore=True, device_memory_budget=BUDGET)
    weights = hosted_then_recorded(restoring, model, {"device_bytes": said}, pinned=pinned)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        info = client.get_model("m")
        assert (info.tier, info.device_bytes) == ("store", BUDGET)
        client.save_checkpoint("w2", saved(mlp(4)))
        load(client, "other", "w2")  # writes the record
        (entry, *_) = json.loads((settings.store / RECORD).read_text())["value"]
        assert entry["served"]["device_bytes"] == said
        np.testing.assert_allclose(client.predict("m", X), reference(model, X), rtol=1e-5)
        info = client.get_model("m")
        assert (info.device_bytes, info.page_ins) == (weights, 1)


def test_device_bytes_measured_on_another_kind_of_device_are_not_counted(
    settings: Settings,
) -> None:
    """What a version held on a GPU (its allocator's peak) says nothing of what it holds
    on the CPU (review 19, 2): a version restored onto another kind of device than its
    record names counts its weights until its build measures its workspace."""
    model, weights = mlp(3), 4 * (4 * 8 + 8 + 8 * 3 + 3)
    restoring = dataclasses.replace(settings, restore=True, device_memory_budget=BUDGET)
    on_a_gpu = {"device": "cuda:0", "device_bytes": str(weights + 4096)}
    assert hosted_then_recorded(restoring, model, on_a_gpu) == weights
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        assert client.get_model("m").device_bytes == weights
        np.testing.assert_allclose(client.predict("m", X), reference(model, X), rtol=1e-5)
