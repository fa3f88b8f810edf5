"""Third red-team round: what LoadModel's arguments could make the server build, and what
a version answers after it is built again."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect, reference
from helpers.memory import peak_growth_mib
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running

IA = grpc.StatusCode.INVALID_ARGUMENT
X = np.ones((2, 4), np.float32)


def refused_cheaply(call: object, code: grpc.StatusCode, *words: str) -> None:
    """`call` fails with `code` naming `words`, and the server's memory rose by under
    200 MiB meanwhile (building what was asked would take gigabytes)."""
    growth = peak_growth_mib(lambda: expect(code, call, *words))  # type: ignore[arg-type]
    assert growth < 200, f"peak memory rose by {growth} MiB"


def refused_load(
    client: ModelHostClient,
    architecture: str,
    args: dict[str, Any],
    code: grpc.StatusCode,
    *words: str,
    strict: bool = True,
) -> None:
    """A LoadModel of `architecture` with `args` (and a tiny_mlp's weights) is refused
    cheaply, with `code` naming `words`."""
    client.save_checkpoint("w", build("tiny_mlp").state_dict(), overwrite=True)
    load = partial(
        client.load_model,
        "m",
        architecture=architecture,
        checkpoint="w",
        architecture_args=args,
        strict=strict,
    )
    refused_cheaply(load, code, *words)


def test_a_model_that_cannot_be_built_on_the_meta_device_allocates_no_weights(
    client: ModelHostClient,
) -> None:
    """regnet computes its widths with tensors, so it cannot be built on the meta device
    alone; it was built for real on the CPU before any check: 3.5 GB for 2M classes."""
    refused_load(client, "regnet_y_400mf", {"num_classes": 2_000_000}, IA, "does not fit")
    assert client.list_models() == []


def test_arguments_that_build_a_million_layers_are_refused(client: ModelHostClient) -> None:
    """19 bytes of arguments asked mobilenet_v2 for 30,000 blocks: 88 s of CPU and 2 GB."""
    setting = {"inverted_residual_setting": [[1, 16, 30000, 1]]}
    refused_load(client, "mobilenet_v2", setting, IA, "makes more than 20000 tensors")


@pytest.fixture
def budgeted(settings: Settings) -> Iterator[Server]:
    """Room on the CPU for one tiny_mlp (268 bytes), not two."""
    with running(dataclasses.replace(settings, device_memory_budget=400)) as server:
        yield server


def test_a_partial_checkpoint_is_checked_against_the_budget_before_it_is_built(
    budgeted: Server,
) -> None:
    """strict=False builds the model for real (what the checkpoint lacks is initialised):
    the budget is asked first, so a load that cannot fit allocates nothing."""
    with ModelHostClient(budgeted.target, timeout=60) as client:
        refused_load(
            client,
            "squeezenet1_1",
            {"num_classes": 1_000_000},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "--device-memory-budget",
            strict=False,
        )


def test_what_a_partial_checkpoint_lacks_is_the_same_after_a_page_in_and_a_restart(
    settings: Settings,
) -> None:
    """strict=False initialises the missing layers at random: every build of the same
    bytes (a page-in from the store, a restart) must initialise them the same way, or the
    version answers differently afterwards."""
    model = build("tiny_mlp")
    partial = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    restoring = dataclasses.replace(settings, device_memory_budget=400, restore=True)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("partial", partial)
        client.save_checkpoint("other", model.state_dict())
        info = client.load_model("p", architecture="tiny_mlp", checkpoint="partial", strict=False)
        assert sorted(info.missing_keys) == ["2.bias", "2.weight"]
        before = client.predict("p", X)
        client.load_model("o", architecture="tiny_mlp", checkpoint="other")  # p leaves
        assert client.get_model("p").tier == "store"
        np.testing.assert_array_equal(client.predict("p", X), before)
        assert client.get_model("p").page_ins == 1
        np.testing.assert_allclose(client.predict("o", X), reference(model, X), rtol=1e-6)
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        np.testing.assert_array_equal(client.predict("p", X), before)


def test_the_same_missing_layers_differ_between_different_weights(client: ModelHostClient) -> None:
    """The seed comes from the bytes: two partial checkpoints do not share one init."""
    first = {k: v for k, v in build("tiny_mlp", seed=1).state_dict().items() if k < "2"}
    second = {k: v for k, v in build("tiny_mlp", seed=2).state_dict().items() if k < "2"}
    for name, state in (("a", first), ("b", second)):
        client.save_checkpoint(name, state)
        client.load_model(name, architecture="tiny_mlp", checkpoint=name, strict=False)
    snap_a = client.snapshot("a", "snap-a")
    snap_b = client.snapshot("b", "snap-b")
    a = client.download_checkpoint(snap_a.name)
    b = client.download_checkpoint(snap_b.name)
    assert not torch.equal(a["2.weight"], b["2.weight"])


def test_labels_are_bounded_in_total(client: ModelHostClient) -> None:
    client.save_checkpoint("w", build("tiny_mlp").state_dict())
    expect(
        IA,
        lambda: client.load_model(
            "m", architecture="tiny_mlp", checkpoint="w", labels=["x" * 1000] * 5000
        ),
        "5,000,000 bytes",
        "at most 4,194,304",
    )


def test_a_load_that_would_outgrow_the_restore_record_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is read back at the next start with a size limit: a LoadModel whose
    entry would take it past that limit is refused (and undone), or the next start would
    fail, for every replica sharing the store."""
    from modelhost.server import store

    monkeypatch.setattr(store, "MAX_STATE_BYTES", 50_000)
    restoring = dataclasses.replace(settings, restore=True)
    model = build("tiny_mlp")
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", model.state_dict())
        client.load_model("a", architecture="tiny_mlp", checkpoint="w")
        expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: client.load_model(
                "b", architecture="tiny_mlp", checkpoint="w", labels=["y" * 1000] * 60
            ),
            "record would take",
            "the limit is 50,000",
        )
        assert [m.name for m in client.list_models()] == ["a"]
    with running(restoring) as server, ModelHostClient(server.target, timeout=60) as client:
        np.testing.assert_allclose(client.predict("a", X), reference(model, X), rtol=1e-6)


def test_an_unreadable_state_document_keeps_every_blob(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """What an unreadable state document pins is unknown: the start's clean-up removes no
    blob then (it would have removed those the document pins)."""
    blob = settings.store / "blobs" / ("ab" * 32)
    with running(settings):
        pass
    blob.write_bytes(b"pinned by a record we cannot read")
    (settings.store / "other-state.json").write_text("[" * 100_000)
    with running(settings):
        assert blob.exists()
    assert "other-state.json is unreadable: unreferenced blobs are kept" in caplog.text
    (settings.store / "other-state.json").unlink()
    with running(settings):
        assert not blob.exists()


def test_two_authorization_headers_are_refused(settings: Settings, tmp_path: Path) -> None:
    """Which of two a proxy meant is not ours to guess: the first no longer decides."""
    from modelhost.v1 import modelhost_pb2 as pb
    from modelhost.v1 import modelhost_pb2_grpc

    (tmp_path / "tokens").write_text("good-token\n")
    guarded = dataclasses.replace(settings, token_file=str(tmp_path / "tokens"))
    with running(guarded) as server, grpc.insecure_channel(server.target) as channel:
        stub = modelhost_pb2_grpc.ModelHostStub(channel)
        good = ("authorization", "Bearer good-token")
        assert stub.ListModels(pb.ListModelsRequest(), metadata=[good], timeout=10) is not None
        for headers in ([good, ("authorization", "Bearer other")], [good, good]):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListModels(pb.ListModelsRequest(), metadata=headers, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_unknown_residency_is_refused(server: Server) -> None:
    from modelhost.v1 import modelhost_pb2 as pb
    from modelhost.v1 import modelhost_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        request = pb.LoadModelRequest(
            name="m",
            architecture="tiny_mlp",
            checkpoint="w",
            residency=99,  # type: ignore[arg-type]
        )
        with pytest.raises(grpc.RpcError) as refused:
            modelhost_pb2_grpc.ModelHostStub(channel).LoadModel(request, timeout=10)
        assert refused.value.code() == IA
        assert "residency 99 is not a Residency" in str(refused.value.details())
